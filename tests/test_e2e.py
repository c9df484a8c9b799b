"""End to end: the tiny preset runs the stages on a small hh-format dataset the test writes itself."""
import json
import os

import rlhf
from train import load_checkpoint


def test_tiny_pretrain_then_sft(hh_dir, tmp_path):
    out = str(tmp_path / "out")
    args = ["--preset", "tiny", "--data_dir", hh_dir, "--out_dir", out, "--sample.num_samples=1"]
    assert rlhf.main(["pretrain"] + args) == 0
    assert rlhf.main(["sft"] + args) == 0
    base, sft = load_checkpoint(os.path.join(out, "base.pt")), load_checkpoint(os.path.join(out, "sft.pt"))
    assert base["done"] and sft["done"]
    assert base["val_loss"] < base["val_loss_before"] and sft["val_loss"] < sft["val_loss_before"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"pretrain/loss", "sft/loss", "sft/val_loss"} <= {k for r in rows for k in r}
    assert rlhf.main(["sample"] + args + ["--sample.prompt=hello", "--sample.max_new_tokens=8"]) == 0
