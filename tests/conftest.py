"""Shared test set-up: offline tokenizer files when the workplace has them, few threads, a tiny hh-format dataset,
and a loopback HTTP server for the download tests (data.py's dataset, model.py's GPT-2 weights)."""
import gzip
import http.server
import json
import os
import sys
import threading

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


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves RangeHandler.body for every path, honours "Range: bytes=K-" (unless honour_range is False),
    and drops the connection after drop_after bytes once (if set). Records the Range headers it saw."""
    body, drop_after, ranges, honour_range, timeout, url = b"", None, [], True, 5, ""

    def do_GET(self):
        cls = type(self)
        rng = self.headers.get("Range")
        cls.ranges.append(rng)
        rng = rng if cls.honour_range else None
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if start >= len(self.body) and rng:  # what servers answer when the .part already holds it all
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(self.body) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        if cls.drop_after is not None:
            self.wfile.write(self.body[start:cls.drop_after])
            cls.drop_after, self.close_connection = None, True
            return
        self.wfile.write(self.body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 for one test. Yields the handler class: set .body (and .drop_after,
    .honour_range) on it, request .url + any path, read the Range headers it saw in .ranges."""
    RangeHandler.body, RangeHandler.drop_after, RangeHandler.ranges, RangeHandler.honour_range = b"", None, [], True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    RangeHandler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield RangeHandler
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def write_tiny_flow(tmp_path, models, n_train=60, n_test=8):
    """An out_dir holding tiny random checkpoints as the flow's stages leave them (2 layers x 32, block 64), and
    a small hh-rlhf dir. models: {name: GPT or RewardModel class}, each seeded by its place. -> (out, data, tok)."""
    from model import GPTConfig
    from runtime import model_checkpoint, save_checkpoint
    from tokens import Tokenizer
    out, data = tmp_path / "out", write_hh_dir(tmp_path / "hh", n_train=n_train, n_test=n_test)
    out.mkdir()
    tok = Tokenizer.trimmed([make_dialogue(i, "I'm sorry, I can help safely and kindly. No. Go away, stupid.")
                             for i in range(7)])
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
    for seed, (name, cls) in enumerate(models.items()):
        torch.manual_seed(seed)
        save_checkpoint(str(out / f"{name}.pt"), model_checkpoint(cls(config), tok, done=True))
    return str(out), data, tok
