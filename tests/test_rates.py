"""rates.py: each kind of work the plan counts is timed by a step of that kind (with bench.py's timing functions
replaced by fakes of known seconds, so the rates are exact and the tests take a second).
Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python -m pytest tests/test_rates.py -q"""
from dataclasses import replace

import numpy as np
import pytest
import torch

import plan
import rates
import rlhf
from model import GPT


def measure(hh_dir, monkeypatch, flags, step_s):
    """rates.measured_rates for the tiny preset and `flags`, with bench's timers faked: an optimizer step takes
    step_s(kind, compiled, dropout) seconds (kind: "stream" for pretraining's windows, "packed" or "padded" SFT
    rows), sampling 1 ms a token step and a PPO iteration 1 s. Returns (rates, cfg, the steps timed)."""
    _, cfg = rlhf.parse_args(["plan", "--preset", "tiny", "--data_dir", hh_dir] + flags)
    timed = []

    def timed_steps(cfg, sc, model, tok, data, device, dtype, repeats, steps=1):
        kind = "stream" if isinstance(data, np.ndarray) else "packed" if len(data[0]) == 3 else "padded"
        timed.append((kind, cfg.compile, model.config.dropout))
        positions = sc.batch_size * sc.grad_accum * cfg.model.block_size  # every row full: width = block_size
        return step_s(kind, cfg.compile, model.config.dropout), positions, positions
    monkeypatch.setattr(rates.bench, "timed_steps", timed_steps)
    monkeypatch.setattr(rates.bench, "sample_rate", lambda model, q, m, n, *a, **k: q.size(0) * n / (n * 1e-3))
    monkeypatch.setattr(rates.bench, "ppo_iteration", lambda *a, **k: {"ppo_s": 1.0, "ppo_scoring_s": {"pm": 0.1}})
    d = plan.read_data(cfg)
    with torch.device("meta"):
        gpt = GPT(replace(cfg.model, vocab_size=d.tok.vocab_size))
    return rates.measured_rates(cfg, d, gpt, "cpu", 1)[0], cfg, timed, gpt


def step_flops(cfg, sc, gpt):
    """The plan's FLOPs for one optimizer step of `sc` with full rows (plan.lm_work)."""
    T = cfg.model.block_size
    return sc.batch_size * sc.grad_accum * T * rates.fpt(gpt, T)


def test_compiled_and_eager_training_are_timed_by_their_own_steps(hh_dir, monkeypatch):
    """With --compile, pretraining and SFT run compiled (kinds pretrain and train) while the PMs and DPO train
    eagerly, without dropout (eager): on a GPU ~2x slower a FLOP. Each rate comes from a step of its kind: here a
    compiled pretraining step takes 1 s, a compiled packed SFT step 1.5 s and an eager one 3 s. Timing every kind
    by the compiled pretraining step made the plan's SFT ~1.5x and its PMs and DPO ~2x too short on a GPU."""
    seconds = {("stream", True): 1.0, ("packed", True): 1.5}
    r, cfg, timed, gpt = measure(hh_dir, monkeypatch, ["--compile=true", "--sft.pack=true", "--model.dropout=0.1"],
                                 lambda kind, compiled, dropout: seconds.get((kind, compiled), 3.0))
    assert r["eager"] == pytest.approx(step_flops(cfg, cfg.sft, gpt) / 3.0)
    assert r["train"] == pytest.approx(step_flops(cfg, cfg.sft, gpt) / 1.5)
    assert r["pretrain"] == pytest.approx(step_flops(cfg, cfg.pretrain, gpt) / 1.0)
    # pretraining and SFT keep their dropout; the eager step is the PMs': one example a row, no compile, no dropout
    assert {("stream", True, 0.1), ("packed", True, 0.1), ("padded", False, 0.0)} <= set(timed)
