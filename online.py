"""
HH's data loop, iterated online RLHF (Bai et al. 2022, sec. 4.5): the deployed policy writes comparisons, people
label them, the PM trains further on them, and the policy is optimised again against the new PM, round after
round. That is how the PM learns the region the policy has moved into, where a PM trained once on the initial
policy's replies knows least (the top decile of PM-A's scores, where PM-A and PM-B agree least).

    python rlhf.py online --online.rounds=2                    # after `python rlhf.py all`
    python rlhf.py online --online.method=ppo                  # re-optimise with PPO instead of rejection sampling
    python rlhf.py online --online.labeler=human               # you decide each comparison (as `rlhf.py label`)

Each round: (1) the current policy (round 1: the initial policy, SFT or cd) samples n replies to train prompts;
PM-A's best two make one comparison (HH's rejection-sampling interface) and two plain samples another; (2) the
labeler decides each; (3) PM-A trains further on half A plus every online comparison so far; (4) a new policy is
optimised from the initial one against that PM-A (`rs` or `ppo`, the stage's own settings: the same KL budget);
(5) the labeler measures it on test prompts. Round 0 is the flow's own PM-A and policy.

Where no person is at hand, the labeler is simulated by PM-B, as in Gao et al. 2022's "gold" PM: a judge nothing
else trains against. The rounds are then judged by the labeler they learn from, so a gain in PM-B reward is partly
PM-A learning PM-B; PM-A's accuracy on the human-labelled test pairs (pm_a_test_accuracy) stays the independent
check. Each round's comparisons are also written in hh-rlhf's layout (online/labels/online-round{r}), which
--data.extra_dir reads as more subsets.

References: Bai et al. 2022 (sec. 4.5, fig. 1: Elo); Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization" (the gold-model simulation).
"""
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from data import Pair, read_pairs, resolve_data_dir, train_comparisons
from evaluate import elo_table, policy_row, sample_and_score, sampled_kl
from label import read_key, show_dialogue, show_replies, write_subset
from model import disable_dropout
from pm_metrics import decile_agreement, pair_accuracy, wilson_interval
from ppo import stage_ppo
from reward import encode_pairs, load_reward_model, normalize_pm, pm_block, pm_reward_fn, score_pairs
from rm import normalisation_samples, train_pm
from rs import stage_rs
from runtime import (ConfigError, MetricsLog, initial_policy, load_checkpoint, load_model, model_checkpoint,
                     pick_device, save_checkpoint, set_seed)
from sampling import rl_prompts, sample_replies, score, strip_end

# -----------------------------------------------------------------------------
# the loop: collect on-policy comparisons, label them, train PM-A further, re-optimise (HH sec. 4.5)

@dataclass
class OnlineConfig:
    """`online`: HH's iterated online RLHF. Each round the current policy writes comparisons on train prompts, a
    labeler decides them, PM-A trains further on them, and a new policy is optimised from the initial one against
    it; each round is measured by the labeler on test prompts."""
    rounds: int = 2              # rounds of collect -> label -> train PM-A -> re-optimise
    method: str = "rs"           # rs | ppo: how a round's policy is optimised against its PM-A (the stage's settings)
    prompts: int = 64            # train prompts a round collects on (a fresh seeded draw each round)
    n: int = 16                  # samples a prompt; PM-A's best two make one comparison (HH's RS interface)
    plain: bool = True           # and the first two samples another (a plain pair)
    labeler: str = "pm_b"        # pm_b: a simulated labeler, the held-out PM-B; human: you, as in `label`
    pm_steps: int = 60           # PM-A's further steps a round, on half A plus every online comparison so far
    eval_prompts: int = 48       # test prompts each round's policy is measured on
    eval_samples: int = 4        # replies a test prompt from each round's policy (SFT's baseline: eval.n)


def check_online(online_cfg):
    """--online.method and --online.labeler, one line each, before anything loads."""
    if online_cfg.method not in ("rs", "ppo"):
        raise ConfigError(f"--online.method must be rs or ppo, got {online_cfg.method!r}")
    if online_cfg.labeler not in ("pm_b", "human"):
        raise ConfigError(f"--online.labeler must be pm_b or human, got {online_cfg.labeler!r}")


def collect(policy, pm_a, tok, queries, online_cfg, max_new, temperature, generator, batch_size, dtype):
    """On-policy comparisons: n samples a query from `policy`, ranked by PM-A; its best two are one comparison (HH's
    rejection-sampling interface, where the labeler compares the two replies the PM likes most) and, with
    online_cfg.plain, the first two samples another. -> [(query, reply_1, reply_2, kind)] id lists."""
    n = online_cfg.n
    replies = sample_replies(policy, queries, n, max_new, batch_size, tok, generator, temperature, dtype)
    rep_q = [q for q in queries for _ in range(n)]
    scores = score(pm_reward_fn(pm_a, tok, batch_size, dtype), rep_q, replies, batch_size).view(len(queries), n)
    top2 = scores.topk(2, dim=1).indices.tolist()                                                       # (P, 2)
    out = []
    for p, q in enumerate(queries):
        out.append((q, replies[p * n + top2[p][0]], replies[p * n + top2[p][1]], "best_two"))
        if online_cfg.plain:
            out.append((q, replies[p * n], replies[p * n + 1], "plain"))
    return out


def judge(candidates, labeler, pm_a, pm_b, tok, batch_size, dtype, partial):
    """The labeler's verdict on each comparison, and PM-A's scores before it trains on them. labeler "pm_b": the
    higher PM-B score is chosen (a tie: no row), the simulation of Gao et al. 2022 with PM-B as the gold model;
    "human": the `label` prompt, each verdict kept in `partial` as it is made, so q (or Ctrl-D) stops the run and the
    next run asks from the next comparison. -> [(query, chosen, rejected, kind, a_c, a_r, b_c, b_r)]."""
    q = [c[0] for c in candidates for _ in (0, 1)]
    r = [c[1 + k] for c in candidates for k in (0, 1)]
    a = score(pm_reward_fn(pm_a, tok, batch_size, dtype), q, r, batch_size).view(-1, 2).tolist()
    b = score(pm_reward_fn(pm_b, tok, batch_size, dtype), q, r, batch_size).view(-1, 2).tolist()
    state = load_checkpoint(partial) if os.path.exists(partial) else {"done": 0, "rows": []}
    rows = state["rows"]
    for i in range(state["done"], len(candidates)):
        (query, r1, r2, kind), (a1, a2), (b1, b2) = candidates[i], a[i], b[i]
        pick = (1 if b1 > b2 else 2 if b2 > b1 else 0) if labeler == "pm_b" else ask_pick(tok, query, r1, r2)
        if pick is None:
            print(f"[online] stopped at comparison {i + 1} of {len(candidates)}; rerun the same command to go on")
            raise SystemExit(0)
        if pick == 1:
            rows.append((query, r1, r2, kind, a1, a2, b1, b2))
        elif pick == 2:
            rows.append((query, r2, r1, kind, a2, a1, b2, b1))
        if labeler == "human":
            save_checkpoint(partial, {"done": i + 1, "rows": rows})
    return rows


def train_pm_a(run, rm_cfg, prev_path, path, pairs, val_pairs, ref, online_cfg, seed):
    """PM-A of a round: the previous round's PM-A trained further, online_cfg.pm_steps steps on `pairs` (half A and
    every online comparison so far), early-stopped on the validation pairs, then normalised on the same SFT samples
    as the rm stage's PMs (`ref`: gain and bias, the length trend). Written to `path` once, resumable."""
    if os.path.exists(path) and load_checkpoint(path).get("done"):
        return
    device = pick_device(run.device)
    model, tok, _ = load_reward_model(prev_path, device)
    set_seed(seed)
    block = pm_block(model, run.data)
    enc = lambda ps: encode_pairs(ps, tok, block, run.data.max_reply_tokens)  # noqa: E731
    steps_cfg = replace(rm_cfg, max_steps=online_cfg.pm_steps, pmp=False, pmp_dir="")
    info = train_pm(run, steps_cfg, model, tok, enc(pairs), enc(val_pairs), rm_cfg.objective,
                    ckpt_path=path + ".train", name=os.path.basename(os.path.dirname(path)) + "/pm_a")
    normalize_pm(model, tok, *ref["ref"], rm_cfg.normalize, rm_cfg.eval_batch_size, run.dtype, trend=ref["trend"])
    save_checkpoint(path, model_checkpoint(
        model, tok, step=info["steps"], stage="online", config=asdict(steps_cfg), seed=run.seed, done=True,
        reward_gain=model.reward_gain, reward_bias=model.reward_bias, length_coef=model.length_coef,
        length_mean=model.length_mean, train_pairs=len(pairs), **info))
    os.remove(path + ".train")


def optimise(run, round_dir, pm_a_path, online_cfg, rs_cfg, ppo_cfg):
    """A round's policy: the `rs` or `ppo` stage, from the initial policy, against this round's PM-A, with the stage's
    own settings (the same KL budget every round), run in round_dir: links there to the initial policy, PM-B and this
    PM-A make the stage read them as its own. -> the policy's checkpoint path."""
    os.makedirs(round_dir, exist_ok=True)
    for name, target in ((run.policy_init, initial_policy(run)), ("pm_a", pm_a_path),
                         ("pm_b", os.path.join(run.out_dir, "pm_b.pt"))):
        link = os.path.join(round_dir, f"{name}.pt")
        if os.path.abspath(target) != os.path.abspath(link) and not os.path.exists(link):
            os.symlink(os.path.abspath(target), link)
    round_run = replace(run, out_dir=round_dir)
    if online_cfg.method == "rs":
        stage_rs(round_run, rs_cfg, ppo_cfg)
    else:
        stage_ppo(round_run, ppo_cfg)
    return os.path.join(round_dir, f"{online_cfg.method}.pt")


def measure(policy, sft, pm_a, pm_b, tok, queries, k, base, max_new, T, run, batch_size, seed):
    """One policy on the measuring prompts, as eval measures it (evaluate.policy_row): k replies a prompt, PM-A's
    and the labeler's (PM-B's) rewards, KL to SFT, win rates against SFT's replies in `base`, raw and
    length-controlled. -> (row, its PM-B scores (P, k), its lengths (P, k))."""
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    reward_a, reward_b = (pm_reward_fn(pm, tok, batch_size, run.dtype) for pm in (pm_a, pm_b))
    rep_q, replies, a, b, lengths = sample_and_score(policy, queries, k, max_new, tok, gen, T, reward_a, reward_b,
                                                     batch_size, run.dtype)
    kl = sampled_kl(policy, sft, rep_q, replies, batch_size, tok.eos_id, T, run.dtype)
    return policy_row(a, b, lengths, base["lengths"], kl, base["b"], T), b, lengths


def before_training(rows):
    """How well the previous PM-A knew where the policy now lives, on the round's labelled comparisons before it
    trains on them: its accuracy against the labeler (Wilson 95% interval), and its agreement with the labeler in
    its own top score decile (pm_metrics.decile_agreement), where RL pushes."""
    a_c, a_r = np.array([row[4] for row in rows]), np.array([row[5] for row in rows])
    accuracy = pair_accuracy(a_c, a_r)  # the labeler picked `chosen`
    deciles = decile_agreement(a_c, a_r, np.ones(len(rows)), np.zeros(len(rows)))
    return {"comparisons": len(rows), "pm_a_accuracy": accuracy,
            "pm_a_accuracy_ci": list(wilson_interval(accuracy * len(rows), len(rows))),
            "top_decile_agreement": deciles[-1]["agreement"] if deciles else float("nan")}


def round_comparisons(run, r, collector_path, pm_a_path, pm_b, tok, prompts, online_cfg, ppo_cfg, path):
    """Round r's labelled comparisons, collected by the policy in collector_path on a seeded draw of train prompts,
    with PM-A's and PM-B's scores: computed once and kept in `path`, so a resumed round labels nothing twice."""
    if os.path.exists(path):
        return load_checkpoint(path)["rows"]
    device = pick_device(run.device)
    policy, _, _ = load_model(collector_path, device)
    pm_a, _, _ = load_reward_model(pm_a_path, device)
    disable_dropout(policy).eval()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(run.seed + 1000 * r)).tolist()
    queries = [prompts[i][1] for i in order[:online_cfg.prompts]]
    gen = torch.Generator(device=device).manual_seed(run.seed + 1000 * r + 1)
    candidates = collect(policy, pm_a, tok, queries, online_cfg, ppo_cfg.max_new_tokens, ppo_cfg.temperature, gen,
                         64, run.dtype)
    rows = judge(candidates, online_cfg.labeler, pm_a, pm_b, tok, 64, run.dtype, path + ".partial")
    save_checkpoint(path, {"rows": rows})
    if os.path.exists(path + ".partial"):
        os.remove(path + ".partial")
    return rows


def as_pairs(rows, tok, subset):
    """Labelled comparisons as data.Pair: the prompt's text, and each reply's text as a PM reads it (its ending cut)."""
    out = []
    for query, chosen, rejected, *_ in rows:
        prompt = tok.decode(query)
        out.append(Pair(prompt, tok.decode(strip_end(chosen, tok.eos_id, tok.stop_ids)),
                        tok.decode(strip_end(rejected, tok.eos_id, tok.stop_ids)), subset, prompt.count("\n\nHuman:")))
    return out


def shared_inputs(run, sft, pm_b, tok, test_queries, rm_cfg, ppo_cfg, eval_cfg, path):
    """What every round reuses, computed once and kept in `path`: SFT's replies to the measuring prompts with the
    labeler's scores (the baseline of the win rates), and the SFT samples a new PM-A is normalised on (as rm's)."""
    if os.path.exists(path):
        return load_checkpoint(path)
    train_pairs = train_comparisons(resolve_data_dir(run.data_dir or None), run.data, rm_cfg.split_halves)[0]
    gen = torch.Generator(device=next(sft.parameters()).device).manual_seed(run.seed)
    reward_b = pm_reward_fn(pm_b, tok, eval_cfg.batch_size, run.dtype)
    _, _, _, b, lengths = sample_and_score(sft, test_queries, eval_cfg.n, ppo_cfg.max_new_tokens, tok, gen,
                                           ppo_cfg.temperature, reward_b, reward_b, eval_cfg.batch_size, run.dtype)
    ref, trend = normalisation_samples(sft, tok, train_pairs, rm_cfg, ppo_cfg, run.seed, run.dtype)
    shared = {"b": b, "lengths": lengths, "ref": ref, "trend": trend}
    save_checkpoint(path, shared)
    return shared


def stage_online(run, online_cfg, rm_cfg, rs_cfg, ppo_cfg, eval_cfg):
    """Stage `online`, after `all`: online_cfg.rounds rounds of HH's loop -> out_dir/online.json, online/round{r}/
    (the comparisons, PM-A, the policy) and online/labels/ (each round's comparisons in hh-rlhf's layout, one subset
    a round: --data.extra_dir reads them). Round 0 is the flow's own PM-A and `rs` or `ppo` policy. Every step of a
    round is kept once done, so a killed run resumes where it stopped and ends as an uninterrupted one."""
    out, device = run.out_dir, pick_device(run.device)
    first = os.path.join(out, f"{online_cfg.method}.pt")
    for path, stage in ((os.path.join(out, "pm_b.pt"), "rm"), (first, online_cfg.method)):
        if not os.path.exists(path):
            raise ConfigError(f"{path} not found: run `python rlhf.py {stage}` first (online starts after `all`)")
    sft, tok, _ = load_model(initial_policy(run), device)
    disable_dropout(sft).eval()
    pm_b = load_reward_model(os.path.join(out, "pm_b.pt"), device)[0]
    T, max_new = ppo_cfg.temperature, ppo_cfg.max_new_tokens
    max_prompt = min(ppo_cfg.max_prompt_tokens, sft.config.block_size - max_new)
    prompts = rl_prompts(run, "train", tok, max_prompt)
    test_q = [q for _, q in rl_prompts(run, "test", tok, max_prompt)[:online_cfg.eval_prompts]]
    home = os.path.join(out, "online")
    os.makedirs(home, exist_ok=True)
    shared = shared_inputs(run, sft, pm_b, tok, test_q, rm_cfg, ppo_cfg, eval_cfg, os.path.join(home, "shared.pt"))
    _, val_pairs, (half_a, _) = train_comparisons(resolve_data_dir(run.data_dir or None), run.data, rm_cfg.split_halves)
    test_ex = encode_pairs(read_pairs(resolve_data_dir(run.data_dir or None), "test", run.data)[0], tok,
                           pm_block(sft, run.data), run.data.max_reply_tokens)
    judged = {"sft": (shared["b"], shared["lengths"])}
    rounds, online_pairs = [], []
    pm_path, policy_path = os.path.join(out, "pm_a.pt"), first
    for r in range(online_cfg.rounds + 1):
        row = {"round": r}
        if r > 0:  # collect with the last round's policy (round 1: the initial policy), label, train, re-optimise
            rd = os.path.join(home, f"round{r}")
            os.makedirs(rd, exist_ok=True)
            collector = initial_policy(run) if r == 1 else policy_path
            rows = round_comparisons(run, r, collector, pm_path, pm_b, tok, prompts, online_cfg, ppo_cfg,
                                     os.path.join(rd, "comparisons.pt"))
            row.update(before_training(rows))
            pairs = as_pairs(rows, tok, f"online-round{r}")
            write_subset(os.path.join(home, "labels"), f"online-round{r}",
                         [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in pairs])
            online_pairs += pairs
            new_pm = os.path.join(rd, "pm_a.pt")
            train_pm_a(run, rm_cfg, pm_path, new_pm, half_a + online_pairs, val_pairs, shared, online_cfg, run.seed + r)
            pm_path, policy_path = new_pm, optimise(run, rd, new_pm, online_cfg, rs_cfg, ppo_cfg)
        pm_a = load_reward_model(pm_path, device)[0]
        policy = disable_dropout(load_model(policy_path, device)[0]).eval()
        measured, b, lengths = measure(policy, sft, pm_a, pm_b, tok, test_q, online_cfg.eval_samples, shared, max_new,
                                       T, run, eval_cfg.batch_size, run.seed + 7919 * (r + 1))
        row.update(measured, pm_a_test_accuracy=pair_accuracy(*score_pairs(pm_a, test_ex, tok.eos_id,
                                                                            eval_cfg.batch_size, run.dtype)))
        judged[f"round{r}"] = (b, lengths)
        rounds.append(row)
        print_round(row)
    elo = elo_table({k: v[0] for k, v in judged.items()}, {k: v[1] for k, v in judged.items()})
    return save_online(out, online_cfg, rounds, elo)


def ask_pick(tok, query, r1, r2):
    """The human labeler: the dialogue and both replies, as `label` shows them -> 1, 2, 0 (a tie or a skip) or None
    (q: stop here; judge keeps what was decided)."""
    show_dialogue(tok.decode(query), 4)
    show_replies([tok.decode(strip_end(r, tok.eos_id, tok.stop_ids)) for r in (r1, r2)])
    key = read_key("helpful")
    return None if key == "q" else {"1": 1, "2": 2}.get(key, 0)


def print_round(row):
    """One line a round: what PM-A knew before training, and where the round's policy stands by the labeler."""
    before = (f"{row['comparisons']} comparisons, PM-A right on {row['pm_a_accuracy']:.2f} "
              f"[{row['pm_a_accuracy_ci'][0]:.2f}, {row['pm_a_accuracy_ci'][1]:.2f}], top-decile agreement "
              f"{row['top_decile_agreement']:.2f} | ") if "comparisons" in row else ""
    print(f"[online] round {row['round']}: {before}PM-A test acc {row['pm_a_test_accuracy']:.3f} | labeler reward "
          f"{row['heldout_pm_reward']:+.3f} ± {row['heldout_pm_reward_se']:.3f} | KL {row['kl']:.2f} | LC win "
          f"{row['lc_win_rate_vs_sft']:.3f} ± {row['lc_win_rate_se']:.3f} | {row['mean_reply_tokens']:.1f} tokens")


def save_online(out, online_cfg, rounds, elo):
    """out_dir/online.json (atomically) and one metrics.jsonl row a round; prints the Elo table. -> the dict."""
    result = {"config": asdict(online_cfg), "labeler": online_cfg.labeler, "rounds": rounds,
              "elo": {"judge": "pm_b", "reference": "sft", "policies": elo}}
    path = os.path.join(out, "online.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    log = MetricsLog(out)
    for row in rounds:
        log.log("online", row["round"], **{k: v for k, v in row.items() if isinstance(v, (int, float))})
    for name, e in elo.items():
        print(f"[online] Elo {name:8s} {e['elo']:+6.0f} [{e['elo_ci'][0]:+.0f}, {e['elo_ci'][1]:+.0f}] | "
              f"length-controlled {e['lc_elo']:+6.0f} [{e['lc_elo_ci'][0]:+.0f}, {e['lc_elo_ci'][1]:+.0f}]")
    print(f"[online] wrote {path}")
    return result
