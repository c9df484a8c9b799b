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
    micro_tokens: int = 0
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


DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device):
    """True on a CUDA GPU with bf16 tensor cores (compute capability 8.0 and up: A100, RTX 30xx/40xx, H100).
    Older ones (T4, V100, RTX 20xx) run bf16 matmuls without tensor cores and attention on the slow math kernel."""
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def precision(device, dtype="auto"):
    """(the autocast dtype or None for fp32, why) on this device for --dtype. auto: bf16 on a GPU that has it
    natively (bf16 keeps fp32's exponent range: no loss scaling), fp16 with a loss scaler on an older GPU, fp32
    elsewhere (bf16 matmuls are slower than fp32 on most CPUs). bfloat16 opts a CPU in: on one with native bf16
    (AVX512-BF16 or AMX; `python rlhf.py bench --dtype=bfloat16` shows it) a step runs faster. A dtype the
    device cannot run is one line of error, naming the flag that fixes it."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cuda = device.startswith("cuda")
    if dtype == "float32" or (dtype == "auto" and not cuda):
        return None, "fp32" + ("" if dtype == "float32" else f" (auto on {device})")
    if dtype == "auto":
        if native_bf16(device):
            return torch.bfloat16, "bf16 autocast (auto: this GPU has native bf16)"
        return torch.float16, ("fp16 autocast + loss scaling (auto: this GPU has no native bf16, compute "
                               "capability < 8.0)")
    if dtype == "bfloat16" and cuda and not native_bf16(device):
        raise ConfigError("--dtype=bfloat16: this GPU has no native bf16 (compute capability < 8.0); "
                          "use --dtype=float16 (with loss scaling) or --dtype=float32")
    if dtype == "float16":
        return torch.float16, "fp16 autocast + loss scaling (--dtype=float16)"
    return torch.bfloat16, "bf16 autocast (--dtype=bfloat16)"


def autocast(device, dtype="auto"):
    """The forward's precision context (precision): bf16 or fp16 autocast, or nothing (fp32). Backward runs in
    the dtypes the forward chose; losses and the RL math stay fp32 (the heads return fp32)."""
    amp_dtype, _ = precision(device, dtype)
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype)


def grad_scaler(device, dtype="auto"):
    """A loss scaler, on only under fp16 autocast: fp16's 5-bit exponent flushes small gradients to zero, so the
    loss is multiplied by a large factor before backward and the gradients divided by it before the step (a step
    whose gradients overflowed is skipped and the factor halved; Micikevicius et al. 2018, "Mixed Precision
    Training"). Off (bf16, fp32) each of its calls is a no-op and the step is the plain one."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=precision(device, dtype)[0] is torch.float16)


def clip_and_step(optimizer, params, max_norm, scaler):
    """The end of every optimizer step: unscale the gradients (fp16), clip their global norm (0 = no clip),
    step, clear. Returns the norm before clipping (inf or nan on a step the scaler skips)."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def micro_batches(widths, max_tokens):
    """Row groups of one batch, each padded to its widest row, holding at most max_tokens tokens (rows x width,
    padding included; a row wider than that is a group of its own): the batch's gradient is the sum of the
    groups', so one optimizer step at any width fits the memory the budget was sized for. Rows are grouped
    widest first, so a group of short rows is also cut to their width. max_tokens 0, or a batch that fits:
    one group of every row in order (the unsplit computation). widths: (B,) tokens of each row ->
    [LongTensor of row indices]."""
    widths = torch.as_tensor(widths)
    if not max_tokens or len(widths) * int(widths.max()) <= max_tokens:
        return [torch.arange(len(widths))]
    order = torch.sort(widths, descending=True, stable=True).indices.tolist()
    groups, start = [], 0
    while start < len(order):
        rows = max(1, max_tokens // max(1, int(widths[order[start]])))  # the first row is the group's widest
        groups.append(torch.tensor(order[start:start + rows]))
        start += rows
    return groups


class CompiledOrEager(torch.nn.Module):
    """torch.compile(model), or `model` itself once compiling fails (Triton needs a C compiler and a recent GPU):
    the failure is one printed line and the run goes on eagerly, in the same memory. Compiling happens at the
    first call of each new shape, so every call is guarded. Attributes other than forward are the model's."""

    def __init__(self, model):
        super().__init__()
        self.model, self.compiled, self.failed = model, torch.compile(model), False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if not is_compile_error(e):  # the model's own error (a bad input, out of memory): not ours to hide
                    raise
                self.failed = True
                print(f"[compile] torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                      "running eagerly (--compile=false skips the attempt)")
        return self.model(*args, **kwargs)

    def __getattr__(self, name):  # config, flops_per_token, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def compile_model(model, enabled=True):
    """--compile: the model compiled where torch.compile works, else eager (CompiledOrEager); `model` if not enabled."""
    return CompiledOrEager(model) if enabled else model


def is_compile_error(e):
    """True for an exception raised by torch.compile's machinery (dynamo, inductor, Triton), not by the model."""
    return type(e).__module__.split(".")[0] in ("torch", "triton") and (
        "_dynamo" in type(e).__module__ or "_inductor" in type(e).__module__ or "triton" in type(e).__module__)


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
    except Exception as e:  # UnpicklingError for anything but tensors and containers,
        # EOFError/RuntimeError if cut short
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
        if key != "scaler" or ckpt.get(key):  # a loss scaler's state exists only where one was on (fp16)
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
