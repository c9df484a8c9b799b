"""Tests for reward.py: loss math vs loops, metrics on hand-made inputs, PM behaviour on tiny data."""
import math

import numpy as np
import pytest
import torch

import reward


# --- losses -------------------------------------------------------------------

def test_ranking_loss_matches_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(7, generator=g), torch.randn(7, generator=g)
    margin, coef = 0.3, 0.05
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - margin)))) + coef * (c + r) ** 2
               for c, r in zip(rc.tolist(), rr.tolist())) / 7
    got = reward.ranking_loss(rc, rr, margin=margin, center_coef=coef).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_ranking_loss_invariant_to_shared_constant():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(5, generator=g), torch.randn(5, generator=g)
    base = reward.ranking_loss(rc, rr)
    assert reward.ranking_loss(rc + 3.7, rr + 3.7).item() == pytest.approx(base.item(), rel=1e-6)


# --- metrics ------------------------------------------------------------------

def test_wilson_interval_known_value():
    lo, hi = reward.wilson_interval(50, 100)            # textbook: p=0.5, n=100 -> [0.404, 0.596]
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert reward.pair_accuracy([1, 2, 3, 0], [0, 2, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_calibration_bins_and_ece_by_hand():
    # bin [0.2,0.3): two predictions 0.25, one positive -> conf .25, freq .5
    # bin [0.9,1.0]: two predictions 0.95 and 1.0, both positive -> conf .975, freq 1
    probs, labels = [0.25, 0.25, 0.95, 1.0], [1, 0, 1, 1]
    bins, ece = reward.calibration(probs, labels, n_bins=10)
    assert [b["n"] for b in bins] == [0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    assert bins[2]["freq"] == 0.5 and bins[9]["conf"] == pytest.approx(0.975)
    assert ece == pytest.approx(0.5 * 0.25 + 0.5 * 0.025)
    _, perfect = reward.calibration([0.0, 1.0], [0, 1])
    assert perfect == 0.0


def test_score_kl_by_hand():
    x = np.random.default_rng(0).normal(size=500)
    assert reward.score_kl(x, 10 * x + 3) == pytest.approx(0.0, abs=1e-12)  # same up to scale/shift
    # two bins over [-1, 1] after standardising; A = {-1, 1} (1 each), B = {-1 x3, 1 x1}
    a, b = np.array([-1.0, 1.0]), np.array([-1.0, -1.0, -1.0, 1.0])
    zb = (b - b.mean()) / b.std()                  # [-0.577 x3, 1.732] -> counts [3, 1]
    assert (zb < 0).sum() == 3
    p, q = np.array([1 + 1, 1 + 1]) / 4, np.array([3 + 1, 1 + 1]) / 6  # alpha = 1 smoothing
    want = float(np.sum(p * np.log(p / q)))
    assert reward.score_kl(a, b, n_bins=2, lim=1.0, alpha=1.0) == pytest.approx(want)


def test_decile_agreement_counts():
    a_c = np.arange(10.0); a_r = a_c - 0.5                     # A always prefers chosen
    b_c = a_c.copy(); b_r = np.where(a_c >= 5, a_c + 1, a_c - 1)  # B disagrees on the top half
    rows = reward.decile_agreement(a_c, a_r, b_c, b_r, n_bins=2)
    assert [r["agreement"] for r in rows] == [1.0, 0.0] and [r["n"] for r in rows] == [5, 5]


def test_normalization_gives_mean0_std1():
    raw = np.random.default_rng(0).normal(4.0, 3.0, size=200)
    gain, bias = reward.fit_normalization(raw)
    z = gain * raw + bias
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0, abs=1e-6)
    gain, bias = reward.fit_normalization(raw, scale=False)
    assert gain == 1.0 and (raw + bias).mean() == pytest.approx(0.0, abs=1e-9)
