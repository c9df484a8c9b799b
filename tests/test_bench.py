"""bench.py runs end to end and reports every figure (a smoke test on tiny shapes), and its split of a PPO
iteration puts time in the phase that spent it."""
import time

import pytest
import torch

from lab import bench
import ppo
import reward
import rlhf
import train
from model import GPT

TINY_PPO = ["--preset", "tiny", "--pretrain.batch_size=2", "--ppo.batch_size=4", "--ppo.minibatch_size=2",
            "--ppo.ppo_epochs=1", "--ppo.max_new_tokens=4"]


def test_bench_reports_every_figure(hh_dir, capsys):
    out = bench.run_bench(rlhf.parse_args(["bench"] + TINY_PPO + ["--data_dir", hh_dir])[1])
    for key in ("matmul_peak_gflops", "train_tokens_per_s", "train_gflops", "train_mfu", "gen_tokens_per_s_cache",
                "gen_tokens_per_s_nocache", "gen_cache_speedup", "peak_mem_mb", "ppo_s", "ppo_rollout_s",
                "ppo_update_s"):
        assert out[key] > 0, key
    assert set(out["ppo_scoring_s"]) == {"policy_value", "ref", "pm"}
    for way in ("padded", "packed"):
        assert out[f"sft_{way}_tokens_per_s"] > 0 and out[f"sft_{way}_mfu"] > 0, way
        assert 0 < out[f"sft_{way}_real_frac"] <= 1, way
    assert '"train_mfu"' in capsys.readouterr().out  # one JSON object on stdout


def test_ppo_split_puts_time_in_its_phase(hh_dir, monkeypatch):
    """A known delay inside the PM's scoring must show up in ppo_scoring_s["pm"], every phase must have
    been timed (> 0, so each wrapper caught its call) and the phases must partition ppo_s."""
    delay = 0.3
    _, cfg = rlhf.parse_args(["all"] + TINY_PPO + ["--data_dir", hh_dir])
    tok, _, _ = train.load_data(cfg)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    queries = torch.randint(0, tok.vocab_size, (cfg.ppo.batch_size, 6))
    pm_reward_fn = reward.pm_reward_fn

    def slow_pm_reward_fn(*args, **kwargs):
        score = pm_reward_fn(*args, **kwargs)
        return lambda *a: (time.sleep(delay), score(*a))[1]

    monkeypatch.setattr(ppo, "pm_reward_fn", slow_pm_reward_fn)
    out = bench.ppo_iteration(cfg, GPT(cfg.model), tok, queries, torch.ones_like(queries), "cpu", "float32")
    scoring = out["ppo_scoring_s"]
    assert scoring["pm"] >= delay, out
    assert min(out["ppo_rollout_s"], out["ppo_update_s"], *scoring.values()) > 0, out
    parts = out["ppo_rollout_s"] + sum(scoring.values()) + out["ppo_update_s"]
    assert abs(parts - out["ppo_s"]) <= 5 * 0.5e-4, out  # equal up to the rounding of five figures


def test_bench_hf_without_transformers_says_how_to_install_it(monkeypatch, capsys):
    # the side-by-side race is an optional extra: without transformers, one clear message, no traceback
    import builtins
    from lab import bench_hf
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] in ("transformers", "trl"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    monkeypatch.setattr("sys.argv", ["bench_hf.py"])
    with pytest.raises(SystemExit, match="pip install transformers"):
        bench_hf.main()


def test_bench_hf_race_interleaves_the_sides_and_reports_each_rounds_ratio(monkeypatch):
    # a fake clock: each call advances it by that side's next duration, so the best times and the rounds'
    # ratios are known exactly; the calls must alternate ours, theirs (one warm-up each first)
    from lab import bench_hf
    now, calls = [0.0], []
    durations = {"ours": iter([9.0, 1.0, 2.0, 1.5]), "theirs": iter([9.0, 3.0, 2.0, 6.0])}

    def side(name):
        def run():
            calls.append(name)
            now[0] += next(durations[name])
        return run
    monkeypatch.setattr(bench_hf.time, "perf_counter", lambda: now[0])
    t_ours, t_theirs, rounds = bench_hf.race(side("ours"), side("theirs"), repeats=3)
    assert calls == ["ours", "theirs"] * 4
    assert (t_ours, t_theirs) == (1.0, 2.0)  # the warm-up's 9 s counts for neither side
    assert rounds == [3.0, 1.0, 4.0]
