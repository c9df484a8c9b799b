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
  sft_*               SFT at its shape (sft.batch_size x grad_accum examples a step) on real dialogues, one
                      example per row (padded) and several per row (packed, as the GPU presets train):
                      real (non-pad) tokens/s, their share of the batch (real_frac) and the MFU on them
  gen_*               GPT.generate at the PPO rollout shape (ppo.batch_size real prompts, left-padded to
                      at most ppo.max_prompt_tokens, ppo.max_new_tokens new tokens, no early stop):
                      new tokens per second with the KV cache; without it (use_cache=False, which
                      recomputes the whole sequence every token) on the first gen_nocache_rows rows
                      only, to keep the run short; gen_cache_speedup compares the two on those rows
  ppo_*               one ppo.ppo_step at the preset's PPO shape, split into rollout (generate), scoring
                      (policy+value, reference and PM forwards) and update (ppo_epochs of minibatch steps)
  peak_mem_mb         peak resident memory of this process (CPU) / max allocated (CUDA); null on Windows
  load_avg            the 1-minute load average at the start: above the core count, other processes
                      share the cores and every rate above is lower than on an idle machine; null on Windows

References: nanoGPT's bench.py and model.py estimate_mfu (https://github.com/karpathy/nanoGPT);
PaLM (Chowdhery et al. 2022) appendix B for the FLOPs per token.
"""

import copy
import json
import os
import sys
import time

import torch

import actor_critic
import ppo
import train
from model import GPT
from reward import RewardModel
from runtime import autocast, cuda_peak_flops, pick_device, set_seed
from tokens import lm_tokens, pack_examples
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
    """Seconds of one ppo.ppo_step with the models stage_ppo builds: the policy, a frozen reference,
    the critic (a trainable copy of the trunk, or the policy's own with ppo.share_trunk) and a PM."""
    ppo_cfg = cfg.ppo
    policy, ref_policy = model.train(), copy.deepcopy(model).requires_grad_(False)
    pm = RewardModel(cfg.model).to(device).eval().requires_grad_(False)
    trunk = None if ppo_cfg.share_trunk else copy.deepcopy(model)
    critic = actor_critic.build_critic(trunk, pm.head.weight, pm.head.bias).to(device)
    optimizer = ppo.build_optimizer(policy, critic, ppo_cfg, device)
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
    reward_fn = timed(ppo.pm_reward_fn(pm, tok, ppo_cfg.minibatch_size, dtype), lambda a: "pm")
    try:
        sync(device)
        t0 = time.perf_counter()
        ppo.ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries, query_mask, ppo_cfg, ppo_cfg.kl_coef,
                     None, torch.Generator(device=device).manual_seed(0), dtype=dtype)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        ppo.rollout_forward = rollout_forward
        del policy.generate
    return {"ppo_shape": {"batch": ppo_cfg.batch_size, "minibatch": ppo_cfg.minibatch_size,
                          "epochs": ppo_cfg.ppo_epochs, "query_tokens": queries.size(1),
                          "new_tokens": ppo_cfg.max_new_tokens, "share_trunk": ppo_cfg.share_trunk},
            "ppo_s": round(total, 4), "ppo_rollout_s": round(split["rollout"], 4),  # 0.1 ms: tiny shapes stay > 0
            "ppo_scoring_s": {k: round(split[k], 4) for k in ("policy_value", "ref", "pm")},
            "ppo_update_s": round(total - sum(split.values()), 4)}


def timed_steps(cfg, train_cfg, model, tok, data, device, dtype, repeats, steps=1):
    """Optimizer steps 0..steps-1 of `train_cfg` on `data` (a token stream, or SFT examples or packed rows), each
    train.optimizer_step as supervised_train runs it (compiled with cfg.compile): one pass first as a warm-up
    (which also compiles every batch shape), then the fastest of `repeats` passes over the same steps.
    Returns (seconds a pass, real tokens a pass, batch positions a pass: real + pad)."""
    optimizer = model.configure_optimizer(train_cfg.weight_decay, train_cfg.lr, (0.9, train_cfg.beta2), device)
    train_model = torch.compile(model) if cfg.compile else model
    T = cfg.model.block_size
    tokens = []

    def run():
        tokens.clear()
        for step in range(steps):
            tokens.append(train.optimizer_step(train_model, optimizer, data, step, train_cfg, cfg.seed, T, tok.eos_id,
                                               device, dtype)[2])
    run()  # warm-up (and compile)
    dt = best_time(run, device, repeats)
    positions = sum(get_batch(data, i, train_cfg.batch_size, T, cfg.seed, tok.eos_id)[0].numel()
                    for i in range(steps * train_cfg.grad_accum))
    return dt, sum(tokens), positions


def measure_train(cfg, model, tok, stream, device, dtype, repeats):
    """One optimizer step at pretrain's shape (batch_size x block_size, grad_accum micro-batches) on windows
    of the token stream: train_batch, train_step_s, train_tokens_per_s and train_gflops = flops_per_token *
    tokens_per_s."""
    train_cfg = cfg.pretrain
    dt, tokens, _ = timed_steps(cfg, train_cfg, model, tok, stream, device, dtype, repeats)
    return {"train_batch": [train_cfg.batch_size * train_cfg.grad_accum, cfg.model.block_size],
            "train_step_s": round(dt, 4), "train_tokens_per_s": round(tokens / dt, 1),
            "train_gflops": round(model.flops_per_token() * tokens / dt / 1e9, 1)}


def measure_sft(cfg, model, tok, pairs, device, dtype, repeats, peak, steps=2):
    """SFT at its shape (sft.batch_size x grad_accum examples a step) on real hh-rlhf dialogues, two ways: one
    example per row, right-padded to the batch's longest (padded), and several per block_size row
    (tokens.pack_examples, as the GPU presets train: packed). For each: real (non-pad) tokens/s, their share of
    the batch's positions (real_frac: the rest is padding, computed and thrown away), and the MFU on the real
    tokens, as supervised_train logs it. Only the dialogues the timed steps can reach are tokenised."""
    train_cfg, T = cfg.sft, cfg.model.block_size
    rows = steps * train_cfg.batch_size * train_cfg.grad_accum
    examples = train.sft_examples(pairs[:rows * -(-T // 64)], tok, cfg, T)  # enough to fill `rows` packed rows
    out = {"sft_batch": [train_cfg.batch_size * train_cfg.grad_accum, T]}
    for name, data in (("padded", examples), ("packed", pack_examples(examples, T, tok.eos_id, cfg.seed))):
        dt, tokens, positions = timed_steps(cfg, train_cfg, model, tok, data, device, dtype, repeats, steps)
        out[f"sft_{name}_tokens_per_s"] = round(tokens / dt, 1)
        out[f"sft_{name}_real_frac"] = round(tokens / positions, 3)
        out[f"sft_{name}_mfu"] = round(model.flops_per_token() * tokens / dt / 1e9 / peak, 3)
    return out


def sample_rate(model, queries, query_mask, max_new_tokens, device, dtype, repeats, use_cache=True):
    """New tokens per second of GPT.generate on these left-padded prompts, the fastest of `repeats`.
    eos_id=None: every row runs to max_new_tokens, so every run does the same work."""
    def sample():
        with autocast(device, dtype):
            model.generate(queries, query_mask, max_new_tokens, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator(device=device).manual_seed(0))
    return queries.size(0) * max_new_tokens / best_time(sample, device, repeats)


def peak_memory_mb(device):
    """Peak resident memory of this process (CPU) / max allocated (CUDA), in MiB; None where Python has no
    `resource` module (Windows). Imported here, not at the top: rlhf.py imports this file, and must start there."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def run_bench(cfg, repeats=3):
    """`rlhf.py bench`: every figure above, for the preset and flags in cfg, printed as one JSON line
    (and returned as a dict)."""
    device, dtype = pick_device(cfg.device), cfg.dtype
    load_avg = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # none on Windows
    out = {"preset": cfg.preset, "device": torch.cuda.get_device_name() if device == "cuda" else device,
           "dtype": dtype, "threads": torch.get_num_threads(), "load_avg": load_avg}

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

    # ---- 1b. SFT at its shape, one example per row and packed: real tokens/s and MFU ----
    out.update(measure_sft(cfg, model, tok, train_pairs, device, dtype, repeats, peak))

    # ---- 2. generation at the rollout shape: KV cache vs full recompute ----
    ppo_cfg = cfg.ppo
    max_prompt = min(ppo_cfg.max_prompt_tokens, cfg.model.block_size - ppo_cfg.max_new_tokens)
    prompts = ppo.rl_prompts(cfg, "train", tok, max_prompt)
    queries, query_mask = (t.to(device) for t in ppo.prompt_batch(prompts, 0, ppo_cfg.batch_size, cfg.seed, tok.eos_id))
    model.eval()
    out["gen_shape"] = [ppo_cfg.batch_size, queries.size(1), ppo_cfg.max_new_tokens]
    out["gen_tokens_per_s_cache"] = round(sample_rate(model, queries, query_mask, ppo_cfg.max_new_tokens, device, dtype,
                                                      repeats), 1)
    rows = min(ppo_cfg.batch_size, 16)  # without the cache a step costs a whole forward: time fewer rows
    out["gen_nocache_rows"] = rows
    out["gen_tokens_per_s_nocache"] = round(sample_rate(model, queries[:rows], query_mask[:rows],
                                                        ppo_cfg.max_new_tokens, device, dtype, 1, use_cache=False), 1)
    out["gen_cache_speedup"] = round(sample_rate(model, queries[:rows], query_mask[:rows], ppo_cfg.max_new_tokens,
                                                 device, dtype, repeats) / out["gen_tokens_per_s_nocache"], 2)

    # ---- 3. one PPO iteration at the preset's PPO shape ----
    out.update(ppo_iteration(cfg, model, tok, queries, query_mask, device, dtype))

    # ---- 4. memory ----
    out["peak_mem_mb"] = peak_memory_mb(device)
    print(json.dumps(out))
    return out
