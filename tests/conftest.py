"""Shared test set-up: offline tokenizer files when the workplace has them, few threads, a tiny hh-format dataset."""
import gzip
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_cache = os.path.join(ROOT, "..", "shared", "tiktoken-cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_dialogue(i, reply):
    """A multi-turn hh-format dialogue whose final assistant turn is `reply`."""
    return (f"\n\nHuman: question {i} about topic {i % 7}?\n\nAssistant: Let me think about {i}."
            f"\n\nHuman: please answer {i}\n\nAssistant: {reply}")


def write_hh_dir(root, n_train=240, n_test=40):
    """A small hh-rlhf-layout directory (harmless-base/{train,test}.jsonl.gz) where the chosen reply is
    polite and the rejected one rude, so any stage has something learnable, in a couple of seconds."""
    (root / "harmless-base").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with gzip.open(root / "harmless-base" / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(n):
                chosen = make_dialogue(i, f"I'm sorry, I can help with {i} safely and kindly.")
                rejected = make_dialogue(i, f"No. Go away, {i} is stupid.")
                f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return str(root)


@pytest.fixture
def hh_dir(tmp_path):
    return write_hh_dir(tmp_path / "hh")
