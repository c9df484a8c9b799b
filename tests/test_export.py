"""`rlhf.py export` writes a Hugging Face GPT-2 folder: hub key names and shapes, loadable by our own
GPT-2 loader with the same logits; a trimmed vocabulary is moved back to GPT-2's token ids."""
import json
import os

import torch

import rlhf
from data import Tokenizer
from model import GPT, GPTConfig, load_safetensors
from train import model_checkpoint, save_checkpoint


def write_policy(path, tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)).eval()
    save_checkpoint(path, model_checkpoint(model, tok, done=True))
    return model


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
    model = write_policy(str(tmp_path / "ppo.pt"), tok)
    assert rlhf.main(["export", "--out_dir", str(tmp_path), "--policy", "ppo"]) == 0
    loaded = GPT.from_pretrained(str(tmp_path / "hf" / "ppo" / "model.safetensors"), n_head=2).eval()
    ids = tok.encode("Hello there, how are you?")
    gpt2_ids = [tok.to_old[i] for i in ids]
    ours, theirs = model(torch.tensor([ids]))[0], loaded(torch.tensor([gpt2_ids]))[0]
    assert torch.allclose(theirs[..., torch.tensor(tok.to_old)], ours, atol=1e-5)
