"""
PPO against a frozen preference model, with a KL penalty to the SFT policy: the RL stage of RLHF.

    python rlhf.py ppo --preset cpu          # needs out_dir/sft.pt, pm_a.pt and pm_b.pt

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
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from actor_critic import build_optimizer, forward_policy, load_models, logprobs_from_logits, rollout_forward
from reward import pm_reward_fn, score_replies
from runtime import (ConfigError, MetricsLog, NonFiniteLoss, all_ranks_mean, autocast, average_gradients, batch_rows,
                     clip_and_step, dist_info, grad_scaler, initial_policy, load_checkpoint, micro_batches,
                     model_checkpoint, pick_device, restore, rng_state, save_checkpoint, set_seed, stage_done,
                     token_share)
from sampling import reply_ended, rl_prompts
from tokens import pad_left


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
    length_debias: bool = False  # reward = PM-A minus its linear trend in reply length on SFT samples (reward.py)
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


def batch_mean(x, mask):
    """masked_mean over the whole rollout batch. Under torchrun each rank holds a slice of the batch,
    so the sum and the count are all-reduced: every rank gets the one-process value."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    sums = torch.stack([x.sum(), mask.to(x.dtype).sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums[0] / sums[1].clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the real tokens of the whole batch (all ranks). Whitening the advantages
    keeps the policy-gradient scale fixed as rewards drift (lm-hp `whiten`); shift_mean=False only
    rescales (used for rewards, whose sign carries meaning). Padding positions are returned as 0."""
    mean = batch_mean(x, mask)
    var = batch_mean((x - mean) ** 2, mask)  # biased, as masked_var
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


# ----------------------------------------------------------------------------------------------
# one PPO iteration: rollout, rewards, advantages, K epochs of updates


def ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries, query_mask, ppo_cfg, kl_coef, eos_id, generator,
             stop_ids=(), dtype="auto", max_tokens=0, scaler=None):
    """One iteration of RLHF-PPO (Ziegler et al. 2019 / lm-hp train_policy), in five steps: a rollout
    (steps 1-4: sample, score, KL-penalised rewards, advantages), then the update (step 5).

    queries (B, Tq) left-padded prompt ids with query_mask (B, Tq). reward_fn(queries, responses) takes
    lists of token-id lists (the real tokens only) and returns a (B,) tensor of scores: the PM, or any
    function a test defines. A reply ends at eos_id or at one of stop_ids (a new "\n\nHuman:" turn:
    the model handing the dialogue back), or is cut at ppo_cfg.max_new_tokens.
    The models' forwards (sampling, scoring, the update's) run under runtime.autocast(dtype), bf16 on CUDA
    by default; what they return for the RL math is fp32 (log-probs, values, scores), so rewards, KL, GAE,
    whitening and the losses are computed in fp32, and backward runs outside autocast.
    Returns (stats dict, rollout dict); the caller owns beta's update.
    """
    ro = rollout(policy, ref_policy, critic, reward_fn, queries, query_mask, ppo_cfg, kl_coef, eos_id, generator,
                 stop_ids, dtype, max_tokens)
    mb_stats, stop = ppo_update(policy, critic, optimizer, ro, ppo_cfg, generator, dtype, max_tokens, scaler)
    # diagnostics (not part of the algorithm)
    mask, kl_sum = ro["mask"], ro["kl"]
    stats = {k: sum(s[k] for s in mb_stats) / len(mb_stats) for k in mb_stats[0]}
    stats.update({
        "score": ro["scores"].mean().item(), "pm_a": ro["pm_scores"].mean().item(), "kl": kl_sum.mean().item(),
        "kl_coef": kl_coef, "non_score_reward": (-kl_coef * kl_sum).mean().item(),
        "entropy": masked_mean(ro["entropy"], mask).item(),
        "explained_var": explained_variance(ro["values"], ro["returns"], mask),
        "reply_len": ro["response_mask"].sum(1).float().mean().item(), "eos_rate": ro["ended"].float().mean().item(),
        "returns": masked_mean(ro["returns"], mask).item(), "values": masked_mean(ro["values"], mask).item(),
        "minibatches": len(mb_stats), "early_stop": float(stop),
    })
    return stats, {**ro, "mb_stats": mb_stats}


def rollout(policy, ref_policy, critic, reward_fn, queries, query_mask, ppo_cfg, kl_coef, eos_id, generator, stop_ids,
            dtype, max_tokens=0):
    """Steps 1-4 of ppo_step, with no gradients (the frozen models under inference_mode): sample, score,
    per-token rewards, advantages. Returns the batch the update trains on, as a dict of (B, ...) tensors
    (and the replies as id lists). The forwards over query + response take minibatch_size rows at a time, fewer
    where that is more than max_tokens tokens."""
    B, Tq = queries.shape
    for m in (policy, critic, ref_policy):
        m.eval()  # dropout off (it is 0 in PPO models anyway): the ratio must be exactly 1 at first
    with torch.no_grad(), autocast(queries.device.type, dtype):
        # 1. sample responses with the batched KV-cache sampler, until EOS (or a stop sequence) or max length
        responses, _, response_mask = policy.generate(
            queries, query_mask, max_new_tokens=ppo_cfg.max_new_tokens, temperature=ppo_cfg.temperature,
            eos_id=eos_id, stop_ids=list(stop_ids), generator=generator)                  # (B, N) each
        query_response = torch.cat([queries, responses], 1)                               # (B, Tq + N)
        attention_mask = torch.cat([query_mask.bool(), response_mask], 1)                 # (B, Tq + N)
        mask = response_mask.float()                                                      # (B, N)
        chunk = ppo_cfg.minibatch_size  # rows a forward: a minibatch's, or as many as max_tokens holds
        if max_tokens:
            chunk = max(1, min(chunk, max_tokens // query_response.size(1)))
        # logprobs recomputed with the same full forward the update uses, so ratio = 1 exactly at first
        logprobs, values, entropy = rollout_forward(policy, critic, query_response, attention_mask, responses,
                                                    Tq, ppo_cfg.temperature, chunk)  # (B, N) each
        with torch.inference_mode():
            ref_logprobs, _, _ = rollout_forward(ref_policy, None, query_response, attention_mask, responses,
                                                 Tq, ppo_cfg.temperature, chunk)    # (B, N)
            # 2. score with the PM: the reply up to and including EOS (or truncated at max length)
            q_list = [q[m].tolist() for q, m in zip(queries, query_mask.bool())]
            r_list = [r[:n].tolist() for r, n in zip(responses, response_mask.sum(1).tolist())]
            pm_scores = reward_fn(q_list, r_list).float().to(queries.device)              # (B,)
    with torch.no_grad():  # the RL math, in fp32
        ended = torch.tensor([reply_ended(r, eos_id, stop_ids) for r in r_list], device=queries.device)  # (B,)
        if ppo_cfg.penalize_no_eos:  # lm-hp: a reply that never ended gets a fixed, bad score
            scores = torch.where(ended, pm_scores, torch.full_like(pm_scores, ppo_cfg.no_eos_penalty))
        else:
            scores = pm_scores
        # 3. per-token KL penalty, plus the score on the last real token
        rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)      # (B, N) each
        if ppo_cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        # 4. GAE (gamma 1, lambda 0.95), then advantages whitened over the real tokens of the batch
        advantages, returns = compute_gae(values, rewards, mask, ppo_cfg.gamma, ppo_cfg.lam)    # (B, N) each
        advantages = masked_whiten(advantages, mask)
    return {"query_response": query_response, "attention_mask": attention_mask, "responses": responses,
            "response_mask": response_mask, "mask": mask, "context_length": Tq, "logprobs": logprobs,
            "values": values, "entropy": entropy, "advantages": advantages, "returns": returns, "ended": ended,
            "scores": scores, "pm_scores": pm_scores, "kl": kl.sum(1), "q_list": q_list, "r_list": r_list}


def minibatch_losses(policy, critic, ro, rows, ppo_cfg, dtype):
    """PPO's losses on rollout rows `rows` under the current weights, with gradients: (pg_loss, vf_loss, stats)."""
    device = ro["responses"].device
    with autocast(device.type, dtype):  # the forward only: backward runs in the forward's dtypes
        logits, values = forward_policy(policy, critic, ro["query_response"][rows], ro["attention_mask"][rows],
                                        ro["context_length"], ppo_cfg.temperature)                # (b, N, V), (b, N)
    logprobs = logprobs_from_logits(logits, ro["responses"][rows])                                # (b, N) fp32
    return ppo_losses(logprobs, values, ro["logprobs"][rows], ro["values"][rows], ro["advantages"][rows],
                      ro["returns"][rows], ro["mask"][rows], ppo_cfg.cliprange, ppo_cfg.cliprange_value)


def ppo_update(policy, critic, optimizer, ro, ppo_cfg, generator, dtype, max_tokens=0, scaler=None):
    """Step 5 of ppo_step: ppo_cfg.ppo_epochs passes of clipped PPO updates over shuffled minibatches of the rollout
    `ro`, stopping early once a minibatch's approximate KL passes ppo_cfg.max_approx_kl (if set). A minibatch of more
    than max_tokens tokens (rows x query + response) runs in groups of rows (runtime.micro_batches), each group's losses
    weighted by its share of the minibatch's reply tokens: the losses are means over those tokens, so the gradients add
    up to the minibatch's. Under torchrun each rank's loss is weighted by its share of the minibatch's tokens and the
    gradients are averaged before every step. Returns (per-minibatch stats, stopped early)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    B, device, mb_stats = ro["responses"].size(0), ro["responses"].device, []
    scaler = scaler or grad_scaler(device.type, "float32")  # off: a plain step
    width = ro["query_response"].size(1)
    for epoch in range(ppo_cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator, device=generator.device).to(device)
        for start in range(0, B, ppo_cfg.minibatch_size):
            mb = perm[start:start + ppo_cfg.minibatch_size]
            groups = [mb[rows.to(device)] for rows in micro_batches(torch.full((len(mb),), width), max_tokens)]
            # this rank's mean, weighted by its share of the global minibatch's tokens (1 in one process)
            share = token_share(ro["mask"][mb]) if dist.is_initialized() else 1.0
            n_tokens = ro["mask"][mb].sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            finite, parts = torch.ones((), device=device), []
            for rows in groups:
                pg_loss, vf_loss, st = minibatch_losses(policy, critic, ro, rows, ppo_cfg, dtype)
                loss = pg_loss + ppo_cfg.vf_coef * vf_loss
                weight = ro["mask"][rows].sum() / n_tokens if len(groups) > 1 else 1.0  # the group's share
                finite *= torch.isfinite(loss)
                scaler.scale(loss * (weight * share) if len(groups) > 1 or dist.is_initialized() else loss).backward()
                parts.append((weight, {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), **st}))
            # every rank reaches the same verdict before any collective on gradients: one rank raising alone
            # would leave the others waiting forever in the next all-reduce
            if all_ranks_mean(finite) < 1:
                raise NonFiniteLoss(f"non-finite PPO loss (this rank: pg_loss {parts[-1][1]['pg_loss'].item()}, "
                                    f"vf_loss {parts[-1][1]['vf_loss'].item()})")
            average_gradients(params)  # one process: nothing to do
            st = {k: sum(w * p[k] for w, p in parts) for k in parts[0][1]}  # the minibatch's means
            st = {k: all_ranks_mean(v) if k not in ("pg_loss", "vf_loss") else v for k, v in st.items()}
            grad_norm = clip_and_step(optimizer, params, ppo_cfg.max_grad_norm, scaler)
            mb_stats.append({"pg_loss": st.pop("pg_loss").item(), "vf_loss": st.pop("vf_loss").item(),
                             "grad_norm": grad_norm.item(), **{k: v.item() for k, v in st.items()}})
            if ppo_cfg.max_approx_kl and st["approx_kl"].item() > ppo_cfg.max_approx_kl:
                return mb_stats, True  # the policy moved too far from the one that sampled: stop reusing the batch
    return mb_stats, False


# ----------------------------------------------------------------------------------------------
# the stage: load SFT and the PMs, loop ppo_step, log, checkpoint


def prompt_batch(prompts, index, batch_size, seed, pad_id):
    """Batch `index` of a seeded per-epoch shuffle, a pure function of (index, seed) so resuming needs
    no loader state. Returns left-padded queries (B, T) and their mask (B, T)."""
    return pad_left([prompts[i][1] for i in batch_rows(len(prompts), index, batch_size, seed)], pad_id)


def resume(path, policy, critic, optimizer, ppo_cfg, scaler):
    """(first iteration, beta): from an unfinished ppo.pt (weights, optimizer, RNG, KL controller), or
    (0, ppo_cfg.kl_coef)."""
    if not os.path.exists(path):
        return 0, ppo_cfg.kl_coef
    ckpt = restore(path, policy, optimizer, critic=critic, scaler=scaler)
    print(f"[ppo] resuming from {path} at iteration {ckpt['iteration']}/{ppo_cfg.iterations}, "
          f"beta {ckpt['kl_coef']:.4f}")
    return ckpt["iteration"], ckpt["kl_coef"]


def print_iteration(it, ppo_cfg, stats, ro, tok):
    """One line of an iteration's numbers, and every ppo_cfg.sample_every iterations two of its replies."""
    print(f"[ppo] it {it + 1}/{ppo_cfg.iterations} | pm_a {stats['pm_a']:+.3f} "
          f"| pm_b {stats.get('pm_b', math.nan):+.3f} "
          f"| kl {stats['kl']:.2f} | beta {stats['kl_coef']:.3f} | ent {stats['entropy']:.2f} "
          f"| clipfrac {stats['clipfrac']:.3f} | approx_kl {stats['approx_kl']:.4f} | ev {stats['explained_var']:.2f} "
          f"| len {stats['reply_len']:.1f} | eos {stats['eos_rate']:.2f} | {stats['time']:.1f}s")
    if ppo_cfg.sample_every and it % ppo_cfg.sample_every == 0:
        for q, r, score in list(zip(ro["q_list"], ro["r_list"], ro["scores"].tolist()))[:2]:
            print(f"    [{score:+.2f}] ...{tok.decode(q)[-120:]!r} -> {tok.decode(r)[:240]!r}")


def stage_ppo(run, ppo_cfg):
    """Stage `ppo`: PPO on PM-A from the SFT policy -> out_dir/ppo.pt (skipped if done, resumed if not).

    Logs every iteration to metrics.jsonl under ppo/ (PM-A score, PM-B score, KL to the reference,
    sqrt KL, beta, entropy, clipfrac, approx_kl, vf_loss, explained variance, reply length, EOS rate).
    Under torchrun each of the N ranks takes rows rank::N of every global batch and minibatch."""
    out, dtype = run.out_dir, run.dtype
    path = os.path.join(out, "ppo.pt")
    if stage_done(path, run.force, "ppo"):
        return
    rank, world_size = dist_info()
    assert ppo_cfg.batch_size % ppo_cfg.minibatch_size == 0 and ppo_cfg.minibatch_size % world_size == 0, (
        f"ppo.batch_size {ppo_cfg.batch_size} must be a multiple of ppo.minibatch_size {ppo_cfg.minibatch_size}, "
        f"which must be divisible by the {world_size} processes")
    local = replace(ppo_cfg, batch_size=ppo_cfg.batch_size // world_size,
                    minibatch_size=ppo_cfg.minibatch_size // world_size)
    device = pick_device(run.device)
    set_seed(run.seed)
    policy, ref_policy, critic, pm_a, pm_b, tok = load_models(out, initial_policy(run), ppo_cfg, device)
    if ppo_cfg.length_debias and not pm_a.length_mean:
        raise ConfigError(f"--ppo.length_debias: {os.path.join(out, 'pm_a.pt')} has no length trend (it was written "
                          "before PMs stored one); rerun `python rlhf.py rm --force`")
    reward_a = pm_reward_fn(pm_a, tok, dtype=dtype, length_debias=ppo_cfg.length_debias)  # the reward
    reward_b = pm_reward_fn(pm_b, tok, dtype=dtype)                                  # the held-out judge, as is
    optimizer = build_optimizer(policy, critic, ppo_cfg, torch.device(device).type)
    scaler = grad_scaler(device, dtype)  # fp16 only: the loss scaler; a no-op otherwise
    start, kl_coef = resume(path, policy, critic, optimizer, ppo_cfg, scaler)
    prompts = rl_prompts(run, "train", tok,
                         min(ppo_cfg.max_prompt_tokens, policy.config.block_size - ppo_cfg.max_new_tokens))
    print(f"[ppo] {len(prompts)} train prompts | {ppo_cfg.iterations} iterations x {ppo_cfg.batch_size} rollouts | "
          f"beta {kl_coef} ({'adaptive' if ppo_cfg.adaptive_kl else 'fixed'}) | lr {ppo_cfg.lr} | device {device}"
          + (f" | {world_size} processes" if world_size > 1 else ""))
    log = MetricsLog(out)

    def checkpoint(iteration, done):
        if rank == 0:  # the replicas are identical: one writer
            save_checkpoint(path, model_checkpoint(
                policy, tok, critic=critic.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                iteration=iteration,
                kl_coef=kl_coef, rng=rng_state(), seed=run.seed, stage="ppo", config=asdict(ppo_cfg), done=done))

    it = start
    try:
        for it in range(start, ppo_cfg.iterations):
            t0 = time.time()
            queries, query_mask = (t[rank::world_size].to(device)
                                   for t in prompt_batch(prompts, it, ppo_cfg.batch_size, run.seed, tok.eos_id))
            generator = torch.Generator(device=device).manual_seed(run.seed * 1_000_003 + it + 7919 * rank)
            try:
                stats, ro = ppo_step(policy, ref_policy, critic, optimizer, reward_a, queries, query_mask, local,
                                     kl_coef, tok.eos_id, generator, tok.stop_ids, dtype, run.micro_tokens, scaler)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"[ppo] {e} at iteration {it}; the last good checkpoint is kept in {path} "
                                    f"(try a lower --ppo.lr or a larger --ppo.kl_coef)") from None
            if ppo_cfg.judge_every and it % ppo_cfg.judge_every == 0:  # the overoptimisation lab: the held-out judge
                with torch.inference_mode():
                    stats["pm_b"] = reward_b(ro["q_list"], ro["r_list"]).float().mean().item()
            if ppo_cfg.length_debias:  # the reward is debiased PM-A; raw PM-A is the frontier's unit (evaluate.py)
                stats["pm_a_raw"] = score_replies(pm_a, tok, ro["q_list"], ro["r_list"], dtype=dtype).mean().item()
            stats = {k: all_ranks_mean(v).item() for k, v in stats.items()}  # each rank saw its own rollouts
            if ppo_cfg.adaptive_kl:
                kl_coef = adaptive_kl_coef(kl_coef, stats["kl"], ppo_cfg.batch_size, ppo_cfg.target_kl,
                                           ppo_cfg.kl_horizon)
            stats.update(sqrt_kl=math.sqrt(max(stats["kl"], 0.0)), time=time.time() - t0)
            if rank == 0:
                log.log("ppo", it, **stats)
            print_iteration(it, ppo_cfg, stats, ro, tok)
            if ppo_cfg.save_every and (it + 1) % ppo_cfg.save_every == 0:
                checkpoint(it + 1, done=False)
    except KeyboardInterrupt:  # mid-update weights are half an iteration: keep the last whole checkpoint
        saved = load_checkpoint(path)["iteration"] if os.path.exists(path) else 0
        print(f"\n[ppo] interrupted at iteration {it}; {path} holds iteration {saved} "
              f"(saved every {ppo_cfg.save_every}); rerun the same command to resume from there")
        raise SystemExit(130)
    checkpoint(ppo_cfg.iterations, done=True)
    print(f"[ppo] done | checkpoint {path}")
