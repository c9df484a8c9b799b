"""`python rlhf.py plan`: each stage's work against a hand count on a small data dir, the JSON last line, a named
GPU's time as the datasheet-peak ratio, and `all` printing the plan before its first stage.
Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python -m pytest tests/test_plan.py -q"""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lab import plan
from lab import rates
import rlhf
from data import read_pairs, split_halves, split_train_val
from model import GPT
from tokens import build_tokenizer, lm_tokens

ARITHMETIC = ["--plan.measure=false", "--plan.gflops=1"]  # 1 GFLOP/s and 1M tokens/s: seconds = gflop + tokenized/1e6


def make(hh_dir, *flags):
    return plan.make_plan(rlhf.parse_args(["plan", "--data_dir", hh_dir] + list(flags))[1])


def test_work_matches_a_hand_count_on_the_tiny_preset(hh_dir):
    """Steps x batch x tokens, passes, pairs, episodes and samples, counted by hand for the tiny preset on 240
    train pairs (rm.max_steps=0: one pass over each half, 8 pairs a step); and seconds = FLOPs / rate."""
    _, cfg = rlhf.parse_args(["plan", "--preset", "tiny", "--data_dir", hh_dir, "--rm.max_steps=0"] + ARITHMETIC)
    stages = plan.make_plan(cfg)["stages"]
    train, val = split_train_val(read_pairs(hh_dir, "train", cfg.data)[0], cfg.data.val_frac)
    tok = build_tokenizer(cfg.data, train)  # every pair is in the sample: the counts are exact
    pre, T = stages["pretrain"], 256  # tiny: model.block_size 256
    assert (pre["steps"], pre["rows"], pre["width"], pre["tokens"]) == (40, 8, T, 40 * 8 * T)
    assert pre["passes"] == pytest.approx(40 * 8 * T / len(lm_tokens(train, tok)), abs=0.005)
    n = GPT(replace(cfg.model, vocab_size=tok.vocab_size)).num_params()
    per_token = 6 * n + 12 * 2 * 2 * 32 * T  # 6N + 12 L H Q T
    val_tokens = ((40 - 1) // 20 + 2) * 2 * 8 * T  # validation before, at step 20, after: 2 batches of 8 x T
    assert pre["gflop"] == pytest.approx((40 * 8 * T + val_tokens / 3) * per_token / 1e9, abs=0.05)
    assert stages["sft"]["steps"] * stages["sft"]["rows"] == 20 * 8
    assert stages["sft"]["passes"] == pytest.approx(20 * 8 / len(train), abs=0.005)
    halves = split_halves(train)
    assert stages["rm"]["steps"] == [len(halves[0]) // 8, len(halves[1]) // 8]
    assert stages["rm"]["val_passes"] == sum(math.ceil(len(h) // 8 / 10) for h in halves)  # rm.eval_interval 10
    rs = stages["rs"]
    assert (rs["prompts"], rs["samples"], rs["winners"]) == (16, 16 * 4, 16 - 1)  # a tenth (at least 1) held out
    assert rs["passes"] == pytest.approx(8 * 8 / 15, abs=0.005)
    ppo = stages["ppo"]
    assert (ppo["episodes"], ppo["minibatch_steps"]) == (3 * 8, 3 * 2 * (8 // 4))  # iterations x epochs x minibatches
    # 4 SFT + 2 each from cd, rs, ppo, dpo
    assert (stages["eval"]["prompts"], stages["eval"]["samples"]) == (8, 8 * (4 + 4 * 2))
    assert (stages["dpo"]["policies"], stages["dpo"]["steps"]) == (["dpo"], 10)  # tiny: dpo.max_steps 10, one beta
    # sampled token steps: one generate call of up to 24 tokens per batch (PPO: per iteration)
    assert [stages[s]["decode_steps"] for s in ("rm", "rs", "ppo", "eval")] == [
        math.ceil(16 / 32) * 24, math.ceil(16 * 4 / 64) * 24, 3 * 24,
        (math.ceil(8 * 4 / 64) + 4 * math.ceil(8 * 2 / 64)) * 24]
    for name, s in stages.items():
        assert s["seconds"] == pytest.approx(s["gflop"] + s["tokenized"] / 1e6, abs=0.1), name


def test_last_line_is_json_and_total_is_the_sum_of_the_stages(hh_dir, capsys):
    assert rlhf.main(["plan", "--preset", "tiny", "--data_dir", hh_dir] + ARITHMETIC) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert {"preset", "device", "stages", "total_seconds"} <= set(doc) and doc["preset"] == "tiny"
    assert list(doc["stages"]) == ["pretrain", "sft", "cd", "rm", "rs", "ppo", "dpo", "eval"]
    assert doc["total_seconds"] == pytest.approx(sum(s["seconds"] for s in doc["stages"].values()), abs=0.05)
    for name in doc["stages"]:  # one table row per stage
        assert any(line.startswith(f"{name} ") for line in lines), name


def test_unknown_gpu_is_one_line_naming_the_known_ones(tmp_path, capsys):
    """Refused before any data is read (the data dir does not exist), as any bad flag is: one line."""
    assert rlhf.main(["plan", "--plan.gpu=b200", "--data_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'b200'" in err and "h100, h100pcie" in err and "rtx4090" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_named_gpu_runs_at_its_datasheet_peak_times_the_h100_utilisation(hh_dir):
    """--plan.gpu=h100: compiled pretraining at 0.40 x 989 TFLOP/s (README, Speed); every stage's compute time
    on an RTX 4090 is the H100's times 989 / 165, the ratio of their datasheet peaks (train.CUDA_PEAK_TFLOPS),
    while its sampled token steps cost what each GPU's decode model gives at the stage's rows (tests/test_rates.py):
    mostly launch-bound, not compute-bound."""
    flags = ["--preset", "gpu-scratch", "--pretrain.eval_interval=100000"]  # validation before and after only
    h100, rtx = make(hh_dir, *flags, "--plan.gpu=h100"), make(hh_dir, *flags, "--plan.gpu=RTX 4090")
    assert h100["device"] == "H100 (assumed)" and rtx["device"] == "RTX 4090 (assumed)"
    cfg = rlhf.parse_args(["--preset", "gpu-scratch"])[1]
    gpt = GPT(cfg.model)  # GPT-2 small, GPT-2's vocabulary
    pretrain = 5000 * 128 * 1024 * gpt.flops_per_token() / (0.40 * 989e12)
    assert h100["stages"]["pretrain"]["seconds"] == pytest.approx(pretrain, rel=2e-3)
    assert rtx["stages"]["ppo"]["decode_steps"] == 320 * 64  # iterations x max_new_tokens
    decode = {gpu: rates.gpu_rates(gpu, cfg)[0]["decode"] for gpu in ("h100", "rtx4090")}

    def fixed(plan, gpu, name):  # tokenising is the CPU's; a GPU's decode steps take what its decode model says
        s = plan["stages"][name]
        return s["tokenized"] / rates.TOKENIZE_PER_S + (s["decode_steps"] and s["decode_steps"] / decode[gpu][name])
    for name, s in h100["stages"].items():
        other = rtx["stages"][name]["seconds"] - fixed(rtx, "rtx4090", name)
        # seconds are rounded to 0.1: the H100's rounding error (<= 0.05 s) comes back 989 / 165 times larger
        assert other == pytest.approx((s["seconds"] - fixed(h100, "h100", name)) * 989 / 165, rel=0.01,
                                      abs=0.05 * (1 + 989 / 165)), name


def test_all_prints_the_plan_and_the_preset_before_the_first_stage(hh_dir, tmp_path, monkeypatch, capsys):
    calls = []
    for stage in ("stage_pretrain", "stage_sft", "stage_cd", "stage_rm", "stage_rs", "stage_ppo", "stage_dpo",
                  "stage_eval"):
        monkeypatch.setattr(rlhf, stage, lambda *a, name=stage: calls.append((name, capsys.readouterr().out)))
    assert rlhf.main(["all", "--preset", "tiny", "--data_dir", hh_dir, "--out_dir", str(tmp_path)] + ARITHMETIC) == 0
    first, printed = calls[0]
    assert first == "stage_pretrain" and len(calls) == 8
    assert "preset tiny (--preset)" in printed and '"total_seconds"' in printed.strip().splitlines()[-1]


def test_measuring_leaves_the_random_state_as_it_was(hh_dir):
    """The measurement (bench.py's functions at the tiny preset's shapes) draws random numbers; a run that
    follows the plan in `all` must start from the same state as without it."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    out = plan.make_plan(rlhf.parse_args(["plan", "--preset", "tiny", "--data_dir", hh_dir])[1], repeats=1)
    assert out["basis"].startswith("measured") and out["total_seconds"] > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_pm_and_dpo_training_are_timed_without_dropout(hh_dir, monkeypatch):
    """The stages after SFT switch dropout off (model.disable_dropout), which makes a CPU step ~40% faster: with
    dropout in the model, the plan times a step without it too, and PM training and DPO go at that rate."""
    def fake(speedup_without_dropout):
        def timed_steps(cfg, sc, model, tok, data, *args):
            positions = sc.batch_size * sc.grad_accum * cfg.model.block_size
            seconds = 10.0  # slow, so that training is most of each stage's time
            return seconds / (speedup_without_dropout if model.config.dropout == 0 else 1.0), positions, positions
        return timed_steps
    flags = ["--preset", "tiny", "--model.dropout=0.1"]
    # sampling and PPO at fixed speeds too: timed for real on a busy machine, their rates varied 4x between plans
    monkeypatch.setattr(rates.bench, "sample_rate", lambda model, q, m, n, *a, **k: q.size(0) * n / 1.0)
    monkeypatch.setattr(rates.bench, "ppo_iteration", lambda *a, **k: {"ppo_s": 1.0, "ppo_scoring_s": {"pm": 0.1}})
    monkeypatch.setattr(rates.bench, "timed_steps", fake(1.0))
    same = make(hh_dir, *flags)["stages"]
    monkeypatch.setattr(rates.bench, "timed_steps", fake(2.0))
    faster = make(hh_dir, *flags)
    assert "without compile or dropout" in faster["basis"]
    # pretraining keeps its dropout: its seconds stay (up to its tokenising, timed afresh by each plan), where
    # the twice-as-fast rate would halve them
    assert faster["stages"]["pretrain"]["seconds"] == pytest.approx(same["pretrain"]["seconds"], rel=0.15)
    for name in ("rm", "dpo"):
        assert faster["stages"][name]["seconds"] < 0.75 * same[name]["seconds"], name


def test_a_busy_cpu_is_named_in_the_basis(monkeypatch):
    """Timed while other processes load the CPU, the plan says so: its times are then too long."""
    monkeypatch.setattr(rates.os, "getloadavg", lambda: (4.3, 4.0, 3.0))
    assert "load average 4.3" in rates.busy_cpu_warning("cpu") and rates.busy_cpu_warning("cuda") == ""
    monkeypatch.setattr(rates.os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert rates.busy_cpu_warning("cpu") == ""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
@pytest.mark.parametrize("stage", ["sft", "cd", "pm", "dpo", "ppo"])
def test_the_memory_formula_is_within_25_percent_of_a_measured_step(stage):
    """plan.memory_parts against the peak resident memory one step of each trained stage adds, in a process of
    its own (tests/memory_step.py: 8 rows of 512 tokens, 4 layers of 256, fp32): gradients, Adam's moments, the
    activations and the head's working memory."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_step.py")
    out = subprocess.run([sys.executable, script, stage], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.75 <= got["measured"] / got["plan"] <= 1.25, got


def test_a_stage_planned_at_about_0_s_is_reported_off_by_seconds(tmp_path, capsys):
    """After each stage, `all` prints its time against the plan's: off by a ratio, or by seconds for a plan under
    10 s, where a ratio says nothing (GPT-2's load, planned at 0.0 s, took 6 s and read +551948213477%)."""
    log = rlhf.MetricsLog(str(tmp_path))
    rlhf.report_time(log, "pretrain", 6.0, {"stages": {"pretrain": {"seconds": 0.0}}})
    rlhf.report_time(log, "sft", 150.0, {"stages": {"sft": {"seconds": 100.0}}})
    assert capsys.readouterr().out.splitlines() == ["[time] pretrain: 6 s (plan: 0.0 s, +6.0 s)",
                                                    "[time] sft: 2 min 30 s (plan: 1 min 40 s, +50%)"]


def test_a_device_smaller_than_the_plans_peak_is_one_line_naming_the_flag():
    plan_ = {"stages": {"sft": {"memory_gb": 7.4, "memory_top": "activations 16 x 1024"},
                        "rm": {"memory_gb": 22.6, "memory_top": "activations 64 x 1002"}}}
    cfg = rlhf.Config()
    assert plan.check_fits(plan_, 24e9, cfg) is None
    why = plan.check_fits(plan_, 16e9, cfg)
    assert "22.6 GB" in why and "rm: activations 64 x 1002" in why and "--micro_tokens (now no cap" in why
    assert "\n" not in why
