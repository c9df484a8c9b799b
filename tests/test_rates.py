"""rates.py: each kind of work the plan counts is timed by a step of that kind (with bench.py's timing functions
replaced by fakes of known seconds, so the rates are exact and the tests take a second).
Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python -m pytest tests/test_rates.py -q"""
from dataclasses import replace

import numpy as np
import pytest
import torch

from lab import plan
from lab import rates
import rlhf
from model import GPT


def measure(hh_dir, monkeypatch, flags, step_s, sample_ms=lambda rows: 1.0):
    """rates.measured_rates for the tiny preset and `flags`, with bench's timers faked: an optimizer step takes
    step_s(kind, compiled, dropout) seconds (kind: "stream" for pretraining's windows, "packed" or "padded" SFT
    rows), a sampled token step of R rows sample_ms(R) ms and a PPO iteration 1 s. Returns (rates, cfg, the
    steps timed, the plan's model)."""
    _, cfg = rlhf.parse_args(["plan", "--preset", "tiny", "--data_dir", hh_dir] + flags)
    timed = []

    def timed_steps(cfg, sc, model, tok, data, device, dtype, repeats, steps=1):
        kind = "stream" if isinstance(data, np.ndarray) else "packed" if len(data[0]) == 3 else "padded"
        timed.append((kind, cfg.compile, model.config.dropout))
        positions = sc.batch_size * sc.grad_accum * cfg.model.block_size  # every row full: width = block_size
        return step_s(kind, cfg.compile, model.config.dropout), positions, positions

    def sample_rate(model, queries, mask, n, *args, **kwargs):  # new tokens a second: rows / a step's seconds
        return queries.size(0) / (sample_ms(queries.size(0)) * 1e-3)
    monkeypatch.setattr(rates.bench, "timed_steps", timed_steps)
    monkeypatch.setattr(rates.bench, "sample_rate", sample_rate)
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


def test_a_named_gpus_sampled_token_step_costs_more_at_more_rows():
    """A sampled token step on a named GPU: the H100's launch-bound step, measured at 64 rows (64 / 9,466 s), plus
    the bytes it reads over the GPU's memory bandwidth, most of them the KV cache of every row. The gpu preset's RS
    and eval sample 256 rows a call: on an RTX 4090 such a step reads 2 GB of cache more than PPO's 64-row one,
    2 ms, where every step was costed at the H100's 64-row time. Every GPU the plan knows has its bandwidth."""
    _, cfg = rlhf.parse_args(["plan", "--preset", "gpu"])
    assert (cfg.ppo.batch_size, cfg.rs.sample_batch_size, cfg.eval.batch_size) == (64, 256, 256)
    h100, rtx = rates.gpu_rates("h100", cfg)[0]["decode"], rates.gpu_rates("rtx4090", cfg)[0]["decode"]
    assert 1 / h100["ppo"] == pytest.approx(64 / 9466)  # PPO's rollout is the shape the H100 was timed at
    kv = 192 * (256 + 64 / 2) * 2 * 12 * 768 * 2       # 192 more rows of prompt + half the reply, K and V, bf16
    for stage in ("rs", "eval"):
        assert 1 / rtx[stage] - 1 / rtx["ppo"] == pytest.approx(kv / 1008e9), stage  # RTX 4090: 1,008 GB/s
        assert 1 / h100[stage] - 1 / h100["ppo"] == pytest.approx(kv / 3350e9), stage
    assert set(rates.GPU_BANDWIDTH_GBS) == set(rates.CUDA_PEAK_TFLOPS)


def test_measured_sampling_is_timed_at_each_stages_rows(hh_dir, monkeypatch):
    """Sampling is timed at the rows each stage samples a call (rm.eval_batch_size, rs.sample_batch_size,
    eval.batch_size), not only at PPO's: on a GPU a step costs about the same at 64 rows as at 16, so rows sampled
    at PPO's shape were costed ~4x too dear at 256 a call. Here a step of R rows takes (1 + R / 16) ms."""
    rows = ["--rm.eval_batch_size=16", "--rs.sample_batch_size=32", "--eval.batch_size=64"]
    r, *_ = measure(hh_dir, monkeypatch, rows, lambda *a: 1.0, lambda rows: 1 + rows / 16)
    for stage, rows in (("rm", 16), ("rs", 32), ("eval", 64)):
        assert 1 / r["decode"][stage] == pytest.approx(1e-3 * (1 + rows / 16)), stage
    assert r["decode"]["ppo"] == r["sample"] == float("inf")  # PPO's rollout is timed inside its iteration


def test_loading_gpt2_takes_its_read_and_first_its_download(hh_dir, tmp_path, monkeypatch):
    """--pretrain.init=gpt2 trains nothing, but reads GPT-2's 548 MB (checks, builds the model, writes base.pt) and,
    the first time, downloads them into hub.py's cache: seconds to minutes that the plan counted as 0.0 s, so that
    `all` reported the 6 s it took as +551948213477%."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    flags = ["plan", "--preset", "gpu", "--plan.gpu=h100", "--data_dir", hh_dir]
    first = plan.make_plan(rlhf.parse_args(flags)[1])["stages"]["pretrain"]
    size = 548_105_171  # hub.GPT2_PINS: gpt2's model.safetensors
    assert first["seconds"] > 1 and "download" in first["what"]
    # seconds are rounded to 0.1 s, and the plan counts the bytes from the model's shapes (14 KB of header fewer)
    assert first["seconds"] == pytest.approx(size / rates.LOAD_BYTES_PER_S + size / rates.DOWNLOAD_BYTES_PER_S, abs=0.1)
    cached = tmp_path / "cache" / "gpt2" / "gpt2.safetensors"
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as f:
        f.truncate(size)  # a sparse file: the plan only asks whether it is there
    then = plan.make_plan(rlhf.parse_args(flags)[1])["stages"]["pretrain"]
    assert then["seconds"] == pytest.approx(size / rates.LOAD_BYTES_PER_S, abs=0.1) and "download" not in then["what"]


def test_the_plan_looks_for_gpt2_where_hub_caches_it(tmp_path, monkeypatch):
    """rates.init_weights asks whether GPT-2's file is in hub.download_gpt2's cache without downloading it: the same
    path, with RLHF_CACHE set or not."""
    import hub
    monkeypatch.setattr(hub, "download_file", lambda url, path, *args, **kwargs: path)  # where it would download to
    for cache in (str(tmp_path), None):
        if cache:
            monkeypatch.setenv("RLHF_CACHE", cache)
        else:
            monkeypatch.delenv("RLHF_CACHE", raising=False)
        assert rates.gpt2_cache_path("gpt2") == hub.download_gpt2("gpt2")
