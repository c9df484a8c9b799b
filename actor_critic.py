"""
The actor-critic as PPO reads it: the policy's log-probabilities (and entropy) of the response tokens,
and the value model's estimate before each of them, from one forward pass over query + response.
The value model is a copy of PM-A (its trunk and scalar head: a critic that starts out knowing what
PM-A rewards), or PM-A's head on the policy's own trunk (one forward, half the cost of an update).
"""
import torch

from model import scalar_head

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
