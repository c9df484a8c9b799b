"""`rlhf.py export` writes a Hugging Face GPT-2 folder: hub key names and shapes, loadable by our own
GPT-2 loader with the same logits; a trimmed vocabulary is moved back to GPT-2's token ids, where the ids
the model never had get probability 0; GPT-2's tokenizer files go alongside. The tests marked so check
all of it with `transformers` itself and are skipped when it is not installed (it is never a dependency)."""
import json
import os
from pathlib import Path

import pytest
import regex  # tiktoken's own dependency
import torch
import torch.nn.functional as F

import rlhf
from conftest import make_dialogue
from data import DataConfig, read_pairs
from hub import load_safetensors
from model import GPT, GPTConfig
from runtime import model_checkpoint, save_checkpoint
from tokens import Tokenizer

SAMPLE = Path(os.environ.get("HH_RLHF_DIR") or Path(__file__).resolve().parents[2] / "shared" / "hh-rlhf-sample")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's encoder.py


def real_texts():
    """12 dialogues of the real hh-rlhf sample when the workplace has it (else made-up ones), plus one
    whose words a vocabulary trimmed to the first six surely lacks."""
    if (SAMPLE / "harmless-base" / "test.jsonl.gz").is_file():
        pairs, _ = read_pairs(SAMPLE, "test", DataConfig(subsets="harmless-base"))
        texts = [p.prompt + p.chosen for p in pairs[:12]]
    else:
        texts = [make_dialogue(i, f"Sure, number {i} is fine.") for i in range(12)]
    return texts + ["\n\nHuman: Is photosynthesis quixotic?\n\nAssistant: Chlorophyll, naturally! <|endoftext|>"]


def trained_like(tok, seed=0, block_size=64):
    """A small model whose final LayerNorm has a bias and gains away from 1, as a trained one does
    (a fresh one has 0 and 1)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.normal_(0.0, 0.1)
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
    return model


def write_policy(path, tok, block_size=32):
    model = trained_like(tok, block_size=block_size)
    save_checkpoint(path, model_checkpoint(model, tok, done=True))
    return model


def export(tmp_path, tok, policy="ppo", block_size=32):
    model = write_policy(str(tmp_path / f"{policy}.pt"), tok, block_size)
    assert rlhf.main(["export", "--out_dir", str(tmp_path), "--policy", policy]) == 0
    return model, tmp_path / "hf" / policy


def test_export_follows_the_hub_layout_and_round_trips(tmp_path):
    tok = Tokenizer.gpt2()
    model = write_policy(str(tmp_path / "sft.pt"), tok)
    to = tmp_path / "hf"
    assert rlhf.main(["export", "--out_dir", str(tmp_path), "--policy", "sft", "--to", str(to)]) == 0
    config = json.load(open(to / "config.json"))
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_layer"] == 2 and config["vocab_size"] == 50257
    tensors = load_safetensors(str(to / "model.safetensors"))
    assert "h.0.attn.c_attn.weight" in tensors and "lm_head.weight" not in tensors
    assert tensors["h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    loaded = GPT.from_pretrained(str(to / "model.safetensors"), n_head=2).eval()
    idx = torch.randint(0, 50257, (2, 12))
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-5)


def test_trimmed_vocab_is_expanded_to_gpt2_ids(tmp_path):
    tok = Tokenizer.trimmed(["Hello there, how are you tonight?"])
    model, to = export(tmp_path, tok)
    loaded = GPT.from_pretrained(str(to / "model.safetensors"), n_head=2).eval()
    ids = tok.encode("Hello there, how are you?")
    gpt2_ids = [tok.to_old[i] for i in ids]
    ours, theirs = model(torch.tensor([ids]))[0], loaded(torch.tensor([gpt2_ids]))[0]
    assert torch.allclose(theirs[..., torch.tensor(tok.to_old)], ours, atol=1e-5)


def export_logprobs(to, gpt2_ids):
    """What GPT2LMHeadModel computes from the folder, without transformers: our trunk (the same
    blocks) and the folder's LM head (lm_head.weight when untied, else wte), log-softmax over 50,257."""
    config = json.load(open(to / "config.json"))
    tensors = load_safetensors(str(to / "model.safetensors"))
    head = tensors["wte.weight" if config.get("tie_word_embeddings", True) else "lm_head.weight"]
    trunk = GPT.from_pretrained(str(to / "model.safetensors"), n_head=config["n_head"]).eval()
    with torch.no_grad():
        return F.log_softmax(trunk.hidden_states(torch.tensor([gpt2_ids])) @ head.t(), -1)[0]  # (T, 50257)


def test_trimmed_export_scores_and_samples_like_the_project(tmp_path):
    # the issue: the ids a trimmed model never had got logit 0 in the export, so they took most of the
    # probability. Over GPT-2's vocabulary the export must give every id the model had the project's
    # log-probability, and every other id probability exactly 0 (never sampled, never in a loss)
    texts = real_texts()
    tok = Tokenizer.trimmed(texts[:6])
    model, to = export(tmp_path, tok, block_size=64)
    kept, unkept = torch.zeros(50257, dtype=torch.bool), 0
    kept[tok.to_old] = True
    for text in texts[6:]:
        ids = tok.encode(text)[:64]
        with torch.no_grad():
            ours = F.log_softmax(model(torch.tensor([ids]))[0][0], -1)
        theirs = export_logprobs(to, [tok.to_old[i] for i in ids])
        assert torch.allclose(theirs[:, kept], ours, atol=1e-5)
        assert theirs[:, ~kept].exp().max() == 0
        unkept += sum(i not in set(tok.to_old) for i in tok.enc.encode_ordinary(text))
    assert unkept > 0  # the texts do hold GPT-2 tokens the trimmed vocabulary lacks


def bytes_to_unicode():
    """GPT-2's map of each byte to a printable character, as in OpenAI's encoder.py."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


def reference_bpe(text, vocab, ranks):
    """GPT-2 BPE from the written files alone: split with GPT-2's pattern, then merge the pair of lowest
    rank in merges.txt until none applies."""
    b2u, out = bytes_to_unicode(), []
    for word in regex.findall(GPT2_PATTERN, text):
        parts = [b2u[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank == len(ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [vocab[p] for p in parts]
    return out


def test_export_writes_gpt2s_tokenizer_files(tmp_path):
    tok = Tokenizer.trimmed(["Hello there, how are you tonight?"])
    _, to = export(tmp_path, tok)
    vocab = json.load(open(to / "vocab.json", encoding="utf-8"))
    lines = (to / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and len(lines) == 50001
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    spelled = {i: bytes(u2b[c] for c in s) for s, i in vocab.items() if i < 50256}
    assert all(spelled[i] == tok.enc.decode_single_token_bytes(i) for i in range(50256))
    ranks = {tuple(line.split(" ")): r for r, line in enumerate(lines[1:])}
    assert all(a + b in vocab for a, b in ranks)
    for text in real_texts()[:3] + real_texts()[-1:]:
        assert reference_bpe(text, vocab, ranks) == tok.enc.encode_ordinary(text)
    special = json.load(open(to / "special_tokens_map.json"))
    assert special == {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
    assert json.load(open(to / "tokenizer_config.json"))["model_max_length"] == 32
    kept = json.load(open(to / "trimmed_vocab.json"))
    assert kept["kept_gpt2_ids"] == tok.keep


def test_gpt2_tokenizer_files_match_tiktokens_cache(tmp_path):
    # tiktoken's cache holds OpenAI's encoder.json and vocab.bpe under the sha1 of their URL
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    import hashlib
    encoder, bpe = (Path(cache) / hashlib.sha1((url + f).encode()).hexdigest() for f in ("encoder.json", "vocab.bpe"))
    if not (cache and encoder.is_file() and bpe.is_file()):
        pytest.skip("tiktoken's cache of GPT-2's files not found")
    _, to = export(tmp_path, Tokenizer.gpt2(), policy="sft")
    assert json.load(open(to / "vocab.json", encoding="utf-8")) == json.load(open(encoder, encoding="utf-8"))
    assert (to / "merges.txt").read_text(encoding="utf-8").split() == bpe.read_text(encoding="utf-8").split()


# -----------------------------------------------------------------------------
# with transformers itself (a test-only extra: pip install transformers)

def spell_unkept_as_bytes(hf_tok, ids, kept):
    """The project's tokenization from GPT-2's: a token outside the trimmed vocabulary becomes its
    bytes' single-byte tokens (each character of a byte-level token is one byte's token)."""
    spell = lambda t: hf_tok.convert_tokens_to_ids(list(hf_tok.convert_ids_to_tokens(t)))
    return [j for t in ids for j in ([t] if t in kept else spell(t))]


@pytest.mark.parametrize("vocab", ["trimmed", "gpt2"])
def test_transformers_loads_the_export_faithfully(tmp_path, monkeypatch, vocab):
    pytest.importorskip("transformers", reason="transformers not installed (a test-only extra, never a dependency)")
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = real_texts()
    tok = Tokenizer.trimmed(texts[:6]) if vocab == "trimmed" else Tokenizer.gpt2()
    model, to = export(tmp_path, tok, block_size=64)
    hf, hf_tok = GPT2LMHeadModel.from_pretrained(to).eval(), AutoTokenizer.from_pretrained(to)
    kept = set(tok.to_old)
    plain = 0
    for text in texts[:1] + texts[6:]:  # a text the vocabulary was made from, and texts it was not
        ours = [tok.to_old[i] for i in tok.encode(text)]
        theirs = hf_tok(text)["input_ids"]
        # (a) the same ids: GPT-2's tokenizer is exact wherever the text's GPT-2 tokens were all kept,
        # and with the tokens outside the vocabulary spelled as bytes, everywhere
        if all(t in kept for t in tok.enc.encode_ordinary(text)):
            assert theirs == ours
            plain += 1
        assert spell_unkept_as_bytes(hf_tok, theirs, kept) == ours
        # (b) the same per-token log-probabilities and loss
        ids = torch.tensor([ours[:64]])
        with torch.no_grad():
            lp_ours = F.log_softmax(model(torch.tensor([tok.encode(text)[:64]]))[0], -1)[0, :-1]
            lp_ours = lp_ours.gather(1, torch.tensor(tok.encode(text)[1:64])[:, None])
            out = hf(ids, labels=ids)
            lp_hf = F.log_softmax(out.logits, -1)[0, :-1].gather(1, ids[0, 1:, None])
        assert torch.allclose(lp_hf, lp_ours, atol=1e-4) and abs(out.loss.item() + lp_ours.mean().item()) < 1e-4
    assert plain >= (1 if vocab == "trimmed" else 1 + len(texts[6:]))
    # (c) sampling: ids the model never had have probability 0, so generate never draws one
    prompt = torch.tensor([[tok.to_old[i] for i in tok.encode(texts[6])[-16:]]])
    with torch.no_grad():
        probs = F.softmax(hf(prompt).logits[0, -1], -1)
        torch.manual_seed(0)
        drawn = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                            max_new_tokens=40, min_new_tokens=40, num_return_sequences=8)[:, prompt.size(1):]
    ours = F.softmax(model(torch.tensor([tok.encode(texts[6])[-16:]]))[0][0, -1], -1)
    assert torch.allclose(probs[torch.tensor(tok.to_old)], ours.detach(), atol=1e-6)
    assert set(drawn.flatten().tolist()) <= kept
    # (d) the ordinary pipeline, offline
    generator = pipeline("text-generation", model=str(to))
    reply = generator("\n\nHuman: Hello?\n\nAssistant:", max_new_tokens=8)[0]["generated_text"]
    assert reply.startswith("\n\nHuman: Hello?\n\nAssistant:")
