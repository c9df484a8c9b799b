"""
rates.py: how fast this device does each kind of work the plan counts (plan.py, step 2), in FLOP/s.

Measured: bench.py's functions timed at the preset's shapes, each kind of work by a step of that kind: a
pretraining step; an SFT step as stage_sft runs it (train: compiled with --compile); the same without compile
or dropout, as PMs and DPO train (eager); a sampled token step at the rows each stage samples (decode); one PPO
iteration and the PM passes inside it. Each rate = the FLOPs (or steps) the plan counts for that work / its
seconds. Or, for a GPU you name (--plan.gpu), its datasheet peak times the utilisation one H100 reached, and a
sampled token step as the H100's launch-bound time plus the bytes it reads over the GPU's memory bandwidth.
Or --plan.gflops for all. A --pretrain.init weights file loads (and is first downloaded) at assumed rates.
The FLOP model both sides share is here too: fpt (GPT.flops_per_token) and one PPO iteration's FLOPs.
"""
import copy
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from lab import bench
from hub import GPT2_SIZES
from model import GPT, GPTConfig
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
        # one sampled token step with the KV cache, 64 prompts of 256 tokens and 64 new (a mean context of 256 + 32):
        # bound by kernel launches, so about the same on any GPU; what grows with the rows is the cache it reads
        "decode_step_s": 64 / 9466, "decode_rows": 64, "decode_context": 256 + 32}
# datasheet memory bandwidth (GB/s) of each GPU runtime.CUDA_PEAK_TFLOPS knows (A100: the 40 GB card's, the lower)
GPU_BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "H100 PCIe": 2000, "A100": 1555, "A10G": 600, "A10": 600,
                     "L40S": 864, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936}
TOKENIZE_PER_S = 1e6                  # tokens/s assumed when nothing is measured (a 2-core CPU: 1.1-1.5M)
# --pretrain.init: a byte of the weights file read (and its sha256 checked), the model built and base.pt written.
# gpt2's 548 MB took 6 s in one run on an H100 machine (the stage's [time] line), a 498 MB copy 7.7 s on a busy
# 2-core CPU (a local path: no sha256)
LOAD_BYTES_PER_S = 80e6
DOWNLOAD_BYTES_PER_S = 12.5e6  # assumed, for weights not yet in hub.py's cache: a 100 Mbit/s connection
FILES = {"load": LOAD_BYTES_PER_S, "download": DOWNLOAD_BYTES_PER_S}  # bytes/s, assumed on every device


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
    ppo_cfg = cfg.ppo
    B, T = rows or ppo_cfg.batch_size, Tq + ppo_cfg.max_new_tokens
    critic = 0 if ppo_cfg.share_trunk else fpt(gpt, T, head=False)
    return {"rollout": B * ppo_cfg.max_new_tokens * fpt(gpt, T) / 3,
            "scoring": B * T * (2 * fpt(gpt, T) + fpt(gpt, T, head=False) + critic) / 3,
            "update": ppo_cfg.ppo_epochs * B * T * (fpt(gpt, T) + critic)}


def gpt2_cache_path(name):
    """Where hub.download_gpt2 keeps GPT-2's weights `name` (gpt2, gpt2-medium, ...): $RLHF_CACHE/gpt2 or
    ~/.cache/rlhf-tutorial/gpt2 (tests/test_rates.py checks that the two agree)."""
    return Path(os.environ.get("RLHF_CACHE", "~/.cache/rlhf-tutorial")).expanduser() / "gpt2" / f"{name}.safetensors"


def init_weights(init):
    """(bytes, cached) of the weights file --pretrain.init loads: a local file as it is; a GPT-2 name, the hub's
    model.safetensors, 4 bytes a weight and each layer's 1024 x 1024 causal-mask buffer (gpt2: 548 MB), cached or
    not yet (gpt2_cache_path). A file that is not there is 0 bytes: the stage will say what is wrong."""
    if init not in GPT2_SIZES:
        return (os.path.getsize(init) if os.path.isfile(init) else 0), True
    L, _, C = GPT2_SIZES[init]
    params = L * (12 * C ** 2 + 13 * C) + 2 * C + (50257 + 1024) * C  # blocks, ln_f, token and position embeddings
    return 4 * (params + L * 1024 ** 2), gpt2_cache_path(init).exists()


def files(cfg):
    """The basis line's words on the weights file --pretrain.init loads, if it loads one."""
    return (f"; loading weights at {LOAD_BYTES_PER_S / 1e6:g} MB/s and downloading at {DOWNLOAD_BYTES_PER_S / 1e6:g} "
            "MB/s (assumed)") if cfg.pretrain.init else ""


def prompt_tokens(cfg, new_tokens):
    """The most tokens of a sampled prompt (sampling.rl_prompts): ppo.max_prompt_tokens, leaving room for
    new_tokens in the context."""
    return min(cfg.ppo.max_prompt_tokens, cfg.model.block_size - new_tokens)


def sampled_prompts(cfg, d, new_tokens):
    """The sampled prompts' ids as the RL stages feed them (sampling.rl_prompts): left-truncated to
    prompt_tokens."""
    return [prompt_ids(x[0], d.tok, prompt_tokens(cfg, new_tokens)) for x in d.ids]


def sampling_shapes(cfg):
    """{stage: (rows, new tokens)} of each stage's generate calls, the stages plan.py counts decode steps for:
    the SFT samples that normalise the PMs (rm), best-of-n (rs), PPO's rollouts and eval's samples."""
    ppo_cfg = cfg.ppo
    return {"rm": (cfg.rm.eval_batch_size, ppo_cfg.max_new_tokens),
            "rs": (cfg.rs.sample_batch_size, cfg.rs.max_new_tokens or ppo_cfg.max_new_tokens),
            "ppo": (ppo_cfg.batch_size, ppo_cfg.max_new_tokens),
            "eval": (cfg.eval.batch_size, cfg.eval.max_new_tokens or ppo_cfg.max_new_tokens)}


def decode_bytes(c, rows, context):
    """Bytes one sampled token step reads from GPU memory for `rows` rows with `context` tokens of KV cache each,
    model config c: every weight matrix, 8 bytes a parameter (autocast casts the fp32 weights to bf16 at every
    step, reading 4 bytes and writing 2, and the matmul reads the 2: GPT.generate runs in inference mode, where
    autocast keeps no cast copies), and the KV cache, keys and values of every layer, 2 bytes each (bf16)."""
    weights = 12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd  # the blocks' matmuls and the LM head
    return 8 * weights + rows * context * 2 * c.n_layer * c.n_embd * 2


def decode_step_s(gpu, c, rows, context):
    """Seconds of one sampled token step on `gpu` (a CUDA_PEAK_TFLOPS name), a model stated, not measured: a
    launch-bound floor, the H100's measured step less the time its bytes took there (kernel launches: about the
    same on any GPU, one set per layer), plus decode_bytes over the GPU's datasheet bandwidth. The step's
    arithmetic is the plan's "sample" FLOPs, counted apart (and added: where they overlap, an upper bound)."""
    gpt2 = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)  # the model the H100 sampled with
    h100_read_s = decode_bytes(gpt2, H100["decode_rows"], H100["decode_context"]) / (GPU_BANDWIDTH_GBS["H100"] * 1e9)
    floor = H100["decode_step_s"] - h100_read_s
    return floor * c.n_layer / 12 + decode_bytes(c, rows, context) / (GPU_BANDWIDTH_GBS[gpu] * 1e9)


def gpu_rates(name, cfg):
    """(rates, device, basis) for a named GPU, measuring nothing: its datasheet peak (train.CUDA_PEAK_TFLOPS)
    times the utilisation one H100 reached under bf16 autocast (H100: compiled pretraining, compiled SFT, eager
    training for everything that is not compiled), and for each stage's sampled token steps (decode) the time
    decode_step_s gives at the rows that stage samples a call, the prompts at their most tokens (from 16 rows on,
    a batch of hh-rlhf prompts is as wide as its cap: the sample's, 251 of 256 tokens) and half the reply."""
    key = GPUS.get(name.lower().replace(" ", "").replace("-", "").replace("_", ""))
    if key is None:
        raise ConfigError(f"--plan.gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    peak, eager = CUDA_PEAK_TFLOPS[key] * 1e12, H100["eager_mfu"]
    mfu = {"pretrain": H100["pretrain_mfu"] if cfg.compile else eager,
           "train": H100["train_mfu"] if cfg.compile else eager,
           "eager": eager, "forward": eager, "sample": eager, "ppo": eager}
    shapes = sampling_shapes(cfg)
    step_s = {stage: decode_step_s(key, cfg.model, rows, prompt_tokens(cfg, N) + N / 2)
              for stage, (rows, N) in shapes.items()}
    said = {}  # "7.9 ms at 64 rows" -> the stages that sample so
    for stage, (rows, _) in shapes.items():
        said.setdefault(f"{step_s[stage] * 1e3:.1f} ms at {rows} rows", []).append(stage)
    steps = ", ".join(f"{step} ({', '.join(stages)})" for step, stages in said.items())
    basis = (f"assumed: the {key}'s datasheet {CUDA_PEAK_TFLOPS[key]} TFLOP/s (bf16) x the utilisation one H100 "
             f"reached (README, Speed): compiled pretraining {mfu['pretrain']}, compiled training {mfu['train']}, "
             f"the rest (PM training, scoring, PPO, sampling) {eager} as eager pretraining did; a sampled token step "
             f"the H100's launch-bound time plus its weights and KV cache read at {GPU_BANDWIDTH_GBS[key]:,} GB/s: "
             f"{steps}; tokenising {TOKENIZE_PER_S / 1e6:g}M tokens/s")
    rates = {k: v * peak for k, v in mfu.items()}
    decode = {stage: 1 / s for stage, s in step_s.items()}
    return {**rates, "decode": decode, "tokenize": TOKENIZE_PER_S, **FILES}, f"{key} (assumed)", basis + files(cfg)


def step_rate(cfg, train_cfg, model, tok, data, device, repeats):
    """(FLOP/s, seconds, rows, mean width) of one optimizer step of `train_cfg` on `data` as supervised_train runs it
    (bench.timed_steps: compiled with cfg.compile): the FLOPs the plan counts for the step's batch positions,
    padding included as plan.lm_work counts it, over the step's seconds."""
    dt, _, positions = bench.timed_steps(cfg, train_cfg, model, tok, data, device, cfg.dtype, repeats)
    rows = train_cfg.batch_size * train_cfg.grad_accum
    return positions * fpt(model, positions / rows) / dt, dt, rows, positions / rows


def measured_rates(cfg, d, gpt, device, repeats):
    """(rates, device, basis) timed on this device at the preset's shapes with bench.py's functions, each kind of
    work by a step of that kind: pretrain, a pretraining step (not timed when --pretrain.init loads weights
    instead); train, an SFT step as stage_sft runs it (compiled with --compile, packed with --sft.pack); eager,
    the same step on one example a row, without compile or dropout, as PM and DPO training run (on a GPU about
    half compiled pretraining's FLOP/s, on a CPU dropout alone costs ~40% a step); decode, a sampled token step
    at the rows each stage samples a call (sampling_shapes: on a GPU, bound by kernel launches, a step of more
    rows costs little more), its arithmetic included (so sample is free); one ppo_step (ppo, its rollout
    included) and the PM's forward passes inside it (forward). Rate = the plan's FLOPs for that work / seconds.
    The RNG state is restored afterwards, so a run that follows is unchanged."""
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
    model.eval()
    shapes, step_s = sampling_shapes(cfg), {}  # (rows, new tokens) -> seconds of a sampled token step
    for rows, N in sorted({shapes[stage] for stage in shapes if stage != "ppo"}):
        prompts = [(None, x) for x in sampled_prompts(cfg, d, N)]
        q, m = (t.to(device) for t in prompt_batch(prompts, 0, rows, cfg.seed, d.tok.eos_id))
        step_s[rows, N] = q.size(0) / bench.sample_rate(model, q, m, N, device, cfg.dtype, repeats)
    prompts = [(None, x) for x in sampled_prompts(cfg, d, cfg.ppo.max_new_tokens)]
    queries, mask = (t.to(device) for t in prompt_batch(prompts, 0, cfg.ppo.batch_size, cfg.seed, d.tok.eos_id))
    B, Tq, N = queries.size(0), queries.size(1), cfg.ppo.max_new_tokens
    it = bench.ppo_iteration(cfg, model, d.tok, queries, mask, device, cfg.dtype)
    set_rng_state(state)
    pm_tokens = int(mask.sum()) + B * (N + 1)  # the PM reads each real prompt + reply + EOS
    # sampling's arithmetic is inside its timed steps (sample: free), PPO's rollout inside the iteration's time
    decode = {stage: 1 / step_s[shape] if stage != "ppo" else math.inf for stage, shape in shapes.items()}
    rates = {"pretrain": pretrain[0], "train": train[0], "eager": eager[0], "decode": decode, "sample": math.inf,
             "forward": pm_tokens * fpt(gpt, Tq + N, head=False) / 3 / max(it["ppo_scoring_s"]["pm"], 1e-4),
             "ppo": sum(ppo_iteration_flops(cfg, gpt, Tq, B).values()) / it["ppo_s"], "tokenize": d.tokenize_per_s,
             **FILES}
    compiled = " (compiled)" if cfg.compile else ""
    steps = [] if cfg.pretrain.init else [f"a pretraining step of {pretrain[2]} x {T}{compiled} in {pretrain[1]:.3f} s"]
    steps.append(f"an SFT step of {train[2]} x ~{train[3]:.0f}{' packed' if cfg.sft.pack else ''}{compiled} in "
                 f"{train[1]:.3f} s")
    if eager is not train:
        steps.append(f"{eager[1]:.3f} s without compile or dropout, one example a row, as PMs and DPO train")
    sampled = ", ".join(f"{t * 1e3:.1f} ms at {rows} rows" for (rows, _), t in step_s.items())
    basis = (f"measured on this device in {time.perf_counter() - t0:.0f} s at the preset's shapes (bench.py): "
             f"{', '.join(steps)}; a sampled token step {sampled}; a PPO iteration of {B} rollouts in "
             f"{it['ppo_s']:.2f} s, tokenising {d.tokenize_per_s / 1e6:.2f}M tokens/s")
    mem = bench.peak_memory_mb(device)  # None where there is no `resource` module (Windows)
    basis += f"; peak memory {mem / 1024:.2f} GiB" if mem is not None else ""
    name = torch.cuda.get_device_name() if device == "cuda" else f"{device}, {torch.get_num_threads()} threads"
    return rates, name, basis + files(cfg) + busy_cpu_warning(device)


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
            + sum(ppo_iteration_flops(cfg, gpt, prompt_tokens(cfg, cfg.ppo.max_new_tokens)).values()))
    too_slow = device != "cuda" and cost > 60 * pl.gflops * 1e9
    if pl.measure and not too_slow:
        return measured_rates(cfg, d, gpt, device, repeats)
    why = f"not measured: the preset's shapes would take ~{cost / pl.gflops / 6e10:.0f} min here (--plan.gpu: a GPU); "
    basis = (why if pl.measure else "") + (f"assumed: every kind of work at {pl.gflops:g} GFLOP/s (--plan.gflops), "
                                           f"tokenising {TOKENIZE_PER_S / 1e6:g}M tokens/s")
    rates = {k: pl.gflops * 1e9 for k in ("pretrain", "train", "eager", "forward", "sample", "ppo")}
    decode = {stage: math.inf for stage in sampling_shapes(cfg)}  # sampling's FLOPs only
    return {**rates, "decode": decode, "tokenize": TOKENIZE_PER_S, **FILES}, f"{device} (assumed)", basis + files(cfg)
