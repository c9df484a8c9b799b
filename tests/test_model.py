"""Tests for model.py: fast paths against slow references, padding/causality invariances,
sampling/stopping rules, safetensors validation and the GPT-2 weight layout. Tiny models, CPU, seconds."""
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import hub as hub_py
import model as model_py
from data import DataError
from hub import (export_hf, gpt2_hub_state_dict, gpt2_vocab_state_dict, load_safetensors, save_safetensors,
                 zero_probability_rows)
from model import GPT, GPTConfig, disable_dropout

V = 101  # vocab


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=V, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def left_pad(seqs, pad=0):
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return idx, mask


def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 3, 10)]


# -----------------------------------------------------------------------------
# generation: KV cache vs full recompute, batching, stopping


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_kv_cache_matches_recompute(sampling):
    model = tiny()
    idx, mask = left_pad(prompts())
    out = [model.generate(idx, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(7),
                          use_cache=use_cache, **sampling) for use_cache in (True, False)]
    assert torch.equal(out[0][0], out[1][0])
    assert torch.allclose(out[0][1], out[1][1], atol=1e-5)
    assert torch.equal(out[0][2], out[1][2])


def test_batched_left_padded_matches_one_at_a_time():
    model = tiny()
    ps = prompts()
    idx, mask = left_pad(ps)
    tokens, logprobs, m = model.generate(idx, mask, max_new_tokens=16, temperature=0.0)
    for i, p in enumerate(ps):
        t1, lp1, m1 = model.generate(torch.tensor([p]), max_new_tokens=16, temperature=0.0)
        assert torch.equal(tokens[i], t1[0])
        assert torch.allclose(logprobs[i], lp1[0], atol=1e-5)


def cached_steps(model, idx, masks):
    """Hidden states of idx (B, T) read through a KV cache: the prompt idx[:, :T - 4], then its last 4 tokens
    one at a time (decode steps); masks[i] is the attention_mask of the i-th call (None: no padding)."""
    T = idx.size(1)
    cache, calls = model_py.KVCache(T), [idx[:, :T - 4]] + [idx[:, t:t + 1] for t in range(T - 4, T)]
    with torch.no_grad():
        return [model.hidden_states(x, m if m is None else m[:, :x.size(1)], cache) for x, m in zip(calls, masks)]


def test_unpadded_rows_take_no_mask_with_the_numbers_of_an_all_ones_mask():
    # no padding and no cache: nanoGPT's case, SDPA told is_causal instead of given a mask
    model = tiny()
    idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    pos, mask = model_py.positions_and_mask(idx)
    assert mask is None and torch.equal(pos, torch.arange(12)[None])
    assert torch.allclose(model.hidden_states(idx), model.hidden_states(idx, torch.ones_like(idx)), atol=1e-6)


def test_cache_calls_without_a_mask_mean_no_padding():
    # through the cache, a call without a mask takes every token as real: the same numbers as an all-ones mask
    model = tiny()
    idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(idx)
    reference = cached_steps(model, idx, [ones] * 5)
    mixed = cached_steps(model, idx, [None, None, ones, None, ones])  # after a mask, the cache keeps its key_mask
    assert all(torch.equal(a, b) for a, b in zip(reference, mixed))


def test_logprobs_are_of_the_unfiltered_tempered_distribution():
    model = tiny()
    idx = torch.tensor([prompts()[0]])
    tokens, logprobs, _ = model.generate(idx, max_new_tokens=1, temperature=0.7, top_k=5,
                                         generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx)
    expected = F.log_softmax(logits[0, -1] / 0.7, -1)[tokens[0, 0]]
    assert torch.allclose(logprobs[0, 0], expected, atol=1e-5)


# the sampler's distribution: a chi-square goodness-of-fit test of model._sample against the softmax
# it should draw from (the cache tests only compare the sampler with itself)

LOGITS = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.5, 0.5, -2.0, 1.5, -1.0, 0.2, -0.2, 0.8])  # 12 tokens, unsorted
# 0.999 quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf(0.999, dof)):
# a correct sampler exceeds one with probability 0.001, and with the seed fixed here it never does
CHI2_CRIT = {3: 16.266, 4: 18.467, 11: 31.264}


def sample_counts(temperature, top_k=None, top_p=None, n=40_000):
    """How often each token of LOGITS comes out in n seeded draws (one row per draw, one _sample call)."""
    tok, _ = model_py._sample(LOGITS.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    return torch.bincount(tok, minlength=len(LOGITS)).double()


def chi_square(counts, probs):
    expected = counts.sum() * probs.double()  # every expected count here is >= 58
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_sampler_draws_from_the_tempered_softmax(temperature):
    stat = chi_square(sample_counts(temperature), F.softmax(LOGITS / temperature, -1))
    assert stat < CHI2_CRIT[len(LOGITS) - 1], stat


@pytest.mark.parametrize("temperature, top_k, top_p, kept", [
    (1.5, 5, None, 5),
    (0.7, None, 0.8, 4),  # tempered probs 0.44, 0.22, 0.11, 0.08, ...: mass before the 4th 0.77 < 0.8 <= 0.85
])
def test_filtered_sampler_draws_only_from_the_kept_tokens(temperature, top_k, top_p, kept):
    probs = F.softmax(LOGITS / temperature, -1)
    keep = probs.argsort(descending=True)[:kept]
    counts = sample_counts(temperature, top_k, top_p)
    assert counts.sum() == counts[keep].sum(), counts  # no draw outside the kept set
    stat = chi_square(counts[keep], probs[keep] / probs[keep].sum())
    assert stat < CHI2_CRIT[kept - 1], stat


def test_top_p_keeps_the_fewest_tokens_whose_mass_reaches_it():
    """Nucleus sampling keeps the most likely tokens until their mass reaches top_p (Holtzman et al. 2019; so
    does transformers' top-p warper): of two tokens of probability 0.5 each (exact in floating point), top_p = 0.5
    keeps one. The chi-square tests above cannot see this boundary."""
    tok, _ = model_py._sample(torch.zeros(1000, 2), 1.0, None, 0.5, torch.Generator().manual_seed(0))
    assert tok.unique().numel() == 1
    tok, _ = model_py._sample(LOGITS.expand(8, -1), 1.0, None, 0.0, torch.Generator().manual_seed(0))
    assert (tok == LOGITS.argmax()).all()  # top_p = 0: the most likely token, not an empty set


def test_sampler_at_u_0_skips_filtered_tokens_in_front(monkeypatch):
    """torch.rand can return exactly 0, and a filtered token in front has cdf 0: searchsorted(right=True)
    takes the first token whose cdf exceeds u, a kept one (right=False would take the filtered token 0).
    Too rare (2**-24 a draw) for the chi-square tests to see."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.zeros(*size, device=device))
    tok, _ = model_py._sample(LOGITS[None], 1.0, 2, None, None)
    assert tok.item() == 2  # top_k=2 keeps tokens 2 and 7 (logits 2.0 and 1.5); 0 and 1 are filtered out


def test_top_k_1_equals_greedy():
    model = tiny()
    idx, mask = left_pad(prompts())
    greedy = model.generate(idx, mask, max_new_tokens=12, temperature=0.0)[0]
    top1 = model.generate(idx, mask, max_new_tokens=12, temperature=1.0, top_k=1,
                          generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(greedy, top1)


def free_run(model, n=20):
    idx, mask = left_pad(prompts())
    return idx, mask, model.generate(idx, mask, max_new_tokens=n, temperature=0.0)[0]


def test_stops_each_row_at_eos():
    model = tiny()
    idx, mask, free = free_run(model)
    eos = int(free[0, 3])  # a token row 0 emits at step 3 (maybe at a prior step too)
    tokens, logprobs, m = model.generate(idx, mask, max_new_tokens=20, temperature=0.0, eos_id=eos)
    for i in range(len(free)):
        hits = (free[i] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else free.size(1)  # tokens kept, EOS included
        assert m[i, :end].all() and not m[i, end:].any()
        assert torch.equal(tokens[i, :end], free[i, :end])
        assert (tokens[i, end:] == eos).all() and (logprobs[i, end:] == 0).all()


def test_loop_ends_when_all_rows_are_done():
    model = tiny()
    idx = torch.tensor([prompts()[0]])
    free = model.generate(idx, max_new_tokens=20, temperature=0.0)[0]
    eos = int(free[0, 3])
    first = int((free[0] == eos).nonzero()[0])
    tokens, _, m = model.generate(idx, max_new_tokens=20, temperature=0.0, eos_id=eos)
    assert tokens.shape == (1, first + 1) and m.all()


def test_stops_at_stop_sequence():
    model = tiny()
    idx, mask, free = free_run(model)
    stop = free[1, 4:6].tolist()  # a 2-token sequence row 1 emits at steps 4-5
    eos = next(t for t in range(V) if t not in free)  # an EOS that never occurs by itself
    tokens, _, m = model.generate(idx, mask, max_new_tokens=20, temperature=0.0, eos_id=eos, stop_ids=[stop])
    for i in range(len(free)):
        ends = [t + 2 for t in range(free.size(1) - 1) if free[i, t:t + 2].tolist() == stop]
        end = ends[0] if ends else free.size(1)
        assert m[i, :end].all() and not m[i, end:].any()
        assert (tokens[i, end:] == eos).all()
    assert not m[1, 6:].any()


def test_generate_respects_block_size():
    model = tiny(block_size=16)
    with pytest.raises(AssertionError, match="block_size"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=7)


# -----------------------------------------------------------------------------
# forward: causality, padding, loss


def test_causal():
    model = tiny()
    idx = torch.randint(0, V, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % V
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_left_padding_invariance():
    model = tiny()
    ps = prompts()
    idx, mask = left_pad(ps, pad=5)
    logits = model(idx, attention_mask=mask)[0]
    for i, p in enumerate(ps):
        alone = model(torch.tensor([p]))[0][0]
        assert torch.allclose(logits[i, idx.size(1) - len(p):], alone, atol=1e-5)
    assert not logits.isnan().any()  # pad rows attend at least to themselves


def test_right_padding_invariance():
    model = tiny()
    p = prompts()[2]
    idx = torch.tensor([p + [9, 9, 9, 9]])
    mask = torch.tensor([[1] * len(p) + [0] * 4])
    logits = model(idx, attention_mask=mask)[0]
    assert torch.allclose(logits[0, :len(p)], model(torch.tensor([p]))[0][0], atol=1e-5)


def test_packed_row_computes_what_separate_rows_would():
    # data.pack_examples puts several examples in one row; segment_ids keep them apart
    model = tiny()
    ps = prompts()
    row = sum(ps, []) + [0, 0]  # three examples, then two pads (segment -1)
    segment_ids = torch.tensor([sum(([k] * len(p) for k, p in enumerate(ps)), []) + [-1, -1]])
    logits = model(torch.tensor([row]), segment_ids=segment_ids)[0][0]
    start = 0
    for p in ps:
        alone = model(torch.tensor([p]))[0][0]
        assert torch.allclose(logits[start:start + len(p)], alone, atol=1e-5)
        start += len(p)
    assert not logits.isnan().any()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_last_position_alone_matches_the_full_forward(padding):
    # hidden_states(last=...) runs the last block for one query per row (a PM's EOS, a prompt's end):
    # the same hidden state as the full forward read at that position
    model = tiny()
    idx = torch.randint(0, V, (3, 12))
    lengths = torch.tensor([12, 7, 9])
    cols = torch.arange(12)[None, :]
    mask = {"none": None, "right": cols < lengths[:, None], "left": cols >= 12 - lengths[:, None]}[padding]
    last = torch.tensor([11, 6, 8]) if padding == "right" else torch.tensor([11, 11, 11])
    if padding == "none":
        last = torch.tensor([11, 4, 8])  # any position: causal attention up to it
    full = model.hidden_states(idx, mask)[torch.arange(3), last]  # (B, C)
    alone = model.hidden_states(idx, mask, last=last)  # (B, C)
    assert alone.shape == full.shape
    assert torch.allclose(alone, full, atol=1e-5)


def test_blocks_have_gpt2_state_dict_keys():
    model = tiny()
    keys = set(model.state_dict())
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.bias"} <= keys


@pytest.mark.parametrize("T", [7, 150])
def test_loss_matches_the_plain_head(T):
    # the loss never builds the logits (lm_loss.py): same loss and same gradients as the plain head's
    model = tiny(vocab_size=101, block_size=T)
    idx, targets = torch.randint(0, 101, (2, T)), torch.randint(0, 101, (2, T))
    loss_mask = (torch.rand(2, T) > 0.3).float()
    _, loss = model(idx, targets, loss_mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.hidden_states(idx) @ model.lm_head.weight.T  # (B, T, V) the plain head
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, T)
    plain = (ce * loss_mask).sum() / loss_mask.sum()
    plain.backward()
    assert torch.allclose(loss, plain, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_loss_mask():
    model = tiny()
    idx, targets = torch.randint(0, V, (2, 10)), torch.randint(0, V, (2, 10))
    loss_mask = torch.zeros(2, 10)
    loss_mask[0, 6:] = 1
    loss_mask[1, 2:5] = 1
    logits, loss = model(idx)[0], model(idx, targets, loss_mask)[1]
    other = torch.where(loss_mask.bool(), targets, (targets + 1) % V)  # change only masked-out targets
    assert torch.equal(model(idx, other, loss_mask)[1], loss)
    # by hand: mean negative log-likelihood over the 7 unmasked positions
    logp = F.log_softmax(logits, -1)
    nll = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(10) if loss_mask[b, t]]
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-6)
    assert torch.allclose(model(idx, targets)[1], F.cross_entropy(logits.view(-1, V), targets.view(-1)))


def test_training_loss_falls():
    model = tiny().train()
    seq = torch.randint(0, V, (1, 17)).repeat(4, 1)
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-3, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(50):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(V) - 0.5 and losses[-1] < 0.5 * losses[0]


def test_param_count_and_flops():
    model = tiny()
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert model.num_params(non_embedding=False) == n
    assert model.flops_per_token() == 6 * (n - 64 * 32) + 12 * 2 * 4 * 8 * 64
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"]) and opt.param_groups[1]["weight_decay"] == 0


# -----------------------------------------------------------------------------
# safetensors and the GPT-2 layout


def test_safetensors_round_trip(tmp_path):
    tensors = {"f": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "i": torch.arange(6).view(2, 3),
               "b": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    loaded["f"] += 1  # writable
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no tmp file left behind


def st_file(header, data=b"\0" * 16):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
MALFORMED = {
    "empty file": b"",
    "truncated header length": b"\x10\0\0",
    "header length larger than file": (1000).to_bytes(8, "little") + b"{}",
    "huge header length": (2 ** 62).to_bytes(8, "little") + b"{}",
    "truncated data": st_file({"a": F32x4})[:-4],
    "bad json": st_file(b"{not json"),
    "not utf-8": st_file(b'{"\xff": 1}'),
    "json not an object": st_file([1, 2]),
    "entry not an object": st_file({"a": 3}),
    "missing field": st_file({"a": {"dtype": "F32", "shape": [4]}}),
    "unknown dtype": st_file({"a": {**F32x4, "dtype": "F8"}}),
    "negative shape": st_file({"a": {**F32x4, "shape": [-4]}}),
    "shape not ints": st_file({"a": {**F32x4, "shape": [4.0]}}),
    "size mismatch": st_file({"a": {**F32x4, "shape": [2, 3]}}),
    "offsets outside file": st_file({"a": {**F32x4, "shape": [8], "data_offsets": [0, 32]}}),
    "offsets reversed": st_file({"a": {**F32x4, "shape": [0], "data_offsets": [16, 0]}}),
    "overlapping": st_file({"a": {**F32x4, "shape": [2], "data_offsets": [0, 8]},
                            "b": {**F32x4, "shape": [2], "data_offsets": [4, 12]}}),
    "bad metadata": st_file({"__metadata__": {"format": 1}, "a": F32x4}),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_raise_value_error(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(ValueError, match=str(path)):
        load_safetensors(path)


def test_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("variant", ["hub", "prefixed with buffers"])
def test_gpt2_layout_round_trip(tmp_path, variant):
    model = tiny(n_embd=768 // 8, n_head=4)  # 96 is not a GPT-2 width: n_head passed explicitly
    sd = gpt2_hub_state_dict(model)
    assert sd["h.0.attn.c_attn.weight"].shape == (96, 3 * 96)  # Conv1D (in, out)
    assert "lm_head.weight" not in sd and "wte.weight" in sd
    if variant != "hub":  # layout of some other exports: prefix plus the old mask buffers
        sd = {"transformer." + k: v for k, v in sd.items()}
        sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
        sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path / "gpt2.safetensors"
    save_safetensors(sd, path)
    loaded = GPT.from_pretrained(str(path), n_head=4).eval()
    assert loaded.config == model.config
    idx = torch.randint(0, V, (2, 9))
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-6)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_from_pretrained_rejects_wrong_shapes(tmp_path):
    sd = gpt2_hub_state_dict(tiny(n_embd=768 // 8, n_head=4))
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"].t().contiguous()  # forgot the Conv1D layout
    path = tmp_path / "gpt2.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(str(path), n_head=4)


def test_from_pretrained_infers_gpt2_head_count(tmp_path):
    model = tiny(n_layer=1, n_embd=768, n_head=12, block_size=8)
    path = tmp_path / "small.safetensors"
    save_safetensors(gpt2_hub_state_dict(model), path)
    assert GPT.from_pretrained(str(path)).config == model.config


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="local path") as e:
        GPT.from_pretrained("gpt2", cache_dir=tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.safetensors"))


# GPT-2 weights from a fake hub: the loopback server of conftest.py serves a tiny GPT-2-layout file, pinned
# (GPT2_PINS) to its own size and sha256, so the real download path runs in milliseconds

@pytest.fixture
def tiny_gpt2():
    return tiny(n_layer=1, n_embd=48, n_head=12, block_size=8)  # 'gpt2' loads with 12 heads


@pytest.fixture
def hub(http_server, tiny_gpt2, tmp_path, monkeypatch):
    path = tmp_path / "served.safetensors"
    save_safetensors(gpt2_hub_state_dict(tiny_gpt2), path)
    http_server.body = path.read_bytes()
    path.unlink()
    monkeypatch.setattr(hub_py, "GPT2_URL", http_server.url + "/{name}/model.safetensors")
    monkeypatch.setitem(hub_py.GPT2_PINS, "gpt2", (hashlib.sha256(http_server.body).hexdigest(), len(http_server.body)))
    return http_server


def test_pinned_gpt2_is_downloaded_once_and_used(hub, tiny_gpt2, tmp_path):
    for _ in range(2):
        loaded = GPT.from_pretrained("gpt2", cache_dir=tmp_path).eval()
    assert hub.ranges == [None]  # one download; the second call read the (checked) cached file
    idx = torch.randint(0, V, (2, 5))
    assert torch.equal(loaded(idx)[0], tiny_gpt2(idx)[0])


def test_cut_gpt2_download_resumes_where_it_stopped(hub, tiny_gpt2, tmp_path):
    cut = len(hub.body) // 3
    hub.drop_after = cut
    with pytest.raises(DataError, match="rerun to resume"):
        GPT.from_pretrained("gpt2", cache_dir=tmp_path)
    assert (tmp_path / "gpt2.safetensors.part").stat().st_size == cut
    loaded = GPT.from_pretrained("gpt2", cache_dir=tmp_path)
    assert hub.ranges == [None, f"bytes={cut}-"] and loaded.config == tiny_gpt2.config


def test_gpt2_download_not_matching_its_pin_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(hub_py.GPT2_PINS, "gpt2", ("0" * 64, len(hub.body)))
    with pytest.raises(DataError, match="sha256 [0-9a-f]{64}, expected 0{64}") as e:
        GPT.from_pretrained("gpt2", cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "local path" in str(e.value)
    assert not list(tmp_path.iterdir())  # no gpt2.safetensors, and no .part of bytes that can't be resumed


@pytest.mark.parametrize("cached", ["other weights, same size", "one byte longer"])
def test_cached_gpt2_not_matching_its_pin_is_refused(hub, tmp_path, cached):
    other = tmp_path / "gpt2.safetensors"
    save_safetensors(gpt2_hub_state_dict(tiny(seed=1, n_layer=1, n_embd=48, n_head=12, block_size=8)), other)
    if cached == "one byte longer":
        other.write_bytes(hub.body + b" ")
    with pytest.raises(DataError, match="delete it") as e:
        GPT.from_pretrained("gpt2", cache_dir=tmp_path)
    assert "\n" not in str(e.value) and hub.ranges == []


def test_unpinned_gpt2_size_says_its_hash_is_unknown(hub, tmp_path):
    with pytest.warns(UserWarning, match="sha256 unknown"):
        GPT.from_pretrained("gpt2-medium", cache_dir=tmp_path)  # served: the tiny file, 48 = 16 heads x 3


def test_export_hf(tmp_path):
    model = tiny(n_embd=768 // 8, n_head=4)
    export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (2, 4, 96, 64, V)
    sd = load_safetensors(tmp_path / "hf" / "model.safetensors")
    assert sd.keys() == gpt2_hub_state_dict(model).keys()
    head = json.loads((tmp_path / "hf" / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert head["__metadata__"] == {"format": "pt"}
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert not (tmp_path / "hf" / "vocab.json").exists()  # tokenizer files only with a tiktoken encoding


def trained_ln_f(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained final LayerNorm: a bias, gains away from 1
        model.transformer.ln_f.bias.copy_(0.1 * torch.randn(model.config.n_embd, generator=g))
        model.transformer.ln_f.weight.copy_(0.5 + torch.rand(model.config.n_embd, generator=g))
    return model


def test_zero_probability_rows_rule_a_token_out_for_every_input():
    model = trained_ln_f(tiny())
    rows = zero_probability_rows(model, 3)
    x = torch.randn(4000, 32) * torch.logspace(-2, 2, 4000)[:, None]  # residual streams of any size
    h = model.transformer.ln_f(x)
    theirs, ours = h @ rows.t(), model.logits(h)
    assert torch.allclose(theirs, theirs[0, 0].expand_as(theirs), atol=1e-3)  # one logit for every input
    assert (ours.min(1).values - theirs[:, 0]).min() > 104  # so exp() of it underflows: probability 0
    assert F.softmax(torch.cat([ours, theirs], 1), 1)[:, V:].max() == 0


def test_zero_probability_rows_need_a_trained_ln_f():
    with pytest.raises(ValueError, match="untrained"):
        zero_probability_rows(tiny(), 1)  # ln_f bias 0: h . w takes both signs, no row can do it


def test_gpt2_vocab_state_dict_moves_rows_to_gpt2_ids():
    model = trained_ln_f(tiny())
    keep = sorted(torch.randperm(50257, generator=torch.Generator().manual_seed(0))[:V].tolist())
    sd = gpt2_vocab_state_dict(model, keep)
    assert sd["wte.weight"].shape == sd["lm_head.weight"].shape == (50257, 32)
    for k in ("wte.weight", "lm_head.weight"):
        assert torch.equal(sd[k][keep], model.transformer.wte.weight)
    others = torch.ones(50257, dtype=torch.bool)
    others[keep] = False
    assert sd["wte.weight"][others].abs().max() == 0
    assert torch.equal(sd["lm_head.weight"][others], zero_probability_rows(model, int(others.sum())))


def test_generate_logprobs_match_forward_on_padded_batch():
    # what PPO does: score [left-padded query | right-padded response] in one forward pass
    model = tiny()
    idx, mask, free = free_run(model)
    eos = int(free[0, 3])
    tokens, logprobs, m = model.generate(idx, mask, max_new_tokens=12, temperature=0.9, eos_id=eos,
                                         generator=torch.Generator().manual_seed(3))
    seq, seq_mask = torch.cat([idx, tokens], 1), torch.cat([mask.bool(), m], 1)
    logits = model(seq, attention_mask=seq_mask)[0][:, idx.size(1) - 1:-1]  # (B, N, V) predicting each response token
    lp = F.log_softmax(logits / 0.9, -1).gather(2, tokens[..., None]).squeeze(2)
    assert torch.allclose(lp[m], logprobs[m], atol=1e-5)


def test_generate_returns_ordinary_tensors_that_autograd_can_use():
    # generate runs without gradients; its outputs must still be ordinary tensors (not inference ones), which
    # autograd can save for backward and a caller can edit in place afterwards
    model = tiny().train()
    idx, mask = left_pad(prompts())
    tokens, logprobs, m = model.generate(idx, mask, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert not any(t.is_inference() for t in (tokens, logprobs, m))
    logits = model(torch.cat([idx, tokens], 1))[0][:, idx.size(1) - 1:-1]  # (B, N, V), with gradients
    F.log_softmax(logits, -1).gather(2, tokens[..., None]).sum().backward()  # gather saves tokens
    tokens[~m] = 0  # in place, outside inference mode
    assert model.lm_head.weight.grad is not None


def test_disable_dropout_switches_off_every_kind_of_dropout():
    """Attention dropout happens inside SDPA (dropout_p), not in a module's forward: disable_dropout must
    reach it too, so that a model in train mode computes the same function twice."""
    torch.manual_seed(0)
    model = disable_dropout(GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.5)))
    model.train()
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx)[0], model(idx)[0])
    assert model.config.dropout == 0.0  # and checkpoints written from it say so
