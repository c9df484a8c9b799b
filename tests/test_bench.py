"""bench.py runs end to end and reports every figure (a smoke test on tiny shapes: no timing is asserted)."""
import bench


def test_bench_reports_every_figure(hh_dir, capsys):
    out = bench.main(["--preset", "tiny", "--data_dir", hh_dir, "--pretrain.batch_size=2", "--ppo.batch_size=4",
                      "--ppo.minibatch_size=2", "--ppo.ppo_epochs=1", "--ppo.max_new_tokens=4"])
    for key in ("matmul_peak_gflops", "train_tokens_per_s", "train_gflops", "train_mfu", "gen_tokens_per_s_cache",
                "gen_tokens_per_s_nocache", "gen_cache_speedup", "peak_mem_mb"):
        assert out[key] > 0, key
    assert min(out["ppo_s"], out["ppo_rollout_s"], out["ppo_update_s"]) >= 0  # seconds, rounded: may be 0.0
    assert set(out["ppo_scoring_s"]) == {"policy_value", "ref", "pm"}
    assert '"train_mfu"' in capsys.readouterr().out  # one JSON object on stdout
