"""
PPO against a frozen preference model, with a KL penalty to the SFT policy: the RL stage of RLHF.

    python rlhf.py ppo --preset cpu          # needs out_dir/sft.pt and out_dir/pm_a.pt

The policy starts from the SFT model; the reference (the same SFT weights, frozen) anchors it with a
per-token KL penalty; the value model starts from PM-A (the training-signal preference model), and
PM-A scores each sampled reply. PM-B, trained on the other half of the comparisons, never trains
anything: it is logged next to PM-A so you can watch the policy overoptimise PM-A (Gao et al. 2022).

The file reads top to bottom: the math (masked statistics, rewards with the KL penalty, the adaptive
KL controller, GAE, the clipped losses), then the rollout and the update, then the stage.

References
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", and its code
  openai/lm-human-preferences (rewards, whitening, AdaptiveKLController, the PPO hyperparameters);
  vwxyzjn/lm-human-preference-details (a line-by-line PyTorch port of it).
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4 (the recipe).
- Schulman et al. 2017 (PPO), 2016 (GAE); cleanrl ppo.py (loop layout, approx_kl, explained variance).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (gold vs proxy reward vs sqrt KL).
"""

import math
import os
import time
from copy import deepcopy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class PPOConfig:
    """Defaults follow lm-human-preferences / lm-human-preference-details where they apply."""
    iterations: int = 100        # PPO iterations (one rollout batch + its updates each)
    batch_size: int = 64         # rollouts (prompts) per iteration
    minibatch_size: int = 16     # rollouts per gradient step
    ppo_epochs: int = 4          # passes over each rollout batch
    lr: float = 1e-5             # Adam lr for policy and value model (one optimizer, as lm-hp)
    adam_eps: float = 1e-5       # lm-hp's Adam epsilon
    max_grad_norm: float = 1.0   # global grad-norm clip (0 = off)
    temperature: float = 1.0     # sampling temperature, used again in every training forward
    max_prompt_tokens: int = 256 # queries are left-truncated to this many tokens
    max_new_tokens: int = 64     # response length cap; no EOS by then -> penalty
    no_eos_penalty: float = -1.0 # score that replaces the PM score of a reply with no EOS (lm-hp: -1)
    penalize_no_eos: bool = True # apply no_eos_penalty
    kl_coef: float = 0.15        # beta: per-token penalty -beta * (logp - logp_ref)
    adaptive_kl: bool = False    # adapt beta toward target_kl (lm-hp AdaptiveKLController)
    target_kl: float = 6.0       # nats per reply, for adaptive_kl
    kl_horizon: int = 10000      # rollouts over which beta moves by at most +-20%
    gamma: float = 1.0           # discount (1: the episode is one reply)
    lam: float = 0.95            # GAE lambda
    whiten_rewards: bool = False # optional reward scaling: divide per-token rewards by their std
    cliprange: float = 0.2       # policy ratio clip
    cliprange_value: float = 0.2 # value clip around the rollout values
    vf_coef: float = 0.1         # weight of vf_loss in the summed loss
    max_approx_kl: float = 0.0   # stop this iteration's updates once minibatch approx_kl exceeds it (0 = off)
    share_trunk: bool = False    # value head on the policy's trunk (one forward) instead of a PM-A copy
    judge_every: int = 1         # iterations between PM-B (held-out judge) scorings of the rollouts
    sample_every: int = 10       # iterations between printed sample replies
    save_every: int = 10         # iterations between checkpoints


# ----------------------------------------------------------------------------------------------
# the math: masked statistics

def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1. `where`, not `x * mask`, so that even inf/nan in the
    padding (exp of a garbage logratio) contributes nothing."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Biased variance over the masked positions. Biased (divide by N, not N-1) to match lm-hp's
    `whiten`, which uses tf.nn.moments; for the batch sizes here the difference is negligible."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the real tokens only. Whitening the advantages keeps the policy-gradient
    scale fixed as rewards drift (lm-hp `whiten`); shift_mean=False only rescales (used for rewards,
    whose sign carries meaning). Padding positions are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# the math: rewards, KL control, advantages

def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards of Ziegler et al. eq. 2: r_t = -beta * (log pi(y_t) - log pi_ref(y_t)),
    plus the preference-model score on the last real token of the response.

    scores (B,), logprobs/ref_logprobs/mask (B, N) -> rewards (B, N), kl (B, N).
    The summed penalty is -beta times a one-sample estimate of KL(pi || pi_ref) for the reply."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask                                # (B, N)
    rewards = -kl_coef * kl                                              # (B, N)
    last = (mask.sum(1).long() - 1).clamp(min=0)                         # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def adaptive_kl_coef(kl_coef, current_kl, n_steps, target, horizon):
    """lm-hp's AdaptiveKLController (Ziegler et al. sec. 2.2): a proportional controller on log beta,
        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    so beta grows when the policy drifts past the target KL and shrinks when it stays under it.
    n_steps = rollouts in this iteration; returns the new beta (a float, so it checkpoints trivially)."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def compute_gae(values, rewards, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left:
        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1}
    with V and A zero after the last real token (the reply is over: no bootstrap).
    values/rewards/mask (B, N) -> advantages (B, N), returns = advantages + values (B, N)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    B, N = values.shape
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]   # padding resets the recursion
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# the math: the clipped PPO losses

def ppo_losses(logprobs, values, old_logprobs, old_values, advantages, returns, mask, cliprange, cliprange_value):
    """The clipped surrogate objective and the clipped value loss (Schulman et al. 2017, eq. 7 and
    the value clipping of openai/baselines' ppo2, as lm-hp uses), averaged over real tokens.

    All inputs (B, N); `old_*` come from the rollout, the others from the current parameters.
        ratio = exp(logprobs - old_logprobs)
        pg_loss = mean max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
        vf_loss = 0.5 * mean max((V - R)^2, (old_V + clip(V - old_V, -eps_v, eps_v) - R)^2)
    Returns pg_loss, vf_loss and a dict of detached diagnostics (clipfrac, approx_kl, ...)."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)                                                   # (B, N)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses2), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses).float(), mask),
            # k3 estimator of KL(old || new), unbiased and >= 0: http://joschu.net/blog/kl-approx.html
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return pg_loss, vf_loss, stats


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over real tokens: 1 = the value model predicts returns perfectly,
    0 = no better than a constant, < 0 = worse (cleanrl logs the same)."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")
