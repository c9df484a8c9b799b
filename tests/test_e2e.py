"""End to end: the tiny preset runs every stage on a small hh-format dataset the test writes itself."""
import json
import math
import os

import pytest

import rlhf
from runtime import load_checkpoint


def test_tiny_run_of_every_stage_writes_a_valid_eval_json(hh_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    # a PPO learning rate high enough that three iterations move the policy well clear of the sampled KL's noise
    args = ["--preset", "tiny", "--data_dir", hh_dir, "--out_dir", out, "--sample.num_samples=1", "--ppo.lr=1e-3"]
    assert rlhf.main(["all"] + args) == 0
    for name in ("base", "sft", "cd", "pm_a", "pm_b", "rs", "ppo", "dpo"):
        assert load_checkpoint(os.path.join(out, f"{name}.pt"))["done"], name
    base, sft = load_checkpoint(os.path.join(out, "base.pt")), load_checkpoint(os.path.join(out, "sft.pt"))
    assert base["val_loss"] < base["val_loss_before"] and sft["val_loss"] < sft["val_loss_before"]

    ev = json.load(open(os.path.join(out, "eval.json")))
    for key in ("accuracy", "heldout_pm_accuracy", "length_baseline_accuracy", "bag_of_tokens_accuracy", "test_pairs",
                "ece", "score_kl_a_b"):
        assert key in ev["pm"], key
    assert list(ev["pm"]["by_subset"]) == ["harmless-base"] and ev["pm"]["by_subset"]["harmless-base"]["n"] == 40
    for policy in ("sft", "bon", "cd", "rs", "ppo", "dpo"):
        for key in ("pm_reward", "heldout_pm_reward", "kl", "win_rate_vs_sft", "lc_win_rate_vs_sft",
                    "mean_reply_tokens"):
            assert isinstance(ev["policies"][policy][key], float), (policy, key)
    assert ev["policies"]["bon"]["n"] == 4 and ev["policies"]["bon"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    for policy, p in ev["policies"].items():
        assert 0 <= p["win_rate_vs_sft"] <= 1 and math.isfinite(p["kl"]) and p["mean_reply_tokens"] > 0, policy
    # a sampled KL estimate can dip below 0 by noise (RS barely moves in 8 tiny steps); PPO's cannot, this far out
    assert ev["policies"]["sft"]["kl"] == 0 and ev["policies"]["ppo"]["kl"] > 0.2
    assert os.path.getsize(os.path.join(out, "report.md")) > 0

    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"pretrain/loss", "sft/loss", "sft/val_loss", "ppo/kl"} <= {k for r in rows for k in r}
    ppo_kl = [r["ppo/kl"] for r in rows if "ppo/kl" in r]
    assert ppo_kl[0] == pytest.approx(0, abs=1e-4) and ppo_kl[-1] > 0.2  # the policy starts at SFT, then moves
    # a finished flow is skipped when rerun, and the tools read its checkpoints
    assert rlhf.main(["all"] + args) == 0
    assert rlhf.main(["sample"] + args + ["--sample.policy=ppo", "--sample.prompt=hello",
                                          "--sample.max_new_tokens=8"]) == 0
    assert rlhf.main(["eval"] + args + ["--eval.pm_only=true"]) == 0
    # chat: two turns in hh-rlhf's format, each reply with the held-out PM-B's score, then an empty line ends it
    turns = iter(["hello there", "and then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    capsys.readouterr()
    assert rlhf.main(["chat"] + args + ["--policy=ppo", "--sample.show_score=true", "--sample.max_new_tokens=8"]) == 0
    assert capsys.readouterr().out.count("[PM-B score") == 2
