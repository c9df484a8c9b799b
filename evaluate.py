"""
The final evaluation of every policy, and the reward-vs-sqrt(KL) frontier.

    python rlhf.py eval --preset cpu     # sft / bon / rs / ppo on held-out prompts -> eval.json, report.md

Each policy is scored on held-out test prompts by PM-A (the reward it was optimised against) and by
PM-B (a preference model trained on the other half of the comparisons, which no policy ever saw),
and placed on the reward-vs-sqrt(KL) plane of Gao et al. 2022: if PM-A keeps rising while PM-B stalls
or falls, the policy is overoptimising its proxy.

The file reads top to bottom: the frontier fits, then the `eval` stage (best-of-n's math is rs.py's).

References
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", sec. 2-3 (R_bon(d) = d(a - b d),
  R_RL(d) = d(a - b log d), d = sqrt(KL)).
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4.3 (reward is linear
  in sqrt(KL)).
"""

import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from actor_critic import sample_logprobs
from dpo import betas
from label import human_elo, read_decisions
from model import disable_dropout
from pm_metrics import bootstrap, bradley_terry, logistic_fit
from reward import load_reward_model, pm_reward_fn
from rs import best_of_n, bon_expected, bon_kl
from runtime import load_checkpoint, load_model, pick_device, set_seed
from sampling import reply_lengths, rl_prompts, sample_replies, score, strip_end


# ----------------------------------------------------------------------------------------------
# the math: reward-vs-KL frontier fits (least squares, numpy)

def _fit(form, features, r):
    """Least squares r ~ features @ (a, b): the fit as eval.json keeps it, with its root-mean-square residual."""
    X, y = np.asarray(features, dtype=np.float64), np.asarray(r, dtype=np.float64)
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    rmse = float(np.sqrt(np.mean((X @ w - y) ** 2)))
    return {"form": form, "a": float(w[0]), "b": float(w[1]), "rmse": rmse, "points": len(y)}


def fit_bon(d, r):
    """Gao et al. eq. 1, best-of-n: R(d) = d (a - b d), d = sqrt(KL), R = reward gain over the
    initial policy (R(0) = 0). Linear in (a, b): features [d, -d^2]."""
    d = np.asarray(d, dtype=np.float64)
    return _fit("d*(a - b*d)", np.stack([d, -d ** 2], 1), r)


def fit_rl(d, r):
    """Gao et al. eq. 2, RL: R(d) = d (a - b log d). Features [d, -d log d] (d log d -> 0 at d = 0)."""
    d = np.asarray(d, dtype=np.float64)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return _fit("d*(a - b*log(d))", np.stack([d, -dlogd], 1), r)


def fit_linear(d, r):
    """Bai et al. 2022 sec. 4.3: reward is roughly linear in sqrt(KL), R = a + b d."""
    d = np.asarray(d, dtype=np.float64)
    return _fit("a + b*d", np.stack([np.ones_like(d), d], 1), r)


@dataclass
class EvalConfig:
    """The final evaluation of sft / bon / rs / ppo on held-out test prompts."""
    num_prompts: int = 64        # test prompts (0 = all)
    n: int = 16                  # SFT samples per prompt for the SFT baseline, and n more for best-of-n to pick from
    max_new_tokens: int = 0      # reply length cap (0 = ppo.max_new_tokens, the length PPO trained with)
    policy_samples: int = 4      # samples per prompt for cd, rs, ppo and dpo (SFT and best-of-n use n)
    batch_size: int = 64         # sequences per generate / scoring call
    num_examples: int = 3        # prompts shown side by side in report.md
    frontier_windows: int = 8    # PPO training iterations are averaged into this many frontier points
    pm_only: bool = False        # only re-evaluate the preference models (pm_metrics.evaluate_pms)
    elo_labels: str = ""         # a decisions.jsonl of `rlhf.py label`: also the Elo of the policies people compared


# ----------------------------------------------------------------------------------------------
# stage eval: every policy on held-out prompts, the reward-vs-sqrt(KL) frontier, the report

def win_rate(policy_scores, sft_scores):
    """P(judge prefers the policy's reply to an SFT reply to the same prompt), ties counted half:
    every policy sample against every SFT sample. policy_scores (P, k), sft_scores (P, n) -> float."""
    diff = policy_scores[:, :, None] - sft_scores[:, None, :]                          # (P, k, n)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def lc_win_rate(policy_scores, sft_scores, policy_lengths, sft_lengths, ridge=1e-3):
    """The win rate vs SFT with reply length taken out (the idea of AlpacaEval 2's length-controlled win rate,
    Dubois et al. 2024): a logistic regression of the judge's verdict on every (policy sample, SFT sample)
    pair of a prompt, P(policy wins) = sigmoid(theta + gamma * dlen / sd(dlen)), dlen = the policy reply's
    tokens minus the SFT reply's, fitted by Newton's method (ties count half; a small ridge on gamma keeps
    it finite when length alone decides). sigmoid(theta) is the win rate of a policy reply against an SFT
    reply of the same length. Scores and lengths (P, k) and (P, n) -> (lc win rate, gamma: the judge's
    log-odds per standard deviation of the length difference; < 0 = it prefers shorter replies).

    The degenerate cases, each the fit's own answer or its limit:
    - Every verdict the same: nothing is left for length to explain, so gamma = 0 and the LC win rate is that
      verdict, 1 when the policy wins every comparison, 0 when it loses every one, 0.5 when all tie. For all
      wins or all losses the likelihood has no maximum (theta -> +-inf, and Newton's steps end on a singular
      matrix once p (1 - p) underflows to 0), so the limit is returned directly. A bootstrap resample of a few
      prompts that the policy wins outright is such a case.
    - No spread in length (every pair the same length difference): length and quality cannot be told apart,
      the ridge gives it all to theta, gamma = 0, and the LC win rate is the raw one (the mean verdict)."""
    diff = (policy_scores[:, :, None] - sft_scores[:, None, :]).double()                    # (P, k, n)
    y = ((diff > 0).double() + 0.5 * (diff == 0).double()).flatten().numpy()
    if (y == y[0]).all():
        return float(y[0]), 0.0
    dlen = (policy_lengths[:, :, None] - sft_lengths[:, None, :]).double().flatten().numpy()
    X = np.stack([np.ones_like(dlen), dlen / (dlen.std() or 1.0)], 1)                      # (M, 2)
    w = logistic_fit(X, y, np.diag([0.0, ridge * len(y)]))
    return float(1 / (1 + np.exp(-w[0]))), float(w[1])


def elo_table(scores, lengths, reference="sft", reps=200, seed=0):
    """HH's Elo (fig. 1) of every policy from one judge: every reply of a policy against every reply of another to
    the same prompt, the higher score winning (a tie half), fitted as a Bradley-Terry model (pm_metrics), raw and
    with the length difference as a covariate (length-controlled), `reference` at 0; 95% intervals from a
    bootstrap over the prompts. scores, lengths: {name: (P, k)} -> {name: {elo, elo_ci, lc_elo, lc_elo_ci}}."""
    names = [reference] + [n for n in scores if n != reference]
    pairs = list(itertools.combinations(range(len(names)), 2))
    between = lambda x, i, j: (x[names[i]][:, :, None] - x[names[j]][:, None, :]).flatten(1).double().numpy()
    diffs = [between(scores, i, j) for i, j in pairs]           # per pair of players: (P, k_i * k_j) each
    verdicts, dlens = [(d > 0) + 0.5 * (d == 0) for d in diffs], [between(lengths, i, j) for i, j in pairs]

    def fit(idx):  # the prompts idx (a bootstrap resample, or all of them) -> Elo, raw then length-controlled
        first = np.concatenate([np.full(v[idx].size, i) for (i, _), v in zip(pairs, verdicts)])
        second = np.concatenate([np.full(v[idx].size, j) for (_, j), v in zip(pairs, verdicts)])
        y, dlen = (np.concatenate([x[idx].ravel() for x in xs]) for xs in (verdicts, dlens))
        raw, _ = bradley_terry(first, second, y, len(names))
        lc, _ = bradley_terry(first, second, y, len(names), dlen)
        return np.concatenate([raw, lc]) * 400 / math.log(10)

    P = len(verdicts[0])
    point, boot = fit(np.arange(P)), bootstrap(fit, P, reps, seed)  # (2 N,), (reps, 2 N)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    N = len(names)
    return {name: {"elo": round(point[k], 1), "elo_ci": [round(lo[k], 1), round(hi[k], 1)],
                   "lc_elo": round(point[N + k], 1), "lc_elo_ci": [round(lo[N + k], 1), round(hi[N + k], 1)]}
            for k, name in enumerate(names)}


def prompt_se(scores):
    """Standard error of the mean score over prompts, scores (P, k): the spread of the per-prompt means
    over sqrt(P). Samples of one prompt are correlated, so the P prompts are the independent draws."""
    per_prompt = scores.double().mean(1)                                               # (P,)
    return float(per_prompt.std() / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")


def prompt_bootstrap_se(stat, *arrays, reps=200, seed=0):
    """Standard error of stat(*arrays) over the test prompts: the spread of stat over `reps` resamples of the P
    prompts (every array's first axis) with replacement. A win rate pairs each policy reply with every SFT reply
    to the same prompt, so its M = P * k * n verdicts are far from independent: the prompts are the draws."""
    values = bootstrap(lambda idx: stat(*(x[torch.as_tensor(idx)] for x in arrays)), arrays[0].size(0), reps, seed)
    return float(np.std(values, ddof=1))


def policy_row(a, b, policy_len, sft_len, kl, sft_b, T):
    """One policy's eval.json entry from its PM-A and PM-B scores a, b (P, k), reply lengths (P, k), KL to SFT,
    and SFT's PM-B scores (P, n) and lengths: rewards, win rates vs SFT under PM-B (raw and length-controlled),
    each with its standard error over prompts."""
    lc, coef = lc_win_rate(b, sft_b, policy_len, sft_len)
    return {"pm_reward": a.mean().item(), "pm_reward_se": prompt_se(a),
            "heldout_pm_reward": b.mean().item(), "heldout_pm_reward_se": prompt_se(b), "kl": kl,
            "win_rate_vs_sft": win_rate(b, sft_b), "win_rate_se": prompt_bootstrap_se(win_rate, b, sft_b),
            "lc_win_rate_vs_sft": lc, "lc_win_rate_se": prompt_bootstrap_se(lambda *x: lc_win_rate(*x)[0], b, sft_b,
                                                                              policy_len, sft_len),
            "judge_length_coef": coef, "mean_reply_tokens": policy_len.mean().item(), "temperature": T}


def ppo_config(out_dir):
    """The config PPO trained with (stored in ppo.pt), {} before PPO has run."""
    path = os.path.join(out_dir, "ppo.pt")
    return load_checkpoint(path).get("config", {}) if os.path.exists(path) else {}


def rl_temperature(out_dir, ppo_cfg):
    """The temperature every policy is sampled and its KL measured at: the one PPO trained at (stored in
    ppo.pt; --ppo.temperature before PPO has run). It is the distribution PPO's KL penalty anchored to,
    the one the PM normaliser centres, and best-of-n's analytic KL holds for it as for any base policy."""
    stored = ppo_config(out_dir).get("temperature")
    return float(ppo_cfg.temperature if stored is None else stored)


def ppo_frontier(out_dir, windows, debiased=False):
    """PPO's path on the frontier, from its metrics.jsonl rows (PM-A, ppo/pm_b, ppo/kl on the training rollouts),
    averaged into `windows` consecutive chunks of iterations. Rows of a previous, forced-over run are dropped: the
    current run is the one after the last iteration-0 row. pm_a is raw PM-A, the unit of best-of-n's curve and the
    final points: ppo/pm_a, or, when PPO's reward was the length-debiased PM-A (--ppo.length_debias, which logs
    that reward as ppo/pm_a), ppo/pm_a_raw, with the debiased reward kept as pm_a_debiased. A debiased run
    (`debiased`) whose rows hold no raw PM-A (logged before PPO logged it) gets pm_a NaN: no point, no fit."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [r for r in map(json.loads, open(path)) if r.get("stage") == "ppo" and "ppo/pm_b" in r]
    starts = [i for i, r in enumerate(rows) if r["step"] == 0]
    rows = list({r["step"]: r for r in rows[starts[-1] if starts else 0:]}.values())  # last row per step
    if not rows:
        return []
    debiased = debiased or "ppo/pm_a_raw" in rows[0]
    raw = lambda r: r.get("ppo/pm_a_raw", math.nan if debiased else r["ppo/pm_a"])  # noqa: E731

    def point(method, c):  # the mean of rows c
        mean = lambda value: float(np.mean([value(rows[i]) for i in c]))  # noqa: E731
        p = {"method": method, "step": int(rows[c[-1]]["step"]), "kl": mean(lambda r: r["ppo/kl"]), "pm_a": mean(raw),
             "pm_b": mean(lambda r: r["ppo/pm_b"]), "prompts": "train"}
        return {**p, "pm_a_debiased": mean(lambda r: r["ppo/pm_a"])} if debiased else p

    chunks = np.array_split(np.arange(len(rows)), min(windows, len(rows)))
    return ([point("sft", [0])] if rows[0]["step"] == 0 else []) + [point("ppo", c) for c in chunks]


def fit_frontiers(bon_points, ppo_points):
    """Fit Gao et al.'s forms to reward gains over the starting policy and Bai et al.'s line to the raw
    rewards, for PM-A (the proxy) and PM-B (the held-out judge). d = sqrt(KL). A Gao fit also stores
    r0, the starting reward its gains are relative to: the curve in reward units is r0 + R(d). A series with a
    NaN reward (PPO's raw PM-A where it was not logged, ppo_frontier) is not fitted."""
    fits = {}
    for pm in ("pm_a", "pm_b"):
        if len(bon_points) >= 2:
            d = [math.sqrt(p["kl"]) for p in bon_points]
            r = [p[pm] for p in bon_points]
            fits[f"bon_{pm}"] = {**fit_bon(d, [x - r[0] for x in r]), "r0": r[0]}
            fits[f"bon_{pm}_linear"] = fit_linear(d, r)
        if len(ppo_points) >= 3 and all(math.isfinite(p[pm]) for p in ppo_points):
            d = [math.sqrt(max(p["kl"], 0.0)) for p in ppo_points]
            r = [p[pm] for p in ppo_points]
            fits[f"ppo_{pm}"] = {**fit_rl(d, [x - r[0] for x in r]), "r0": r[0]}
            fits[f"ppo_{pm}_linear"] = fit_linear(d, r)
    return fits


def write_report(path, ev, examples):
    """out_dir/report.md: the policy table, best-of-n curve, frontier fits and a few replies."""
    lines = ["# Evaluation on held-out test prompts", "",
             "PM-A is the reward the policies were optimised against; PM-B, trained on the other half of the "
             "comparisons, is the held-out judge. KL is to the SFT policy in nats (analytic for best-of-n). "
             "Win rates are ± their standard error over prompts (a bootstrap of the prompts).", "",
             "| policy | PM-A | PM-B | KL | sqrt KL | win rate vs SFT (PM-B) | length-controlled | reply tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in ev["policies"].items():
        lines.append(f"| {name} | {p['pm_reward']:+.3f} | {p['heldout_pm_reward']:+.3f} | {p['kl']:.2f} | "
                     f"{math.sqrt(max(p['kl'], 0)):.2f} | "
                     f"{p['win_rate_vs_sft']:.3f} ± {p.get('win_rate_se', math.nan):.3f} | "
                     f"{p['lc_win_rate_vs_sft']:.3f} ± {p.get('lc_win_rate_se', math.nan):.3f} | "
                     f"{p['mean_reply_tokens']:.1f} |")
    lines += ["", *[f"- {n}" for n in ev["notes"]], "",
              "## Best-of-n (PM-A picks, unbiased estimator of Gao et al.)", "",
              "| n | KL = log n - (n-1)/n | PM-A | PM-B |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['n']} | {p['kl']:.3f} | {p['pm_a']:+.3f} | {p['pm_b']:+.3f} |" for p in ev["bon_curve"]]
    lines += ["", "## Reward vs d = sqrt(KL): least-squares fits", "",
              "Gao et al. forms are fitted to the gain over the starting policy; `linear` (Bai et al.) to the raw "
              "reward. PPO points come from its training rollouts (train prompts), best-of-n from test prompts.", "",
              "| curve | form | a | b | rmse | points |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {f['form']} | {f['a']:+.4f} | {f['b']:+.4f} | {f['rmse']:.4f} | {f['points']} |"
              for k, f in ev["frontier_fits"].items()]
    lines += ["", "## Elo (PM-B's verdicts between every pair of policies, Bradley-Terry, SFT = 0, 95% intervals)", "",
              "| policy | Elo | length-controlled Elo |", "| --- | --- | --- |"]
    elo, human = ev.get("elo", {}).get("policies", {}), ev.get("elo", {}).get("human", {})
    lines += [f"| {k} | {e['elo']:+.0f} [{e['elo_ci'][0]:+.0f}, {e['elo_ci'][1]:+.0f}] | {e['lc_elo']:+.0f} "
              f"[{e['lc_elo_ci'][0]:+.0f}, {e['lc_elo_ci'][1]:+.0f}] |" for k, e in elo.items()]
    lines += ["", "People's verdicts (`rlhf.py label`), Elo [95%]: " + ", ".join(
        f"{k} {e['elo']:+.0f} [{e['elo_ci'][0]:+.0f}, {e['elo_ci'][1]:+.0f}] of {e['comparisons']}"
        for k, e in human.items())] if human else []
    lines += ["", "## Sample replies (PM-A / PM-B scores)", ""]
    for ex in examples:
        lines += [f"**Human:** {ex['human'][:300]}", ""]
        lines += [f"- **{name}** [{a:+.2f} / {b:+.2f}]: {reply[:400]}" for name, (reply, a, b) in ex["replies"].items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines).replace("\r", " ") + "\n")


def eval_notes(P, T, max_new, n, k, policy_init):
    """eval.json's notes: how the numbers below them were made."""
    notes = [f"{P} test prompts, temperature {T} (PPO's; KL to SFT at the same temperature), replies up to {max_new} "
             f"tokens; SFT from {n} samples per prompt, best-of-{n} picked from {n} more SFT samples (so its win rates "
             f"compare it with SFT replies its picker did not see), the others from {k} per prompt."]
    if policy_init != "sft":
        notes.append(f"rs, ppo and dpo started from {policy_init}.pt (--policy_init), and the PMs' trunks too; "
                     "KL and win rates are still measured against SFT")
    return notes


def sample_and_score(policy, queries, k, max_new, tok, generator, T, reward_a, reward_b, batch_size, dtype):
    """k replies a query from `policy` at temperature T: (their queries, the replies, PM-A's and PM-B's scores and
    the lengths, each (P, k))."""
    rep_q = [q for q in queries for _ in range(k)]
    replies = sample_replies(policy, queries, k, max_new, batch_size, tok, generator, T, dtype)
    a, b = (score(reward, rep_q, replies, batch_size).view(len(queries), k) for reward in (reward_a, reward_b))
    return rep_q, replies, a, b, reply_lengths(replies, tok.eos_id, tok.stop_ids).view(len(queries), k)


def policy_paths(out, dpo_cfg):
    """{name: checkpoint} of the policies eval samples besides SFT and best-of-n: cd, rs, ppo, each DPO beta, and the
    rounds of `rlhf.py online` once it has run (online.json names them), so the Elo table holds every policy."""
    paths = {name: os.path.join(out, f"{name}.pt") for name in ("cd", "rs", "ppo", *[n for n, _ in betas(dpo_cfg)])}
    if os.path.exists(os.path.join(out, "online.json")):
        with open(os.path.join(out, "online.json")) as f:
            cfg = json.load(f)["config"]
        paths.update({f"online{r}": os.path.join(out, "online", f"round{r}", f"{cfg['method']}.pt")
                      for r in range(1, cfg["rounds"] + 1)})
    return paths


def sampled_kl(policy, sft, queries, replies, batch_size, pad_id, T, dtype):
    """KL(policy || SFT) from the policy's own replies: mean over replies of sum_t [log pi(y_t) - log pi_sft(y_t)]."""
    return (sample_logprobs(policy, queries, replies, batch_size, pad_id, T, dtype)
            - sample_logprobs(sft, queries, replies, batch_size, pad_id, T, dtype)).mean().item()


def stage_eval(run, eval_cfg, ppo_cfg, dpo_cfg):
    """Stage `eval`: sft, best-of-n, cd, rs, ppo and dpo (each beta of dpo_cfg) on held-out test prompts -> eval.json
    (its "pm" section, written by reward.py, is kept), frontier.jsonl and report.md. Returns the eval.json dict.

    SFT gets n samples per prompt: the SFT row, and the baseline of every win rate. Best-of-n gets n SFT samples of its
    own: PM-A picks among them (the unbiased estimator gives every n up to n at once), so its win rates compare the pick
    with SFT replies the picker never saw (policies.bon.baseline_unseen), not with its own pool, which PM-B mostly ranks
    as PM-A does. The others get `policy_samples` each, and their sampled KL to SFT. Missing policies are skipped."""
    out = run.out_dir
    device = pick_device(run.device)
    set_seed(run.seed)
    sft, tok, _ = load_model(os.path.join(out, "sft.pt"), device)
    disable_dropout(sft).eval()
    pm_a, _, _ = load_reward_model(os.path.join(out, "pm_a.pt"), device)
    pm_b, _, _ = load_reward_model(os.path.join(out, "pm_b.pt"), device)
    dtype = run.dtype
    reward_a, reward_b = (pm_reward_fn(pm, tok, eval_cfg.batch_size, dtype) for pm in (pm_a, pm_b))
    max_new = eval_cfg.max_new_tokens or ppo_cfg.max_new_tokens
    max_prompt = min(ppo_cfg.max_prompt_tokens, sft.config.block_size - max_new)
    prompts = rl_prompts(run, "test", tok, max_prompt)[:eval_cfg.num_prompts or None]
    queries, P = [q for _, q in prompts], len(prompts)
    n, k, bs = eval_cfg.n, eval_cfg.policy_samples, eval_cfg.batch_size
    print(f"[eval] {P} test prompts | SFT x{n}, best-of-{n} from {n} more | cd, rs, ppo, dpo x{k}")
    gen = lambda name: torch.Generator(device=device).manual_seed(run.seed + zlib.crc32(name.encode()))  # noqa: E731
    T = rl_temperature(out, ppo_cfg)

    draw = lambda policy, k, name: sample_and_score(policy, queries, k, max_new, tok, gen(name), T, reward_a,  # noqa: E731
                                                    reward_b, eval_cfg.batch_size, dtype)
    # 1. SFT: n samples per prompt, scored by both PMs
    rep_q, replies, a, b, lengths = ({"sft": x} for x in draw(sft, n, "sft"))                   # each (P, n)
    kl = {"sft": 0.0}
    notes = eval_notes(P, T, max_new, n, k, run.policy_init)

    # 2. best-of-n: PM-A picks among n SFT samples of its own, none of them in the SFT baseline of its win rates;
    #    the unbiased estimator gives every n <= N from the same pool
    _, pool, pool_a, pool_b, _ = draw(sft, n, "bon")                                            # (P, n) scores
    bon_curve = [{"method": "bon", "n": k, "kl": bon_kl(k), "pm_a": bon_expected(pool_a, pool_a, k).mean().item(),
                  "pm_b": bon_expected(pool_a, pool_b, k).mean().item(), "prompts": "test"}
                 for k in [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]]
    best = best_of_n(pool_a)                                                                     # (P,)
    pick = lambda x: x.gather(1, best[:, None])                                                  # noqa: E731 (P, 1)
    a["bon"], b["bon"], kl["bon"] = pick(pool_a), pick(pool_b), bon_kl(n)
    replies["bon"] = [pool[p * n + j] for p, j in enumerate(best.tolist())]
    lengths["bon"] = reply_lengths(replies["bon"], tok.eos_id, tok.stop_ids).view(P, 1)

    # 3. cd, rs, ppo and dpo: their own samples, scored, and their sampled KL to SFT
    beta = {}
    for name, path in policy_paths(out, dpo_cfg).items():
        if not os.path.exists(path):
            notes.append(f"{name}: skipped ({path} not found; run `python rlhf.py {name.split('_')[0]}` first)")
            continue
        policy, _, ckpt = load_model(path, device)
        disable_dropout(policy).eval()
        if "beta" in ckpt:
            beta[name] = ckpt["beta"]
        if not ckpt.get("done"):
            notes.append(f"{name}: evaluated an unfinished checkpoint (step {ckpt.get('step', ckpt.get('iteration'))})")
        rep_q[name], replies[name], a[name], b[name], lengths[name] = draw(policy, k, name)        # its own draws
        kl[name] = sampled_kl(policy, sft, rep_q[name], replies[name], bs, tok.eos_id, T, dtype)
        del policy

    policies = {name: policy_row(a[name], b[name], lengths[name], lengths["sft"], kl[name], b["sft"], T) for name in a}
    policies["bon"].update(n=n, kl_analytic=bon_kl(n), baseline_unseen=True)  # its pool is not SFT's baseline
    for name, value in beta.items():
        policies[name]["beta"] = value

    # 4. the frontier: best-of-n and PPO on the same (sqrt KL, reward) axes, and the fits, in raw PM-A
    fits = write_frontier(out, bon_curve, policies, eval_cfg.frontier_windows,
                          bool(ppo_config(out).get("length_debias")), notes)
    # 5. eval.json (merged with rm's "pm" section), report.md
    examples = side_by_side(prompts[:eval_cfg.num_examples], replies, a, b, n, k, tok)
    elo = {"judge": "pm_b", "reference": "sft", "policies": elo_table(b, lengths)}  # every policy against every other
    if eval_cfg.elo_labels:  # and by people: `rlhf.py label` decisions between two policies
        elo["human"] = human_elo(read_decisions(eval_cfg.elo_labels))
    return save_eval(out, dict(temperature=T, policies=policies, bon_curve=bon_curve, frontier_fits=fits, elo=elo,
                               notes=notes), examples)


def side_by_side(prompts, replies, a, b, n, k, tok):
    """report.md's examples: for each of these prompts (text, ids), its Human turn and every policy's first reply
    with its PM-A and PM-B scores (replies hold n SFT samples a prompt, one best-of-n, k from each other policy)."""
    examples = []
    for p, (text, _) in enumerate(prompts):
        human = text.rsplit("\n\nHuman:", 1)[-1].split("\n\nAssistant:")[0].strip()
        col = {m: p * n if m == "sft" else p if m == "bon" else p * k for m in replies}
        examples.append({"human": human, "replies": {
            m: (tok.decode(strip_end(replies[m][col[m]], tok.eos_id, tok.stop_ids)).strip(),
                a[m].view(-1)[col[m]].item(), b[m].view(-1)[col[m]].item()) for m in replies}})
    return examples


def write_frontier(out, bon_curve, policies, windows, debiased=False, notes=None):
    """frontier.jsonl: best-of-n's curve, PPO's training windows and the final RS, PPO and DPO points, each with
    sqrt(KL), PM-A raw throughout (ppo_frontier); returns the fits of the three frontier forms (fit_frontiers).
    `debiased`: PPO trained on the length-debiased PM-A; a note goes to `notes` if its log lacks raw PM-A."""
    ppo_points = ppo_frontier(out, windows, debiased)
    if notes is not None and any(math.isnan(p["pm_a"]) for p in ppo_points):
        notes.append("ppo: trained with --ppo.length_debias before PPO logged raw PM-A (ppo/pm_a_raw): its frontier "
                     "path has PM-B only (its reward is kept as pm_a_debiased); `python rlhf.py ppo --force` logs both")
    final = [{"method": f"{m}_final", "step": None, "kl": policies[m]["kl"], "pm_a": policies[m]["pm_reward"],
              "pm_b": policies[m]["heldout_pm_reward"], "prompts": "test", **({"beta": policies[m]["beta"]} if "beta" in
                                                                          policies[m] else {})}
             for m in policies if m not in ("sft", "bon")]
    frontier = bon_curve + ppo_points + final
    for p in frontier:
        p["sqrt_kl"] = math.sqrt(max(p["kl"], 0.0))
    with open(os.path.join(out, "frontier.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in frontier)
    return fit_frontiers(bon_curve, ppo_points)


def save_eval(out, results, examples):
    """Merge `results` into eval.json (atomically, keeping rm's "pm" section), write report.md, print the
    table. Returns the eval.json dict."""
    ev_path = os.path.join(out, "eval.json")
    ev = json.load(open(ev_path)) if os.path.exists(ev_path) else {}
    ev.update(results)
    tmp = ev_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ev, f, indent=2)
    os.replace(tmp, ev_path)
    write_report(os.path.join(out, "report.md"), ev, examples)
    print(f"[eval] {'policy':12s} {'PM-A':>7s} {'PM-B':>7s} {'KL':>6s} {'win':>13s} {'LC win':>13s} {'tokens':>6s}")
    for name, r in ev["policies"].items():
        print(f"[eval] {name:12s} {r['pm_reward']:+7.3f} {r['heldout_pm_reward']:+7.3f} {r['kl']:6.2f} "
              f"{r['win_rate_vs_sft']:6.3f} ± {r.get('win_rate_se', math.nan):.3f} "
              f"{r['lc_win_rate_vs_sft']:6.3f} ± {r.get('lc_win_rate_se', math.nan):.3f} {r['mean_reply_tokens']:6.1f}")
    for note in ev["notes"][1:]:
        print(f"[eval] note: {note}")
    print(f"[eval] wrote {ev_path}, {os.path.join(out, 'frontier.jsonl')}, {os.path.join(out, 'report.md')}")
    return ev
