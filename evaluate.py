"""
Best-of-n sampling, rejection-sampling fine-tuning, and the final evaluation of every policy.

    python rlhf.py rs   --preset cpu     # best-of-n against PM-A, fine-tune SFT on the winners -> rs.pt
    python rlhf.py eval --preset cpu     # sft / bon / rs / ppo on held-out prompts -> eval.json, report.md

Each policy is scored on held-out test prompts by PM-A (the reward it was optimised against) and by
PM-B (a preference model trained on the other half of the comparisons, which no policy ever saw),
and placed on the reward-vs-sqrt(KL) plane of Gao et al. 2022: if PM-A keeps rising while PM-B stalls
or falls, the policy is overoptimising its proxy.

The file reads top to bottom: the math (best-of-n selection, its analytic KL, the unbiased
best-of-n estimator, the frontier fits), sampling and scoring helpers, then the `rs` and `eval` stages.

References
- Stiennon et al. 2020, "Learning to summarize from human feedback", app. G.3 (KL of best-of-n).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", sec. 2-3 (the unbiased best-of-n
  estimator, R_bon(d) = d(a - b d), R_RL(d) = d(a - b log d), d = sqrt(KL)).
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4.3 (reward is linear
  in sqrt(KL)); Anthony et al. 2017 / Dong et al. 2023 (expert iteration / RAFT, rejection sampling).
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# the math: best-of-n

def best_of_n(scores):
    """Index of the best of each row's n samples. scores (P, n) -> (P,) long. Ties go to the first."""
    return scores.argmax(dim=1)


def bon_kl(n):
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020 app. G.3).

    For a continuous reward the best of n draws has CDF F(x)^n, density q = n F^(n-1) p, so
    KL = E_q[log n F^(n-1)] = log n + (n - 1) E_q[log F], and under q, F ~ U^(1/n) with
    E[log U^(1/n)] = -1/n. For a discrete base distribution it is an upper bound (ties lower it)."""
    return math.log(n) - (n - 1) / n


def bon_expected(select, report, n):
    """The unbiased best-of-n estimator of Gao et al. 2022 sec. 2: with N >= n samples per prompt,
    average `report` of the `select`-argmax over ALL C(N, n) subsets of size n, in closed form.
    After sorting a row by `select` (ascending), sample i (0-based) is the max of exactly C(i, n-1)
    of the C(N, n) subsets, so its weight is C(i, n-1) / C(N, n).

    select, report: (P, N) float tensors (e.g. PM-A picks, PM-B judges) -> (P,) expected report."""
    P, N = select.shape
    assert 1 <= n <= N, f"best-of-{n} needs at least {n} samples per prompt, got {N}"
    order = select.argsort(dim=1, stable=True)                               # (P, N)
    sorted_report = report.gather(1, order).double()                         # (P, N)
    weights = torch.tensor([math.comb(i, n - 1) for i in range(N)], dtype=torch.float64) / math.comb(N, n)
    return (sorted_report * weights).sum(1).to(report.dtype)                 # (P,)


# ----------------------------------------------------------------------------------------------
# the math: reward-vs-KL frontier fits (least squares, numpy)

def _lstsq(features, y):
    """Least squares y ~ features @ w; returns w and the root-mean-square residual."""
    X, y = np.asarray(features, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    return w, float(np.sqrt(np.mean((X @ w - y) ** 2)))


def fit_bon(d, r):
    """Gao et al. eq. 1, best-of-n: R(d) = d (a - b d), d = sqrt(KL), R = reward gain over the
    initial policy (R(0) = 0). Linear in (a, b): features [d, -d^2]."""
    d = np.asarray(d, dtype=np.float64)
    (a, b), rmse = _lstsq(np.stack([d, -d ** 2], 1), r)
    return {"form": "d*(a - b*d)", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}


def fit_rl(d, r):
    """Gao et al. eq. 2, RL: R(d) = d (a - b log d). Features [d, -d log d] (d log d -> 0 at d = 0)."""
    d = np.asarray(d, dtype=np.float64)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    (a, b), rmse = _lstsq(np.stack([d, -dlogd], 1), r)
    return {"form": "d*(a - b*log(d))", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}


def fit_linear(d, r):
    """Bai et al. 2022 sec. 4.3: reward is roughly linear in sqrt(KL), R = a + b d."""
    d = np.asarray(d, dtype=np.float64)
    (a, b), rmse = _lstsq(np.stack([np.ones_like(d), d], 1), r)
    return {"form": "a + b*d", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}
