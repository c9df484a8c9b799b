"""
Best-of-n sampling and rejection-sampling fine-tuning (expert iteration), the simplest way to use a PM.

    python rlhf.py rs --preset cpu     # best-of-n against PM-A, fine-tune SFT on the winners -> rs.pt

Best-of-n samples n replies and keeps the one PM-A scores highest: a policy whose KL from SFT is known in
closed form, log n - (n-1)/n, which makes it the cleanest point to compare RL against (evaluate.py
draws its reward-vs-KL curve for every n at once with the unbiased estimator bon_expected). The rs stage
then fine-tunes SFT on its own best-of-n replies: the "RS" policy (Bai et al. 2022 sec. 4.3).

References
- Stiennon et al. 2020, "Learning to summarize from human feedback", app. G.3 (KL of best-of-n).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", sec. 2 (the unbiased best-of-n estimator).
- Anthony et al. 2017 / Dong et al. 2023 (expert iteration / RAFT: fine-tuning on the best samples).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from model import disable_dropout
from reward import load_reward_model, pm_reward_fn
from runtime import (MetricsLog, dist_info, initial_policy, load_checkpoint, load_model, pick_device, save_checkpoint,
                     set_seed, stage_done)
from sampling import reply_ended, rl_prompts, sample_replies, score, strip_end
from tokens import sft_example
from train import LMTrainConfig, supervised_train

# ----------------------------------------------------------------------------------------------
# the math: best-of-n

def best_of_n(scores):
    """Index of the best of each row's n samples. scores (P, n) -> (P,) long. Ties go to the first."""
    return scores.argmax(dim=1)


def pick_winners(scores, ended):
    """Each prompt's winner for the fine-tune: its best finished reply, or, where none of its n replies
    finished, its best cut one. scores, ended (P, n) -> (P,) long."""
    best_finished = best_of_n(scores.masked_fill(~ended, float("-inf")))  # (P,) arbitrary where none finished
    return torch.where(ended.any(1), best_finished, best_of_n(scores))


def winner_example(query, reply, ended, tok, block_size):
    """(ids, loss_mask) to fine-tune on a winner: a finished reply without the EOS or stop sequence it ended
    with, then one EOS (sft_example's); a cut reply as sampled, with no EOS, so that the fine-tune never
    teaches the policy to stop where max_new_tokens cut it."""
    if ended:
        reply = strip_end(reply, tok.eos_id, tok.stop_ids)
    return sft_example(query, reply, tok, block_size, len(reply), eos=ended)


def bon_kl(n):
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020 app. G.3).

    For a continuous reward the best of n draws has CDF F(x)^n, density q = n F^(n-1) p, so
    KL = E_q[log n F^(n-1)] = log n + (n - 1) E_q[log F], and under q, F ~ U^(1/n) with
    E[log U^(1/n)] = -1/n. For a discrete base distribution it is an upper bound (ties lower it)."""
    return math.log(n) - (n - 1) / n


def bon_expected(select, report, n):
    """The unbiased best-of-n estimator of Gao et al. 2022 sec. 2: with N >= n samples per prompt,
    average `report` of the `select`-argmax over ALL C(N, n) subsets of size n, in closed form.
    After sorting a row by `select` (ascending), sample i (0-based) is the max of exactly C(i, n-1)
    of the C(N, n) subsets, so its weight is C(i, n-1) / C(N, n).

    select, report: (P, N) float tensors (e.g. PM-A picks, PM-B judges) -> (P,) expected report."""
    P, N = select.shape
    assert 1 <= n <= N, f"best-of-{n} needs at least {n} samples per prompt, got {N}"
    order = select.argsort(dim=1, stable=True)                               # (P, N)
    sorted_report = report.gather(1, order).double()                         # (P, N)
    weights = torch.tensor([math.comb(i, n - 1) for i in range(N)], dtype=torch.float64) / math.comb(N, n)
    return (sorted_report * weights).sum(1).to(report.dtype)                 # (P,)


# ----------------------------------------------------------------------------------------------
# the rs stage

@dataclass
class RSConfig(LMTrainConfig):
    """Rejection-sampling fine-tuning (expert iteration): best-of-n on RL prompts, then SFT on the winners.
    The LMTrainConfig fields (max_steps, batch_size, lr, ...) configure the fine-tune."""
    n: int = 16                  # samples per prompt; the best under PM-A is kept
    num_prompts: int = 256       # train prompts to sample (0 = all)
    max_new_tokens: int = 0      # reply length cap while sampling (0 = ppo.max_new_tokens)
    sample_batch_size: int = 64  # sequences per generate call
    max_steps: int = 200         # fine-tuning steps on the winners
    lr: float = 5e-5             # fine-tuning lr (a small step from SFT)
    warmup_steps: int = 10       # linear warmup
    eval_interval: int = 50      # steps between validation passes and checkpoints


def stage_rs(run, rs_cfg, ppo_cfg):
    """Stage `rs`: sample n replies per RL prompt from SFT, keep the PM-A best, fine-tune SFT on them
    (Bai et al. sec. 4 / expert iteration) -> out_dir/rs.pt. Replies that ended (EOS or a new Human
    turn) are the candidates where a prompt has one; a cut winner is trained without EOS, so the
    fine-tune never teaches the policy to stop mid-sentence. The winners are cached in
    out_dir/rs_data.pt, so a resumed run trains on the same examples. Under torchrun each rank samples
    prompts rank::N, the winners are gathered on every rank, and the fine-tune is data-parallel."""
    out = run.out_dir
    path, data_path = os.path.join(out, "rs.pt"), os.path.join(out, "rs_data.pt")
    if stage_done(path, run.force, "rs"):
        return
    device = pick_device(run.device)
    set_seed(run.seed)
    policy, tok, _ = load_model(initial_policy(run), device)
    disable_dropout(policy)  # for the sampling and the fine-tune alike, whether or not the winners are on disk
    block_size, max_new = policy.config.block_size, rs_cfg.max_new_tokens or ppo_cfg.max_new_tokens
    if os.path.exists(data_path) and not run.force:
        data = load_checkpoint(data_path)
    else:
        policy.eval()
        pm_a, _, _ = load_reward_model(os.path.join(out, "pm_a.pt"), device)
        prompts = rl_prompts(run, "train", tok, min(ppo_cfg.max_prompt_tokens, block_size - max_new))
        g = torch.Generator().manual_seed(run.seed)
        order = torch.randperm(len(prompts), generator=g).tolist()[:rs_cfg.num_prompts or None]
        rank, world_size = dist_info()
        queries = [prompts[i][1] for i in order][rank::world_size]  # this rank's share
        print(f"[rs] best-of-{rs_cfg.n} on {len(order)} train prompts ({len(order) * rs_cfg.n} samples)"
              + (f", {len(queries)} of them on each of {world_size} processes" if world_size > 1 else ""))
        gen = torch.Generator(device=device).manual_seed(run.seed + 1 + 7919 * rank)
        dtype = run.dtype
        replies = sample_replies(policy, queries, rs_cfg.n, max_new, rs_cfg.sample_batch_size, tok, gen,
                                 ppo_cfg.temperature, dtype)
        rep_queries = [q for q in queries for _ in range(rs_cfg.n)]
        reward_fn = pm_reward_fn(pm_a, tok, rs_cfg.sample_batch_size, dtype)
        scores = score(reward_fn, rep_queries, replies, rs_cfg.sample_batch_size)
        scores = scores.view(-1, rs_cfg.n)                                                             # (P, n)
        ended = torch.tensor([reply_ended(r, tok.eos_id, tok.stop_ids) for r in replies]).view(-1, rs_cfg.n)
        best = pick_winners(scores, ended)                                                       # (P,)
        examples = [winner_example(queries[p], replies[p * rs_cfg.n + j], bool(ended[p, j]), tok, block_size)
                    for p, j in enumerate(best.tolist())]
        kept = scores.gather(1, best[:, None]).squeeze(1).tolist()
        n_cut = int((~ended.gather(1, best[:, None])).sum())
        parts = [(examples, kept, scores.flatten().tolist(), ended.flatten().tolist(), n_cut)]
        if world_size > 1:  # every rank gets every rank's winners (and the numbers for the summary)
            parts = [None] * world_size
            dist.all_gather_object(parts, (examples, kept, scores.flatten().tolist(), ended.flatten().tolist(), n_cut))
        examples, kept, all_scores, all_ended = ([x for part in parts for x in part[i]] for i in range(4))
        n_cut = sum(part[4] for part in parts)
        data = {"examples": examples, "mean_score": sum(kept) / len(kept), "cut": n_cut,
                "mean_score_all": sum(all_scores) / len(all_scores), "eos_rate": sum(all_ended) / len(all_ended)}
        if rank == 0:
            save_checkpoint(data_path, data)
        print(f"[rs] PM-A of the winners {data['mean_score']:+.3f} vs {data['mean_score_all']:+.3f} for all samples "
              f"| EOS rate {data['eos_rate']:.2f} | {n_cut}/{len(examples)} winners cut at max_new_tokens")
    examples = [tuple(e) for e in data["examples"]]
    n_val = max(1, len(examples) // 10)
    set_seed(run.seed)  # the same start whether the winners were just sampled (which draws on the RNG) or read
    supervised_train(run, "rs", rs_cfg, policy, tok, examples[n_val:], examples[:n_val], path, MetricsLog(out))
