"""
What every stage stands on, and nothing about RLHF: seeding, the device and its precision, data
parallelism under torchrun, checkpoints (atomic, resumable, loaded with weights_only=True), the
skip-if-done rule of a stage, and the metrics log.

A stage's skeleton, the same in train.py (pretrain, sft), reward.py (rm), rs.py (rs) and ppo.py (ppo):

    if stage_done(path, run.force, name): return          # finished: skip (--force: start over)
    ckpt = load_checkpoint(path) if it exists              # unfinished: resume model, optimizer, step, RNG
    for step in range(start, steps): ... MetricsLog.log(...); save_checkpoint(path, {...})

Resuming is exact on CPU: batches are pure functions of (seed, step), so a checkpoint only needs the
model, the optimizer, the step and the RNG states. References: PyTorch's notes on
`torch.load(weights_only=True)` and on torchrun (torch.distributed.elastic).
"""
import json
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import DataConfig
from model import GPT, GPTConfig
from tokens import Tokenizer


# ----------------------------------------------------------------------------------------------
# what every stage shares

@dataclass
class Run:
    """The values every stage shares, passed to each with its own section of the config (rlhf.run builds
    it from the command line's Config, whose top-level fields these are): where it reads and writes, and
    how it runs."""
    out_dir: str = "out"
    data_dir: str = ""
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    force: bool = False
    policy_init: str = "sft"
    data: DataConfig = field(default_factory=DataConfig)


def initial_policy(run):
    """out_dir/sft.pt or out_dir/cd.pt (--policy_init): the policy RS, PPO and DPO start from and anchor to
    (PPO's reference, DPO's pi_ref), the trunk of the PMs (--rm.init=policy) and the replies they are
    normalised on. SFT by default; cd is the HH work's order (base -> context distillation -> PM -> RL)."""
    if run.policy_init not in ("sft", "cd"):
        raise ConfigError(f"--policy_init must be sft or cd, got {run.policy_init!r}")
    return os.path.join(run.out_dir, f"{run.policy_init}.pt")


# ----------------------------------------------------------------------------------------------
# seeding, device, precision

def set_seed(seed):
    """One call seeds every generator a run uses (python, numpy, torch on all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_permutation(n, epoch, seed):
    """The seeded shuffle of n rows for one epoch. Batches drawn from it are a pure function of (seed,
    step), so a resumed run sees the same batches with no loader state to save."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def batch_rows(n, index, batch_size, seed):
    """The rows of batch number `index` when n rows are reshuffled every epoch (epoch_permutation)."""
    epoch, pos = divmod(index, max(1, n // batch_size))
    return epoch_permutation(n, epoch, seed)[pos * batch_size:(pos + 1) * batch_size]


def pick_device(name="auto"):
    """The device is chosen once per run: CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device, dtype="auto"):
    """bf16 autocast on CUDA (no loss scaler needed: bf16 has fp32's exponent range); full fp32
    elsewhere by default, because bf16 matmuls are slower than fp32 on most CPUs. dtype="bfloat16"
    opts a CPU in: on one with native bf16 (AVX512-BF16 or AMX; `python rlhf.py bench --dtype=bfloat16`
    shows it) a training step runs faster. dtype="float32" turns autocast off everywhere."""
    if dtype == "float32" or (dtype == "auto" and not device.startswith("cuda")):
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the datasheets, for MFU in the training log
# and bench.py; the longest name contained in torch.cuda.get_device_name wins ("H100 PCIe" before "H100")
CUDA_PEAK_TFLOPS = {"H200": 989, "H100": 989, "H100 PCIe": 756, "A100": 312, "A10G": 70, "A10": 125,
                    "L40S": 362, "L4": 121, "RTX 4090": 165, "RTX 3090": 71}


def cuda_peak_flops(name):
    """The datasheet bf16 FLOP/s of a GPU from its name, or None for one not in the table."""
    known = sorted((k for k in CUDA_PEAK_TFLOPS if k in name), key=len)
    return CUDA_PEAK_TFLOPS[known[-1]] * 1e12 if known else None


def to_device(tensors, device):
    """Copy a batch to the device. On CUDA the batch is first pinned (page-locked), so the copy can
    be asynchronous (non_blocking) and overlap with the GPU still running the previous step."""
    if device.startswith("cuda"):
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


# ----------------------------------------------------------------------------------------------
# data parallel: torchrun starts one process per GPU (or CPU worker); each takes a share of every batch

def init_distributed():
    """(rank, world_size, local_rank) from the env vars torchrun sets, initialising the process group
    once: NCCL between GPUs, gloo between CPU processes. A plain `python rlhf.py` is rank 0 of 1.
    On GPUs gloo comes too, for the tensors that live on the CPU (all_ranks_mean's Python floats, rs.py's
    objects, barriers): NCCL refuses those, and each tensor goes to the backend of its device.

        torchrun --standalone --nproc_per_node=2 rlhf.py pretrain --preset cpu
    """
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size, local_rank


def dist_info():
    """(rank, world_size) of this process: (0, 1) unless init_distributed started a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint); a no-op in one process."""
    if dist.is_initialized():
        dist.barrier()


def all_ranks_mean(x):
    """The mean of a scalar over the ranks (itself in one process): for logs and shared decisions."""
    x = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def token_share(mask):
    """world_size * (this rank's real tokens) / (all ranks' real tokens): the weight that turns the
    average of the ranks' per-token means into the mean over every token of the global minibatch."""
    n = mask.sum()
    total = n.clone()
    dist.all_reduce(total)
    return dist.get_world_size() * n / total.clamp(min=1)


def average_gradients(params):
    """Data-parallel PPO: each rank samples and scores its own rollouts, then the gradients are
    averaged (all-reduced) before every optimizer step, so the replicas stay identical."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# checkpoints: plain dicts, written atomically, read with weights_only=True; the skip / resume skeleton of a stage

class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, unsafe, or from an incompatible config."""


def save_checkpoint(path, ckpt):
    """Write to a temp file, fsync, then rename: a crash mid-write leaves the old checkpoint intact,
    never a half-written one that looks complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint without running code: `weights_only=True` unpickles only tensors and plain
    containers, so a file that smuggles in a callable is refused instead of executed."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint (run the stage that writes it first)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and containers, EOFError/RuntimeError if cut short
        code = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        why = f"it would run code: {code[0]}" if code else f"not a checkpoint this project wrote ({type(e).__name__})"
        raise CheckpointError(f"{path}: refused to load, {why}; only tensors and plain containers are "
                              "loaded (weights_only=True). Rerun the stage that writes it.") from None


def rng_state():
    """Every RNG a stage draws from, in a form weights_only loading accepts (no numpy objects)."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    """Inverse of `rng_state`."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def stage_done(path, force, name):
    """True if the stage whose checkpoint is `path` already finished: it is skipped. --force starts it
    over instead (the checkpoint is removed); an unfinished checkpoint is left for the stage to resume.
    Under torchrun rank 0 alone removes the file and every rank waits for that before looking, so no
    rank trips over a file another is deleting, and all of them skip or run the stage together."""
    if force and dist_info()[0] == 0:
        Path(path).unlink(missing_ok=True)
    barrier()
    if os.path.exists(path) and load_checkpoint(path).get("done"):
        print(f"[{name}] {path} is complete; skipping (use --force to redo it)")
        return True
    return False


def restore(path, model, optimizer, **modules):
    """Continue an unfinished stage: its checkpoint's weights into `model` (and into each of `modules`,
    by key), its optimizer state, and every RNG where it stopped. Returns the checkpoint dict."""
    ckpt = load_checkpoint(path)
    check_compatible(path, ckpt, model)
    model.load_state_dict(ckpt["model"])
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt


def model_checkpoint(model, tok, **extra):
    """The part of every checkpoint that rebuilds a GPT: weights, architecture, and vocabulary."""
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {"model": raw.state_dict(), "model_args": asdict(raw.config),
            "tokenizer": tok.state_dict(), **extra}


def load_model(path, device="cpu"):
    """Rebuild a GPT and its tokenizer from any stage's checkpoint -> (model, tok, ckpt)."""
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint (keys: {sorted(ckpt)[:8]})")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}  # a PM's scalar head
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({str(e)[:200]})") from None
    return model.to(device), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt


def check_compatible(path, ckpt, model):
    """Refuse to resume a checkpoint written with another model size, with a message, not a shape error."""
    want = asdict(getattr(model, "_orig_mod", model).config)
    have = ckpt.get("model_args", {})
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: written with a different model config ({pretty}); "
                              "use the same preset/flags, or --force to start the stage over")


# ----------------------------------------------------------------------------------------------
# metrics, and the one failure every training loop checks for

class MetricsLog:
    """Appends one JSON object per log step to out_dir/metrics.jsonl, keys namespaced by stage
    (`sft/loss`), so a user can plot any run with a few lines of pandas or matplotlib."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")

    def log(self, stage, step, **metrics):
        row = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        row.update({f"{stage}/{k}": (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                    for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class NonFiniteLoss(Exception):
    """Training produced NaN/inf; the last good checkpoint is kept on disk."""


class ConfigError(ValueError):
    """A bad command line: unknown stage, preset or flag, or a value of the wrong type."""


# glibc hands a freed block of over 32 MB (a batch's logits: 16 x 256 x 8,192 floats on the cpu preset) back to the
# OS at once, and the next step's first touch of a new one costs a page fault per 4 KB: ~150,000 a step, ~10% of a
# CPU training step. These limits keep such blocks in the process for reuse; the numbers computed do not change.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def start_env(environ, load_avg):
    """The variables rlhf.py restarts itself with, read only at start-up (by glibc, by libgomp), each unless the
    user set it: MALLOC_TUNABLES on Linux with glibc; and OMP_WAIT_POLICY=PASSIVE when other processes already
    use the CPU (a 1-minute load average of 1 or more), because libgomp's threads otherwise spin between parallel
    regions on cores those processes need (README, Speed: threads on a busy machine). Returns {name: value}."""
    extra = {}
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in environ and "glibc" in os.confstr("CS_GNU_LIBC_VERSION"):
        extra["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    if "OMP_WAIT_POLICY" not in environ and load_avg >= 1.0:
        extra["OMP_WAIT_POLICY"] = "PASSIVE"
    return extra


def restart_with_start_env():
    """Start this script again with start_env's variables (none to add: carry on). Once, or twice should the
    load average cross 1 between the two starts; each variable, once set, stays."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    extra = start_env(os.environ, load)
    if extra:
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **extra})
