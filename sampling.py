"""
Sampling and scoring replies: the layer that SFT's samples, best-of-n, rejection sampling, the PM's
normalisation, PPO's rollouts and the evaluation all share, and that none of those stages owns.

A reply is sampled at a temperature with no top-k/top-p (so best-of-n's KL is the analytic one and a
sampled KL estimate is unbiased) and ends at EOS or where the model starts a new "\n\nHuman:" turn
(handing the dialogue back); strip_end drops that ending, the one place that knows what it looks like.
A PM scores the prompt + reply + one EOS, read at that EOS, as it was trained (reward.score_replies).

The commands `sample` and `chat` (the end of this file) talk to any checkpoint:

    python rlhf.py sample --policy sft --prompt "How do I bake bread?"
    python rlhf.py chat --policy ppo [--sample.show_score=true]
"""
import itertools
import os
from dataclasses import dataclass

import torch

from data import read_pairs, resolve_data_dir, split_train_val
from runtime import ConfigError, autocast, load_model, pick_device
from tokens import pad_left, prompt_ids


@dataclass
class SampleConfig:
    """`sample` and `chat`: which policy to talk to and how to decode."""
    policy: str = "sft"          # base | sft | rs | ppo, or a checkpoint path
    prompt: str = ""             # one Human turn to complete; "" = a few held-out test prompts
    prompts_file: str = ""       # a text file with one Human turn per line
    num_samples: int = 4         # prompts taken from the test split when no prompt is given
    max_new_tokens: int = 128    # reply length cap
    temperature: float = 0.7     # sampling temperature (0 = greedy)
    top_k: int = 0               # 0 = off
    top_p: float = 0.95          # nucleus sampling (1.0 = off)
    show_score: bool = False     # chat: print the held-out PM-B's score of each reply
@torch.no_grad()
def complete(model, tok, prompts, sample_cfg, seed, dtype="auto"):
    """Batched sampling for a list of prompt strings -> list of reply strings (stops at EOS or a new Human turn),
    the forwards under runtime.autocast(dtype) (the sampling itself is fp32: GPT.generate)."""
    model.eval()
    device = next(model.parameters()).device
    max_prompt = model.config.block_size - sample_cfg.max_new_tokens
    idx, mask = pad_left([prompt_ids(p, tok, max_prompt) for p in prompts], tok.eos_id)
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast(device.type, dtype):
        tokens, _, keep = model.generate(idx.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=sample_cfg.max_new_tokens,
                                         temperature=sample_cfg.temperature, top_k=sample_cfg.top_k or None,
                                         top_p=sample_cfg.top_p if sample_cfg.top_p < 1 else None, eos_id=tok.eos_id,
                                         stop_ids=tok.stop_ids, generator=gen)
    replies = []
    for row, m in zip(tokens.tolist(), keep.tolist()):
        text = tok.decode([t for t, k in zip(row, m) if k and t != tok.eos_id])
        replies.append(text.split("\n\nHuman:")[0].strip())
    return replies


def show_samples(model, tok, pairs, sample_cfg, seed, title, dtype="auto"):
    """Print a few replies to held-out prompts: the quickest check of what a stage learned."""
    prompts = [p.prompt for p in pairs[:sample_cfg.num_samples]]
    for prompt, reply in zip(prompts, complete(model, tok, prompts, sample_cfg, seed, dtype)):
        last_turn = prompt.rsplit("\n\nHuman:", 1)[-1].split("\n\nAssistant:")[0].strip()
        print(f"--- {title} | Human: {last_turn[:200]}\n    Assistant: {reply[:400]}")


@torch.no_grad()
def sample_replies(policy, queries, n, max_new_tokens, batch_size, tok, generator, temperature=1.0, dtype="auto"):
    """n replies per query at `temperature` with no top-k/top-p (so best-of-n's KL is the analytic
    one and a sampled KL estimate is unbiased), ending at EOS or a new "\n\nHuman:" turn, as in PPO.
    The forwards run under runtime.autocast(dtype); the sampling itself is fp32 (GPT.generate).
    queries: list of P id lists. Returns P*n reply id lists (query-major, the EOS or stop included)."""
    device = next(policy.parameters()).device
    rows = [q for q in queries for _ in range(n)]
    replies = []
    for start in range(0, len(rows), batch_size):
        idx, mask = pad_left(rows[start:start + batch_size], tok.eos_id)
        with autocast(device.type, dtype):
            tokens, _, keep = policy.generate(idx.to(device), attention_mask=mask.to(device),
                                              max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                                              stop_ids=tok.stop_ids, generator=generator)
        replies += [t[:int(k.sum())].tolist() for t, k in zip(tokens, keep)]
    return replies


def strip_end(reply, eos_id, stop_ids):
    """A sampled reply (id list) without the EOS or "\n\nHuman:" stop sequence it ended with: the text a
    reader sees, and what a PM scores (with one EOS of its own appended)."""
    if reply[-1:] == [eos_id]:
        return reply[:-1]
    for stop in stop_ids:
        if len(stop) and reply[-len(stop):] == list(stop):
            return reply[:-len(stop)]
    return reply


def reply_lengths(replies, eos_id, stop_ids):
    """Each reply's length in tokens as a PM reads it, (len(replies),) float: without the EOS or stop sequence it
    ended with, so that a reply handing the turn back with "\n\nHuman:" does not count four tokens longer than
    one ending at EOS (the length-controlled win rate compares lengths across policies)."""
    return torch.tensor([len(strip_end(r, eos_id, stop_ids)) for r in replies], dtype=torch.float)


def score(reward_fn, queries, replies, batch_size):
    """PM scores of (query, reply) id lists in batches -> (len(replies),) float tensor."""
    with torch.inference_mode():
        return torch.cat([reward_fn(queries[i:i + batch_size], replies[i:i + batch_size]).float().cpu()
                          for i in range(0, len(replies), batch_size)])


def reply_ended(reply, eos_id, stop_ids):
    """True if a sampled reply (id list) finished by itself: EOS, or a new "\n\nHuman:" turn."""
    return len(strip_end(reply, eos_id, stop_ids)) < len(reply)


def rl_prompts(run, split, tok, max_prompt_tokens):
    """Unique prompts of a split as (text, left-truncated ids): train for RL, test for evaluation."""
    pairs, _ = read_pairs(resolve_data_dir(run.data_dir or None), split, run.data)
    if split == "train":
        pairs, _ = split_train_val(pairs, run.data.val_frac)
    # unique prompts, the subsets taken in turn (each in file order): the data comes subset after subset, so the
    # evaluation's first num_prompts would otherwise all be the first subset's
    subsets = dict.fromkeys(p.subset for p in pairs)
    per_subset = [list(dict.fromkeys(p.prompt for p in pairs if p.subset == s)) for s in subsets]
    texts = list(dict.fromkeys(t for turn in itertools.zip_longest(*per_subset) for t in turn if t is not None))
    return [(t, prompt_ids(t, tok, max_prompt_tokens)) for t in texts]


# -----------------------------------------------------------------------------
# the commands: sample and chat

def format_prompt(human_turn):
    """One Human turn in hh-rlhf's dialogue format, ready for the Assistant's reply."""
    return f"\n\nHuman: {human_turn.strip()}\n\nAssistant:"


def policy_path(out_dir, policy):
    """--sample.policy: base | sft | rs | ppo (a checkpoint in out_dir), or a path to any .pt."""
    p = policy
    return p if p.endswith(".pt") else os.path.join(out_dir, f"{p}.pt")


def stage_sample(run, sample_cfg):
    """Print completions from any checkpoint, for one prompt, a file of prompts, or held-out prompts."""
    model, tok, _ = load_model(policy_path(run.out_dir, sample_cfg.policy), pick_device(run.device))
    if sample_cfg.prompt or sample_cfg.prompts_file:
        if sample_cfg.prompts_file:
            try:
                with open(sample_cfg.prompts_file, encoding="utf-8") as f:
                    turns = [line.strip() for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--sample.prompts_file: cannot read {sample_cfg.prompts_file} ({e})") from None
        else:
            turns = [sample_cfg.prompt]
        replies = complete(model, tok, [format_prompt(t) for t in turns], sample_cfg, run.seed, run.dtype)
        for turn, reply in zip(turns, replies):
            print(f"Human: {turn}\nAssistant: {reply}\n")
    else:
        test_pairs, _ = read_pairs(resolve_data_dir(run.data_dir or None), "test", run.data)
        show_samples(model, tok, test_pairs, sample_cfg, run.seed, sample_cfg.policy, run.dtype)


def stage_chat(run, sample_cfg):
    """An interactive multi-turn chat, kept in hh-rlhf's Human/Assistant format."""
    from reward import load_reward_model, score_texts  # only needed with --sample.show_score
    device = pick_device(run.device)
    model, tok, _ = load_model(policy_path(run.out_dir, sample_cfg.policy), device)
    judge = load_reward_model(os.path.join(run.out_dir, "pm_b.pt"), device) if sample_cfg.show_score else None
    print(f"chatting with {policy_path(run.out_dir, sample_cfg.policy)} "
          "(empty line or Ctrl-D to quit, /reset to start over)")
    dialogue, turn = "", 0
    while True:
        try:
            human = input("Human: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not human:
            return
        if human == "/reset":
            dialogue = ""
            continue
        dialogue += format_prompt(human)
        reply = complete(model, tok, [dialogue], sample_cfg, run.seed + turn, run.dtype)[0]
        turn += 1
        score = f"   [PM-B score {score_texts(*judge[:2], [dialogue], [' ' + reply])[0]:+.2f}]" if judge else ""
        print(f"Assistant: {reply}{score}")
        dialogue += " " + reply
