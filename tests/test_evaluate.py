"""Tests for evaluate.py: best-of-n selection and its KL, the unbiased estimator, the frontier fits."""

import itertools
import math

import numpy as np
import pytest
import torch

from evaluate import best_of_n, bon_expected, bon_kl, fit_bon, fit_linear, fit_rl

torch.set_num_threads(1)


def test_best_of_n_picks_argmax():
    scores = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 5.0], [-3.0, -2.0, -1.0]])
    assert best_of_n(scores).tolist() == [1, 0, 2]


def test_bon_kl_values():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def test_bon_kl_matches_exact_and_monte_carlo_on_a_categorical():
    """Best-of-n over a categorical with K equally likely atoms of distinct reward: the exact
    distribution is q_i = (i/K)^n - ((i-1)/K)^n, and its KL tends to log n - (n-1)/n as K grows.
    A Monte-Carlo run of the real selection function gives the same KL (plug-in estimate)."""
    K, n, M = 200, 4, 200_000
    i = np.arange(1, K + 1)
    q = (i / K) ** n - ((i - 1) / K) ** n
    exact = float(np.sum(q * np.log(q * K)))
    assert exact == pytest.approx(bon_kl(n), abs=0.01) and exact <= bon_kl(n)
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(K, (M, n), generator=g)               # atom ids; reward of atom k = k
    reward = draws.float() + 0.0
    picked = draws.gather(1, best_of_n(reward)[:, None]).squeeze(1)
    q_hat = np.bincount(picked.numpy(), minlength=K) / M
    nz = q_hat > 0
    mc = float(np.sum(q_hat[nz] * np.log(q_hat[nz] * K)))
    assert mc == pytest.approx(bon_kl(n), abs=0.02)


def test_bon_expected_is_the_average_over_subsets():
    g = torch.Generator().manual_seed(1)
    P, N = 3, 6
    select, report = torch.randn(P, N, generator=g), torch.randn(P, N, generator=g)
    for n in (1, 2, 3, 6):
        est = bon_expected(select, report, n)
        for p in range(P):
            vals = [report[p, list(c)[int(select[p, list(c)].argmax())]].item()
                    for c in itertools.combinations(range(N), n)]
            assert est[p].item() == pytest.approx(np.mean(vals), abs=1e-5)
    assert torch.allclose(bon_expected(select, report, 1), report.mean(1))
    assert torch.allclose(bon_expected(select, select, N), select.max(1).values)


def test_frontier_fits_recover_parameters():
    d = np.linspace(0.1, 3.0, 12)
    b = fit_bon(d, d * (1.3 - 0.2 * d))
    assert (b["a"], b["b"]) == (pytest.approx(1.3), pytest.approx(0.2)) and b["rmse"] < 1e-9
    r = fit_rl(np.r_[0.0, d], np.r_[0.0, d * (0.9 - 0.4 * np.log(d))])
    assert (r["a"], r["b"]) == (pytest.approx(0.9), pytest.approx(0.4))
    rng = np.random.default_rng(0)
    lin = fit_linear(d, 0.5 + 0.7 * d + 0.01 * rng.standard_normal(len(d)))
    assert lin["a"] == pytest.approx(0.5, abs=0.03) and lin["b"] == pytest.approx(0.7, abs=0.03)
