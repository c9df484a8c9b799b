"""
rates.py: how fast this device does each kind of work the plan counts (plan.py, step 2), in FLOP/s.

Measured: bench.py's functions timed at the preset's shapes, each kind of work by a step of that kind: a
pretraining step; an SFT step as stage_sft runs it (train: compiled with --compile); the same without compile
or dropout, as PMs and DPO train (eager); sampling at PPO's rollout shape, one PPO iteration and the PM passes
inside it. Each rate = the FLOPs the plan counts for that work / its seconds. Or, for a GPU you name
(--plan.gpu), its datasheet peak times the utilisation one H100 reached, plus the H100's launch-bound time a
sampled token step. Or --plan.gflops for all.
The FLOP model both sides share is here too: fpt (GPT.flops_per_token) and one PPO iteration's FLOPs.
"""
import copy
import math
import os
import time
from dataclasses import replace

import torch

import bench
from model import GPT
from ppo import prompt_batch
from runtime import CUDA_PEAK_TFLOPS, ConfigError, pick_device, rng_state, set_rng_state, set_seed
from tokens import pack_examples, prompt_ids, sft_example

GPUS = {k.lower().replace(" ", ""): k for k in CUDA_PEAK_TFLOPS}  # --plan.gpu names: h100, h100pcie, rtx4090, ...
# measured on one NVIDIA H100 80GB HBM3 (989 TFLOP/s dense bf16) under bf16 autocast, GPT-2 small (README, Speed)
H100 = {"pretrain_mfu": 0.40,     # compiled pretraining, 128 x 1024 tokens a step (0.39-0.41)
        "train_mfu": 0.27,        # compiled packed SFT, on real tokens (its rows were 87% real then): every compiled
                                  # training step but pretraining's (SFT, the RS fine-tune, cd: supervised_train)
        "eager_mfu": 0.19,        # pretraining with --compile=false, dropout off (GPT-2's presets): the PMs and DPO,
                                  # never compiled, train so; PPO, scoring and sampling's FLOPs are eager too
        "decode_step_s": 64 / 9466}  # one sampled token for 64 rows with the KV cache: bound by kernel launches, so
                                     # about the same on any GPU (and twice as long with 24 layers)
TOKENIZE_PER_S = 1e6                  # tokens/s assumed when nothing is measured (a 2-core CPU: 1.1-1.5M)


def fpt(gpt, T, head=True):
    """Training FLOPs a token with T tokens of context (GPT.flops_per_token); without the LM head (a PM,
    a critic) 6 V C fewer. A forward pass alone, or one sampled token, costs a third of it."""
    c = gpt.config
    return gpt.flops_per_token(max(1, round(T))) - (0 if head else 6 * c.vocab_size * c.n_embd)


def ppo_iteration_flops(cfg, gpt, Tq, rows=None):
    """FLOPs of one ppo.ppo_step with every reply run to max_new_tokens (as bench.ppo_iteration times it),
    on `rows` rollouts (default ppo.batch_size) of Tq prompt tokens: rollout, B N sampled tokens; scoring,
    forward passes over the B (Tq + N) tokens by the policy, the reference, PM-A and, unless share_trunk,
    the critic's own trunk; update, ppo_epochs forward + backward passes of the policy (and that trunk)."""
    pc = cfg.ppo
    B, T = rows or pc.batch_size, Tq + pc.max_new_tokens
    critic = 0 if pc.share_trunk else fpt(gpt, T, head=False)
    return {"rollout": B * pc.max_new_tokens * fpt(gpt, T) / 3,
            "scoring": B * T * (2 * fpt(gpt, T) + fpt(gpt, T, head=False) + critic) / 3,
            "update": pc.ppo_epochs * B * T * (fpt(gpt, T) + critic)}


def sampled_prompts(cfg, d, new_tokens):
    """The sampled prompts' ids as the RL stages feed them (sampling.rl_prompts): left-truncated to
    ppo.max_prompt_tokens, leaving room for new_tokens in the context."""
    return [prompt_ids(x[0], d.tok, min(cfg.ppo.max_prompt_tokens, cfg.model.block_size - new_tokens)) for x in d.ids]


def gpu_rates(name, cfg):
    """(rates, device, basis) for a named GPU, measuring nothing: its datasheet peak (train.CUDA_PEAK_TFLOPS)
    times the utilisation one H100 reached under bf16 autocast (H100: compiled pretraining, compiled SFT, eager
    training for everything that is not compiled), and for every sampled token step (decode) the H100's
    launch-bound step time, scaled by the layer count: at these sizes sampling waits on kernel launches, not
    on the GPU's arithmetic, so a GPU with a lower peak is not slower at it."""
    key = GPUS.get(name.lower().replace(" ", "").replace("-", "").replace("_", ""))
    if key is None:
        raise ConfigError(f"--plan.gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    peak, eager = CUDA_PEAK_TFLOPS[key] * 1e12, H100["eager_mfu"]
    mfu = {"pretrain": H100["pretrain_mfu"] if cfg.compile else eager,
           "train": H100["train_mfu"] if cfg.compile else eager,
           "eager": eager, "forward": eager, "sample": eager, "ppo": eager}
    step_s = H100["decode_step_s"] * cfg.model.n_layer / 12
    basis = (f"assumed: the {key}'s datasheet {CUDA_PEAK_TFLOPS[key]} TFLOP/s (bf16) x the utilisation one H100 "
             f"reached (README, Speed): compiled pretraining {mfu['pretrain']}, compiled training {mfu['train']}, "
             f"the rest (PM training, scoring, PPO, sampling) {eager} as eager pretraining did; plus {step_s * 1e3:.1f} ms "
             f"a sampled token step (launch-bound, the H100's, as on any GPU); tokenising {TOKENIZE_PER_S / 1e6:g}M "
             "tokens/s")
    rates = {k: v * peak for k, v in mfu.items()}
    return {**rates, "decode": 1 / step_s, "tokenize": TOKENIZE_PER_S}, f"{key} (assumed)", basis


def step_rate(cfg, sc, model, tok, data, device, repeats):
    """(FLOP/s, seconds, rows, mean width) of one optimizer step of `sc` on `data` as supervised_train runs it
    (bench.timed_steps: compiled with cfg.compile): the FLOPs the plan counts for the step's batch positions,
    padding included as plan.lm_work counts it, over the step's seconds."""
    dt, _, positions = bench.timed_steps(cfg, sc, model, tok, data, device, cfg.dtype, repeats)
    rows = sc.batch_size * sc.grad_accum
    return positions * fpt(model, positions / rows) / dt, dt, rows, positions / rows


def measured_rates(cfg, d, gpt, device, repeats):
    """(rates, device, basis) timed on this device at the preset's shapes with bench.py's functions, each kind of
    work by a step of that kind: pretrain, a pretraining step (not timed when --pretrain.init loads weights
    instead); train, an SFT step as stage_sft runs it (compiled with --compile, packed with --sft.pack); eager,
    the same step on one example a row, without compile or dropout, as PM and DPO training run (on a GPU about
    half compiled pretraining's FLOP/s, on a CPU dropout alone costs ~40% a step); sampling at the PPO rollout
    shape, one ppo_step (ppo) and the PM's forward passes inside it (forward). Rate = the plan's FLOPs for that
    work / seconds. The RNG state is restored afterwards, so a run that follows is unchanged."""
    cfg, state, t0 = copy.deepcopy(cfg), rng_state(), time.perf_counter()
    cfg.model.vocab_size, T = d.tok.vocab_size, cfg.model.block_size
    set_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    sft = [sft_example(x[0], x[1], d.tok, T, cfg.data.max_reply_tokens) for x in d.ids]  # as plan.work_sft
    train = step_rate(cfg, cfg.sft, model, d.tok, pack_examples(sft, T, d.tok.eos_id, cfg.seed) if cfg.sft.pack
                      else sft, device, repeats)
    eager = train  # unless the SFT step differs from the PMs' one: compiled, packed or with dropout
    if cfg.compile or cfg.sft.pack or cfg.model.dropout > 0:
        plain = replace(cfg, compile=False, model=replace(cfg.model, dropout=0.0))
        eager = step_rate(plain, cfg.sft, GPT(plain.model).to(device), d.tok, sft, device, repeats)
    pretrain = train if cfg.pretrain.init else step_rate(cfg, cfg.pretrain, model, d.tok, d.stream, device, repeats)
    prompts = [(None, x) for x in sampled_prompts(cfg, d, cfg.ppo.max_new_tokens)]
    queries, mask = (t.to(device) for t in prompt_batch(prompts, 0, cfg.ppo.batch_size, cfg.seed, d.tok.eos_id))
    B, Tq, N = queries.size(0), queries.size(1), cfg.ppo.max_new_tokens
    model.eval()
    sample = bench.sample_rate(model, queries, mask, N, device, cfg.dtype, repeats)
    it = bench.ppo_iteration(cfg, model, d.tok, queries, mask, device, cfg.dtype)
    set_rng_state(state)
    pm_tokens = int(mask.sum()) + B * (N + 1)  # the PM reads each real prompt + reply + EOS
    rates = {"pretrain": pretrain[0], "train": train[0], "eager": eager[0], "decode": math.inf,  # sampling's timing
             "sample": sample * fpt(gpt, Tq + N) / 3,                                          # includes its steps
             "forward": pm_tokens * fpt(gpt, Tq + N, head=False) / 3 / max(it["ppo_scoring_s"]["pm"], 1e-4),
             "ppo": sum(ppo_iteration_flops(cfg, gpt, Tq, B).values()) / it["ppo_s"], "tokenize": d.tokenize_per_s}
    compiled = " (compiled)" if cfg.compile else ""
    steps = [] if cfg.pretrain.init else [f"a pretraining step of {pretrain[2]} x {T}{compiled} in {pretrain[1]:.3f} s"]
    steps.append(f"an SFT step of {train[2]} x ~{train[3]:.0f}{' packed' if cfg.sft.pack else ''}{compiled} in "
                 f"{train[1]:.3f} s")
    if eager is not train:
        steps.append(f"{eager[1]:.3f} s without compile or dropout, one example a row, as PMs and DPO train")
    basis = (f"measured on this device in {time.perf_counter() - t0:.0f} s at the preset's shapes (bench.py): "
             f"{', '.join(steps)}; sampling {B} x {Tq}+{N} at {sample:,.0f} tokens/s, a PPO iteration of {B} rollouts "
             f"in {it['ppo_s']:.2f} s, tokenising {d.tokenize_per_s / 1e6:.2f}M tokens/s; peak memory "
             f"{bench.peak_memory_mb(device) / 1024:.2f} GiB")
    name = torch.cuda.get_device_name() if device == "cuda" else f"{device}, {torch.get_num_threads()} threads"
    return rates, name, basis + busy_cpu_warning(device)


def busy_cpu_warning(device):
    """A warning for the basis line when other processes were using the CPU as it was timed (a 1-minute load
    average of 1 or more before this run's own work): they slow every measured rate, so for a run that will
    have the machine to itself the plan's times come out too long."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device == "cuda" or load < 1.0:
        return ""
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    return (f"; load average {load:.1f} on {os.cpu_count()} cores while timing: other processes shared the CPU, "
            "so these times are longer than an idle machine's; "
            + ("threads wait passively (OMP_WAIT_POLICY=PASSIVE), sharing the cores" if passive else
               "set OMP_WAIT_POLICY=PASSIVE so idle threads do not spin on shared cores (README, Speed)"))


def device_rates(cfg, d, gpt, repeats):
    """(rates, device, basis): this device's, measured; or --plan.gflops for every kind of work with
    --plan.measure=false, or on a CPU that would need over a minute at that rate to time the preset's
    shapes (GPT-2 size): there, --plan.gpu estimates the GPU such a preset is meant for."""
    pl, device, T = cfg.plan, pick_device(cfg.device), cfg.model.block_size
    rows = (0 if cfg.pretrain.init else cfg.pretrain.batch_size * cfg.pretrain.grad_accum) \
        + 2 * cfg.sft.batch_size * cfg.sft.grad_accum  # the steps measured_rates times, at most T tokens a row
    cost = ((repeats + 1) * rows * T * fpt(gpt, T)
            + sum(ppo_iteration_flops(cfg, gpt, min(cfg.ppo.max_prompt_tokens, T - cfg.ppo.max_new_tokens)).values()))
    too_slow = device != "cuda" and cost > 60 * pl.gflops * 1e9
    if pl.measure and not too_slow:
        return measured_rates(cfg, d, gpt, device, repeats)
    why = f"not measured: the preset's shapes would take ~{cost / pl.gflops / 6e10:.0f} min here (--plan.gpu: a GPU); "
    basis = (why if pl.measure else "") + (f"assumed: every kind of work at {pl.gflops:g} GFLOP/s (--plan.gflops), "
                                           f"tokenising {TOKENIZE_PER_S / 1e6:g}M tokens/s")
    rates = {k: pl.gflops * 1e9 for k in ("pretrain", "train", "eager", "forward", "sample", "ppo")}
    return {**rates, "decode": math.inf, "tokenize": TOKENIZE_PER_S}, f"{device} (assumed)", basis
