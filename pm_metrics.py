"""
The preference model's evaluation metrics, as plain numpy functions of score arrays, so that each one
can be checked by hand (tests/test_reward.py) and reused by anything that scores comparisons:

  - pairwise accuracy with a Wilson 95% interval,
  - calibration of P(chosen) = sigmoid(r_c - r_r) and its expected calibration error (Guo et al. 2017),
  - robustness of two PMs trained on disjoint halves: the KL between their standardised score
    distributions and their agreement by score decile (Bai et al. 2022, sec. 4.5),
  - a bag-of-tokens logistic regression on the same comparisons: the lexical reference a transformer
    PM should reach (at a few hundred pairs it is hard to beat),
  - pm_report: all of them for eval.json's "pm" section, and format_report: that section as text.

reward.py computes the scores and this file turns them into numbers; its last section, evaluate_pms,
runs PM-A and PM-B over a test split to get them (`rlhf.py eval --eval.pm_only=true` on any directory).
"""
import json
import math
import os

import numpy as np

from data import DataError, read_pairs, resolve_data_dir, train_comparisons
from reward import encode_pairs, load_reward_model, pm_block, score_pairs
from runtime import pick_device


def pair_accuracy(r_chosen, r_rejected):
    """Fraction of pairs where the chosen reply scores higher; ties count one half."""
    d = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)
    return float(np.mean((d > 0) + 0.5 * (d == 0))) if len(d) else float("nan")


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a binomial proportion k/n.

    Better than the normal approximation at small n or p near 0/1 (Wilson 1927). With 300
    test pairs the half-width is ~5.5 points: differences smaller than that are noise.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (center - half, center + half)


def calibration(probs, labels, n_bins=10):
    """Reliability diagram and expected calibration error (ECE).

    Bins predicted probabilities into n_bins equal-width bins on [0, 1]; each bin reports the
    mean prediction and the observed frequency of label 1. ECE = sum_b n_b/N |conf_b - freq_b|
    (Guo et al. 2017). For a PM, pass each test pair in both orders: p = sigmoid(r_c - r_r)
    with label 1 and 1 - p with label 0 (as Bai et al. 2022 plot it), otherwise every label is 1.
    Returns (bins: list of {lo, hi, n, conf, freq}, ece).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = np.clip((probs * n_bins).astype(int), 0, n_bins - 1)  # p = 1.0 goes in the last bin
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        conf = float(probs[sel].mean()) if n else None
        freq = float(labels[sel].mean()) if n else None
        if n:
            ece += n / len(probs) * abs(conf - freq)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n, "conf": conf, "freq": freq})
    return bins, float(ece)


def standardize(x):
    """Zero mean, unit (population) std: makes two PMs' arbitrary score scales comparable."""
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / (x.std() + 1e-8)


def score_kl(scores_a, scores_b, n_bins=20, lim=4.0, alpha=1.0):
    """KL(P_A || P_B) in nats between two PMs' standardised score distributions.

    Each score list (same replies, any scale) is standardised, then histogrammed on n_bins
    equal bins over [-lim, lim] (values outside are clipped into the edge bins). alpha is
    add-alpha (Laplace) smoothing: every bin gets alpha pseudo-counts so an empty bin in P_B
    does not make the KL infinite. 0 means the two PMs spread the replies the same way.
    """
    edges = np.linspace(-lim, lim, n_bins + 1)
    ha = np.histogram(np.clip(standardize(scores_a), -lim, lim), bins=edges)[0] + alpha
    hb = np.histogram(np.clip(standardize(scores_b), -lim, lim), bins=edges)[0] + alpha
    p, q = ha / ha.sum(), hb / hb.sum()
    return float(np.sum(p * np.log(p / q)))


def logistic_fit(X, y, penalty, steps=100):
    """The maximum-likelihood weights w of P(verdict) = sigmoid(X w), verdicts y in [0, 1] (a tie counts 1/2), by
    Newton's method on the log-likelihood with a ridge: `penalty` (D, D) is added to the Hessian, so a separable
    set (one side wins every comparison) still has a finite answer. X (M, D), y (M,) -> w (D,). Used by the
    length-controlled win rate and the Bradley-Terry fit of the Elo table (evaluate.py)."""
    w = np.zeros(X.shape[1])
    for _ in range(steps):  # converges in ~10
        p = 1 / (1 + np.exp(-X @ w))
        step = np.linalg.solve(X.T @ (X * (p * (1 - p))[:, None]) + penalty, X.T @ (y - p) - penalty @ w)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return w


def bradley_terry(first, second, y, n_players, dlen=None, ridge=1e-3):
    """Strengths s (log-odds, s[0] = 0: player 0 is the reference) of the Bradley-Terry model
    P(first beats second) = sigmoid(s[first] - s[second] + gamma * dlen / sd(dlen)), fitted to verdicts y (M,)
    of comparisons between players first (M,) and second (M,). With dlen (M,), the first reply's length minus the
    second's, gamma takes out what length explains and s is each player's strength at equal length. A ridge of
    ridge * M on every weight keeps the fit finite when a player wins or loses every comparison (it shrinks the
    strengths by about 4 ridge, 0.4%). Returns (s (n_players,), gamma); Elo = s * 400 / ln 10 (HH fig. 1)."""
    M = len(y)
    X = np.zeros((M, n_players))
    np.add.at(X, (np.arange(M), first), 1.0)
    np.add.at(X, (np.arange(M), second), -1.0)
    X = X[:, 1:]
    if dlen is not None:
        X = np.column_stack([X, dlen / (dlen.std() or 1.0)])
    w = logistic_fit(X, np.asarray(y, dtype=np.float64), ridge * M * np.eye(X.shape[1]))
    return np.concatenate([[0.0], w[:n_players - 1]]), float(w[-1]) if dlen is not None else 0.0


def bootstrap(stat, n, reps=200, seed=0):
    """stat(idx) for `reps` resamples idx (n,) of range(n) with replacement: the spread of a statistic over the
    independent units it is computed from (test pairs here, test prompts in evaluate.py). -> (reps,) array."""
    rng = np.random.default_rng(seed)
    return np.array([stat(rng.integers(0, n, n)) for _ in range(reps)])


def score_kl_ci(a_c, a_r, b_c, b_r, reps=200):
    """A 95% basic-bootstrap interval of score_kl(A, B) over the test pairs (each pair's two replies go together).

    The histogram KL of a finite sample is biased upward: noise alone puts the two histograms apart, so two PMs
    with the same score distribution (KL 0) get a KL above 0, and the resampled KLs sit higher still (a
    percentile interval, their 2.5th to 97.5th percentiles, then lies above the estimate and misses a KL of 0).
    The basic bootstrap (Davison & Hinkley 1997, sec. 5.2.1) takes the resampled KLs' spread about the estimate,
    kl* - kl, for that of the estimate about the truth, kl - KL, and reflects it: [2 kl - q97.5, 2 kl - q2.5],
    cut at 0 (a KL is never negative). What it covers: the KL between the two PMs' standardised score
    distributions on the population the test pairs are drawn from, binned and smoothed as score_kl does at this
    number of pairs (the add-alpha smoothing shrinks a KL, the more so the fewer the pairs): compare intervals
    from the same test set only. Where the bias is large, the estimate itself lies near the top of its interval."""
    a, b = np.stack([a_c, a_r], 1), np.stack([b_c, b_r], 1)                              # (N, 2)
    kl = score_kl(a.ravel(), b.ravel())
    kls = bootstrap(lambda idx: score_kl(a[idx].ravel(), b[idx].ravel()), len(a), reps)
    return [max(0.0, 2 * kl - float(np.percentile(kls, 97.5))), max(0.0, 2 * kl - float(np.percentile(kls, 2.5)))]


def decile_agreement(a_chosen, a_rejected, b_chosen, b_rejected, n_bins=10):
    """How often PM-A and PM-B agree on which reply of a pair is better, by score decile.

    Pairs are binned by deciles of their mean standardised PM-A score. Bai et al. 2022 (robustness
    study) find the two PMs agree less at high scores: the region RL pushes the policy into, where
    the reward is least trustworthy. Returns a list of {decile, n, mean_score, agreement}.
    """
    a_c, a_r, b_c, b_r = (np.asarray(x, dtype=np.float64) for x in (a_chosen, a_rejected, b_chosen, b_rejected))
    z = standardize(np.concatenate([a_c, a_r]))
    level = (z[:len(a_c)] + z[len(a_c):]) / 2                   # (N,) mean PM-A score of each pair
    agree = np.sign(a_c - a_r) == np.sign(b_c - b_r)           # (N,)
    order = np.argsort(level, kind="stable")
    out = []
    for d, sel in enumerate(np.array_split(order, n_bins)):
        if len(sel):
            out.append({"decile": d, "n": len(sel), "mean_score": float(level[sel].mean()),
                        "agreement": float(agree[sel].mean())})
    return out


def bag_of_tokens_baseline(train, val, test, lams=(1e-3, 1e-2, 0.1, 0.3, 1.0), max_features=2000, max_pairs=5000):
    """Test accuracy of an L2-regularised logistic regression on bags of reply tokens.

    The classic text-classification baseline, fitted on the same comparisons as the PM: a pair's
    features are f(chosen) - f(rejected), with f = token presence (the max_features most common
    tokens of the training replies) plus log(1 + length), and P(chosen) = sigmoid(w . x) (no bias:
    swapping the replies flips the prediction). Fitted exactly by Newton's method for each strength
    in lams; the one with the lowest validation log-loss is kept. A transformer PM below it has
    not yet learnt more than which words appear. train/val/test: [(chosen_ids, rejected_ids)] of the
    replies alone (at most max_pairs of train are used: the full dataset's half A would need minutes).
    Returns {"accuracy", "accuracy_ci", "l2", "features", "train_pairs"}.
    """
    train = train[:max_pairs]
    counts = {}
    for c, r in train:
        for t in set(c) | set(r):
            counts[t] = counts.get(t, 0) + 1
    vocab = {t: i for i, t in enumerate(sorted(counts, key=lambda t: (-counts[t], t))[:max_features])}

    def features(pairs):  # (N, F + 1)
        X = np.zeros((len(pairs), len(vocab) + 1))
        for i, (c, r) in enumerate(pairs):
            for sign, ids in ((1, c), (-1, r)):
                X[i, [vocab[t] for t in set(ids) if t in vocab]] += sign
                X[i, -1] += sign * math.log1p(len(ids))
        return X

    X, X_val, X_test = features(train), features(val), features(test)
    best = None
    for lam in lams:  # minimise mean log(1 + exp(-X w)) + lam/2 |w|^2: convex, so Newton converges fast
        w = np.zeros(X.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-(X @ w)))                                  # (N,) P(chosen)
            grad = X.T @ (p - 1) / len(X) + lam * w
            hess = (X.T * (p * (1 - p))) @ X / len(X) + lam * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-6:
                break
        val_loss = float(np.mean(np.logaddexp(0.0, -(X_val @ w)))) if len(val) else 0.0
        if best is None or val_loss < best[0]:
            best = (val_loss, lam, w)
    _, lam, w = best
    acc = pair_accuracy(X_test @ w, np.zeros(len(test)))
    return {"accuracy": acc, "accuracy_ci": list(wilson_interval(acc * len(test), len(test))), "l2": lam,
            "features": len(vocab) + 1, "train_pairs": len(train)}


def by_group(groups, a_c, a_r, b_c, b_r, length):
    """{group: {n, accuracy (PM-A), heldout_pm_accuracy (PM-B), length_baseline}} over the test pairs of each
    value of `groups` (one label a pair, e.g. its subset), in sorted order: does a PM hold up on every kind?"""
    groups = np.asarray(groups)
    return {str(g): {"n": int((groups == g).sum()), "accuracy": pair_accuracy(a_c[groups == g], a_r[groups == g]),
                     "heldout_pm_accuracy": pair_accuracy(b_c[groups == g], b_r[groups == g]),
                     "length_baseline": pair_accuracy(length[0][groups == g], length[1][groups == g])}
            for g in sorted(set(groups.tolist()))}


def pm_report(n_turns, len_c, len_r, a_c, a_r, b_c, b_r, n_bins=10, subsets=None):
    """Every PM metric of the eval.json "pm" section, from test-pair scores of PM-A and PM-B (raw)
    and the reply lengths (tokens), human-turn counts and hh-rlhf subsets (harmless-base, helpful-base, ...)
    of the same pairs."""
    n = len(a_c)

    def acc_ci(c, r):
        acc = pair_accuracy(c, r)
        return acc, list(wilson_interval(acc * n, n))

    def calib(c, r):  # each pair in both orders, so both labels occur
        p = 1 / (1 + np.exp(-(np.asarray(c) - np.asarray(r))))
        return calibration(np.concatenate([p, 1 - p]), np.concatenate([np.ones(n), np.zeros(n)]), n_bins)

    length = (-np.asarray(len_c), -np.asarray(len_r))  # the shorter reply wins
    out = {"test_pairs": n}
    out["accuracy"], out["accuracy_ci"] = acc_ci(a_c, a_r)
    out["heldout_pm_accuracy"], out["heldout_pm_accuracy_ci"] = acc_ci(b_c, b_r)
    out["length_baseline_accuracy"], out["length_baseline_accuracy_ci"] = acc_ci(*length)
    longer = length[0] < length[1]  # pairs where "shorter wins" is wrong: did the PM learn more than length?
    out["accuracy_chosen_longer"] = {"n": int(longer.sum()), "accuracy": pair_accuracy(a_c[longer], a_r[longer]),
                                     "heldout_pm_accuracy": pair_accuracy(b_c[longer], b_r[longer])}
    out["accuracy_by_turns"] = by_group([str(t) if t < 4 else "4+" for t in n_turns], a_c, a_r, b_c, b_r, length)
    if subsets is not None:
        out["by_subset"] = by_group(subsets, a_c, a_r, b_c, b_r, length)
    out["calibration"], out["ece"] = calib(a_c, a_r)
    out["heldout_pm_calibration"], out["heldout_pm_ece"] = calib(b_c, b_r)
    out["score_kl_a_b"] = score_kl(np.concatenate([a_c, a_r]), np.concatenate([b_c, b_r]))
    out["score_kl_a_b_ci"] = score_kl_ci(a_c, a_r, b_c, b_r)
    out["score_corr_a_b"] = float(np.corrcoef(np.concatenate([a_c, a_r]), np.concatenate([b_c, b_r]))[0, 1])
    out["agreement_a_b"] = float(np.mean(np.sign(a_c - a_r) == np.sign(b_c - b_r)))
    out["agreement_by_decile"] = decile_agreement(a_c, a_r, b_c, b_r)
    return out


def ci_str(acc, ci):
    """An accuracy and its interval as '57.5% [51.9, 63.0]'."""
    return f"{100 * acc:5.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_report(pm):
    """The summary `rlhf.py rm` and `eval` print, from eval.json's "pm" section."""
    if "bag_of_tokens_accuracy" in pm:
        bow = (f"{ci_str(pm['bag_of_tokens_accuracy'], pm['bag_of_tokens_accuracy_ci'])}   (logistic regression on "
               f"{pm['bag_of_tokens_train_pairs']} half-A pairs' reply tokens: the lexical reference)")
    else:
        bow = f"skipped: {pm.get('bag_of_tokens_skipped')}"
    longer = pm["accuracy_chosen_longer"]
    kl_lo, kl_hi = pm.get("score_kl_a_b_ci", [math.nan, math.nan])  # absent from eval.json files before it
    return (f"[rm] test pairs {pm['test_pairs']} ({pm['data_dir']})\n"
            f"  PM-A accuracy     {ci_str(pm['accuracy'], pm['accuracy_ci'])}   ECE {pm['ece']:.3f}\n"
            f"  PM-B accuracy     {ci_str(pm['heldout_pm_accuracy'], pm['heldout_pm_accuracy_ci'])}   "
            f"ECE {pm['heldout_pm_ece']:.3f}\n"
            f"  bag of tokens     {bow}\n"
            f"  length baseline   {ci_str(pm['length_baseline_accuracy'], pm['length_baseline_accuracy_ci'])}; on the "
            f"{longer['n']} pairs where the chosen reply is longer: PM-A {longer['accuracy']:.3f}, "
            f"PM-B {longer['heldout_pm_accuracy']:.3f}\n"
            f"  A vs B: score KL {pm['score_kl_a_b']:.3f} nats [{kl_lo:.3f}, {kl_hi:.3f}], "
            f"corr {pm['score_corr_a_b']:.2f}, "
            f"agreement {pm['agreement_a_b']:.2f}; by PM-A score decile: "
            + " ".join(f"{d['agreement']:.2f}" for d in pm["agreement_by_decile"])
            + "".join(f"\n  by {what} (n, PM-A, PM-B, length): " + ", ".join(
                f"{t}: ({d['n']}, {d['accuracy']:.2f}, {d['heldout_pm_accuracy']:.2f}, {d['length_baseline']:.2f})"
                for t, d in pm[key].items())
                      for what, key in (("human turns", "accuracy_by_turns"), ("subset", "by_subset")) if key in pm))


# ----------------------------------------------------------------------------------------------
# the evaluation: both PMs on a test split -> eval.json["pm"]

def update_eval_json(out_dir, pm):
    """Merge `pm` into out_dir/eval.json["pm"], keeping every other key ("policies", previous pm tables)."""
    path = os.path.join(out_dir, "eval.json")
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc["pm"] = {**doc.get("pm", {}), **pm}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)


def reply_pairs(pairs, tok):
    """[(chosen_ids, rejected_ids)] of the replies alone: their lengths and the bag-of-tokens baseline."""
    ids = tok.encode_batch([r for p in pairs for r in (p.chosen, p.rejected)])
    return list(zip(ids[0::2], ids[1::2]))


def evaluate_pms(run, rm_cfg, data_dir=None):
    """Score the test split of `data_dir` (default run.data_dir) with PM-A and PM-B from run.out_dir,
    print the summary, merge it into eval.json["pm"] and return it. No training: any hh-layout
    directory works (`rlhf.py eval --data_dir OTHER --eval.pm_only=true`)."""
    device = pick_device(run.device)
    data_dir = resolve_data_dir(data_dir or run.data_dir or None)
    pairs, _ = read_pairs(data_dir, "test", run.data)
    pm_a, tok, _ = load_reward_model(os.path.join(run.out_dir, "pm_a.pt"), device)
    pm_b, _, _ = load_reward_model(os.path.join(run.out_dir, "pm_b.pt"), device)
    ex = encode_pairs(pairs, tok, pm_block(pm_a, run.data), run.data.max_reply_tokens)
    a_c, a_r = score_pairs(pm_a, ex, tok.eos_id, rm_cfg.eval_batch_size, run.dtype)
    b_c, b_r = score_pairs(pm_b, ex, tok.eos_id, rm_cfg.eval_batch_size, run.dtype)
    test_replies = reply_pairs(pairs, tok)
    pm = pm_report([p.n_turns for p in pairs], [len(c) for c, _ in test_replies], [len(r) for _, r in test_replies],
                   a_c, a_r, b_c, b_r, subsets=[p.subset for p in pairs])
    pm["data_dir"] = str(data_dir)
    try:  # the lexical reference, fitted on half A of this directory's train split, as PM-A was
        _, val_pairs, (half_a, _) = train_comparisons(data_dir, run.data, rm_cfg.split_halves)
        bow = bag_of_tokens_baseline(reply_pairs(half_a, tok), reply_pairs(val_pairs, tok), test_replies)
        pm.update(bag_of_tokens_accuracy=bow["accuracy"], bag_of_tokens_accuracy_ci=bow["accuracy_ci"],
                  bag_of_tokens_train_pairs=bow["train_pairs"])
    except DataError as e:
        pm["bag_of_tokens_skipped"] = str(e)
    update_eval_json(run.out_dir, pm)
    print(format_report(pm))
    return pm
