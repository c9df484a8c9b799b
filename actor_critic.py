"""
The actor-critic as PPO reads it: the policy's log-probabilities (and entropy) of the response tokens,
and the value model's estimate before each of them, from one forward pass over query + response.
The value model is a copy of PM-A (its trunk and scalar head: a critic that starts out knowing what
PM-A rewards), or PM-A's head on the policy's own trunk (one forward, half the cost of an update).
sample_logprobs reads sampled replies' log-probabilities (KL to SFT in eval); load_models builds every model the
ppo stage holds, build_optimizer the one Adam over policy and critic.
"""
import os

import torch

from model import disable_dropout, scalar_head
from reward import load_reward_model
from runtime import autocast, load_model
from tokens import pad_left, pad_right

def build_critic(trunk, head_weight, head_bias, gain=1.0, bias=0.0):
    """The value model as lm-hp builds it: a copy of the reward model, trunk and scalar head.
    The PM's output normalisation (gain * r + bias, fitted so SFT replies score mean 0, std 1) is
    folded into the head, so V starts on the scale of the rewards it must predict.
    trunk=None means the head sits on the policy's own trunk (share_trunk: one forward for both).
    Returns an nn.ModuleDict {"head": Linear(C, 1)} plus {"trunk": GPT} when not shared."""
    C = head_weight.numel()
    head = torch.nn.Linear(C, 1)
    with torch.no_grad():
        head.weight.copy_(gain * head_weight.reshape(1, C))
        head.bias.copy_(gain * head_bias.reshape(1) + bias)
    parts = {"head": head} if trunk is None else {"trunk": trunk, "head": head}
    return torch.nn.ModuleDict(parts)


def entropy_from_logits(logits):
    """Per-token entropy H = logsumexp(z) - sum softmax(z) z, (B, N, V) -> (B, N)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def forward_policy(policy, critic, query_response, attention_mask, context_length, temperature):
    """Logits and values for every response token in one pass over query + response.

    query_response (B, Tq + N): left-padded queries then right-padded responses; attention_mask
    the same shape. Response token t sits at column Tq + t and is predicted from column Tq + t - 1,
    so logits and values are read at columns Tq - 1 .. Tq + N - 2: V_t is the value of the state
    before the policy emits token t. Logits are divided by the sampling temperature, as in the
    rollout, otherwise the ratio compares two different distributions (lm-hp does the same).
    Returns logits (B, N, V) and values (B, N) in fp32 (values None if critic is None): under bf16
    autocast the logits are bf16 (logprobs_from_logits casts them), the values fp32 (scalar_head)."""
    hidden = policy.hidden_states(query_response, attention_mask)[:, context_length - 1:-1]  # (B, N, C)
    logits = policy.logits(hidden) / temperature                                             # (B, N, V)
    if critic is None:
        return logits, None
    if "trunk" in critic:
        hidden = critic["trunk"].hidden_states(query_response, attention_mask)[:, context_length - 1:-1]
    values = scalar_head(critic["head"], hidden)                                              # (B, N)
    return logits, values


def rollout_forward(policy, critic, query_response, attention_mask, responses, context_length, temperature, chunk):
    """forward_policy over a rollout batch in chunks of `chunk` rows (the memory of one minibatch),
    keeping only what PPO stores: logprobs (B, N), values (B, N) or None, and entropy (B, N)."""
    out = []
    for s in range(0, len(responses), chunk):
        logits, values = forward_policy(policy, critic, query_response[s:s + chunk], attention_mask[s:s + chunk],
                                        context_length, temperature)                          # (b, N, V), (b, N)
        out.append((logprobs_from_logits(logits, responses[s:s + chunk]), values, entropy_from_logits(logits)))
    logprobs, values, entropy = zip(*out)
    return torch.cat(logprobs), None if critic is None else torch.cat(values), torch.cat(entropy)


def logprobs_from_logits(logits, tokens):
    """log pi(token) for each position: logits (B, N, V), tokens (B, N) -> (B, N)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def sample_logprobs(model, queries, replies, batch_size, pad_id, temperature=1.0, dtype="auto"):
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


def load_models(out, init_path, ppo_cfg, device):
    """The initial policy (init_path: SFT, or CD; trained), its frozen copy (the reference), PM-A (the reward,
    frozen), PM-B (the held-out judge, frozen) and the value model: a trainable copy of PM-A (trunk and head),
    or PM-A's head on the policy's trunk (ppo_cfg.share_trunk). Returns (policy, ref_policy, critic, pm_a, pm_b,
    tok)."""
    policy, tok, _ = load_model(init_path, device)
    ref_policy, _, _ = load_model(init_path, device)
    disable_dropout(policy)
    disable_dropout(ref_policy.requires_grad_(False))
    pm_a, _, _ = load_reward_model(os.path.join(out, "pm_a.pt"), device)
    pm_b, _, _ = load_reward_model(os.path.join(out, "pm_b.pt"), device)
    trunk = None if ppo_cfg.share_trunk else disable_dropout(load_model(os.path.join(out, "pm_a.pt"), device)[0])
    critic = build_critic(trunk, pm_a.head.weight, pm_a.head.bias, pm_a.reward_gain, pm_a.reward_bias).to(device)
    return policy, ref_policy, critic, pm_a, pm_b, tok


def build_optimizer(policy, critic, ppo_cfg, device_type):
    """One Adam over the policy and the value model, as lm-hp (its epsilon, no weight decay); the fused
    kernel where there is one (model.configure_optimizer says why)."""
    params = list(policy.parameters()) + list(critic.parameters())
    return torch.optim.Adam(params, lr=ppo_cfg.lr, eps=ppo_cfg.adam_eps, fused=device_type in ("cuda", "cpu"))
