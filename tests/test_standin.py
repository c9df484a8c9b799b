"""Tests for standin.py: the stand-in has the real row counts and length profile, every row is a valid
hh-rlhf row built from real source rows, one seed gives the same bytes, and a bad --from is one line.
Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python -m pytest tests/test_standin.py -q"""
import gzip
import json

import pytest

from lab import standin
from conftest import write_hh_dir
from data import DataConfig, HUMAN, SPLITS, SUBSETS, read_pairs, split_dialogue
from tokens import Tokenizer

SCALE = 0.01
# the real table (standin.REAL_ROWS) times SCALE, rounded half up, written out by hand
EXPECTED_ROWS = {("harmless-base", "train"): 425, ("helpful-base", "train"): 438,
                 ("helpful-online", "train"): 220, ("helpful-rejection-sampled", "train"): 524,
                 ("harmless-base", "test"): 23, ("helpful-base", "test"): 24,
                 ("helpful-online", "test"): 11, ("helpful-rejection-sampled", "test"): 27}


def source_dir(root):
    """write_hh_dir's small harmless-base copy plus one train row that read_pairs drops (same replies)."""
    write_hh_dir(root, n_train=240, n_test=40)
    with gzip.open(root / "harmless-base" / "train.jsonl.gz", "at", encoding="utf-8") as f:  # a second gzip member
        same = "\n\nHuman: hi\n\nAssistant: hello"
        f.write(json.dumps({"chosen": same, "rejected": same}) + "\n")
    return root


def rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(source dir, stand-in dir, build's summary), built once for the module at SCALE."""
    root = tmp_path_factory.mktemp("standin")
    src = source_dir(root / "src")
    return src, root / "out", standin.build(src, root / "out", seed=0, scale=SCALE)


def test_row_counts_are_the_real_table_times_scale(made):
    _, out, summary = made
    for (subset, split), n in EXPECTED_ROWS.items():
        assert len(rows(out / subset / f"{split}.jsonl.gz")) == n == summary["files"][(subset, split)][0]
        assert standin.scaled_rows(subset, split, 1.0) == standin.REAL_ROWS[subset][SPLITS.index(split)]


def test_read_pairs_keeps_every_row_the_source_kept(made):
    src, out, _ = made
    assert read_pairs(src, "train", DataConfig())[1]["dropped_same_reply"] == 1  # the source's own drop
    for split in SPLITS:
        _, stats = read_pairs(out, split, DataConfig())
        n = sum(v for (_, s), v in EXPECTED_ROWS.items() if s == split)
        assert stats["read"] == stats["kept"] == n and stats["skipped_bad"] == 0
        assert not any(v for k, v in stats.items() if k.startswith("dropped_"))


def test_rows_share_a_prompt_and_end_in_a_source_row_after_other_dialogues_turns(made):
    src, out, _ = made
    source = {(p.chosen, p.rejected): p.prompt for split in SPLITS for p in read_pairs(src, split, DataConfig())[0]}
    prepended = 0
    for subset in SUBSETS:
        for row in rows(out / subset / "train.jsonl.gz"):
            (prompt, chosen, _), (prompt_r, rejected, _) = (split_dialogue(row["chosen"]),
                                                            split_dialogue(row["rejected"]))
            assert prompt == prompt_r and (chosen, rejected) in source  # real replies, real label
            own = source[(chosen, rejected)]
            assert prompt.endswith(own)
            prefix = prompt[:-len(own)]
            assert prefix == "" or prefix.startswith(HUMAN)  # whole exchanges
            i = own.split("question ")[1].split(" ")[0]  # make_dialogue's dialogue number
            assert f"question {i} about" not in prefix and f"please answer {i}\n" not in prefix
            prepended += prefix != ""
    assert prepended > 1000  # the fixture's rows are short, so nearly every row gets preceding turns


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    src = source_dir(tmp_path / "src")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        standin.build(src, tmp_path / name, seed=seed, scale=0.002)
    files = [f"{subset}/{split}.jsonl.gz" for subset in SUBSETS for split in SPLITS]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert not list(tmp_path.glob("*/*/*.tmp"))  # written atomically, nothing left behind


def test_subset_mean_lengths_follow_the_profile(made):
    files = made[2]["files"]
    mean = {s: files[(s, "train")][2] / files[(s, "train")][0] for s in SUBSETS}
    for subset, ratio in standin.LENGTH_RATIO.items():
        assert mean[subset] / mean["harmless-base"] == pytest.approx(ratio, rel=0.1)


def test_train_split_has_76M_tokens_times_scale(made):
    _, out, summary = made
    tok = Tokenizer.gpt2()
    exact = sum(len(tok.encode(row[k])) for s in SUBSETS for row in rows(out / s / "train.jsonl.gz")
                for k in ("chosen", "rejected"))
    assert exact == pytest.approx(standin.TRAIN_TOKENS * SCALE, rel=0.1)
    assert summary["train_tokens"] == pytest.approx(exact, rel=0.03)  # the sampled estimate it prints


def test_readme_says_sizes_real_labels_meaningless(made):
    src, out, _ = made
    text = (out / "README.txt").read_text()
    assert "sizes are real" in text and "labels mean nothing" in text and str(src) in text and "seed 0" in text


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: (p / "empty").mkdir() or p / "empty"])
def test_bad_from_is_one_clear_line(tmp_path, capsys, make):
    assert standin.main(["--from", str(make(tmp_path)), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--from DIR" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
