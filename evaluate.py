"""
Best-of-n sampling, rejection-sampling fine-tuning, and the final evaluation of every policy.

    python rlhf.py rs   --preset cpu     # best-of-n against PM-A, fine-tune SFT on the winners -> rs.pt
    python rlhf.py eval --preset cpu     # sft / bon / rs / ppo on held-out prompts -> eval.json, report.md

Each policy is scored on held-out test prompts by PM-A (the reward it was optimised against) and by
PM-B (a preference model trained on the other half of the comparisons, which no policy ever saw),
and placed on the reward-vs-sqrt(KL) plane of Gao et al. 2022: if PM-A keeps rising while PM-B stalls
or falls, the policy is overoptimising its proxy.

The file reads top to bottom: the math (best-of-n selection, its analytic KL, the unbiased
best-of-n estimator, the frontier fits), sampling and scoring helpers, then the `rs` and `eval` stages.

References
- Stiennon et al. 2020, "Learning to summarize from human feedback", app. G.3 (KL of best-of-n).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", sec. 2-3 (the unbiased best-of-n
  estimator, R_bon(d) = d(a - b d), R_RL(d) = d(a - b log d), d = sqrt(KL)).
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4.3 (reward is linear
  in sqrt(KL)); Anthony et al. 2017 / Dong et al. 2023 (expert iteration / RAFT, rejection sampling).
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data import pad_left, pad_right, sft_example
from model import disable_dropout
from ppo import forward_policy, logprobs_from_logits, pm_reward_fn, reply_ended, rl_prompts
from reward import load_reward_model
from train import (LMTrainConfig, MetricsLog, autocast, dist_info, load_checkpoint, load_model, pick_device,
                   save_checkpoint, set_seed, stage_done, supervised_train)


# ----------------------------------------------------------------------------------------------
# the math: best-of-n

def best_of_n(scores):
    """Index of the best of each row's n samples. scores (P, n) -> (P,) long. Ties go to the first."""
    return scores.argmax(dim=1)


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
# the math: reward-vs-KL frontier fits (least squares, numpy)

def _lstsq(features, y):
    """Least squares y ~ features @ w; returns w and the root-mean-square residual."""
    X, y = np.asarray(features, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    return w, float(np.sqrt(np.mean((X @ w - y) ** 2)))


def fit_bon(d, r):
    """Gao et al. eq. 1, best-of-n: R(d) = d (a - b d), d = sqrt(KL), R = reward gain over the
    initial policy (R(0) = 0). Linear in (a, b): features [d, -d^2]."""
    d = np.asarray(d, dtype=np.float64)
    (a, b), rmse = _lstsq(np.stack([d, -d ** 2], 1), r)
    return {"form": "d*(a - b*d)", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}


def fit_rl(d, r):
    """Gao et al. eq. 2, RL: R(d) = d (a - b log d). Features [d, -d log d] (d log d -> 0 at d = 0)."""
    d = np.asarray(d, dtype=np.float64)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    (a, b), rmse = _lstsq(np.stack([d, -dlogd], 1), r)
    return {"form": "d*(a - b*log(d))", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}


def fit_linear(d, r):
    """Bai et al. 2022 sec. 4.3: reward is roughly linear in sqrt(KL), R = a + b d."""
    d = np.asarray(d, dtype=np.float64)
    (a, b), rmse = _lstsq(np.stack([np.ones_like(d), d], 1), r)
    return {"form": "a + b*d", "a": float(a), "b": float(b), "rmse": rmse, "points": len(d)}


# ----------------------------------------------------------------------------------------------
# configs

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


@dataclass
class EvalConfig:
    """The final evaluation of sft / bon / rs / ppo on held-out test prompts."""
    num_prompts: int = 64        # test prompts (0 = all)
    n: int = 16                  # SFT samples per prompt: best-of-n up to n, and the SFT baseline
    max_new_tokens: int = 0      # reply length cap (0 = ppo.max_new_tokens, the length PPO trained with)
    policy_samples: int = 4      # samples per prompt for rs and ppo (SFT and best-of-n use n)
    batch_size: int = 64         # sequences per generate / scoring call
    num_examples: int = 3        # prompts shown side by side in report.md
    frontier_windows: int = 8    # PPO training iterations are averaged into this many frontier points
    pm_only: bool = False        # only re-evaluate the preference models (reward.py's evaluate_pms)


# ----------------------------------------------------------------------------------------------
# sampling and scoring

@torch.no_grad()
def sample_replies(policy, queries, n, max_new_tokens, batch_size, tok, generator, temperature=1.0, dtype="auto"):
    """n replies per query at `temperature` with no top-k/top-p (so best-of-n's KL is the analytic
    one and a sampled KL estimate is unbiased), ending at EOS or a new "\n\nHuman:" turn, as in PPO.
    The forwards run under train.autocast(dtype); the sampling itself is fp32 (GPT.generate).
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
    under train.autocast(dtype); the log-softmax and the sums are fp32."""
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


def strip_end(reply, tok):
    """A reply without its final EOS or "\n\nHuman:" stop sequence: the text a reader sees."""
    if reply[-1:] == [tok.eos_id]:
        return reply[:-1]
    for stop in tok.stop_ids:
        if len(stop) and reply[-len(stop):] == list(stop):
            return reply[:-len(stop)]
    return reply


def score(reward_fn, queries, replies, batch_size):
    """PM scores of (query, reply) id lists in batches -> (len(replies),) float tensor."""
    with torch.inference_mode():
        return torch.cat([reward_fn(queries[i:i + batch_size], replies[i:i + batch_size]).float().cpu()
                          for i in range(0, len(replies), batch_size)])


# ----------------------------------------------------------------------------------------------
# stage rs: rejection-sampling fine-tuning (expert iteration)

def run_rs(cfg):
    """Stage `rs`: sample n replies per RL prompt from SFT, keep the PM-A best, fine-tune SFT on them
    (Bai et al. sec. 4 / expert iteration) -> out_dir/rs.pt. Replies that ended (EOS or a new Human
    turn) are the candidates where a prompt has one; a cut winner is trained without EOS, so the
    fine-tune never teaches the policy to stop mid-sentence. The winners are cached in
    out_dir/rs_data.pt, so a resumed run trains on the same examples. Under torchrun each rank samples
    prompts rank::N, the winners are gathered on every rank, and the fine-tune is data-parallel."""
    rc, out = cfg.rs, cfg.out_dir
    path, data_path = os.path.join(out, "rs.pt"), os.path.join(out, "rs_data.pt")
    if stage_done(path, cfg.force, "rs"):
        return
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    policy, tok, _ = load_model(os.path.join(out, "sft.pt"), device)
    disable_dropout(policy)  # for the sampling and the fine-tune alike, whether or not the winners are on disk
    block_size, max_new = policy.config.block_size, rc.max_new_tokens or cfg.ppo.max_new_tokens
    if os.path.exists(data_path) and not cfg.force:
        data = load_checkpoint(data_path)
    else:
        policy.eval()
        pm_a, _, _ = load_reward_model(os.path.join(out, "pm_a.pt"), device)
        prompts = rl_prompts(cfg, "train", tok, min(cfg.ppo.max_prompt_tokens, block_size - max_new))
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(prompts), generator=g).tolist()[:rc.num_prompts or None]
        rank, world_size = dist_info()
        queries = [prompts[i][1] for i in order][rank::world_size]  # this rank's share
        print(f"[rs] best-of-{rc.n} on {len(order)} train prompts ({len(order) * rc.n} samples)"
              + (f", {len(queries)} of them on each of {world_size} processes" if world_size > 1 else ""))
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 7919 * rank)
        dtype = getattr(cfg, "dtype", "auto")
        replies = sample_replies(policy, queries, rc.n, max_new, rc.sample_batch_size, tok, gen, cfg.ppo.temperature,
                                 dtype)
        rep_queries = [q for q in queries for _ in range(rc.n)]
        scores = score(pm_reward_fn(pm_a, tok, rc.sample_batch_size, dtype), rep_queries, replies, rc.sample_batch_size)
        scores = scores.view(-1, rc.n)                                                             # (P, n)
        ended = torch.tensor([reply_ended(r, tok.eos_id, tok.stop_ids) for r in replies]).view(-1, rc.n)
        # the best finished reply; only where none finished, the best cut one (trained without EOS)
        best = best_of_n(torch.where(ended, scores, scores - 1e9))                                # (P,)
        examples, kept, n_cut = [], [], 0
        for p, j in enumerate(best.tolist()):
            reply = replies[p * rc.n + j]
            if ended[p, j]:  # drop the EOS or stop sequence; sft_example appends one EOS, since the reply fits
                reply = strip_end(reply, tok)
                examples.append(sft_example(queries[p], reply, tok, block_size, len(reply)))
            else:            # a cut reply gets no EOS: the policy must not learn to stop there
                examples.append(sft_example(queries[p], reply, tok, block_size, len(reply) - 1))
                n_cut += 1
            kept.append(scores[p, j].item())
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
    set_seed(cfg.seed)  # the same start whether the winners were just sampled (which draws on the RNG) or read
    supervised_train(cfg, "rs", rc, policy, tok, examples[n_val:], examples[:n_val], path, MetricsLog(out))


# ----------------------------------------------------------------------------------------------
# stage eval: every policy on held-out prompts, the reward-vs-sqrt(KL) frontier, the report

def win_rate(policy_scores, sft_scores):
    """P(judge prefers the policy's reply to an SFT reply to the same prompt), ties counted half:
    every policy sample against every SFT sample. policy_scores (P, k), sft_scores (P, n) -> float."""
    diff = policy_scores[:, :, None] - sft_scores[:, None, :]                          # (P, k, n)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def prompt_se(scores):
    """Standard error of the mean score over prompts, scores (P, k): the spread of the per-prompt means
    over sqrt(P). Samples of one prompt are correlated, so the P prompts are the independent draws."""
    per_prompt = scores.double().mean(1)                                               # (P,)
    return float(per_prompt.std() / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")


def rl_temperature(cfg):
    """The temperature every policy is sampled and its KL measured at: the one PPO trained at (stored in
    ppo.pt; --ppo.temperature before PPO has run). It is the distribution PPO's KL penalty anchored to,
    the one the PM normaliser centres, and best-of-n's analytic KL holds for it as for any base policy."""
    path = os.path.join(cfg.out_dir, "ppo.pt")
    stored = load_checkpoint(path).get("config", {}).get("temperature") if os.path.exists(path) else None
    return float(cfg.ppo.temperature if stored is None else stored)


def ppo_frontier(out_dir, windows):
    """PPO's path on the frontier, from its metrics.jsonl rows (ppo/pm_a, ppo/pm_b, ppo/kl on the
    training rollouts), averaged into `windows` consecutive chunks of iterations. Rows of an earlier,
    forced-over run are dropped: the current run is the one after the last iteration-0 row."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [r for r in map(json.loads, open(path)) if r.get("stage") == "ppo" and "ppo/pm_b" in r]
    starts = [i for i, r in enumerate(rows) if r["step"] == 0]
    rows = list({r["step"]: r for r in rows[starts[-1] if starts else 0:]}.values())  # last row per step
    if not rows:
        return []
    chunks = np.array_split(np.arange(len(rows)), min(windows, len(rows)))
    points = [{"method": "sft", "step": rows[0]["step"], "kl": rows[0]["ppo/kl"], "pm_a": rows[0]["ppo/pm_a"],
               "pm_b": rows[0]["ppo/pm_b"], "prompts": "train"}] if rows[0]["step"] == 0 else []
    for c in chunks:
        mean = lambda k: float(np.mean([rows[i][k] for i in c]))  # noqa: E731
        points.append({"method": "ppo", "step": int(rows[c[-1]]["step"]), "kl": mean("ppo/kl"),
                       "pm_a": mean("ppo/pm_a"), "pm_b": mean("ppo/pm_b"), "prompts": "train"})
    return points


def fit_frontiers(bon_points, ppo_points):
    """Fit Gao et al.'s forms to reward gains over the starting policy and Bai et al.'s line to the raw
    rewards, for PM-A (the proxy) and PM-B (the held-out judge). d = sqrt(KL). A Gao fit also stores
    r0, the starting reward its gains are relative to: the curve in reward units is r0 + R(d)."""
    fits = {}
    for pm in ("pm_a", "pm_b"):
        if len(bon_points) >= 2:
            d = [math.sqrt(p["kl"]) for p in bon_points]
            r = [p[pm] for p in bon_points]
            fits[f"bon_{pm}"] = {**fit_bon(d, [x - r[0] for x in r]), "r0": r[0]}
            fits[f"bon_{pm}_linear"] = fit_linear(d, r)
        if len(ppo_points) >= 3:
            d = [math.sqrt(max(p["kl"], 0.0)) for p in ppo_points]
            r = [p[pm] for p in ppo_points]
            fits[f"ppo_{pm}"] = {**fit_rl(d, [x - r[0] for x in r]), "r0": r[0]}
            fits[f"ppo_{pm}_linear"] = fit_linear(d, r)
    return fits


def write_report(path, ev, examples):
    """out_dir/report.md: the policy table, best-of-n curve, frontier fits and a few replies."""
    lines = ["# Evaluation on held-out test prompts", "",
             "PM-A is the reward the policies were optimised against; PM-B, trained on the other half of the "
             "comparisons, is the held-out judge. KL is to the SFT policy in nats (analytic for best-of-n).", "",
             "| policy | PM-A | PM-B | KL | sqrt KL | win rate vs SFT (PM-B) | reply tokens |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in ev["policies"].items():
        lines.append(f"| {name} | {p['pm_reward']:+.3f} | {p['heldout_pm_reward']:+.3f} | {p['kl']:.2f} | "
                     f"{math.sqrt(max(p['kl'], 0)):.2f} | {p['win_rate_vs_sft']:.3f} | {p['mean_reply_tokens']:.1f} |")
    lines += ["", *[f"- {n}" for n in ev["notes"]], "", "## Best-of-n (PM-A picks, unbiased estimator of Gao et al.)", "",
              "| n | KL = log n - (n-1)/n | PM-A | PM-B |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['n']} | {p['kl']:.3f} | {p['pm_a']:+.3f} | {p['pm_b']:+.3f} |" for p in ev["bon_curve"]]
    lines += ["", "## Reward vs d = sqrt(KL): least-squares fits", "",
              "Gao et al. forms are fitted to the gain over the starting policy; `linear` (Bai et al.) to the raw reward. "
              "PPO points come from its training rollouts (train prompts), best-of-n from test prompts.", "",
              "| curve | form | a | b | rmse | points |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {f['form']} | {f['a']:+.4f} | {f['b']:+.4f} | {f['rmse']:.4f} | {f['points']} |"
              for k, f in ev["frontier_fits"].items()]
    lines += ["", "## Sample replies (PM-A / PM-B scores)", ""]
    for ex in examples:
        lines += [f"**Human:** {ex['human'][:300]}", ""]
        lines += [f"- **{name}** [{a:+.2f} / {b:+.2f}]: {reply[:400]}" for name, (reply, a, b) in ex["replies"].items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines).replace("\r", " ") + "\n")


def run_eval(cfg):
    """Stage `eval`: sft, best-of-n, rs and ppo on held-out test prompts -> eval.json (its "pm" section,
    written by reward.py, is kept), frontier.jsonl and report.md. Returns the eval.json dict.

    SFT gets n samples per prompt: their mean is the SFT row and their PM-A maxima are best-of-n for
    every n up to n at once. rs and ppo get `policy_samples` each; KL(policy || SFT) is the sampled
    estimate mean over replies of sum_t [log pi(y_t) - log pi_sft(y_t)]. Missing policies are skipped."""
    ec, out = cfg.eval, cfg.out_dir
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    sft, tok, _ = load_model(os.path.join(out, "sft.pt"), device)
    disable_dropout(sft).eval()
    pm_a, _, _ = load_reward_model(os.path.join(out, "pm_a.pt"), device)
    pm_b, _, _ = load_reward_model(os.path.join(out, "pm_b.pt"), device)
    dtype = getattr(cfg, "dtype", "auto")
    reward_a, reward_b = pm_reward_fn(pm_a, tok, ec.batch_size, dtype), pm_reward_fn(pm_b, tok, ec.batch_size, dtype)
    max_new = ec.max_new_tokens or cfg.ppo.max_new_tokens
    max_prompt = min(cfg.ppo.max_prompt_tokens, sft.config.block_size - max_new)
    prompts = rl_prompts(cfg, "test", tok, max_prompt)[:ec.num_prompts or None]
    queries, P, n, bs = [q for _, q in prompts], len(prompts), ec.n, ec.batch_size
    print(f"[eval] {P} test prompts | SFT x{n} (best-of-n) | rs, ppo x{ec.policy_samples}")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    T = rl_temperature(cfg)

    # 1. SFT: n samples per prompt, scored by both PMs
    replies = {"sft": sample_replies(sft, queries, n, max_new, bs, tok, gen, T, dtype)}
    rep_q = {"sft": [q for q in queries for _ in range(n)]}
    a = {"sft": score(reward_a, rep_q["sft"], replies["sft"], bs).view(P, n)}                    # (P, n)
    b = {"sft": score(reward_b, rep_q["sft"], replies["sft"], bs).view(P, n)}                    # (P, n)
    lengths = {"sft": torch.tensor([len(r) for r in replies["sft"]], dtype=torch.float).view(P, n)}
    kl = {"sft": 0.0}
    notes = [f"{P} test prompts, temperature {T} (PPO's; KL to SFT at the same temperature), replies up to {max_new} "
             f"tokens; SFT and best-of-n from {n} SFT samples per prompt, rs/ppo from {ec.policy_samples} per prompt."]

    # 2. best-of-n: PM-A picks among the SFT samples; the unbiased estimator gives every n <= N
    bon_curve = [{"method": "bon", "n": k, "kl": bon_kl(k), "pm_a": bon_expected(a["sft"], a["sft"], k).mean().item(),
                  "pm_b": bon_expected(a["sft"], b["sft"], k).mean().item(), "prompts": "test"}
                 for k in [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]]
    best = best_of_n(a["sft"])                                                                   # (P,)
    pick = lambda x: x.gather(1, best[:, None])                                                  # noqa: E731 (P, 1)
    a["bon"], b["bon"], lengths["bon"], kl["bon"] = pick(a["sft"]), pick(b["sft"]), pick(lengths["sft"]), bon_kl(n)
    replies["bon"] = [replies["sft"][p * n + j] for p, j in enumerate(best.tolist())]

    # 3. rs and ppo: their own samples, scored, and their sampled KL to SFT
    k = ec.policy_samples
    for name in ("rs", "ppo"):
        path = os.path.join(out, f"{name}.pt")
        if not os.path.exists(path):
            notes.append(f"{name}: skipped ({path} not found; run `python rlhf.py {name}` first)")
            continue
        policy, _, ckpt = load_model(path, device)
        disable_dropout(policy).eval()
        if not ckpt.get("done"):
            notes.append(f"{name}: evaluated an unfinished checkpoint (step {ckpt.get('step', ckpt.get('iteration'))})")
        rep_q[name] = [q for q in queries for _ in range(k)]
        replies[name] = sample_replies(policy, queries, k, max_new, bs, tok, gen, T, dtype)
        a[name] = score(reward_a, rep_q[name], replies[name], bs).view(P, k)
        b[name] = score(reward_b, rep_q[name], replies[name], bs).view(P, k)
        lengths[name] = torch.tensor([len(r) for r in replies[name]], dtype=torch.float).view(P, k)
        kl[name] = (reply_logprobs(policy, rep_q[name], replies[name], bs, tok.eos_id, T, dtype)
                    - reply_logprobs(sft, rep_q[name], replies[name], bs, tok.eos_id, T, dtype)).mean().item()
        del policy

    policies = {name: {"pm_reward": a[name].mean().item(), "pm_reward_se": prompt_se(a[name]),
                       "heldout_pm_reward": b[name].mean().item(), "heldout_pm_reward_se": prompt_se(b[name]),
                       "kl": kl[name], "win_rate_vs_sft": win_rate(b[name], b["sft"]),
                       "mean_reply_tokens": lengths[name].mean().item(), "temperature": T} for name in a}
    policies["bon"].update(n=n, kl_analytic=bon_kl(n))

    # 4. the frontier: best-of-n and PPO on the same (sqrt KL, reward) axes, and the fits
    ppo_points = ppo_frontier(out, ec.frontier_windows)
    final = [{"method": f"{m}_final", "step": None, "kl": policies[m]["kl"], "pm_a": policies[m]["pm_reward"],
              "pm_b": policies[m]["heldout_pm_reward"], "prompts": "test"} for m in ("rs", "ppo") if m in policies]
    frontier = bon_curve + ppo_points + final
    for p in frontier:
        p["sqrt_kl"] = math.sqrt(max(p["kl"], 0.0))
    with open(os.path.join(out, "frontier.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in frontier)
    fits = fit_frontiers(bon_curve, ppo_points)

    # 5. eval.json (merged with reward.py's "pm" section), report.md
    ev_path = os.path.join(out, "eval.json")
    ev = json.load(open(ev_path)) if os.path.exists(ev_path) else {}
    ev.update(temperature=T, policies=policies, bon_curve=bon_curve, frontier_fits=fits, notes=notes)
    tmp = ev_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ev, f, indent=2)
    os.replace(tmp, ev_path)
    examples = []
    for p in range(min(ec.num_examples, P)):
        human = prompts[p][0].rsplit("\n\nHuman:", 1)[-1].split("\n\nAssistant:")[0].strip()
        col = {"sft": p * n, "bon": p, "rs": p * k, "ppo": p * k}
        examples.append({"human": human, "replies": {
            m: (tok.decode(strip_end(replies[m][col[m]], tok)).strip(),
                a[m].view(-1)[col[m]].item(), b[m].view(-1)[col[m]].item()) for m in replies}})
    write_report(os.path.join(out, "report.md"), ev, examples)
    print(f"[eval] {'policy':6s} {'PM-A':>7s} {'PM-B':>7s} {'KL':>6s} {'win':>6s} {'tokens':>6s}")
    for name, r in policies.items():
        print(f"[eval] {name:6s} {r['pm_reward']:+7.3f} {r['heldout_pm_reward']:+7.3f} {r['kl']:6.2f} "
              f"{r['win_rate_vs_sft']:6.3f} {r['mean_reply_tokens']:6.1f}")
    for note in notes[1:]:
        print(f"[eval] note: {note}")
    print(f"[eval] wrote {ev_path}, {os.path.join(out, 'frontier.jsonl')}, {os.path.join(out, 'report.md')}")
    return ev
