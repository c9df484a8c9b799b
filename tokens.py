"""
Tokens: GPT-2's BPE (optionally trimmed to the tokens the data uses), and the token sequences each
stage trains on, built from data.py's Pairs:
  - pretraining text  (lm_tokens):   every dialogue, EOS-separated, for the base LM
  - SFT examples      (sft_example): prompt + chosen reply, loss on the reply and EOS only; several to a
                                     row with pack_examples
  - PM examples       (pm_example):  prompt + reply + EOS, the reward is read at the EOS
  - RL prompts        (prompt_ids):  the prompt alone, left-truncated, for the policy to continue
and the padding that batches them (pad_right to train, pad_left to generate).
"""
import bisect
import itertools
import os

import numpy as np
import tiktoken
import torch

from data import HUMAN, DataError


# -----------------------------------------------------------------------------
# Tokenizer: GPT-2 BPE, optionally trimmed to the tokens the data uses

class Tokenizer:
    """GPT-2 BPE (tiktoken). With keep=None, ids are GPT-2's own (vocab 50257). With keep = a sorted
    list of GPT-2 ids (always including the 256 single-byte tokens and EOS), ids are remapped to
    0..len(keep)-1 and a GPT-2 token outside keep is spelled as its bytes' single-byte tokens, so
    encoding stays lossless while the embedding table, most of a small model's weights, shrinks
    (1,500 harmless-base rows use ~12.8k of GPT-2's 50,257 tokens)."""

    def __init__(self, keep=None):
        try:  # tiktoken fetches GPT-2's BPE files once, then reads them from its cache
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline, a proxy, a broken cache: say what to do, not where it broke
            raise DataError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); it downloads "
                            "two files once, so connect to the internet once, or point TIKTOKEN_CACHE_DIR "
                            "at a directory holding them") from None
        self.keep = None if keep is None else sorted(int(i) for i in keep)
        gpt2_bytes = [self.enc.encode_single_token(bytes([b])) for b in range(256)]
        if self.keep is None:  # identity maps
            self.to_old = self.to_new = list(range(self.enc.n_vocab))
        else:
            self.to_old, self.to_new = self.keep, [-1] * self.enc.n_vocab
            for new, old in enumerate(self.keep):
                self.to_new[old] = new
            if min(self.to_new[i] for i in gpt2_bytes + [self.enc.eot_token]) < 0:
                raise ValueError("a trimmed vocab must keep the 256 single-byte tokens and EOS")
        self.vocab_size = len(self.to_old)
        self.byte_ids = [self.to_new[i] for i in gpt2_bytes]  # our id of each byte value 0..255
        self.eos_id = self.to_new[self.enc.eot_token]
        # The model starting a new human turn ends its reply. In the data "\n\nHuman:" is always
        # [198, 198, 20490, 25], but a sampled "\n\n" may also come as the one token 628.
        stops = [self.encode(HUMAN), self.encode("\n\n") + self.encode(HUMAN[2:])]
        self.stop_ids = [s for i, s in enumerate(stops) if s not in stops[:i]]

    @classmethod
    def gpt2(cls):
        return cls()

    @classmethod
    def trimmed(cls, texts, min_count=1, max_size=0):
        """Keep the 256 byte tokens, EOS, and every GPT-2 token seen >= min_count times in texts
        (at most max_size tokens in all, most frequent first)."""
        base, texts = cls(), list(texts)
        counts = np.zeros(base.vocab_size, dtype=np.int64)  # how often each GPT-2 token occurs
        for start in range(0, len(texts), 4096):  # in chunks: the full data as Python ints would be GBs
            ids = base.encode_batch(texts[start:start + 4096])
            counts += np.bincount(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64),
                                  minlength=len(counts))
        must = set(base.byte_ids) | {base.eos_id}
        seen = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= max(min_count, 1) and i not in must]
        if max_size:
            seen = seen[:max(max_size - len(must), 0)]
        return cls(sorted(must | set(seen)))

    def _remap(self, gpt2_ids):
        """GPT-2 ids -> our ids; a token outside the kept set becomes its bytes' single-byte tokens."""
        new = list(map(self.to_new.__getitem__, gpt2_ids))
        if self.keep is None or -1 not in new:
            return new
        out = []
        for old, n in zip(gpt2_ids, new):
            out.extend([n] if n >= 0 else [self.byte_ids[b] for b in self.enc.decode_single_token_bytes(old)])
        return out

    def encode(self, text):
        """text -> ids. "<|endoftext|>" inside the text is ordinary text, never the EOS token: data must
        not be able to inject control tokens."""
        return self._remap(self.enc.encode_ordinary(text))

    def encode_batch(self, texts):
        """Like [encode(t) for t in texts], but tiktoken runs the batch on several threads."""
        return [self._remap(ids) for ids in self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)]

    def decode(self, ids):
        """ids (a list, array or tensor) -> text; bytes that are not valid UTF-8 (a cut character)
        become U+FFFD instead of raising."""
        gpt2_ids = [self.to_old[int(i)] for i in ids]
        return self.enc.decode_bytes(gpt2_ids).decode("utf-8", errors="replace")

    def state_dict(self):
        """Plain ints and lists only, so it loads with torch.load(weights_only=True)."""
        return {"encoding": "gpt2", "keep": self.keep}

    @classmethod
    def from_state_dict(cls, d):
        if d.get("encoding") != "gpt2":
            raise ValueError(f"unknown tokenizer encoding {d.get('encoding')!r}")
        return cls(d["keep"])


def build_tokenizer(cfg, train_pairs):
    """The tokenizer cfg.vocab asks for; the trimmed one is built from the training dialogues."""
    if cfg.vocab == "gpt2":
        return Tokenizer.gpt2()
    if cfg.vocab == "trimmed":
        texts = [t for p in train_pairs for t in (p.prompt, p.chosen, p.rejected)]
        return Tokenizer.trimmed(texts, cfg.trimmed_min_count, cfg.trimmed_max_size)
    raise ValueError(f"data.vocab must be 'gpt2' or 'trimmed', got {cfg.vocab!r}")


# -----------------------------------------------------------------------------
# Examples: token sequences for each stage

def lm_tokens(pairs, tok, chunk=4096):
    """All dialogues (prompt+chosen and prompt+rejected), each followed by EOS, as one flat array for
    next-token pretraining. uint16 when the vocab fits (half the memory), else int32."""
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.int32
    parts = []
    for start in range(0, len(pairs), chunk):  # in chunks: Python int lists of the full data are GBs
        texts = [p.prompt + r for p in pairs[start:start + chunk] for r in (p.chosen, p.rejected)]
        parts.extend(np.array(ids + [tok.eos_id], dtype=dtype) for ids in tok.encode_batch(texts))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def tokenize_pairs(pairs, tok):
    """[(prompt_ids, chosen_ids, rejected_ids)] for all pairs in one batched pass: encode once, then
    build examples from ids every epoch (sft_example, pm_example and prompt_ids accept ids)."""
    flat = tok.encode_batch([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)])
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _ids(x, tok):
    return tok.encode(x) if isinstance(x, str) else list(x)  # text, or ids encoded before


def sft_example(prompt, reply, tok, block_size, max_reply_tokens, eos=True):
    """(ids, loss_mask) for supervised fine-tuning on prompt + reply + EOS. loss_mask is 1 on the
    reply tokens and the EOS (the tokens the model should learn to produce), 0 on the prompt; train
    with inputs ids[:-1], targets ids[1:], mask loss_mask[1:]. A reply longer than max_reply_tokens
    is cut and gets no EOS (the model must not learn to stop mid-reply); so does one known to be
    unfinished (eos=False: a sample cut at max_new_tokens). The prompt is truncated from the LEFT,
    keeping its last turns, so that everything fits in block_size.
    prompt and reply may be strings or ids already encoded by tok."""
    assert block_size >= 2, "need room for a prompt token and a reply token"
    r = _reply(reply, tok, block_size, max_reply_tokens, eos)
    p = _ids(prompt, tok)[-(block_size - len(r)):]
    return p + r, [0] * len(p) + [1] * len(r)


def _reply(reply, tok, block_size, max_reply_tokens, eos=True):
    """The reply's ids as a policy learns them: cut to max_reply_tokens, + EOS only if it was not cut (and
    eos), and at most block_size - 1 tokens, so at least one prompt token is left to condition on."""
    reply_ids = _ids(reply, tok)
    r = reply_ids[:max_reply_tokens] + ([tok.eos_id] if eos and len(reply_ids) <= max_reply_tokens else [])
    return r[:block_size - 1]


def dpo_example(prompt, chosen, rejected, tok, block_size, max_reply_tokens):
    """(chosen_ids, rejected_ids, prompt_length) for DPO: one prompt, left-truncated the same for both so
    that both fit block_size, then each reply as sft_example makes it (EOS unless cut). DPO compares the
    two replies' log-probabilities given the same context, summed from position prompt_length on."""
    c, r = (_reply(x, tok, block_size, max_reply_tokens) for x in (chosen, rejected))
    p = _ids(prompt, tok)[-(block_size - max(len(c), len(r))):]
    return p + c, p + r, len(p)


def pack_examples(examples, block_size, pad_id, seed=0):
    """Pack (ids, loss_mask) SFT examples into rows of exactly block_size + 1 tokens: (ids, loss_mask,
    segment_ids) per row, segment k = the row's k-th example, -1 = padding at the row's end. Why: hh-rlhf
    dialogues are short (GPT-2 tokens: median ~130, long tail to 1024), so one right-padded example per row
    wastes ~70% of a batch of 32 on pads. The model keeps each example to itself (GPT.hidden_states with
    segment_ids: positions restart, attention stays inside the segment), so a packed row computes exactly what
    separate rows would. The row is shifted as a whole (inputs ids[:-1], targets ids[1:]); the one target that
    crosses a boundary is the next example's first token, a prompt token with loss_mask 0, so no loss crosses.
    Best fit decreasing (Ding et al. 2024, "Fewer Truncations Improve Language Modeling", arXiv:2404.10830):
    longest first, each into the row with the least room that still holds it, else a new row; equal lengths in a
    seeded random order. It leaves ~1% of the sample's 1,025-token rows as padding, filling rows in random order
    ~13%."""
    assert all(len(ids) <= block_size and mask[0] == 0 for ids, mask in examples), (
        "each example must fit block_size and start with a prompt (loss_mask 0) token")
    width = block_size + 1
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -len(examples[i][0]))  # stable: equal lengths keep the random order
    rows, with_room, rooms = [], {}, []  # example indices per row; room -> rows with that room; sorted rooms
    for i in order:
        n = len(examples[i][0])
        k = bisect.bisect_left(rooms, n)  # the least room that holds n tokens, if any row has it
        if k == len(rooms):  # none: a new row
            r, room = len(rows), width
            rows.append([])
        else:
            room, r = rooms[k], with_room[rooms[k]].pop()
            if not with_room[room]:
                del with_room[room], rooms[k]
        rows[r].append(i)
        left = room - n
        if left:  # a full row is never looked at again
            if left not in with_room:
                with_room[left] = []
                bisect.insort(rooms, left)
            with_room[left].append(r)
    return [_pad_row([t for i in row for t in examples[i][0]], [m for i in row for m in examples[i][1]],
                     [k for k, i in enumerate(row) for _ in examples[i][0]], width, pad_id) for row in rows]


def _pad_row(ids, mask, seg, width, pad_id):
    n = width - len(ids)
    return ids + [pad_id] * n, mask + [0] * n, seg + [-1] * n


def pm_example(prompt, reply, tok, block_size, max_reply_tokens):
    """ids of prompt + reply + EOS for the preference model, which reads its score at the final EOS
    (Bai et al. Sec. 3 append an end-of-context token). EOS is appended even to a cut reply, so the
    score is always read at the same kind of token; the prompt is left-truncated to fit block_size."""
    assert block_size >= 2, "need room for a prompt token and the EOS"
    r = _ids(reply, tok)[:min(max_reply_tokens, block_size - 2)] + [tok.eos_id]
    return _ids(prompt, tok)[-(block_size - len(r)):] + r


def prompt_ids(prompt, tok, max_prompt_tokens):
    """ids of the prompt, left-truncated to its last max_prompt_tokens (the latest turns); 0 = all."""
    ids = _ids(prompt, tok)
    return ids[-max_prompt_tokens:] if max_prompt_tokens > 0 else ids


def pad_right(seqs, pad_id):
    """Batch variable-length sequences, padding on the right (for training: positions line up from
    the start). Returns (ids (B, T) long, mask (B, T) long with 1 = real token, 0 = pad)."""
    return _pad(seqs, pad_id, left=False)


def pad_left(seqs, pad_id):
    """Batch sequences padding on the LEFT (for generation: every prompt ends at the last column, so
    new tokens are appended at the same position for all rows). Returns (ids (B, T), mask (B, T))."""
    return _pad(seqs, pad_id, left=True)


def _pad(seqs, pad_id, left):
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
