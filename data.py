"""
Anthropic's hh-rlhf preference data: download, parse and split (tokens.py turns it into token sequences).

Each row of hh-rlhf is {"chosen": dialogue, "rejected": dialogue}: two whole conversations that share
everything up to the last "\n\nAssistant:" and differ only in the final assistant reply. We split
every row into one shared prompt and two replies (a `Pair`); validation prompts and the two PMs'
halves are split off by a stable hash of the prompt.

Use it:
    python data.py [--data_dir DIR]     # download (if needed), parse, and print what was read

    from data import DataConfig, format_stats, read_pairs, resolve_data_dir
    data_dir = resolve_data_dir(None)   # --data_dir > $HH_RLHF_DIR > download into the cache
    pairs, stats = read_pairs(data_dir, "train", DataConfig())
    print(format_stats(stats))

References:
  - Bai et al. 2022, "Training a Helpful and Harmless Assistant with Reinforcement Learning from
    Human Feedback", https://arxiv.org/abs/2204.05862 (the data, Sec. 2)
  - the dataset card: https://huggingface.co/datasets/Anthropic/hh-rlhf
"""
import gzip
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")
BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
# (sha256, bytes) of the files as published by Anthropic; None = unknown. A mismatch only warns.
KNOWN_FILES = {
    "harmless-base/train.jsonl.gz": (None, None),
    "harmless-base/test.jsonl.gz": ("ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03", 742801),
    "helpful-base/train.jsonl.gz": ("518a5bf288456fc9f3b7c980c54116fba0c52f274d3f4d344675d83e4058f6f4", 16200131),
    "helpful-base/test.jsonl.gz": ("8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b", 875191),
    "helpful-online/train.jsonl.gz": ("0994d18b82083f5c084ce04071b683958a724df8c7215ab1d851986642d36a2a", 20127228),
    "helpful-online/test.jsonl.gz": ("39a475cc7e0df972902f8e3a0972726fce826ac65369bda8c671de4330c60a10", 1053578),
    "helpful-rejection-sampled/train.jsonl.gz":
        ("0cea2d2ab2187624ec1314e8cc6fb579f0fa987b3a33e8102b7556ed4d255f64", 25697148),
    "helpful-rejection-sampled/test.jsonl.gz":
        ("abc35dbc56015db1dae0faa484514ccbc3eee0133bfcd557fc69250619b028bb", 1361231),
}
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MAX_LINE_BYTES = 1 << 20  # a real row is a few KB; a longer line is garbage, not a dialogue
HOW_TO_FIX = ("pass --data_dir DIR (a directory in the dataset's layout, e.g. DIR/harmless-base/"
              "train.jsonl.gz) or set HH_RLHF_DIR=DIR")


class DataError(Exception):
    """Bad or missing data; the message names the file (and line) and says what to do."""


@dataclass
class DataConfig:
    subsets: str = ""              # comma list of subsets to read; "" = all subsets present in the dir
    val_frac: float = 0.05         # fraction of train held out for validation, by hash of the prompt
    max_pairs: int = 0             # cap on train pairs read (0 = all): a fixed hash-chosen subset, mixed across subsets
    max_test_pairs: int = 0        # the same cap on the test split (PM test accuracy, eval's prompts)
    skip_bad_rows: bool = False    # count and skip malformed rows instead of raising DataError
    vocab: str = "gpt2"            # "gpt2" (all 50257 tokens) or "trimmed" (tokens seen in train + 256 bytes)
    trimmed_min_count: int = 1     # trimmed vocab: keep a token seen at least this many times in train
    trimmed_max_size: int = 0      # trimmed vocab: keep at most this many tokens, most frequent first (0 = no cap)
    max_prompt_tokens: int = 384   # prompts are left-truncated to this many tokens (the last turns matter most)
    max_reply_tokens: int = 128    # replies are cut to this many tokens (SFT, PM) and generated up to it (PPO)
    extra_dir: str = ""            # one more directory in the dataset's layout whose subsets are read too, train
                                   # split only (the comparisons `rlhf.py label` writes: --data.extra_dir=out/labels);
                                   # never capped by max_pairs, never filtered by subsets


@dataclass
class Pair:
    prompt: str    # dialogue up to and including the last "\n\nAssistant:"
    chosen: str    # preferred reply after it (leading space kept, so prompt + reply == original)
    rejected: str  # dispreferred reply
    subset: str    # which hh-rlhf subset it came from, e.g. "harmless-base"
    n_turns: int   # number of human turns in the prompt


# -----------------------------------------------------------------------------
# Download: resumable, checked, and never leaving a half file that looks complete

def download_file(url, dest, sha256=None, size=None, timeout=30.0, strict=False):
    """Download url to dest. Bytes go to dest.part; a rerun continues it with an HTTP Range request, and
    dest appears (by atomic rename) only once every byte the server announced has arrived.

    A complete file whose size or sha256 differs from the expected one only warns by default: the hub
    copy of the dataset may legitimately differ from the hashes we know, and the parser catches a
    genuinely broken file. strict=True (pinned model weights: nothing downstream would notice wrong
    numbers) raises instead and deletes the .part: its bytes are all there but wrong, so resuming could
    only append to them, and a rerun must start from zero anyway."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if have and r.status != 206:  # the server ignored our Range: start again from zero
                have = 0
            total = None if r.length is None else have + r.length
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after byte `have`: the .part is as long as the file or
            part.unlink()           # longer (the file changed); we can't tell which, so start over
            return download_file(url, dest, sha256, size, timeout, strict)
        raise DataError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DataError(f"downloading {url} failed ({getattr(e, 'reason', e)}); rerun to resume") from None
    got = part.stat().st_size
    if total is not None and got != total:  # connection dropped: http.client returns b"" silently
        raise DataError(f"downloading {url} stopped at {got} of {total} bytes; rerun to resume")
    if (problem := file_mismatch(part, sha256, size)) and strict:
        part.unlink()
        raise DataError(f"downloaded {url} but it has {problem}; deleted it, rerun to download it again")
    if problem:
        warnings.warn(f"{dest}: {problem}; using it anyway", stacklevel=2)
    os.replace(part, dest)
    return dest


def file_mismatch(path, sha256=None, size=None):
    """How the file at path differs from the expected size/sha256 ("12 bytes, expected 10"), or None
    if it matches (None = not known, not checked). The size first: a stat is free and catches a
    truncated file before the sha256 reads every byte (about a second per GB)."""
    if size is not None and (got := os.path.getsize(path)) != size:
        return f"{got} bytes, expected {size}"
    if sha256 is not None and (digest := _sha256(path)) != sha256:
        return f"sha256 {digest}, expected {sha256}"
    return None


def _sha256(path):
    """The file's sha256, read 1 MiB at a time (a GB file never sits in memory whole): by hand, as
    hashlib.file_digest does it, because that needs Python 3.11."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2 ** 20):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir():
    """~/.cache/rlhf-tutorial/hh-rlhf, or $RLHF_CACHE/hh-rlhf."""
    root = os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf-tutorial"
    return Path(root) / "hh-rlhf"


def subsets_present(data_dir, split=None):
    """Subset directories of data_dir holding SPLIT.jsonl.gz (any split if split is None)."""
    data_dir, splits = Path(data_dir), SPLITS if split is None else (split,)
    if not data_dir.is_dir():
        return []
    return sorted(d.name for d in data_dir.iterdir() if any((d / f"{s}.jsonl.gz").is_file() for s in splits))


def resolve_data_dir(data_dir=None, base_url=BASE_URL, cache_dir=None, timeout=30.0):
    """Where the data lives: the explicit data_dir, else $HH_RLHF_DIR, else the 8 official files
    downloaded (once) into the cache. A local dir may hold any subset of the subsets."""
    data_dir = data_dir or os.environ.get("HH_RLHF_DIR")
    if data_dir:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: no such directory; {HOW_TO_FIX}")
        if not subsets_present(data_dir):
            hint = " (it holds the files themselves: pass its parent)" if any(data_dir.glob("*.jsonl.gz")) else ""
            raise DataError(f"{data_dir}: no SUBSET/{{train,test}}.jsonl.gz inside{hint}; {HOW_TO_FIX}")
        return data_dir
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    for rel, (sha256, size) in KNOWN_FILES.items():
        if not (cache / rel).is_file():
            try:
                download_file(f"{base_url}/{rel}", cache / rel, sha256, size, timeout)
            except DataError as e:
                raise DataError(f"could not get hh-rlhf: {e}. Offline? {HOW_TO_FIX} "
                                f"(files downloaded so far are in {cache})") from None
    return cache


# -----------------------------------------------------------------------------
# Parsing: rows -> Pairs, with every problem named by file and line

def split_dialogue(text):
    """Split a dialogue at its LAST "\n\nAssistant:" into (prompt, reply, n_human_turns).
    The prompt keeps the "\n\nAssistant:" so the model sees whose turn it is; the reply keeps its
    leading space so that prompt + reply is the original text (and tokenizes the same way)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError("dialogue has no '\\n\\nAssistant:' turn")
    prompt, reply = text[:i + len(ASSISTANT)], text[i + len(ASSISTANT):]
    return prompt, reply, prompt.count(HUMAN)


def _parse_row(raw):
    """One jsonl line (bytes) -> (split_dialogue(chosen), split_dialogue(rejected)); a ValueError
    says what is wrong with the line."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, "[[[[..." nested too deep
        raise ValueError(f"bad JSON ({str(e)[:80]})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(row[key], str):
            raise ValueError(f"{key!r} is {type(row[key]).__name__}, expected a string")
    if b"\\u" in raw:  # an escape like "\ud800" can smuggle in a lone surrogate, which is not text:
        try:            # no tokenizer or UTF-8 file would take it
            (row["chosen"] + row["rejected"]).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid unicode (a lone surrogate escape)") from None
    return split_dialogue(row["chosen"]), split_dialogue(row["rejected"])


def _lines(path):
    """Yield (line_no, bytes) of a .jsonl.gz file, reading at most MAX_LINE_BYTES+1 bytes per line
    so that a gigantic line cannot exhaust memory (its excess is skipped)."""
    with gzip.open(path, "rb") as f:
        line_no = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
            yield line_no, raw


def _stable_hash01(text, salt):
    """A hash of text in [0, 1) that is the same on every machine and run (unlike Python's hash())."""
    digest = hashlib.sha256(f"{salt}:{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _read_file(path, subset, cfg, stats):
    """The Pairs of one SUBSET/SPLIT.jsonl.gz, counting what is dropped in stats (read_pairs says what)."""
    pairs, n_before = [], stats["read"]
    try:
        for line_no, raw in _lines(path):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            stats["read"] += 1
            try:
                (prompt, chosen, n_turns), (prompt_r, rejected, _) = _parse_row(raw)
            except ValueError as e:
                if not cfg.skip_bad_rows:
                    raise DataError(f"{path}:{line_no}: {e} (--data.skip_bad_rows=True to skip "
                                    f"such rows)") from None
                stats["skipped_bad"] += 1
                continue
            if prompt != prompt_r:
                stats["dropped_prompt_mismatch"] += 1
            elif not chosen or not rejected:  # "" (a " " reply is kept: "say nothing" is a real answer)
                stats["dropped_empty_reply"] += 1
            elif chosen == rejected:
                stats["dropped_same_reply"] += 1
            else:
                pairs.append(Pair(prompt, chosen, rejected, subset, n_turns))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); delete it and "
                        f"download again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if stats["read"] == n_before:
        raise DataError(f"{path}: empty file (no rows)")
    return pairs


def read_pairs(data_dir, split, cfg):
    """Read SUBSET/SPLIT.jsonl.gz for the configured subsets into Pairs. Dropped (counted, no error):
    rows whose chosen and rejected prompts differ (a handful in hh-rlhf: we can't tell which prompt
    the preference is about), rows with identical replies (no preference signal), and rows with a
    zero-length reply (nothing to train on; a whitespace reply, ~0.3% of harmless-base, is kept).
    Malformed rows raise DataError("file:line: what") unless cfg.skip_bad_rows; a broken file
    (corrupt gzip, empty) always raises. The train split adds every subset of cfg.extra_dir, parsed and
    checked the same way, after the max_pairs cap: a person's labels are few and each cost minutes, so a
    cap never drops them (they take part in the validation split and the PM halves, by the prompt's hash,
    as any pair does). Returns (pairs, stats)."""
    data_dir = Path(data_dir)
    if cfg.subsets:
        subsets = [s.strip() for s in cfg.subsets.split(",") if s.strip()]
        for s in subsets:
            if not (data_dir / s / f"{split}.jsonl.gz").is_file():
                raise DataError(f"{data_dir / s / f'{split}.jsonl.gz'}: no such file (subset {s!r} "
                                f"asked for in --data.subsets); present: {subsets_present(data_dir, split)}")
    else:
        subsets = subsets_present(data_dir, split) if data_dir.is_dir() else []
        if not subsets:
            raise DataError(f"{data_dir}: no SUBSET/{split}.jsonl.gz inside; {HOW_TO_FIX}")
    stats = dict(read=0, kept=0, dropped_prompt_mismatch=0, dropped_same_reply=0,
                 dropped_empty_reply=0, dropped_max_pairs=0, skipped_bad=0)
    pairs = [p for s in subsets for p in _read_file(data_dir / s / f"{split}.jsonl.gz", s, cfg, stats)]
    if not pairs:
        raise DataError(f"{data_dir}: no usable {split} pairs ({format_stats(stats)})")
    cap = cfg.max_test_pairs if split == "test" else cfg.max_pairs
    if cap and len(pairs) > cap:  # the same subset every run, mixed across subsets
        keep = set(sorted(range(len(pairs)), key=lambda i: _stable_hash01(pairs[i].prompt, "cap"))[:cap])
        stats["dropped_max_pairs"] = len(pairs) - cap
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    if split == "train" and cfg.extra_dir:
        extra = Path(cfg.extra_dir)
        if not subsets_present(extra, "train"):
            raise DataError(f"--data.extra_dir {extra}: no SUBSET/train.jsonl.gz inside (`python rlhf.py label` "
                            "writes them)")
        for s in subsets_present(extra, "train"):
            pairs += _read_file(extra / s / "train.jsonl.gz", s, cfg, stats)
    stats["kept"] = len(pairs)
    return pairs, stats


def format_stats(stats, name=""):
    """One human line for a read_pairs stats dict, e.g. for the log."""
    parts = [f"read {stats['read']} rows", f"kept {stats['kept']} pairs"]
    parts += [f"dropped {v} ({k[len('dropped_'):].replace('_', ' ')})" for k, v in stats.items()
              if k.startswith("dropped_") and v]
    parts += [f"skipped {stats['skipped_bad']} bad rows"] if stats["skipped_bad"] else []
    return (f"{name}: " if name else "") + ", ".join(parts)


def split_train_val(pairs, val_frac):
    """(train, val) by a stable hash of the prompt: deterministic across runs and machines, and pairs
    sharing a prompt land on the same side, so validation never sees a training prompt."""
    val = [p for p in pairs if _stable_hash01(p.prompt, "val") < val_frac]
    return [p for p in pairs if _stable_hash01(p.prompt, "val") >= val_frac], val


def train_comparisons(data_dir, cfg, halves=True):
    """The train split as every comparison stage reads it: (train, val, (half A, half B)), the validation
    pairs split off first; with halves=False both "halves" are all of train (--rm.split_halves=false)."""
    pairs, _ = read_pairs(data_dir, "train", cfg)
    train, val = split_train_val(pairs, cfg.val_frac)
    return train, val, split_halves(train) if halves else (train, train)


def split_halves(pairs):
    """Two disjoint ~50/50 halves by a stable hash of the prompt. Bai et al. train two preference
    models on disjoint halves: one is the PPO reward, the other an unbiased judge of the policy."""
    a = [p for p in pairs if _stable_hash01(p.prompt, "half") < 0.5]
    return a, [p for p in pairs if _stable_hash01(p.prompt, "half") >= 0.5]


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Download (if needed) and check the hh-rlhf data.")
    parser.add_argument("--data_dir", default=None, help="a dir in the dataset's layout (default: cache)")
    args, cfg = parser.parse_args(), DataConfig()
    try:
        data_dir = resolve_data_dir(args.data_dir)
        splits = {split: read_pairs(data_dir, split, cfg) for split in SPLITS}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for split, (pairs, stats) in splits.items():
        print(format_stats(stats, f"{data_dir} {split}"))
