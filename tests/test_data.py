"""Tests for data.py: parsing (incl. hostile input), tokenizers, examples, splits, collation, downloads.
Offline and fast: every dataset is a tiny hh-format dir written here; downloads hit a local server.
Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python -m pytest tests/test_data.py -q"""
import gzip
import hashlib
import json
import os
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data import (DataConfig, DataError, Pair, download_file, file_mismatch, format_stats, read_pairs, resolve_data_dir,
                  split_halves, split_train_val)
from tokens import Tokenizer, lm_tokens, pad_left, pad_right, pm_example, prompt_ids, sft_example, tokenize_pairs


def dialogue(*turns):
    """dialogue("hi", " hello", "how?", " fine") -> "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?..."
    (assistant turns bring their own leading space, so the last reply can be checked exactly)."""
    roles = ["\n\nHuman: ", "\n\nAssistant:"]
    return "".join(roles[i % 2] + t for i, t in enumerate(turns))


def row(prompt_turns, chosen, rejected):
    return {"chosen": dialogue(*prompt_turns, chosen), "rejected": dialogue(*prompt_turns, rejected)}


def write_jsonl_gz(path, lines):
    """Write rows (dicts) or raw lines (bytes) as a .jsonl.gz file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        for x in lines:
            f.write((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n")
    return path


GOOD = [row(["Hi"], " Hello!", " Go away."), row(["What is 2+2?"], " 4", " 5"), row(["Bye"], " Bye!", " No.")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


# --- parsing -------------------------------------------------------------------------------------

def test_parse_multiturn_unicode_and_drops(tmp_path):
    rows = [
        row(["Hi", " Hello, how can I help?", "Tell me a joke"], " Why did the chicken...", " No."),
        row(["Ça va? 日本語 🤗"], " Très bien 🙂", " Bof."),
        {"chosen": dialogue("Hi", " A"), "rejected": dialogue("Hello", " B")},  # prompts differ
        row(["Hi"], " Same reply", " Same reply"),                            # no preference
        row(["Hi"], "", " Something"),                                        # zero-length reply
        row(["Hi"], " ", " Something harmful"),                               # "say nothing" is kept
    ]
    write_jsonl_gz(tmp_path / "helpful-base" / "train.jsonl.gz", rows)
    pairs, stats = read_pairs(tmp_path, "train", DataConfig())
    assert stats == dict(read=6, kept=3, dropped_prompt_mismatch=1, dropped_same_reply=1,
                         dropped_empty_reply=1, dropped_max_pairs=0, skipped_bad=0)
    p = pairs[0]
    assert p.prompt.endswith("\n\nHuman: Tell me a joke\n\nAssistant:") and p.n_turns == 2
    assert p.prompt + p.chosen == rows[0]["chosen"] and p.prompt + p.rejected == rows[0]["rejected"]
    assert pairs[1].chosen == " Très bien 🙂" and pairs[1].subset == "helpful-base"
    assert "kept 3 pairs" in format_stats(stats) and "dropped 1 (prompt mismatch)" in format_stats(stats)


def test_subsets_all_present_or_named(tmp_path):
    write_jsonl_gz(tmp_path / "harmless-base" / "train.jsonl.gz", GOOD[:1])
    write_jsonl_gz(tmp_path / "helpful-base" / "train.jsonl.gz", GOOD[1:])
    pairs, _ = read_pairs(tmp_path, "train", DataConfig())
    assert [p.subset for p in pairs] == ["harmless-base", "helpful-base", "helpful-base"]
    pairs, _ = read_pairs(tmp_path, "train", DataConfig(subsets="helpful-base"))
    assert len(pairs) == 2
    with pytest.raises(DataError, match="helpful-online"):
        read_pairs(tmp_path, "train", DataConfig(subsets="helpful-online"))
    with pytest.raises(DataError, match="test.jsonl.gz"):
        read_pairs(tmp_path, "test", DataConfig())


HOSTILE = {  # name: the bad third line of a file
    "not utf-8": b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: \xff\xfe", "rejected": "x"}',
    "bad json": b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": ',
    "not an object": b'["chosen", "rejected"]',
    "missing key": json.dumps({"chosen": dialogue("hi", " a")}).encode(),
    "non-string field": json.dumps({"chosen": dialogue("hi", " a"), "rejected": 7}).encode(),
    "no assistant turn": json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}).encode(),
    "enormous line": json.dumps(row(["hi"], " " + "a" * (1 << 20), " b")).encode(),
    "json nested too deep": b"[" * 100_000,
    "5000-digit number": b'{"chosen": ' + b"9" * 5000 + b"}",
    "lone surrogate": json.dumps(row(["hi"], " \ud800", " b")).encode(),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_row_names_file_and_line_or_is_skipped(tmp_path, name):
    path = write_jsonl_gz(tmp_path / "harmless-base" / "train.jsonl.gz", GOOD[:2] + [HOSTILE[name]] + GOOD[2:])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ")):
        read_pairs(tmp_path, "train", DataConfig())
    pairs, stats = read_pairs(tmp_path, "train", DataConfig(skip_bad_rows=True))
    assert (stats["read"], stats["skipped_bad"], len(pairs)) == (4, 1, 3)


@pytest.mark.parametrize("name", ["truncated gzip", "not gzip", "empty file", "no rows"])
def test_broken_file_is_always_an_error(tmp_path, name):
    path = tmp_path / "harmless-base" / "train.jsonl.gz"
    write_jsonl_gz(path, GOOD * 200)
    data = path.read_bytes()
    path.write_bytes({"truncated gzip": data[:len(data) // 2], "not gzip": b"chosen,rejected\n" * 10,
                      "empty file": b"", "no rows": gzip.compress(b"\n")}[name])
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_pairs(tmp_path, "train", DataConfig(skip_bad_rows=True))


def test_no_usable_pairs_is_an_error(tmp_path):
    write_jsonl_gz(tmp_path / "harmless-base" / "train.jsonl.gz", [b"junk", row(["hi"], " a", " a")])
    with pytest.raises(DataError, match="no usable train pairs"):
        read_pairs(tmp_path, "train", DataConfig(skip_bad_rows=True))


def test_real_sample_reads_1500_rows():
    root = Path(os.environ.get("HH_RLHF_DIR") or Path(__file__).resolve().parents[2] / "shared" / "hh-rlhf-sample")
    if not (root / "harmless-base" / "train.jsonl.gz").is_file():
        pytest.skip("real hh-rlhf sample not available")
    pairs, stats = read_pairs(root, "train", DataConfig(subsets="harmless-base"))
    assert stats["read"] == 1500 and stats["skipped_bad"] == 0 and len(pairs) >= 1490
    assert stats["dropped_prompt_mismatch"] >= 1


def test_max_pairs_is_deterministic(tmp_path):
    write_jsonl_gz(tmp_path / "harmless-base" / "train.jsonl.gz", [row([f"q{i}"], " a", " b") for i in range(50)])
    a, stats = read_pairs(tmp_path, "train", DataConfig(max_pairs=10))
    b, _ = read_pairs(tmp_path, "train", DataConfig(max_pairs=10))
    assert len(a) == 10 and a == b and stats["dropped_max_pairs"] == 40


def test_train_and_test_have_their_own_caps(tmp_path):
    """A small preset caps the train split (what it can train on) and the test split (what it can score)
    separately: the cpu preset keeps 16,000 of 160,800 train pairs and 1,000 of 8,552 test pairs."""
    for split in ("train", "test"):
        write_jsonl_gz(tmp_path / "harmless-base" / f"{split}.jsonl.gz",
                       [row([f"q{i}"], " a", " b") for i in range(50)])
    assert len(read_pairs(tmp_path, "test", DataConfig(max_pairs=10))[0]) == 50
    test, stats = read_pairs(tmp_path, "test", DataConfig(max_pairs=10, max_test_pairs=20))
    assert len(test) == 20 and stats["dropped_max_pairs"] == 30
    assert len(read_pairs(tmp_path, "train", DataConfig(max_pairs=10, max_test_pairs=20))[0]) == 10


def test_extra_dir_adds_its_subsets_to_train_only_and_no_cap_drops_them(tmp_path):
    """--data.extra_dir (the comparisons `rlhf.py label` writes): every subset in it joins the train split after the
    max_pairs cap, parsed and checked as hh-rlhf's rows are; the test split and --data.subsets leave it alone."""
    for split in ("train", "test"):
        write_jsonl_gz(tmp_path / "hh" / "harmless-base" / f"{split}.jsonl.gz",
                       [row([f"q{i}"], " a", " b") for i in range(50)])
    labels = tmp_path / "labels"
    write_jsonl_gz(labels / "online-helpful" / "train.jsonl.gz", GOOD)
    cfg = DataConfig(max_pairs=10, subsets="harmless-base", extra_dir=str(labels))
    pairs, stats = read_pairs(tmp_path / "hh", "train", cfg)
    assert [p.subset for p in pairs] == ["harmless-base"] * 10 + ["online-helpful"] * 3
    assert pairs[10].prompt + pairs[10].chosen == GOOD[0]["chosen"] and stats["kept"] == 13
    assert stats["read"] == 53 and stats["dropped_max_pairs"] == 40
    assert len(read_pairs(tmp_path / "hh", "test", cfg)[0]) == 50
    write_jsonl_gz(labels / "online-harmless" / "train.jsonl.gz", [GOOD[0], b'{"chosen": "x"}'])
    with pytest.raises(DataError, match=re.escape(f"{labels / 'online-harmless' / 'train.jsonl.gz'}:2: missing key")):
        read_pairs(tmp_path / "hh", "train", cfg)
    with pytest.raises(DataError, match="--data.extra_dir .*nope: no SUBSET/train.jsonl.gz inside"):
        read_pairs(tmp_path / "hh", "train", DataConfig(extra_dir=str(tmp_path / "nope")))


# --- splits --------------------------------------------------------------------------------------

def test_splits_deterministic_and_disjoint():
    pairs = [Pair(f"\n\nHuman: q{i}\n\nAssistant:", " a", " b", "x", 1) for i in range(1000)]
    train, val = split_train_val(pairs, 0.1)
    assert (train, val) == split_train_val(list(pairs), 0.1)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in val) and len(train) + len(val) == 1000
    assert 50 < len(val) < 150
    a, b = split_halves(pairs)
    assert (a, b) == split_halves(list(pairs)) and {p.prompt for p in a}.isdisjoint(p.prompt for p in b)
    assert 400 < len(a) < 600 and len(a) + len(b) == 1000


# --- tokenizer -----------------------------------------------------------------------------------

def test_gpt2_tokenizer_eos_and_stop(tok):
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.stop_ids == [[198, 198, 20490, 25], [628, 20490, 25]]  # "\n\n" as 2 tokens, or as 1
    ids = tok.encode("a <|endoftext|> b")  # literal text, never the EOS token
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|endoftext|> b"


def test_trimmed_tokenizer_is_lossless_and_saves(tmp_path):
    tt = Tokenizer.trimmed(["\n\nHuman: hello there\n\nAssistant: hi"])
    assert 257 < tt.vocab_size < 300 and tt.decode([tt.eos_id]) == "<|endoftext|>"
    for s in ["hello there", "Unseen wörds ça 日本語 🤗🙂 \x00\t\n  ", "<|endoftext|>", "zzqxj" * 7, ""]:
        ids = tt.encode(s)
        assert tt.decode(ids) == s and all(0 <= i < tt.vocab_size for i in ids)
    assert [tt.decode(s) for s in tt.stop_ids] == ["\n\nHuman:"]  # "\n\n" (628) unseen: one spelling
    torch.save({"tokenizer": tt.state_dict()}, tmp_path / "t.pt")
    t2 = Tokenizer.from_state_dict(torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"])
    s = "hello there, unseen 🤗"
    assert t2.encode(s) == tt.encode(s) and t2.vocab_size == tt.vocab_size
    small = Tokenizer.trimmed(["a b c d e f g h"] * 3, min_count=2, max_size=260)
    assert small.vocab_size == 260
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer.from_state_dict({"encoding": "gpt2", "keep": [1, 2, 3]})


# --- examples and collation ----------------------------------------------------------------------

def test_sft_mask_is_reply_plus_eos(tok):
    prompt, reply = dialogue("Tell me a joke", ""), " Knock knock."
    ids, mask = sft_example(prompt, reply, tok, block_size=64, max_reply_tokens=32)
    n_reply = len(tok.encode(reply))
    assert mask == [0] * (len(ids) - n_reply - 1) + [1] * (n_reply + 1)
    assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == prompt + reply
    ids, mask = sft_example(prompt, reply, tok, block_size=64, max_reply_tokens=2)  # cut: no EOS
    assert sum(mask) == 2 and tok.eos_id not in ids


def test_prompt_truncation_keeps_the_end(tok):
    prompt = dialogue(*[f"turn {i} words words" for i in range(40)], "")
    end = tok.encode(prompt)[-10:]
    assert prompt_ids(prompt, tok, 10) == end
    ids, mask = sft_example(prompt, " ok", tok, block_size=16, max_reply_tokens=8)
    assert len(ids) == 16 and ids[:sum(1 for m in mask if m == 0)] == tok.encode(prompt)[-(16 - 2):]
    ids = pm_example(prompt, " ok" * 50, tok, block_size=16, max_reply_tokens=8)
    assert len(ids) == 16 and ids[-1] == tok.eos_id and ids[:7] == tok.encode(prompt)[-7:]


def test_encode_pairs_matches_encode(tok):
    pairs = [Pair(dialogue("hi", ""), " a", " b", "x", 1), Pair(dialogue("yo 🤗", ""), " c", " d", "x", 1)]
    enc = tokenize_pairs(pairs, tok)
    assert enc[1] == (tok.encode(pairs[1].prompt), tok.encode(" c"), tok.encode(" d"))
    assert sft_example(*enc[0][:2], tok, 32, 8) == sft_example(pairs[0].prompt, " a", tok, 32, 8)


def test_lm_tokens_whole_dialogues_eos_separated(tok):
    pairs = [Pair(dialogue("hi", ""), " a", " b", "x", 1), Pair(dialogue("yo", ""), " c", " d", "x", 1)]
    arr = lm_tokens(pairs, tok)
    assert arr.dtype == np.uint16 and (arr == tok.eos_id).sum() == 4 and arr[-1] == tok.eos_id
    dialogues = [p.prompt + r for p in pairs for r in (p.chosen, p.rejected)]
    assert tok.decode(arr.tolist()) == "".join(d + "<|endoftext|>" for d in dialogues)


def test_pad_left_and_right():
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and ids.shape == (2, 3)


# --- downloads against a local server ------------------------------------------------------------

@pytest.fixture
def server(http_server):
    """The loopback server (conftest.py) serving a small gzip of good rows."""
    http_server.body = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 300))
    return http_server


def test_download_full_with_matching_sha(server, tmp_path):
    sha = hashlib.sha256(server.body).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = download_file(f"{server.url}/harmless-base/train.jsonl.gz", tmp_path / "train.jsonl.gz",
                             sha256=sha, size=len(server.body), timeout=5)
    assert path.read_bytes() == server.body and not (tmp_path / "train.jsonl.gz.part").exists()


def test_sha256_check_works_without_file_digest(tmp_path, monkeypatch):
    """hashlib.file_digest is Python 3.11+; on 3.10 (here: with it removed) the download check still
    hashes the file, across more than one 1 MiB chunk."""
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    body = bytes(range(256)) * 4097  # 1 MiB + 256 bytes
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(body)
    assert file_mismatch(path, sha256=hashlib.sha256(body).hexdigest()) is None
    assert file_mismatch(path, sha256="0" * 64).startswith("sha256 ")


def test_dropped_download_is_not_complete_and_resumes(server, tmp_path):
    server.drop_after = len(server.body) // 3
    dest = tmp_path / "train.jsonl.gz"
    url, sha = f"{server.url}/harmless-base/train.jsonl.gz", hashlib.sha256(server.body).hexdigest()
    with pytest.raises(DataError, match="rerun to resume"):
        download_file(url, dest, sha256=sha, timeout=5)
    assert not dest.exists() and (tmp_path / "train.jsonl.gz.part").stat().st_size == len(server.body) // 3
    download_file(url, dest, sha256=sha, timeout=5)
    assert server.ranges[-1] == f"bytes={len(server.body) // 3}-" and dest.read_bytes() == server.body


@pytest.mark.parametrize("extra", [b"", b"junk"])
def test_leftover_part_complete_or_too_long_restarts(server, tmp_path, extra):
    (tmp_path / "train.jsonl.gz.part").write_bytes(server.body + extra)  # a run that died before rename
    dest = download_file(f"{server.url}/x.jsonl.gz", tmp_path / "train.jsonl.gz", timeout=5)
    assert dest.read_bytes() == server.body and server.ranges == [f"bytes={len(server.body + extra)}-", None]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    (tmp_path / "train.jsonl.gz.part").write_bytes(b"stale bytes")
    server.honour_range = False
    dest = download_file(f"{server.url}/x.jsonl.gz", tmp_path / "train.jsonl.gz", timeout=5)
    assert dest.read_bytes() == server.body and server.ranges == ["bytes=11-"]


def test_resolve_downloads_all_files_and_mismatch_warns(server, tmp_path, monkeypatch):
    monkeypatch.delenv("HH_RLHF_DIR", raising=False)
    with pytest.warns(UserWarning, match="expected"):  # the tiny test file is not the real one
        data_dir = resolve_data_dir(None, base_url=server.url, cache_dir=tmp_path, timeout=5)
    assert len(list(data_dir.glob("*/*.jsonl.gz"))) == 8 and not list(data_dir.glob("*/*.part"))
    pairs, stats = read_pairs(data_dir, "test", DataConfig(subsets="helpful-online"))
    assert stats["read"] == 900 and len(pairs) == 900


def test_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HH_RLHF_DIR", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="--data_dir") as e:
        resolve_data_dir(None, base_url=f"http://127.0.0.1:{port}", cache_dir=tmp_path, timeout=5)
    assert "HH_RLHF_DIR" in str(e.value) and not list(tmp_path.glob("**/*.jsonl.gz"))


def test_local_dir_without_subsets_is_an_error(tmp_path):
    write_jsonl_gz(tmp_path / "train.jsonl.gz", GOOD)
    with pytest.raises(DataError, match="pass its parent"):
        resolve_data_dir(str(tmp_path))
    with pytest.raises(DataError, match="no such directory"):
        resolve_data_dir(str(tmp_path / "nope"))
    write_jsonl_gz(tmp_path / "my-subset" / "test.jsonl.gz", GOOD)  # any subset name works
    assert resolve_data_dir(str(tmp_path)) == tmp_path
