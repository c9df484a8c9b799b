"""
The preference model (PM): stage `rm` of rlhf.py.

A GPT trunk (initialised from the SFT checkpoint) with a scalar head scores a whole
(prompt, reply) sequence at its final EOS token. Trained on human comparisons with the
ranking loss -log sigmoid(r_chosen - r_rejected); binary and LM baselines for comparison.
Two PMs are trained on disjoint halves of the train pairs: PM-A is the reward for
rejection sampling and PPO, PM-B is a held-out judge of the policies PM-A trained.

    python rlhf.py rm --preset=cpu                     # pm_a.pt, pm_b.pt, eval.json["pm"]
    python rlhf.py rm --preset=cpu --rm.ablation=true  # ranking vs binary vs lm table
    python rlhf.py rm --preset=cpu --rm.pmp_study=true # accuracy vs #pairs, with/without PMP

References:
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec 3 (PMs, calibration
  fig 9, PM-A/PM-B robustness sec 4.3 fig 14-15), arXiv:2204.05862.
- Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", sec 4-5
  (ranking vs binary vs LM, preference-model pretraining), arXiv:2112.00861.
- Ziegler et al. 2019 / OpenAI lm-human-preferences (reward normalisation to mean 0, std 1 on
  policy samples; head init N(0, 1/sqrt(d+1))), and Stiennon et al. 2020 (ranking loss).
"""
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RMConfig:
    objective: str = "ranking"   # "ranking" (-log sigmoid(r_c - r_r)), "binary" (BCE per reply), "lm" (SFT mean log-prob)
    init: str = "sft"            # trunk initialisation: "sft" (out_dir/sft.pt) or "base" (out_dir/base.pt)
    lr: float = 3e-5             # peak AdamW learning rate (linear warmup + cosine)
    weight_decay: float = 0.0    # AdamW weight decay on matrices
    batch_size: int = 8          # comparisons per step (2x sequences)
    epochs: int = 2              # passes over the PM's half of the train pairs
    max_steps: int = 0           # >0 caps the number of steps (overrides epochs)
    warmup_steps: int = 20       # linear LR warmup
    grad_clip: float = 1.0       # clip the global grad norm (0 = off)
    margin: float = 0.0          # ranking: -log sigmoid(r_c - r_r - margin)
    center_coef: float = 0.0     # ranking: + coef * mean((r_c + r_r)^2), keeps scores centred at 0
    max_reply_tokens: int = 128  # replies are cut to this many tokens (prompt is left-truncated to fit)
    split_halves: bool = True    # train PM-A / PM-B on disjoint halves (False: both see all pairs)
    pmp: bool = False            # preference-model pretraining on unlabelled, auto-built comparisons first
    pmp_steps: int = 200         # PMP steps (batch_size comparisons each)
    eval_interval: int = 50      # steps between validation evaluations (early stopping keeps the best)
    eval_batch_size: int = 32    # sequences per scoring forward pass
    normalize: str = "scale"     # "scale": gain and bias so SFT samples score mean 0 std 1; "shift": bias only; "none"
    normalize_samples: int = 64  # SFT samples (on train prompts) used to fit gain and bias
    max_new_tokens: int = 64     # length of those SFT samples
    ablation: bool = False       # also train and compare ranking / binary / lm (one table)
    pmp_study: bool = False      # accuracy vs 25/50/100% of half A, with and without PMP (one table)


# -----------------------------------------------------------------------------
# losses

def ranking_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Pairwise ranking loss -log sigmoid(r_c - r_r - margin), mean over pairs.

    The Bradley-Terry loss of Bai et al. 2022 eq (2.1) / Askell et al. 2021 sec 4. Only score
    differences matter, so it cannot fix the scale's origin; the optional centering term
    coef * (r_c + r_r)^2 pins it near 0 (as in Eisenstein et al. 2023 "reward centering").
    r_chosen, r_rejected: (B,) raw scores.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef > 0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def binary_loss(scores, labels):
    """Binary discrimination: each reply alone is labelled good (1) or bad (0), BCE on its score.

    The "binary" baseline of Askell et al. 2021 sec 4.1: it throws away the pairing, so the
    model must learn an absolute notion of good. scores, labels: (B,).
    """
    return F.binary_cross_entropy_with_logits(scores, labels.float())


# -----------------------------------------------------------------------------
# metrics (plain numpy on score arrays: easy to test by hand)

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
    with label 1 and 1 - p with label 0 (Bai et al. 2022 fig 9), otherwise every label is 1.
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


def decile_agreement(a_chosen, a_rejected, b_chosen, b_rejected, n_bins=10):
    """How often PM-A and PM-B agree on which reply of a pair is better, by score decile.

    Pairs are binned by deciles of their mean standardised PM-A score. Bai et al. 2022 sec 4.3
    (fig 15) find the two PMs agree less at high scores: the region RL pushes the policy into,
    where the reward is least trustworthy. Returns a list of {decile, n, mean_score, agreement}.
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


def fit_normalization(raw_scores, scale=True):
    """Gain and bias so that gain * raw + bias has mean 0 (and std 1 if scale) on raw_scores.

    raw_scores are PM scores of replies sampled from the SFT policy on train prompts, as in
    lm-human-preferences: the reward PPO sees then starts centred, so the KL penalty and the
    reward are on a known scale whatever the PM's arbitrary offset is.
    """
    x = np.asarray(raw_scores, dtype=np.float64)
    gain = 1.0 / (x.std() + 1e-8) if scale else 1.0
    return float(gain), float(-gain * x.mean())
