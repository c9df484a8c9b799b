"""
Sampling and scoring replies: the layer that SFT's samples, best-of-n, rejection sampling, the PM's
normalisation, PPO's rollouts and the evaluation all share, and that none of those stages owns.

A reply is sampled at a temperature with no top-k/top-p (so best-of-n's KL is the analytic one and a
sampled KL estimate is unbiased) and ends at EOS or where the model starts a new "\n\nHuman:" turn
(handing the dialogue back); strip_end drops that ending, the one place that knows what it looks like.
A PM scores the prompt + reply + one EOS, read at that EOS, as it was trained (reward.score_replies).
"""
import itertools

import torch

from actor_critic import forward_policy, logprobs_from_logits
from data import read_pairs, resolve_data_dir, split_train_val
from runtime import autocast
from tokens import pad_left, pad_right, prompt_ids
@torch.no_grad()
def complete(model, tok, prompts, sc, seed, dtype="auto"):
    """Batched sampling for a list of prompt strings -> list of reply strings (stops at EOS or a new Human turn),
    the forwards under runtime.autocast(dtype) (the sampling itself is fp32: GPT.generate)."""
    model.eval()
    device = next(model.parameters()).device
    max_prompt = model.config.block_size - sc.max_new_tokens
    idx, mask = pad_left([prompt_ids(p, tok, max_prompt) for p in prompts], tok.eos_id)
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast(device.type, dtype):
        tokens, _, keep = model.generate(idx.to(device), attention_mask=mask.to(device), max_new_tokens=sc.max_new_tokens,
                                         temperature=sc.temperature, top_k=sc.top_k or None,
                                         top_p=sc.top_p if sc.top_p < 1 else None, eos_id=tok.eos_id,
                                         stop_ids=tok.stop_ids, generator=gen)
    replies = []
    for row, m in zip(tokens.tolist(), keep.tolist()):
        text = tok.decode([t for t, k in zip(row, m) if k and t != tok.eos_id])
        replies.append(text.split("\n\nHuman:")[0].strip())
    return replies


def show_samples(model, tok, pairs, sc, seed, title, dtype="auto"):
    """Print a few replies to held-out prompts: the quickest check of what a stage learned."""
    prompts = [p.prompt for p in pairs[:sc.num_samples]]
    for prompt, reply in zip(prompts, complete(model, tok, prompts, sc, seed, dtype)):
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
            tokens, _, keep = policy.generate(idx.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                              temperature=temperature, eos_id=tok.eos_id, stop_ids=tok.stop_ids,
                                              generator=generator)
        replies += [t[:int(k.sum())].tolist() for t, k in zip(tokens, keep)]
    return replies


@torch.inference_mode()
def reply_logprobs(model, queries, replies, batch_size, pad_id, temperature=1.0, dtype="auto"):
    """Sum over reply tokens of log p_model(reply | query) at `temperature` (logits / T, the distribution
    the replies were sampled from), (len(replies),). With the policy's own samples,
    mean(logp_policy - logp_sft) is the usual sampled estimate of KL(policy || SFT). The forward runs
    under runtime.autocast(dtype); the log-softmax and the sums are fp32."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(replies), batch_size):
        q, r = queries[start:start + batch_size], replies[start:start + batch_size]
        q_ids, q_mask = pad_left(q, pad_id)                                        # (b, Tq)
        r_ids, r_mask = pad_right(r, pad_id)                                       # (b, N)
        with autocast(device.type, dtype):
            logits, _ = forward_policy(model, None, torch.cat([q_ids, r_ids], 1).to(device),
                                       torch.cat([q_mask, r_mask], 1).to(device), q_ids.size(1), temperature)
        lp = logprobs_from_logits(logits, r_ids.to(device)) * r_mask.to(device)  # (b, N)
        out.append(lp.sum(1).cpu())
    return torch.cat(out)


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
