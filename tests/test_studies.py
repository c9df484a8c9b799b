"""The PM studies (studies.py) on small hh-layout directories the tests write: helpful vs harmless finds a
tension where the two kinds of data disagree, each PM early-stopping on its own kind; both studies' tables hold
the accuracies and score KL of a hand count on written scores; the size study's rows are a function of the seed."""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from lab import studies
import rm
from data import Pair, read_pairs
from model import GPTConfig
from runtime import ConfigError
from test_reward import marker_dir, stage_cfg
from train import LMTrainConfig


def two_kinds(tmp_path):
    """harmless-base where the reply with "please" wins, helpful-base where it loses: two kinds of data
    that pull against each other, as the HH paper found helpfulness and harmlessness do."""
    root = marker_dir(tmp_path / "hh", n_train=120, n_test=30)
    marker_dir(tmp_path / "hh", n_train=120, n_test=30, seed=1, subset="helpful-base", flip=True)
    return root


def test_helpful_vs_harmless_shows_the_tension_and_refuses_one_kind_of_data(tmp_path):
    cfg = stage_cfg(tmp_path, two_kinds(tmp_path))
    cfg.rm.epochs = 3
    inp = rm.pm_inputs(cfg, cfg.rm)
    test, _ = read_pairs(cfg.data_dir, "test", cfg.data)
    rows = {r["train"]: r for r in studies.hh_study(cfg, cfg.rm, inp, test)}
    assert list(rows) == ["helpful", "harmless", "mix"] and rows["helpful"]["pairs"] == rows["harmless"]["pairs"]
    acc = {(t, s): rows[t]["test"][s]["accuracy"] for t in rows for s in ("harmless-base", "helpful-base")}
    assert rows["harmless"]["test"]["helpful-base"]["n"] == 30
    # each learns its own rule, wrong on the other
    assert acc["harmless", "harmless-base"] > 0.75 and acc["harmless", "helpful-base"] < 0.35
    assert acc["helpful", "helpful-base"] > 0.75 and acc["helpful", "harmless-base"] < 0.35
    one_kind = stage_cfg(tmp_path / "one", marker_dir(tmp_path / "one" / "hh"))
    with pytest.raises(ConfigError, match="needs helpful-\\* and harmless-base pairs"):
        studies.hh_study(one_kind, one_kind.rm, rm.pm_inputs(one_kind, one_kind.rm), test)


def written_scores(monkeypatch, scores):
    """Stand-ins for training and scoring: train_pm records the validation pairs each PM gets, and the n-th
    score_pairs call returns scores[n] ((chosen, rejected) arrays of the test pairs)."""
    vals, calls = {}, iter(scores)

    def train_pm(run, rc, model, tok, train_ex, val_ex, objective, name="pm", **_):
        vals[name] = val_ex
        return {"wall_s": 0.0, "best_step": 1, "steps": 1}
    monkeypatch.setattr(studies, "train_pm", train_pm)
    monkeypatch.setattr(studies, "score_pairs", lambda *args, **kwargs: tuple(map(np.array, next(calls))))
    return vals


def test_helpful_vs_harmless_stops_each_pm_on_its_own_kind_and_counts_by_subset(tmp_path, monkeypatch):
    """Each PM early-stops on validation pairs of the kind it trains on (the mix on as many of each kind), not
    on the mixed set; its test accuracy by subset is the hand count of its scores, ties one half."""
    root = marker_dir(tmp_path / "hh", n_train=120, n_test=1)
    marker_dir(tmp_path / "hh", n_train=60, n_test=1, seed=1, subset="helpful-base")  # fewer helpful pairs
    cfg = stage_cfg(tmp_path, root)
    inp = rm.pm_inputs(cfg, cfg.rm)
    test = [Pair("\n\nHuman: hi?\n\nAssistant:", " yes", " no", s, 1)
            for s in ["harmless-base"] * 3 + ["helpful-base"] * 2]
    vals = written_scores(monkeypatch, [
        ([0, 0, 1, 2, 3], [1, 1, 1, 0, 0]),    # helpful PM: harmless 0 + 0 + 1/2 of 3, helpful 2 of 2
        ([2, 2, 2, 0, 1], [0, 1, 3, 0, 2]),    # harmless PM: harmless 2 of 3, helpful 1/2 + 0 of 2
        ([1, 1, 1, 1, 1], [0, 0, 0, 0, 2])])   # mix: harmless 3 of 3, helpful 1 of 2
    rows = {r["train"]: r for r in studies.hh_study(cfg, cfg.rm, inp, test)}
    acc = {t: (rows[t]["test"]["harmless-base"]["accuracy"], rows[t]["test"]["helpful-base"]["accuracy"]) for t in rows}
    assert acc == {"helpful": (pytest.approx(1 / 6), 1.0), "harmless": (pytest.approx(2 / 3), 0.25), "mix": (1.0, 0.5)}
    assert rows["mix"]["test"]["harmless-base"]["n"] == 3 and rows["mix"]["test"]["helpful-base"]["n"] == 2
    kind = {tuple(map(tuple, ex)): p.subset for p, ex in zip(inp.val_pairs, inp.val_ex)}
    helpful = [ex for p, ex in zip(inp.val_pairs, inp.val_ex) if p.subset == "helpful-base"]
    harmless = [ex for p, ex in zip(inp.val_pairs, inp.val_ex) if p.subset == "harmless-base"]
    assert 0 < len(helpful) < len(harmless)
    assert vals["hh_helpful"] == helpful and vals["hh_harmless"] == harmless
    assert Counter(kind[tuple(map(tuple, ex))] for ex in vals["hh_mix"]) == {"helpful-base": len(helpful),
                                                                          "harmless-base": len(helpful)}
    assert [r["val_pairs"] for r in rows.values()] == [len(helpful), len(harmless), 2 * len(helpful)]


def test_the_size_study_rows_are_the_hand_count_of_the_scores(tmp_path, monkeypatch):
    """Four test pairs with written scores. PM-A: chosen (1, 1, 1, -1), rejected (-1, -1, -1, 1): right on 3 of 4;
    standardised, its 8 scores are +-1, 4 each, in bins 12 and 7 of score_kl's 20 over [-4, 4]. PM-B: chosen
    (3, 1, -1, -1), rejected (-3, 1, 1, -1): 1 right, 1 wrong, 2 ties, 1/2 each: 0.5; standardised (std sqrt 3) its
    scores are +-sqrt 3 (1 each, bins 14 and 5) and +-1/sqrt 3 (3 each, bins 11 and 8). With one pseudo-count a bin
    (28 counts each), KL(A || B) = 2 (5/28) log 5 + 2 (1/28) log(1/2) + 2 (1/28) log(1/4) = (10 log 5 - 6 log 2) / 28;
    the second trunk's PMs are swapped: KL(B || A) = (20 log 2 - 2 log 5) / 28. A and B agree on pair 1 only."""
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh", n_train=40, n_test=1))
    cfg.studies.sizes = "1x16,1x32"
    inp = rm.pm_inputs(cfg, cfg.rm)
    monkeypatch.setattr(studies, "size_trunk", lambda *args: inp.init)
    test = [Pair("\n\nHuman: hi?\n\nAssistant:", " yes", " no", "harmless-base", 1)] * 4
    a, b = ([1, 1, 1, -1], [-1, -1, -1, 1]), ([3, 1, -1, -1], [-3, 1, 1, -1])
    written_scores(monkeypatch, [a, b, b, a])
    rows = studies.size_study(cfg, cfg.rm, cfg.studies, inp, test, LMTrainConfig(), GPTConfig())
    assert [(r["accuracy"], r["heldout_pm_accuracy"], r["agreement_a_b"]) for r in rows] == [(0.75, 0.5, 0.25),
                                                                                            (0.5, 0.75, 0.25)]
    assert rows[0]["score_kl_a_b"] == pytest.approx((10 * math.log(5) - 6 * math.log(2)) / 28)
    assert rows[1]["score_kl_a_b"] == pytest.approx((20 * math.log(2) - 2 * math.log(5)) / 28)


def size_rows(tmp_path):
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh", n_train=80, n_test=20))
    cfg.rm.max_steps = 4
    cfg.studies.size, cfg.studies.sizes, cfg.studies.size_steps = True, "1x16,1x32,2x32", 3
    cfg.compile = False
    train_cfg = LMTrainConfig(batch_size=4, eval_interval=2, eval_batches=1, warmup_steps=1, log_interval=1)
    studies.run_studies(cfg, cfg.rm, cfg.studies, train_cfg, GPTConfig(block_size=48))
    rows = json.load(open(os.path.join(cfg.out_dir, "pm_size_study.json")))
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_the_size_study_writes_a_row_per_trunk_that_depends_only_on_the_seed(tmp_path):
    rows = size_rows(tmp_path / "a")
    assert [r["size"] for r in rows] == ["1x16", "1x32", "2x32"]
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]
    for r in rows:  # the numbers themselves: test_the_size_study_rows_are_the_hand_count_of_the_scores
        assert {"accuracy", "heldout_pm_accuracy", "score_kl_a_b", "score_kl_a_b_ci", "agreement_by_decile"} <= set(r)
    assert size_rows(tmp_path / "b") == rows  # a fresh run with the same seed: the same rows
