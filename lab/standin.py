"""
standin.py: a full-size stand-in of hh-rlhf, made from any local copy, for timing only.

Why: how long a stage takes on the real data depends on its shapes (how many rows each subset and
split has, how long their dialogues are), not on what the dialogues say. This writes a directory in
hh-rlhf's layout (SUBSET/{train,test}.jsonl.gz) with the real dataset's row count for every subset
and split and about its length profile, recombined from the rows of whatever copy is at hand (the
1,500-row sample, say), so anyone can time the real shapes without the 80 MB download:

    python standin.py --from ../shared/hh-rlhf-sample --to /tmp/hh-standin [--seed 0] [--scale 1]
    python rlhf.py --data_dir /tmp/hh-standin ...     # or bench.py --data_dir /tmp/hh-standin

How: each written row is a real source row (drawn seeded, with replacement, from the source's rows
of the same split, preferring the same subset) with whole preceding "Human: ... Assistant: ..."
exchanges of other source dialogues prepended to both its chosen and its rejected dialogue. The
two still share everything up to the last "\n\nAssistant:" and end in the source's real replies, so
data.read_pairs parses every row. How many exchanges a row gets is Poisson-drawn so that each
subset's mean row length meets its target: harmless-base rows TRAIN_TOKENS / (train rows weighted
by LENGTH_RATIO) GPT-2 tokens, the other subsets LENGTH_RATIO times that (the real files' ratios of
compressed bytes per row), which puts the full train split at about 76M tokens per pass over the
dialogue text (prompt+chosen and prompt+rejected). Tokens become characters through a chars-per-
token ratio measured on a sample of the source. Rows are never cut, so a subset whose source rows
are already longer than its target keeps their length.

From the 1,500-row sample on a busy 2-core CPU the full size takes about 25 s and writes 71 MB (the
real files: about 78 MB), train about 76.2M tokens (tokenising 2,000 random rows per subset).

Its sizes are real; its labels mean nothing. The prepended turns belong to unrelated dialogues, and
a "helpful-online" row may be a harmlessness comparison, so a preference model trained on it
learns nothing about helpfulness. Measure with it, never report accuracy from it.
"""
import argparse
import gzip
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import (ASSISTANT, DataConfig, DataError, HOW_TO_FIX, HUMAN, SPLITS, SUBSETS, _lines, format_stats,
                  read_pairs, resolve_data_dir, subsets_present)
from tokens import Tokenizer

# (train, test) rows of each subset of the published dataset (Anthropic/hh-rlhf)
REAL_ROWS = {"harmless-base": (42537, 2312), "helpful-base": (43835, 2354),
             "helpful-online": (22007, 1137), "helpful-rejection-sampled": (52421, 2749)}
# mean row length relative to harmless-base (the real files' compressed bytes per row)
LENGTH_RATIO = {"harmless-base": 1.0, "helpful-base": 1.15, "helpful-online": 2.9,
                "helpful-rejection-sampled": 1.5}
TRAIN_TOKENS = 76e6  # GPT-2 tokens in one pass over the real train split's dialogues
SAMPLE_ROWS = 500    # rows tokenised to measure characters per token (source, and each written file)
FROM_HINT = "pass --from DIR, a local copy in the dataset's layout (e.g. DIR/harmless-base/train.jsonl.gz)"


def scaled_rows(subset, split, scale):
    """Rows to write for one file: the real count times scale, rounded half up, at least 1 (so that
    every file exists and read_pairs never meets an empty one)."""
    return max(1, int(REAL_ROWS[subset][SPLITS.index(split)] * scale + 0.5))


def load_source(src):
    """(dir, {split: Pairs}) of the local copy, parsed and checked by data.read_pairs (its own dropped
    rows stay dropped). A split the copy lacks borrows the other split's rows. A dir without any
    SUBSET/{train,test}.jsonl.gz raises resolve_data_dir's DataError, its hint naming --from."""
    try:
        src = resolve_data_dir(Path(src))
    except DataError as e:
        raise DataError(str(e).replace(HOW_TO_FIX, FROM_HINT)) from None
    pools = {}
    for split in SPLITS:
        if subsets_present(src, split):
            pools[split], stats = read_pairs(src, split, DataConfig())
            print(format_stats(stats, f"source {src} {split}"))
    return src, {split: pools.get(split) or next(iter(pools.values())) for split in SPLITS}


def exchanges_of(pairs):
    """Every whole "\\n\\nHuman: ...\\n\\nAssistant: ..." exchange of the dialogues prompt + chosen, each
    with the Pair it came from (so that a row never gets its own dialogue's turns)."""
    out = []
    for pair in pairs:
        for piece in (pair.prompt + pair.chosen).split(HUMAN)[1:]:
            if ASSISTANT in piece:
                out.append((HUMAN + piece, pair))
    return out


def spread(items, k):
    """Up to k items taken evenly across the list: a deterministic sample without an RNG."""
    return items[::max(1, len(items) // k)][:k]


def chars_per_token(dialogues, tok):
    """Characters per GPT-2 token of some dialogues: turns a token target into characters without
    tokenising every row."""
    return sum(map(len, dialogues)) / max(1, sum(len(tok.encode(d)) for d in dialogues))


def target_chars(cpt):
    """{subset: mean characters per row to reach}: harmless-base rows `base` GPT-2 tokens, the others
    LENGTH_RATIO times that, with base set so that the full train split holds TRAIN_TOKENS."""
    base = TRAIN_TOKENS / sum(REAL_ROWS[s][0] * LENGTH_RATIO[s] for s in SUBSETS)
    return {s: base * LENGTH_RATIO[s] * cpt for s in SUBSETS}


def _other_exchange(exchanges, pair, rng):
    """A random exchange from a dialogue other than pair's (a few redraws; a one-dialogue source
    has no other, and gets its own)."""
    for _ in range(8):
        text, source = exchanges[rng.integers(len(exchanges))]
        if source is not pair:
            break
    return text


def make_rows(pool, exchanges, target, n, rng):
    """Yield n (chosen, rejected) dialogues: a random pair of pool, with k random exchanges of other
    dialogues in front of both, k ~ Poisson(lam), lam set so that the mean row length (characters of
    chosen + rejected) is about target. Rows are never cut: a pool already longer gets lam = 0."""
    mean_row = np.mean([2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pool])
    mean_add = 2 * np.mean([len(text) for text, _ in exchanges]) if exchanges else 0.0
    lam = max(0.0, target - mean_row) / mean_add if mean_add else 0.0
    for i, k in zip(rng.integers(len(pool), size=n), rng.poisson(lam, size=n)):
        pair = pool[i]
        prompt = "".join(_other_exchange(exchanges, pair, rng) for _ in range(k)) + pair.prompt
        yield prompt + pair.chosen, prompt + pair.rejected


def write_rows(path, rows, n):
    """Write (chosen, rejected) rows to path as gzip jsonl (UTF-8, like the real files), atomically:
    bytes go to path.tmp, renamed over path only when complete (deleted on failure). The gzip header
    holds no time, so one seed gives the same bytes every run. Returns the characters written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, chars = path.with_name(path.name + ".tmp"), 0
    try:
        with open(tmp, "wb") as f, gzip.GzipFile(path.name, "wb", compresslevel=6, fileobj=f, mtime=0) as gz:
            for chosen, rejected in tqdm(rows, total=n, desc=f"{path.parent.name}/{path.name}",
                                         unit="row", leave=False):
                gz.write((json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False)
                          + "\n").encode("utf-8"))
                chars += len(chosen) + len(rejected)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return chars


def written_chars_per_token(path, tok):
    """Characters per GPT-2 token of the first SAMPLE_ROWS rows of a written file (its rows are
    random draws, so the first ones are a fair sample)."""
    dialogues = []
    for line_no, raw in _lines(path):
        row = json.loads(raw)
        dialogues += [row["chosen"], row["rejected"]]
        if line_no >= SAMPLE_ROWS:
            break
    return chars_per_token(dialogues, tok)


def build(src, out, seed=0, scale=1.0, command=""):
    """Write the stand-in of the local copy src into out; print one line per file and the total.
    Returns {"files": {(subset, split): (rows, bytes, chars)}, "train_tokens": estimate, "cpt": ratio}
    where the train estimate is each train file's characters over its own measured chars per token."""
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    src, pools = load_source(src)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise DataError(f"{out}: is the source; pass another --to")
    tok = Tokenizer.gpt2()
    cpt = chars_per_token([p.prompt + r for p in spread(pools["train"], SAMPLE_ROWS)
                           for r in (p.chosen, p.rejected)], tok)
    targets, files, train_tokens = target_chars(cpt), {}, 0.0
    for split in SPLITS:
        exchanges = exchanges_of(pools[split])
        for subset in SUBSETS:
            pool = [p for p in pools[split] if p.subset == subset] or pools[split]
            n, path = scaled_rows(subset, split, scale), out / subset / f"{split}.jsonl.gz"
            rng = np.random.default_rng([seed, SUBSETS.index(subset), SPLITS.index(split)])
            chars = write_rows(path, make_rows(pool, exchanges, targets[subset], n, rng), n)
            files[(subset, split)] = (n, path.stat().st_size, chars)
            print(f"{subset}/{split}: {n:,} rows, {path.stat().st_size / 1e6:.1f} MB, {chars / n:,.0f} chars/row")
            if split == "train":
                train_tokens += chars / written_chars_per_token(path, tok)
    rows, size = sum(f[0] for f in files.values()), sum(f[1] for f in files.values())
    print(f"total: {rows:,} rows, {size / 1e6:.1f} MB; train about {train_tokens / 1e6:.1f}M GPT-2 tokens per "
          f"pass (target {TRAIN_TOKENS * scale / 1e6:.1f}M; source {cpt:.2f} chars/token)")
    write_readme(out, src, seed, scale, command, files, train_tokens)
    return {"files": files, "train_tokens": train_tokens, "cpt": cpt}


def write_readme(out, src, seed, scale, command, files, train_tokens):
    """README.txt in out: what this is, what is real and what is not, and how it was made."""
    table = "\n".join(f"  {subset}/{split}.jsonl.gz: {n:,} rows, {size / 1e6:.1f} MB, {chars / n:,.0f} chars/row"
                      for (subset, split), (n, size, chars) in files.items())
    text = f"""A stand-in for Anthropic's hh-rlhf, for timing only. Not the dataset.

Its sizes are real: every SUBSET/SPLIT.jsonl.gz has the real row count (times --scale {scale:g}) and
about the real length profile (train: about {train_tokens / 1e6:.1f}M GPT-2 tokens per pass over the dialogues).

Its labels mean nothing: each row is a real row of the source with whole exchanges of other, unrelated
dialogues prepended to both chosen and rejected, and rows of any subset may stand in for another's. A
preference model trained on it learns nothing about helpfulness; time stages on it, report no accuracy.

Made by: {command or "standin.build"}
Source: {src} (rows drawn with replacement, seed {seed}), see standin.py for how.
{table}
"""
    tmp = out / "README.txt.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "README.txt")


def main(argv):
    """The command line; a bad input is one line on stderr and exit code 2 (RLHF_DEBUG=1: traceback)."""
    parser = argparse.ArgumentParser(
        description="Write a full-size stand-in of hh-rlhf for timing (labels meaningless).")
    parser.add_argument("--from", dest="src", required=True, help="a local copy in hh-rlhf's layout")
    parser.add_argument("--to", dest="out", required=True, help="the directory to write (e.g. under /tmp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row draws (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every row count (default 1)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        build(args.src, args.out, args.seed, args.scale, shlex.join(["python", "standin.py", *argv]))
    except (DataError, ValueError) as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
