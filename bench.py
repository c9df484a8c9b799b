"""
bench.py: how fast each part of the RLHF flow runs on this machine, as one JSON object.

    python rlhf.py bench --preset cpu --data_dir ../shared/hh-rlhf-sample
    python rlhf.py bench --preset cpu --model.n_embd=384 --pretrain.batch_size=32   # try another shape

It takes rlhf.py's flags (same parser, same presets), so a shape measured here is the shape a stage runs;
plan.py times a preset with the same functions.
Every figure comes from this one run, so ratios between them are fair even on a busy machine:

  matmul_peak_gflops  the best fp32 (CPU) / bf16 (CUDA) square-matmul rate reached right now, measured
                      first; on CUDA, peak_gflops is the device's datasheet peak when the name is known
  train_*             the preset's model at pretrain's batch shape (batch_size x block_size), one
                      optimizer step = forward + backward + clip + AdamW, as supervised_train does it:
                      tokens_per_s; gflops = flops_per_token * tokens_per_s, where flops_per_token is
                      6N + 12*L*H*Q*T (PaLM appendix B, nanoGPT's estimate_mfu); mfu = gflops / peak
  gen_*               GPT.generate at the PPO rollout shape (ppo.batch_size real prompts, left-padded to
                      at most ppo.max_prompt_tokens, ppo.max_new_tokens new tokens, no early stop):
                      new tokens per second with the KV cache; without it (use_cache=False, which
                      recomputes the whole sequence every token) on the first gen_nocache_rows rows
                      only, to keep the run short; gen_cache_speedup compares the two on those rows
  ppo_*               one ppo.ppo_step at the preset's PPO shape, split into rollout (generate), scoring
                      (policy+value, reference and PM forwards) and update (ppo_epochs of minibatch steps)
  peak_mem_mb         peak resident memory of this process (CPU) / max allocated (CUDA)
  load_avg            the 1-minute load average at the start: above the core count, other processes
                      share the cores and every rate above is lower than on an idle machine

References: nanoGPT's bench.py and model.py estimate_mfu (https://github.com/karpathy/nanoGPT);
PaLM (Chowdhery et al. 2022) appendix B for the FLOPs per token.
"""

import copy
import json
import os
import resource
import sys
import time

import torch

import ppo
import train
from model import GPT
from reward import RewardModel
from runtime import autocast, cuda_peak_flops, pick_device, set_seed, to_device
from tokens import lm_tokens
from train import get_batch


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA calls are asynchronous: wait before reading the clock


def best_time(fn, device, repeats):
    """Fastest of `repeats` runs: other processes only ever slow a run down, so the minimum is the
    closest to what the code itself costs."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device, dtype, repeats):
    """GFLOP/s of the best of a few square matmul sizes: the ceiling every other figure is held to.
    bf16 on CUDA (tensor cores), fp32 on CPU unless training runs under bf16 autocast there too."""
    dtype = torch.bfloat16 if device == "cuda" or dtype == "bfloat16" else torch.float32
    best = 0.0
    for n in ((1024, 2048, 4096, 8192) if device == "cuda" else (512, 1024, 2048)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: the first call allocates and picks a kernel
        best = max(best, 2 * n ** 3 / best_time(lambda: a @ b, device, repeats) / 1e9)
    return best


def ppo_iteration(cfg, model, tok, queries, query_mask, device, dtype):
    """Seconds of one ppo.ppo_step with the models train_ppo builds: the policy, a frozen reference,
    the critic (a trainable copy of the trunk, or the policy's own with ppo.share_trunk) and a PM."""
    pc = cfg.ppo
    policy, ref_policy = model.train(), copy.deepcopy(model).requires_grad_(False)
    pm = RewardModel(cfg.model).to(device).eval().requires_grad_(False)
    trunk = None if pc.share_trunk else copy.deepcopy(model)
    critic = ppo.build_critic(trunk, pm.head.weight, pm.head.bias).to(device)
    optimizer = ppo.build_optimizer(policy, critic, pc, device)
    # ppo_step is one function; to split its time we wrap the calls it makes (generate, rollout_forward,
    # the reward function) with a timer. The update is what is left.
    split = {"rollout": 0.0, "policy_value": 0.0, "ref": 0.0, "pm": 0.0}

    def timed(fn, key_of):
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(device)
            split[key_of(args)] += time.perf_counter() - t0
            return result
        return wrapper

    policy.generate = timed(policy.generate, lambda a: "rollout")
    rollout_forward = ppo.rollout_forward
    ppo.rollout_forward = timed(rollout_forward, lambda a: "ref" if a[1] is None else "policy_value")
    reward_fn = timed(ppo.pm_reward_fn(pm, tok, pc.minibatch_size, dtype), lambda a: "pm")
    try:
        sync(device)
        t0 = time.perf_counter()
        ppo.ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries, query_mask, pc, pc.kl_coef,
                     None, torch.Generator(device=device).manual_seed(0), dtype=dtype)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        ppo.rollout_forward = rollout_forward
        del policy.generate
    return {"ppo_shape": {"batch": pc.batch_size, "minibatch": pc.minibatch_size, "epochs": pc.ppo_epochs,
                          "query_tokens": queries.size(1), "new_tokens": pc.max_new_tokens, "share_trunk": pc.share_trunk},
            "ppo_s": round(total, 4), "ppo_rollout_s": round(split["rollout"], 4),  # 0.1 ms: tiny shapes stay > 0
            "ppo_scoring_s": {k: round(split[k], 4) for k in ("policy_value", "ref", "pm")},
            "ppo_update_s": round(total - sum(split.values()), 4)}


def measure_train(cfg, model, tok, stream, device, dtype, repeats):
    """One optimizer step at pretrain's shape (batch_size x block_size, grad_accum micro-batches), as
    supervised_train runs it, on windows of the token stream: the fastest of `repeats` after a warm-up
    (which also compiles, with cfg.compile). Returns train_batch, train_step_s, train_tokens_per_s and
    train_gflops = flops_per_token * tokens_per_s."""
    sc, T = cfg.pretrain, cfg.model.block_size
    optimizer = model.configure_optimizer(sc.weight_decay, sc.lr, (0.9, sc.beta2), device)
    train_model = torch.compile(model) if cfg.compile else model
    step_no = [0]

    def train_step():
        for _ in range(sc.grad_accum):
            batch = get_batch(stream, step_no[0], sc.batch_size, T, cfg.seed, tok.eos_id)
            idx, targets = to_device(batch[:2], device)  # pinned + non_blocking on CUDA
            with autocast(device, dtype):
                _, loss = train_model(idx, targets)
            (loss / sc.grad_accum).backward()
            step_no[0] += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up (and compile)
    dt = best_time(train_step, device, repeats)
    tokens = sc.batch_size * sc.grad_accum * T
    return {"train_batch": [sc.batch_size * sc.grad_accum, T], "train_step_s": round(dt, 4),
            "train_tokens_per_s": round(tokens / dt, 1),
            "train_gflops": round(model.flops_per_token() * tokens / dt / 1e9, 1)}


def sample_rate(model, queries, query_mask, max_new_tokens, device, dtype, repeats, use_cache=True):
    """New tokens per second of GPT.generate on these left-padded prompts, the fastest of `repeats`.
    eos_id=None: every row runs to max_new_tokens, so every run does the same work."""
    def sample():
        with autocast(device, dtype):
            model.generate(queries, query_mask, max_new_tokens, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator(device=device).manual_seed(0))
    return queries.size(0) * max_new_tokens / best_time(sample, device, repeats)


def peak_memory_mb(device):
    """Peak resident memory of this process (CPU) / max allocated (CUDA), in MiB."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def run_bench(cfg, repeats=3):
    """`rlhf.py bench`: every figure above, for the preset and flags in cfg, printed as one JSON line
    (and returned as a dict)."""
    device, dtype = pick_device(cfg.device), cfg.dtype
    out = {"preset": cfg.preset, "device": torch.cuda.get_device_name() if device == "cuda" else device,
           "dtype": dtype, "threads": torch.get_num_threads(), "load_avg": round(os.getloadavg()[0], 2)}

    # ---- 0. the machine's matmul ceiling, first, before anything else heats or fills memory ----
    out["matmul_peak_gflops"] = round(matmul_peak(device, dtype, repeats), 1)
    peak = out["matmul_peak_gflops"]
    if device == "cuda":  # the datasheet peak where the GPU is known (unknown GPUs: the measured one)
        known = cuda_peak_flops(torch.cuda.get_device_name())
        peak = known / 1e9 if known else peak
    out["peak_gflops"] = peak

    # the real tokenizer (the trimmed vocabulary sets the LM head's size) and real prompts
    tok, train_pairs, _ = train.load_data(cfg)
    cfg.model.vocab_size = tok.vocab_size
    set_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    out["params_m"] = round(model.num_params() / 1e6, 2)
    out["vocab_size"] = tok.vocab_size

    # ---- 1. training: one optimizer step at pretrain's shape, as supervised_train runs it ----
    out.update(measure_train(cfg, model, tok, lm_tokens(train_pairs, tok), device, dtype, repeats + 2))
    out["train_mfu"] = round(out["train_gflops"] / peak, 3)

    # ---- 2. generation at the rollout shape: KV cache vs full recompute ----
    pc = cfg.ppo
    max_prompt = min(pc.max_prompt_tokens, cfg.model.block_size - pc.max_new_tokens)
    prompts = ppo.rl_prompts(cfg, "train", tok, max_prompt)
    queries, query_mask = (t.to(device) for t in ppo.prompt_batch(prompts, 0, pc.batch_size, cfg.seed, tok.eos_id))
    model.eval()
    out["gen_shape"] = [pc.batch_size, queries.size(1), pc.max_new_tokens]
    out["gen_tokens_per_s_cache"] = round(sample_rate(model, queries, query_mask, pc.max_new_tokens, device, dtype,
                                                      repeats), 1)
    rows = min(pc.batch_size, 16)  # without the cache a step costs a whole forward: time fewer rows
    out["gen_nocache_rows"] = rows
    out["gen_tokens_per_s_nocache"] = round(sample_rate(model, queries[:rows], query_mask[:rows], pc.max_new_tokens,
                                                        device, dtype, 1, use_cache=False), 1)
    out["gen_cache_speedup"] = round(sample_rate(model, queries[:rows], query_mask[:rows], pc.max_new_tokens, device,
                                                 dtype, repeats) / out["gen_tokens_per_s_nocache"], 2)

    # ---- 3. one PPO iteration at the preset's PPO shape ----
    out.update(ppo_iteration(cfg, model, tok, queries, query_mask, device, dtype))

    # ---- 4. memory ----
    out["peak_mem_mb"] = peak_memory_mb(device)
    print(json.dumps(out))
    return out
