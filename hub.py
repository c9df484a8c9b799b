"""
GPT-2's files: safetensors read and written with the standard library and torch alone (no pickle),
OpenAI's GPT-2 weights from the Hugging Face hub (pinned, resumable), and the export of a trained model
as a Hugging Face GPT-2 folder (weights, config, GPT-2's tokenizer files) that `transformers` loads.

model.py's GPT.from_pretrained reads through this file; the `export` command (stage_export, at the end) writes
through it:

    python rlhf.py export --policy ppo --to DIR

Nothing here builds or runs a model: it moves tensors between files and a GPT's state dict.

References:
  safetensors format: https://github.com/huggingface/safetensors#format
  GPT-2's byte-level BPE files: openai/gpt-2 src/encoder.py
"""

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from data import DataError, download_file, file_mismatch  # the dataset's downloader (data.py imports no model code)

# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length N, N bytes of JSON header
#    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
#    then the raw little-endian tensor bytes (offsets relative to the end of the header).

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a header this big is a corrupt file, not a model


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is a Python int subclass


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor} without pickle, so a downloaded file
    cannot run code. The header is validated fully; any problem raises ValueError("<path>: ...")."""
    path = str(path)

    def bad(what):
        return ValueError(f"{path}: {what}")

    try:
        f = open(path, "rb")
    except OSError as e:
        raise bad(f"cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"file has {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} is larger than the file ({size} bytes) or the {MAX_HEADER_BYTES} limit")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad(f"header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise bad("__metadata__ must be an object of string to string")
        data_len = size - 8 - n
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
            dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if dtype not in DTYPES:
                raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise bad(f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                    and 0 <= offs[0] <= offs[1] <= data_len):
                raise bad(f"tensor {name!r}: data_offsets {offs!r} outside the data section ({data_len} bytes)")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if offs[1] - offs[0] != nbytes:
                raise bad(f"tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes, shape {shape} "
                          f"{dtype} needs {nbytes}")
            spans.append((offs[0], offs[1], name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise bad(f"tensors {n0!r} and {n1!r} have overlapping data")
        tensors = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            dtype, shape = DTYPES[e["dtype"]], e["shape"]
            if end == begin:  # torch.frombuffer rejects empty buffers
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))  # a fresh writable buffer the tensor owns
            tensors[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)  # assumes a little-endian host
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors, atomically (tmp file + fsync + rename), so a crash
    never leaves a half-written file that looks like a model."""
    names = {v: k for k, v in DTYPES.items()}
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in names:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw bytes (bf16 via uint8 view)
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad with spaces so the data starts 8-byte aligned
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# OpenAI GPT-2 weights from the Hugging Face hub, read without `transformers`

GPT2_SIZES = {  # name -> (n_layer, n_head, n_embd); all have vocab 50257 and block 1024
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
N_HEAD_BY_EMBD = {n_embd: n_head for _, n_head, n_embd in GPT2_SIZES.values()}
GPT2_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
# (sha256, bytes) of each hub model.safetensors: weights that differ are refused, not loaded. None = not
# known here: gpt2-medium/large/xl download unverified, with a warning that says so.
GPT2_PINS = {
    "gpt2": ("248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", 548_105_171),
    "gpt2-medium": (None, None), "gpt2-large": (None, None), "gpt2-xl": (None, None)}
# OpenAI's checkpoint uses a Conv1D module whose weight is (in, out): transpose for nn.Linear
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def download_gpt2(name, cache_dir=None):
    """The hub's model.safetensors for `name`, downloaded once into the cache; returns its path.

    data.download_file does the work (a cut download resumes with an HTTP Range request; the file gets
    its final name only when complete), with strict=True: wrong pretrained weights would not crash
    anything, only quietly spoil every stage after them, so a file that differs from its pin is an error.
    A cached file is checked too, by size and then sha256 (about half a second for gpt2): the weights
    are read once per run, at pretrain's init, and a stale or hand-copied file is caught before use."""
    root = cache_dir or Path(os.environ.get("RLHF_CACHE", "~/.cache/rlhf-tutorial")).expanduser() / "gpt2"
    path = Path(root) / f"{name}.safetensors"
    url, (sha256, size) = GPT2_URL.format(name=name), GPT2_PINS[name]
    instead = ("Or download model.safetensors yourself and pass its local path "
               "(--pretrain.init=PATH, GPT.from_pretrained(PATH))")
    if sha256 is None:
        warnings.warn(f"{name}: sha256 unknown (not pinned in hub.GPT2_PINS), its weights are used unverified",
                      stacklevel=3)
    if path.exists():
        if problem := file_mismatch(path, sha256, size):
            raise DataError(f"{path} does not match the pinned {name} weights ({problem}); delete it and rerun. "
                            f"{instead}")
        return path
    try:
        return download_file(url, path, sha256, size, strict=True)
    except DataError as e:
        raise DataError(f"could not get the {name} weights: {e}. {instead}") from None


def read_gpt2(name_or_path, cache_dir=None, n_head=None):
    """GPT-2 weights by name (downloaded once) or from a local GPT-2-layout .safetensors file, for
    GPT.from_pretrained. Returns (path, the GPTConfig fields their shapes give, the state dict in our layout:
    no "transformer." prefix, no lm_head, Conv1D weights transposed to (out, in)), or raises a ValueError
    naming the file. The inverse of gpt2_hub_state_dict."""
    if name_or_path in GPT2_SIZES:
        path = download_gpt2(name_or_path, cache_dir)
        n_head = GPT2_SIZES[name_or_path][1]
    else:
        path = name_or_path
        if not os.path.isfile(path):
            raise ValueError(f"{path}: not a file, nor one of {', '.join(GPT2_SIZES)}")
    # some exports keep the "transformer." prefix, the masked-attention buffers or a copy of lm_head
    # (ours, of a trimmed vocabulary, an untied one: the rows it adds only rule out ids never trained)
    sd = {k.removeprefix("transformer."): w.t() if k.endswith(CONV1D) else w for k, w in load_safetensors(path).items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    for k in ("wte.weight", "wpe.weight"):
        if k not in sd:
            raise ValueError(f"{path}: no {k!r}, not a GPT-2 checkpoint")
    vocab_size, n_embd = sd["wte.weight"].shape
    n_head = n_head or N_HEAD_BY_EMBD.get(n_embd)
    if n_head is None:
        raise ValueError(f"{path}: cannot infer n_head for n_embd={n_embd}; pass n_head=")
    layers = {k.split(".")[1] for k in sd if k.startswith("h.")}  # h.N.*
    n_layer = 1 + max((int(i) for i in layers if i.isdigit()), default=-1)
    shape = dict(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                 n_embd=n_embd, bias="ln_f.bias" in sd)
    return path, shape, sd


def load_gpt2_weights(model, sd, path):
    """Copy read_gpt2's state dict into a GPT built from its shape: every key and every shape checked."""
    target = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if set(sd) != set(target):
        raise ValueError(f"{path}: missing keys {sorted(set(target) - set(sd))[:5]}, "
                         f"unexpected keys {sorted(set(sd) - set(target))[:5]}")
    with torch.no_grad():
        for k, w in sd.items():
            if w.shape != target[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, expected {tuple(target[k].shape)}")
            target[k].copy_(w)  # lm_head shares wte's storage, so it is loaded too


# -----------------------------------------------------------------------------
# Export to the Hugging Face GPT-2 layout, with GPT-2's tokenizer files

def gpt2_hub_state_dict(model):
    """The model's weights in the hub's GPT-2 layout: no "transformer." prefix, Conv1D (in, out)
    weights, no lm_head (tied). The inverse of read_gpt2."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.removeprefix("transformer.")
        sd[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    return sd


ZERO_MARGIN = 128.0  # logit gap that makes a probability exactly 0 in float32: exp(-104) underflows


def zero_probability_rows(model, n):
    """n rows for an untied LM head whose logit is, for every input, ZERO_MARGIN below any logit the
    model's own rows can reach, so that softmax gives them probability exactly 0 in float32.

    Why a linear head can do it: it reads h = g * z + b, the final LayerNorm's output, where z is the
    normalised residual stream, whose entries sum to 0 and whose norm is at most sqrt(C). The row
    w = c / g (elementwise) gives h . w = c * sum(z) + c * sum(b / g) = c * S, the same logit for every
    input, and c is set so that c * S = -(reach + ZERO_MARGIN), reach = max |h| * max |w_kept| bounding
    every kept logit. This needs the bias (S != 0): with b = 0 (a fresh ln_f) h . w is (g * w) . z,
    whose values at z and -z sum to 0, so no row stays below the kept ones: ValueError."""
    ln_f = model.transformer.ln_f
    if ln_f.bias is None:
        raise ValueError("no ln_f bias: no LM head row can rule a token out")
    g, b = ln_f.weight.detach().double().cpu(), ln_f.bias.detach().double().cpu()
    C = g.numel()
    h_max = g.abs().max() * C ** 0.5 + b.norm()  # the largest |h| any input can give
    reach = h_max * model.lm_head.weight.detach().double().cpu().norm(dim=1).max()
    row = (-(reach + ZERO_MARGIN) / (b / g).sum() / g).float()
    # check the float32 row as written: its logit is (g*w).z + b.w; the part of g*w along (1, ..., 1)
    # meets sum(z) = 0, the rest adds at most its norm * sqrt(C); float32 sums add at most C * 2^-24 * |h||w|
    w = row.double()
    a = g * w
    worst = (b * w).sum() + (a - a.mean()).norm() * C ** 0.5 + C * 2 ** -24 * h_max * w.norm()
    if not worst <= -(reach + 104):  # also False for NaN: a zero gain or a zero bias
        raise ValueError(f"cannot build zero-probability rows from ln_f (bias sum {float(b.abs().sum()):.3g}): "
                         "an untrained model? export one with --data.vocab=gpt2")
    return row.expand(n, C).clone()


def gpt2_vocab_state_dict(model, keep):
    """The hub layout over GPT-2's 50,257 ids for a model whose rows are the GPT-2 ids `keep` (sorted):
    wte puts each row at its GPT-2 id and 0 elsewhere (such an input, which only GPT-2's tokenizer
    makes, embeds as its position alone), and an untied lm_head has the same rows there and
    zero_probability_rows elsewhere, so that sampling and scoring over GPT-2's vocabulary are the
    model's own: the kept ids get exactly the project's log-probabilities, the others probability 0.
    Why not export the trimmed vocabulary itself, with a tokenizer of its tokens only: the project's
    tokenization (GPT-2's BPE, then a token outside keep spelled as bytes, data.Tokenizer) is no BPE,
    and merges over the kept tokens alone split 20-35% of the hh-rlhf sample's words otherwise; GPT-2's
    own files give exactly the project's ids up to that spelling step, and GPT-2's ids stay."""
    sd = gpt2_hub_state_dict(model)
    rows, ids = model.lm_head.weight.detach().cpu(), torch.tensor(keep)
    sd["wte.weight"] = torch.zeros(50257, rows.size(1), dtype=rows.dtype).index_copy_(0, ids, rows)
    sd["lm_head.weight"] = zero_probability_rows(model, 50257).to(rows.dtype).index_copy_(0, ids, rows)
    return sd


def export_hf(model, out_dir, keep=None, enc=None, generation=None):
    """Write a folder that transformers' GPT2LMHeadModel.from_pretrained(out_dir) loads, to inspect or
    share a trained model with standard tools. keep: the GPT-2 ids of a trimmed vocabulary's rows, which
    are then moved back to GPT-2's ids (gpt2_vocab_state_dict; trimmed_vocab.json lists them). enc: the
    tiktoken gpt2 encoding, to write GPT-2's tokenizer files (write_gpt2_tokenizer). generation: the
    sampling settings (temperature, top_k, top_p) that generate() and pipeline() then use by default."""
    cfg = model.config
    assert cfg.bias, "Hugging Face GPT-2 always has biases"
    os.makedirs(out_dir, exist_ok=True)
    vocab_size = cfg.vocab_size if keep is None else 50257
    hf = dict(  # the fields of OpenAI GPT-2's config.json on the hub
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size,
        n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        initializer_range=0.02, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        scale_attn_weights=True, use_cache=True, tie_word_embeddings=keep is None, bos_token_id=50256,
        eos_token_id=50256, summary_type="cls_index", summary_use_proj=True, summary_activation=None,
        summary_proj_to_labels=True, summary_first_dropout=0.1)
    _write_json(out_dir, "config.json", hf)
    gen = dict(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    if generation:  # the project's decoding rule (model.generate): temperature 0 is greedy, top_k 0 is off
        t = generation["temperature"]
        gen.update(dict(do_sample=False) if t <= 0 else
                   dict(do_sample=True, temperature=t, top_k=generation["top_k"], top_p=generation["top_p"]))
    _write_json(out_dir, "generation_config.json", gen)
    sd = gpt2_hub_state_dict(model) if keep is None else gpt2_vocab_state_dict(model, keep)
    save_safetensors(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if keep is not None:
        _write_json(out_dir, "trimmed_vocab.json", dict(
            kept_gpt2_ids=list(keep), note="the GPT-2 ids this model has; the others get probability 0. The "
            "project spells any other GPT-2 token as its bytes: to tokenize as it does, replace each id not "
            "listed by the ids of its token's characters (vocab.json spells one byte per character)"))
    if enc is not None:
        write_gpt2_tokenizer(enc, out_dir, cfg.block_size)


def _write_json(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (OpenAI's encoder.py), in which vocab.json
    and merges.txt spell tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=2)
def gpt2_bpe_files(enc):
    """GPT-2's vocab.json (token -> id) and merges.txt (pairs, by rank), i.e. OpenAI's encoder.json and
    vocab.bpe that tiktoken downloads, rebuilt from the tiktoken gpt2 Encoding: a token's id is its merge
    rank, and the merge that made token i is the split into two that BPE limited to ranks below i
    leaves (~1 s; checked against the files themselves in tests/test_export.py)."""
    u = _bytes_to_unicode()
    spell = lambda bs: "".join(u[b] for b in bs)
    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)]
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i in range(256, len(tokens)):
        parts = [bytes([b]) for b in tokens[i]]
        while len(parts) > 2:  # tiktoken's rule: merge the adjacent pair whose join has the lowest rank
            r, j = min((rank.get(a + b, i), j) for j, (a, b) in enumerate(zip(parts, parts[1:])))
            if r >= i:
                break
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {i} of {enc.name} is not one merge of lower-ranked tokens")
        merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(t): i for i, t in enumerate(tokens)}
    vocab["<|endoftext|>"] = enc.eot_token
    return vocab, merges


def write_gpt2_tokenizer(enc, out_dir, model_max_length):
    """GPT-2's tokenizer files, so that AutoTokenizer.from_pretrained(out_dir) works offline: vocab.json,
    merges.txt, and configs making <|endoftext|> the bos, eos and unk token. Like the project (data.py),
    the tokenizer reads "<|endoftext|>" inside a text as plain text (split_special_tokens), adds no
    BOS, and decodes without touching spaces."""
    vocab, merges = gpt2_bpe_files(enc)
    _write_json(out_dir, "vocab.json", vocab)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
    _write_json(out_dir, "special_tokens_map.json", special)
    _write_json(out_dir, "tokenizer_config.json", dict(
        tokenizer_class="GPT2Tokenizer", model_max_length=model_max_length, add_bos_token=False,
        add_prefix_space=False, errors="replace", split_special_tokens=True,
        clean_up_tokenization_spaces=False, **special))


# -----------------------------------------------------------------------------
# the `export` command

@dataclass
class ExportConfig:
    """`export`: write a checkpoint as a Hugging Face GPT-2 folder (weights, config, GPT-2's tokenizer files)."""
    policy: str = "ppo"          # base | sft | rs | ppo | pm_a | pm_b, or a checkpoint path
    to: str = ""                 # output folder ("" = out_dir/hf/<policy>)


def stage_export(run, export_cfg, sample_cfg):
    """Write a policy (or a preference model's trunk plus its head) as a Hugging Face GPT-2 folder."""
    from runtime import load_model  # runtime imports model, which imports this file
    path = (export_cfg.policy if export_cfg.policy.endswith(".pt")
            else os.path.join(run.out_dir, f"{export_cfg.policy}.pt"))
    model, tok, ckpt = load_model(path)
    to = export_cfg.to or os.path.join(run.out_dir, "hf", os.path.basename(path).removesuffix(".pt"))
    # generate() and pipeline() then sample as `sample` and `chat` do
    export_hf(model, to, keep=tok.keep, enc=tok.enc,
              generation=dict(temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p))
    if "head.weight" in ckpt["model"]:  # a PM: score = gain * (w . h_EOS + b) + bias
        head = {"weight": ckpt["model"]["head.weight"], "bias": ckpt["model"]["head.bias"]}
        save_safetensors(head, os.path.join(to, "reward_head.safetensors"),
                         metadata={"gain": str(ckpt.get("reward_gain", 1.0)), "bias": str(ckpt.get("reward_bias", 0.0)),
                                   "read_at": "final hidden state (after ln_f) of the EOS token appended to the reply"})
    print(f"[export] {path} -> {to} ({', '.join(sorted(os.listdir(to)))})")
