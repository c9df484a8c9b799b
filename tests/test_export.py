"""`rlhf.py export` writes a Hugging Face GPT-2 folder: hub key names and shapes, loadable by our own
GPT-2 loader with the same logits; a trimmed vocabulary is moved back to GPT-2's token ids, where the ids
the model never had get probability 0."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rlhf
from conftest import make_dialogue
from data import DataConfig, Tokenizer, read_pairs
from model import GPT, GPTConfig, load_safetensors
from train import model_checkpoint, save_checkpoint

SAMPLE = Path(os.environ.get("HH_RLHF_DIR") or Path(__file__).resolve().parents[2] / "shared" / "hh-rlhf-sample")


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
    tok = Tokenizer.trimmed(["Hello there, how are you today?"])
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
