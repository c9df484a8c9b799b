"""The PM studies (pm_studies.py) on small hh-layout directories the tests write: helpful vs harmless finds a
tension where the two kinds of data disagree, and the size study's rows are a function of the seed."""
import json
import os

import pytest

import pm_studies
import rm
from data import read_pairs
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
    rows = {r["train"]: r for r in pm_studies.hh_study(cfg, cfg.rm, inp, test)}
    assert list(rows) == ["helpful", "harmless", "mix"] and rows["helpful"]["pairs"] == rows["harmless"]["pairs"]
    acc = {(t, s): rows[t]["test"][s]["accuracy"] for t in rows for s in ("harmless-base", "helpful-base")}
    assert rows["harmless"]["test"]["helpful-base"]["n"] == 30
    assert acc["harmless", "harmless-base"] > 0.75 and acc["harmless", "helpful-base"] < 0.35  # each learns its own
    assert acc["helpful", "helpful-base"] > 0.75 and acc["helpful", "harmless-base"] < 0.35    # rule, wrong on the other
    one_kind = stage_cfg(tmp_path / "one", marker_dir(tmp_path / "one" / "hh"))
    with pytest.raises(ConfigError, match="needs helpful-\\* and harmless-base pairs"):
        pm_studies.hh_study(one_kind, one_kind.rm, rm.pm_inputs(one_kind, one_kind.rm), test)


def size_rows(tmp_path):
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh", n_train=80, n_test=20))
    cfg.rm.max_steps, cfg.rm.size_study, cfg.rm.size_study_sizes, cfg.rm.size_study_steps = 4, True, "1x16,1x32,2x32", 3
    cfg.compile = False
    sc = LMTrainConfig(batch_size=4, eval_interval=2, eval_batches=1, warmup_steps=1, log_interval=1)
    pm_studies.run_studies(cfg, cfg.rm, sc, GPTConfig(block_size=48))
    rows = json.load(open(os.path.join(cfg.out_dir, "pm_size_study.json")))
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_the_size_study_writes_a_row_per_trunk_that_depends_only_on_the_seed(tmp_path):
    rows = size_rows(tmp_path / "a")
    assert [r["size"] for r in rows] == ["1x16", "1x32", "2x32"]
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]
    for r in rows:
        assert {"accuracy", "heldout_pm_accuracy", "score_kl_a_b", "agreement_by_decile"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["score_kl_a_b"] >= 0 and len(r["agreement_by_decile"]) > 0
        assert 0 <= r["score_kl_a_b_ci"][0] <= r["score_kl_a_b_ci"][1]
    assert size_rows(tmp_path / "b") == rows  # a fresh run with the same seed: the same rows
