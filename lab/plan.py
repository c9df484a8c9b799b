"""
plan.py: before a run, what each stage will do, the memory it needs and how long it will take.

    python rlhf.py plan                                # the preset and data `python rlhf.py` would use
    python rlhf.py plan --preset cpu --data_dir DIR    # any preset and flag, as for the stages
    python rlhf.py plan --preset gpu --plan.gpu=h100   # a GPU you do not have (nothing is measured)
    python rlhf.py plan --plan.measure=false           # arithmetic only, at --plan.gflops

Why: the first `python rlhf.py` on the full hh-rlhf (160,800 train pairs, ~76M tokens per pass) runs for
hours, and nothing said so before it started. `all` prints this plan first. How:
1. Work: each stage's steps, rows and tokens from its config and the data it would read, counted with the
   stages' own functions (rm.pm_steps, train.validation_batches, tokens.sft_example, ...). Pair counts are
   exact; token counts are estimated from a seeded sample of plan.sample_rows pairs, scaled by the counts.
   Work is FLOPs (GPT.flops_per_token: 6N + 12LHQT a token to train, a third of that for a forward pass or
   a sampled token) of six kinds, pretrain and train (supervised_train, compiled with --compile), eager
   (PM training), forward, sample and ppo (whole iterations); sampled token steps (decode: one per token of
   a generate call, however many rows it has); tokens to tokenise; and bytes of a weights file to load and, where
   it is not cached yet, download (--pretrain.init). Replies are counted to max_new_tokens: an upper bound.
2. Rates (rates.py): what this device reaches for each kind, timed at the preset's shapes with bench.py's
   functions (decode steps at the rows each stage samples, their arithmetic included); or, for a named GPU
   (--plan.gpu), its datasheet peak times the utilisation an H100 reached, and a decode step modelled at each
   stage's rows (the H100's launch-bound time + the weights and KV cache over the memory bandwidth); or
   --plan.gflops. Files load and download at assumed rates (rates.LOAD_BYTES_PER_S, DOWNLOAD_BYTES_PER_S).
3. Time = the sum over kinds of work / rate. Memory: the peak, an estimate from the shapes of each stage's widest
   forward/backward pass on the data it reads, under --micro_tokens (memory_parts), with what dominates it named.
The last line printed is the plan as one JSON object: {"preset", "device", "stages", "total_seconds", ...}.

References: PaLM (Chowdhery et al. 2022) app. B and nanoGPT's estimate_mfu (FLOPs); Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4 (activation memory).
"""
import json
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import dpo
from cd import cd_examples, read_prompt
from data import read_pairs, resolve_data_dir, train_comparisons
from lm_loss import CHUNK_LOGITS
from model import GPT
from lab.rates import device_rates, fpt, gpu_rates, init_weights, ppo_iteration_flops, sampled_prompts
from reward import pm_block
from rm import auto_eval_interval, pair_batch, pm_steps
from runtime import pick_device, precision
from tokens import build_tokenizer, dpo_example, lm_tokens, pack_examples, pm_example, sft_example, tokenize_pairs
from train import validation_batches


@dataclass
class Data:
    """What a run would read: exact pair and prompt counts, and a tokenised sample for token counts."""
    data_dir: str
    train: int             # pairs after the validation split (data.split_train_val)
    val: int
    test: int
    halves: tuple          # pairs in PM-A's and PM-B's halves (data.split_halves)
    prompts: int           # unique train prompts: rejection sampling and PPO draw from these
    test_prompts: int      # unique test prompts: eval draws from these
    tok: object            # the tokenizer the run would build
    ids: list              # (prompt, chosen, rejected) token ids of each sampled pair
    stream: np.ndarray     # data.lm_tokens of the sampled pairs: pretraining text
    scale: float           # train pairs per sampled pair
    mean: tuple            # mean tokens of a prompt, a chosen reply, a rejected reply
    tokenize_per_s: float  # how fast this machine tokenised the sample


def read_data(cfg):
    """The data as the stages read it (resolve_data_dir, read_pairs, split_train_val, split_halves); only a
    seeded sample of plan.sample_rows train pairs is tokenised. A trimmed vocabulary is built from that
    sample: the run's own when train holds no more pairs than the sample, else an estimate of it."""
    data_dir = resolve_data_dir(cfg.data_dir or None)
    train, val, halves = train_comparisons(data_dir, cfg.data, cfg.rm.split_halves)
    test, _ = read_pairs(data_dir, "test", cfg.data)
    rows = np.random.default_rng(cfg.seed).permutation(len(train))[:max(1, cfg.plan.sample_rows)]
    sample = [train[i] for i in sorted(rows)]
    tok = build_tokenizer(cfg.data, sample)
    t0 = time.perf_counter()
    ids = tokenize_pairs(sample, tok)
    rate = sum(len(x) for triple in ids for x in triple) / max(time.perf_counter() - t0, 1e-6)
    return Data(str(data_dir), len(train), len(val), len(test), (len(halves[0]), len(halves[1])),
                len({p.prompt for p in train}), len({p.prompt for p in test}), tok, ids, lm_tokens(sample, tok),
                len(train) / len(sample), tuple(float(np.mean([len(x[i]) for x in ids])) for i in range(3)), rate)


def batch_width(lengths, rows, seed):
    """Expected width of a padded batch of `rows` random examples (a batch is as wide as its longest
    example): the mean over 64 seeded batches drawn from the sample's lengths."""
    lengths, rng = np.asarray(lengths), np.random.default_rng(seed)
    k = min(rows, len(lengths))
    return float(np.mean([lengths[rng.choice(len(lengths), k, replace=False)].max() for _ in range(64)]))


def pair_width(seqs, batch_size, seed, group_by_length):
    """Mean width of a comparison batch as rm.pair_batch pads it (length-grouped or not), over one epoch of
    stand-in pairs with the sample's (chosen, rejected) lengths `seqs`."""
    pairs = [(range(a), range(b)) for a, b in seqs]
    return float(np.mean([pair_batch(pairs, i, batch_size, seed, 0, group_by_length)[0].size(1)
                          for i in range(max(1, len(pairs) // batch_size))]))


def widest(lengths, cap, scale):
    """The widest row a stage reads: the sample's widest where the sample is all of the data (scale 1), else
    `cap`, the width every row is cut to, which some of the unseen rows reach."""
    return min(cap, max(lengths)) if scale <= 1 else cap


def pass_rows(rows, width, max_tokens):
    """Rows in a step's widest forward/backward pass: all `rows`, or as many `width`-wide ones as fit in
    max_tokens (runtime.micro_batches, --micro_tokens), at least one."""
    return rows if not max_tokens or rows * width <= max_tokens else max(1, min(rows, max_tokens // width))


def memory_parts(gpt, act_bytes, frozen=0, trained=(), kv=None, logits=None):
    """A stage's peak memory by what holds it, {name: bytes}: 4 bytes a parameter for each frozen model (fp32
    weights); for each trained one, 16 bytes a parameter (weights, gradients, Adam's two moments; + 2 under 16-bit
    autocast, the cast weights it keeps for backward) and the activations of its widest forward/backward pass,
    trained = [(rows, T, head)]: about 34 C bytes a token and layer in 16 bits (Korthikanti et al. 2022, eq. 2
    without the T x T scores, which SDPA does not keep) scaled to act_bytes, + 4 C under autocast (layer norm
    keeps its fp32 input); and the head's: "logits" keeps V values a token (in act_bytes, their fp32 copy for
    the loss, its gradient), "lm_loss" one chunk of logits (fp32 logits and log-softmax, and under autocast the
    matmul's 16-bit output and two 16-bit casts of their gradient) and an fp32 gradient of the hidden states
    (lm_loss.py) and of the head's weight, "distill" the same for context distillation's two heads
    (lm_loss.distill_loss), "dpo" lm_loss's and the padded rows' attention mask, which SDPA keeps as floats (T values
    a token and layer), None (a scalar head) nothing; logits = (rows, N): PPO's logits of the N reply tokens of each
    row, V values a token (in act_bytes, their fp32 log-softmax and its gradient); and the KV cache of sampling
    kv = (rows, T). Checked against the peak resident memory of a CPU step (tests/test_plan.py)."""
    c, P = gpt.config, gpt.num_params(non_embedding=False)
    half = act_bytes < 4  # 16-bit autocast
    parts = {}
    if frozen:
        parts[f"{frozen} frozen model{'s' * (frozen > 1)}"] = 4 * P * frozen
    if kv:
        parts[f"KV cache {kv[0]} x {round(kv[1])}"] = 2 * c.n_layer * kv[0] * kv[1] * c.n_embd * act_bytes
    for rows, T, head in trained:
        per_token = c.n_layer * c.n_embd * (34 * act_bytes / 2 + 4 * half)
        per_token += 4 * c.n_embd if head else 0  # the fp32 gradient of the hidden states the head reads
        per_token += 4 * T * c.n_layer if head == "dpo" else 0  # the attention mask SDPA keeps as floats a layer
        lm_chunk = CHUNK_LOGITS * (8 + 3 * act_bytes * half) + 4 * c.vocab_size * c.n_embd  # + the head's fp32 gradient
        chunk = {"lm_loss": lm_chunk, "dpo": lm_chunk, None: 0,
                 "distill": CHUNK_LOGITS * (12 + 4 * act_bytes * half) + 4 * c.vocab_size * c.n_embd}[head]
        parts["weights + Adam"] = parts.get("weights + Adam", 0) + (16 + 2 * half) * P
        key = f"activations {rows} x {round(T)}"
        parts[key] = parts.get(key, 0) + rows * T * per_token + chunk
    if logits:
        key = next(k for k in parts if k.startswith("activations"))
        parts[key] += logits[0] * logits[1] * c.vocab_size * (act_bytes + 8)
    return parts


def pair_pass(seqs, pairs, cap, cfg, scale, head):
    """[(rows, width, head)] of a comparison step's widest pass: rm.pair_step groups pairs (two rows each, as wide as
    the wider) under cfg.micro_tokens. seqs: [(chosen tokens, rejected tokens)] of the sample."""
    width = widest([max(a, b) for a, b in seqs], cap, scale)
    return [(2 * pass_rows(pairs, 2 * width, cfg.micro_tokens), width, head)]


def trained_pass(rows, width, cfg, head):
    """[(rows, width, head)] of a trained model's widest pass under cfg.micro_tokens (pass_rows)."""
    return [(pass_rows(rows, width, cfg.micro_tokens), width, head)]


def lm_work(gpt, train_cfg, width, n_rows, n_val, kind):
    """supervised_train's work: train_cfg.max_steps steps of batch_size x grad_accum rows `width` tokens wide
    (passes = rows trained / n_rows), and a validation pass before, every eval_interval steps and after,
    of validation_batches(train_cfg, n_val) micro-batches (n_val None: a token stream)."""
    rows = train_cfg.batch_size * train_cfg.grad_accum
    tokens = train_cfg.max_steps * rows * width
    val_passes = (train_cfg.max_steps - 1) // train_cfg.eval_interval + 2
    val_tokens = val_passes * validation_batches(train_cfg, n_val) * train_cfg.batch_size * width
    return {"steps": train_cfg.max_steps, "rows": rows, "width": round(width), "tokens": round(tokens),
            "passes": round(train_cfg.max_steps * rows / max(n_rows, 1), 2), "val_passes": val_passes,
            "flops": {kind: tokens * fpt(gpt, width), "forward": val_tokens * fpt(gpt, width) / 3}}


def work_pretrain(cfg, d, gpt, act):
    """Pretraining on windows of the token stream of every dialogue; a trimmed vocabulary is built first."""
    train_cfg, T, stream = cfg.pretrain, cfg.model.block_size, len(d.stream) * d.scale
    if train_cfg.init:  # no training: the weights file is read, and downloaded first where hub.py has no copy of it yet
        size, cached = init_weights(train_cfg.init)
        what = (f"load {train_cfg.init}'s weights ({size / 1e6:,.0f} MB"
                f"{'' if cached else ', downloaded first'}; no training)")
        return {"what": what, "flops": {}, "tokenize": 0, "bytes": {"load": size, "download": 0 if cached else size},
                "memory": memory_parts(gpt, act, 1)}
    w = lm_work(gpt, train_cfg, T, stream / T, None, "pretrain")
    trim = d.train * sum(d.mean) if cfg.data.vocab == "trimmed" else 0  # the trimmed vocabulary reads every text
    w.update(what=(f"{w['steps']:,} steps x {w['rows']} x {T} tokens = {w['tokens'] / 1e6:,.1f}M tokens: "
                   f"{w['passes']} passes over ~{stream / 1e6:,.2f}M"),
             tokenize=stream * (d.train + d.val) / d.train + trim,
             memory=memory_parts(gpt, act, 0, trained_pass(train_cfg.batch_size, T, cfg, "lm_loss")))
    return w


def work_sft(cfg, d, gpt, act):
    """SFT on prompt + chosen reply: right-padded rows as wide as a batch's longest, or packed full rows."""
    train_cfg, T = cfg.sft, cfg.model.block_size
    ex = [sft_example(x[0], x[1], d.tok, T, cfg.data.max_reply_tokens) for x in d.ids]
    rows = len(pack_examples(ex, T, d.tok.eos_id, cfg.seed)) * d.scale if train_cfg.pack else d.train
    width = T if train_cfg.pack else batch_width([len(e[0]) - 1 for e in ex], train_cfg.batch_size, cfg.seed)
    w = lm_work(gpt, train_cfg, width, rows, round(rows * d.val / d.train), "train")
    packed = f" packed into ~{rows:,.0f} rows" if train_cfg.pack else ""
    w.update(what=(f"{w['steps']:,} steps x {w['rows']} x ~{w['width']} tokens: {w['passes']} passes over {d.train:,} "
                   f"chosen replies{packed}"), tokenize=(d.train + d.val) * (d.mean[0] + d.mean[1]),
             memory=memory_parts(gpt, act, 0, trained_pass(train_cfg.batch_size, T if train_cfg.pack else widest(
                 [len(e[0]) - 1 for e in ex], T, d.scale), cfg, "lm_loss")))
    return w


def work_rm(cfg, d, gpt, act):
    """PM-A and PM-B, each on its half (B pairs = 2B rows a step), validated every eval_interval steps;
    SFT samples at PPO's shapes to normalise them; both score the test pairs (pm_metrics.evaluate_pms)."""
    rm_cfg, N = cfg.rm, cfg.ppo.max_new_tokens
    block, B = pm_block(gpt, cfg.data), rm_cfg.batch_size
    seqs = [[len(pm_example(x[0], x[i], d.tok, block, cfg.data.max_reply_tokens)) for i in (1, 2)] for x in d.ids]
    mean, width = float(np.mean(seqs)), pair_width(seqs, B, cfg.seed, rm_cfg.group_by_length)
    human = [pm_steps(rm_cfg, n) for n in d.halves]
    steps = [n + (rm_cfg.pmp_steps if rm_cfg.pmp or rm_cfg.pmp_dir else 0) for n in human]
    n_val = min(d.val, rm_cfg.val_pairs) if rm_cfg.val_pairs else d.val  # reward.val_subset's cap
    every = rm_cfg.eval_interval or auto_eval_interval(n_val, B)       # as train_pm validates
    vals = sum(math.ceil(n / every) for n in human) if n_val else 0
    q = batch_width([len(x) for x in sampled_prompts(cfg, d, N)], rm_cfg.eval_batch_size, cfg.seed)
    scored = 2 * vals * n_val + 4 * d.test + 2 * rm_cfg.normalize_samples  # sequences, each ~mean tokens
    return {"what": (f"2 PMs x {steps[0]:,} steps x {B} pairs x ~{round(width)} tokens: "
                     f"{human[0] * B / d.halves[0]:.2f} passes over {d.halves[0]:,} pairs; {vals} validations x "
                     f"{n_val:,} pairs; {rm_cfg.normalize_samples} SFT samples to normalise; {d.test:,} test pairs"),
            "steps": steps, "pairs": list(d.halves), "val_passes": vals,
            "flops": {"eager": sum(steps) * 2 * B * width * fpt(gpt, width, head=False),
                      "forward": scored * mean * fpt(gpt, mean, head=False) / 3,
                      "sample": rm_cfg.normalize_samples * N * fpt(gpt, q + N) / 3},
            "decode": math.ceil(rm_cfg.normalize_samples / rm_cfg.eval_batch_size) * N,
            "tokenize": (d.train + d.val + 2 * d.test) * sum(d.mean),
            "memory": memory_parts(gpt, act, 1, pair_pass(seqs, B, block, cfg, d.scale, None))}


def work_cd(cfg, d, gpt, act):
    """Context distillation (cd.stage_cd): supervised_train's work on the dialogues, cut to leave room for the
    HHH prompt, plus the frozen teacher's forward pass over prompt + dialogue for every row, trained or validated."""
    cd_cfg, T = cfg.cd, cfg.model.block_size
    L = len(read_prompt(cd_cfg, d.tok, T)[0])
    ex = cd_examples([x[:2] for x in d.ids], d.tok, T - L + 1)
    width = batch_width([len(e[0]) - 1 for e in ex], cd_cfg.batch_size, cfg.seed)
    w = lm_work(gpt, cd_cfg, width, d.train, round(d.val), "train")
    w["flops"]["forward"] *= 1 + (width + L) / width  # validation: the student's and the teacher's forward
    w["flops"]["forward"] += w["tokens"] * (width + L) / width * fpt(gpt, width + L) / 3  # the teacher, training
    w.update(what=(f"{w['steps']:,} steps x {w['rows']} x ~{w['width']} tokens of dialogue, the teacher reading the "
                   f"{L}-token HHH prompt first: {w['passes']} passes over {d.train:,} dialogues"),
             tokenize=(d.train + d.val) * (d.mean[0] + d.mean[1]),
             memory=memory_parts(gpt, act, 1, trained_pass(cd_cfg.batch_size, widest([len(e[0]) - 1 for e in ex], T - L,
                                                                                  d.scale), cfg, "distill")))
    return w


def work_dpo(cfg, d, gpt, act):
    """One DPO policy per beta (dpo.betas), each trained like a PM on half A (rm.train_pm): a step trains the
    policy on B pairs (2B rows), and the frozen reference runs forward on the same rows. The LM head runs on
    the reply tokens only (reward.reply_logprobs), and in training a second time in backward (lm_loss.py)."""
    dpo_cfg, names = cfg.dpo, dpo.betas(cfg.dpo)
    seqs = [[len(dpo_example(*x, d.tok, cfg.model.block_size, cfg.data.max_reply_tokens)[i]) for i in (0, 1)]
            for x in d.ids]
    width = pair_width(seqs, dpo_cfg.batch_size, cfg.seed, dpo_cfg.group_by_length)
    steps = pm_steps(dpo.pm_config(dpo_cfg), d.halves[0])
    n_val = min(d.val, dpo_cfg.val_pairs) if dpo_cfg.val_pairs else d.val
    vals = math.ceil(steps / (dpo_cfg.eval_interval or auto_eval_interval(n_val, dpo_cfg.batch_size)))
    trained = len(names) * steps * 2 * dpo_cfg.batch_size                           # policy rows, forward and backward
    forward = len(names) * (steps * 2 * dpo_cfg.batch_size + vals * 4 * n_val)     # reference rows; validation: both
    head = 2 * gpt.config.vocab_size * gpt.config.n_embd                       # the head's forward FLOPs a token
    reply = min(width, (d.mean[1] + d.mean[2]) / 2 + 1)                        # reply tokens a row, with EOS
    return {"what": (f"{len(names)} beta{'s' if len(names) > 1 else ''} ({', '.join(f'{b:g}' for _, b in names)}) x "
                     f"{steps:,} steps x {dpo_cfg.batch_size} pairs x ~{round(width)} tokens on half A "
                     f"({d.halves[0]:,} pairs), the SFT reference forward on each; "
                     f"{vals} validations x {n_val:,} pairs"),
            "policies": [n for n, _ in names], "steps": steps,
            "flops": {"eager": trained * (width * fpt(gpt, width, head=False) + reply * 4 * head),
                      "forward": forward * (width * fpt(gpt, width, head=False) / 3 + reply * head)},
            "tokenize": (d.halves[0] + d.val) * sum(d.mean),
            "memory": memory_parts(gpt, act, 1, pair_pass(seqs, dpo_cfg.batch_size, cfg.model.block_size, cfg, d.scale,
                                                          "dpo"))}


def work_rs(cfg, d, gpt, act):
    """Best-of-n on train prompts (sample_batch_size rows a generate call, n per prompt), scored by PM-A,
    then a fine-tune on the winners, a tenth held out for validation (rs.stage_rs)."""
    rs_cfg = cfg.rs
    N = rs_cfg.max_new_tokens or cfg.ppo.max_new_tokens
    lens = [len(x) for x in sampled_prompts(cfg, d, N)]
    q_cap = min(cfg.ppo.max_prompt_tokens, cfg.model.block_size - N)  # prompts are cut as PPO's (sampled_prompts)
    prompts = min(d.prompts, rs_cfg.num_prompts or d.prompts)
    winners = prompts - max(1, prompts // 10)
    q = batch_width(lens, max(1, rs_cfg.sample_batch_size // rs_cfg.n), cfg.seed)
    width = batch_width([n + N for n in lens], rs_cfg.batch_size, cfg.seed)  # a winner: prompt + reply (+ EOS)
    w = lm_work(gpt, rs_cfg, width, winners, prompts - winners, "train")
    w["flops"]["sample"] = prompts * rs_cfg.n * N * fpt(gpt, q + N) / 3
    w["flops"]["forward"] += prompts * rs_cfg.n * (np.mean(lens) + N + 1) * fpt(gpt, q + N, head=False) / 3
    w.update(prompts=prompts, samples=prompts * rs_cfg.n, winners=winners, tokenize=d.prompts * d.mean[0],
             decode=math.ceil(prompts * rs_cfg.n / rs_cfg.sample_batch_size) * N,
             memory=max(memory_parts(gpt, act, 2, kv=(rs_cfg.sample_batch_size, q + N)),
                        memory_parts(gpt, act, 0, trained_pass(rs_cfg.batch_size, widest([n + N + 1 for n in lens],
                                                                                     q_cap + N + 1, d.scale),
                                                               cfg, "lm_loss")), key=lambda p: sum(p.values())),
             what=(f"{prompts:,} prompts x {rs_cfg.n} samples of <= {N} tokens, scored by PM-A; then "
                   f"{rs_cfg.max_steps:,} steps x {w['rows']} x ~{w['width']} tokens: {w['passes']} passes over "
                   f"{winners:,} winners"))
    return w


def work_ppo(cfg, d, gpt, act):
    """PPO iterations of batch_size episodes, ppo_epochs passes of minibatches over each; PM-B judges the
    rollouts every judge_every iterations. Memory: policy (and critic trunk) with Adam, reference, 2 PMs."""
    ppo_cfg, N = cfg.ppo, cfg.ppo.max_new_tokens
    lens = [len(x) for x in sampled_prompts(cfg, d, N)]
    q, episodes = batch_width(lens, ppo_cfg.batch_size, cfg.seed), ppo_cfg.iterations * ppo_cfg.batch_size
    judged = math.ceil(ppo_cfg.iterations / ppo_cfg.judge_every) if ppo_cfg.judge_every else 0
    mb_steps = ppo_cfg.iterations * ppo_cfg.ppo_epochs * (ppo_cfg.batch_size // ppo_cfg.minibatch_size)
    # the widest rollout: its longest query + the reply cap
    width = widest(lens, ppo_cfg.max_prompt_tokens, d.scale) + N
    trained = trained_pass(ppo_cfg.minibatch_size, width, cfg, None)
    trained += [] if ppo_cfg.share_trunk else trained  # the critic's own trunk
    return {"what": (f"{ppo_cfg.iterations:,} iterations x {ppo_cfg.batch_size} episodes of ~{round(q)} + <= {N} "
                     f"tokens = {episodes:,} episodes; {mb_steps:,} minibatch steps of {ppo_cfg.minibatch_size}; "
                     f"{episodes / d.prompts:.2f} passes over {d.prompts:,} prompts"),
            "iterations": ppo_cfg.iterations, "episodes": episodes, "minibatch_steps": mb_steps,
            "flops": {"ppo": ppo_cfg.iterations * sum(ppo_iteration_flops(cfg, gpt, q).values()),
                      "forward": judged * ppo_cfg.batch_size * (np.mean(lens) + N + 1)
                                 * fpt(gpt, q + N, head=False) / 3},
            "decode": ppo_cfg.iterations * N, "tokenize": d.prompts * d.mean[0],
            "memory": memory_parts(gpt, act, 3, trained, logits=(trained[0][0], N))}


def work_eval(cfg, d, gpt, act):
    """Test prompts: n SFT samples each (best-of-n) and policy_samples from cd, RS, PPO and each DPO beta, every
    sample scored by PM-A and PM-B; each policy's KL to SFT from both models' log-probs (evaluate.stage_eval)."""
    eval_cfg = cfg.eval
    N = eval_cfg.max_new_tokens or cfg.ppo.max_new_tokens
    lens = [len(x) for x in sampled_prompts(cfg, d, N)]  # train prompts stand in for the test prompts' lengths
    prompts, k = min(d.test_prompts, eval_cfg.num_prompts or d.test_prompts), eval_cfg.policy_samples
    policies = ["cd", "rs", "ppo"] + [name for name, _ in dpo.betas(cfg.dpo)]
    P = len(policies)
    samples, q = prompts * (eval_cfg.n + P * k), batch_width(lens, max(1, eval_cfg.batch_size // eval_cfg.n), cfg.seed)
    scored = (np.mean(lens) + N + 1) * (2 * samples * fpt(gpt, q + N, head=False)
                                        + 2 * P * prompts * k * fpt(gpt, q + N))
    return {"what": (f"{prompts:,} test prompts x ({eval_cfg.n} SFT + {k} each from {', '.join(policies)}) samples of "
                     f"<= {N} tokens = {samples:,}, each scored by PM-A and PM-B; each policy's KL to SFT"),
            "prompts": prompts, "samples": samples,
            "flops": {"sample": samples * N * fpt(gpt, q + N) / 3, "forward": scored / 3},
            "decode": (math.ceil(prompts * eval_cfg.n / eval_cfg.batch_size)
                       + P * math.ceil(prompts * k / eval_cfg.batch_size)) * N,
            "tokenize": d.test_prompts * d.mean[0],
            "memory": memory_parts(gpt, act, 4, kv=(eval_cfg.batch_size, q + N))}


def make_plan(cfg, repeats=2):
    """The plan as a dict: preset, device, basis (where the rates come from), data, stages {stage: {what,
    seconds, memory_gb, gflop, tokenized, figures}} and total_seconds (the sum of the stages')."""
    rates = gpu_rates(cfg.plan.gpu, cfg) if cfg.plan.gpu else None  # an unknown GPU fails before anything is read
    d = read_data(cfg)
    with torch.device("meta"):
        gpt = GPT(replace(cfg.model, vocab_size=d.tok.vocab_size))
    rates, device, basis = rates or device_rates(cfg, d, gpt, repeats)
    amp, why = ((torch.bfloat16, f"bf16 autocast (assumed for --plan.gpu={cfg.plan.gpu})") if cfg.plan.gpu
                else precision(pick_device(cfg.device), cfg.dtype))
    act = 4 if amp is None else 2  # bytes of an activation
    stages = {"pretrain": work_pretrain(cfg, d, gpt, act), "sft": work_sft(cfg, d, gpt, act),
              "cd": work_cd(cfg, d, gpt, act), "rm": work_rm(cfg, d, gpt, act), "rs": work_rs(cfg, d, gpt, act),
              "ppo": work_ppo(cfg, d, gpt, act), "dpo": work_dpo(cfg, d, gpt, act), "eval": work_eval(cfg, d, gpt, act)}
    for name, s in stages.items():
        flops, tokens, decode = s.pop("flops"), s.pop("tokenize"), s.pop("decode", 0)
        seconds = (sum(f / rates[k] for k, f in flops.items()) + tokens / rates["tokenize"]
                   + (decode / rates["decode"][name] if decode else 0)  # a step costs what its stage's rows do
                   + sum(b / rates[k] for k, b in s.pop("bytes", {}).items()))  # files to load or download
        parts = s.pop("memory")
        s.update(seconds=round(seconds, 1), memory_gb=round(sum(parts.values()) / 1e9, 2),
                 memory_parts_gb={k: round(v / 1e9, 2) for k, v in parts.items()}, memory_top=max(parts, key=parts.get),
                 gflop=round(sum(flops.values()) / 1e9, 1), tokenized=round(tokens), decode_steps=decode)
    return {"preset": cfg.preset, "device": device, "precision": why, "stages": stages,
            "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1), "basis": basis,
            "data": {"dir": d.data_dir, "train_pairs": d.train, "val_pairs": d.val, "test_pairs": d.test,
                     "sampled_pairs": len(d.ids), "vocab_size": d.tok.vocab_size,
                     "params": gpt.num_params(non_embedding=False)}}


def check_fits(plan, device_bytes, cfg):
    """One line of error, before any stage runs, when the plan's peak memory is more than the device has, naming
    the stage, what holds the memory and the flag that shrinks it; None when it fits."""
    name, stage = max(plan["stages"].items(), key=lambda kv: kv[1]["memory_gb"])
    if stage["memory_gb"] * 1e9 <= device_bytes:
        return None
    budget = cfg.micro_tokens or "no cap"
    return (f"the plan needs {stage['memory_gb']:.1f} GB at its peak ({name}: {stage['memory_top']}) and this device "
            f"has {device_bytes / 1e9:.1f} GB: lower --micro_tokens (now {budget}; the rows of one forward/backward "
            f"x their width), or a smaller preset")


def fmt_time(seconds):
    """Seconds as a person reads them: 0.4 s, 42 s, 10 min 34 s, 3 h 05 min, 2.5 days."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 1 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s < 2 * 86400 else f"{seconds / 86400:.1f} days"


def print_plan(cfg, why="", repeats=2):
    """Print the plan (make_plan): the data and where the rates come from, one row per stage (time, memory,
    what it does), the total, and, as the last line, the plan as one JSON object. Returns the plan."""
    plan = make_plan(cfg, repeats)
    d, stages = plan["data"], plan["stages"]
    print(f"[plan] preset {why or cfg.preset} | device {plan['device']} | {d['params'] / 1e6:.2f}M parameters, "
          f"vocab {d['vocab_size']:,}\n[plan] data {d['dir']}: {d['train_pairs']:,} train / {d['val_pairs']:,} val / "
          f"{d['test_pairs']:,} test pairs; token counts estimated from {d['sampled_pairs']:,} seeded train pairs, "
          f"scaled by the pair counts\n[plan] precision: {plan['precision']}\n[plan] time: {plan['basis']}")
    rows = [("stage", "time", "peak memory (est.)", "what it does")]
    rows += [(name, fmt_time(s["seconds"]), f"{s['memory_gb']:.2f} GB ({s['memory_top']})", s["what"])
             for name, s in stages.items()]
    peak = max(s["memory_gb"] for s in stages.values())
    rows.append(("total", fmt_time(plan["total_seconds"]), f"{peak:.2f} GB peak",
                 "replies counted to their cap; reading the data (seconds a stage) not counted"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)) + "  " + r[3])
    print(json.dumps(plan))
    return plan
