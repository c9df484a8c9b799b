"""The machines people have: the scripts start on Windows (no POSIX-only modules at import), bench.py
reports what Windows cannot measure as null instead of crashing, and on GPUs the process group takes the
CPU tensors the collectives get as well as the CUDA ones."""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

from lab import bench
from lab import plan
import rlhf
from runtime import init_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")


def test_scripts_import_without_posix_only_modules():
    """Windows has none of POSIX_ONLY; a module set to None in sys.modules fails to import, as there. A fresh
    process, because in this one the scripts are imported already."""
    block = "".join(f"sys.modules[{m!r}] = None; " for m in POSIX_ONLY)
    scripts = "import rlhf, lab.bench_hf, lab.plot, lab.standin, data"  # every file with a __main__
    proc = subprocess.run([sys.executable, "-c", f"import sys; {block}{scripts}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]


def test_bench_without_resource_or_load_average_reports_null(hh_dir, monkeypatch):
    """Windows has no `resource` (peak RSS) and no os.getloadavg: bench reports both as None, the rest as usual."""
    monkeypatch.setitem(sys.modules, "resource", None)
    monkeypatch.delattr(os, "getloadavg")
    flags = ["--preset", "tiny", "--pretrain.batch_size=2", "--ppo.batch_size=4", "--ppo.minibatch_size=2",
             "--ppo.ppo_epochs=1", "--ppo.max_new_tokens=4", "--data_dir", hh_dir]
    out = bench.run_bench(rlhf.parse_args(["bench"] + flags)[1], repeats=1)
    assert out["peak_mem_mb"] is None and out["load_avg"] is None
    assert out["train_tokens_per_s"] > 0


def test_plan_without_resource_leaves_peak_memory_out(hh_dir, monkeypatch):
    """`rlhf.py all` starts with the plan, whose basis line quotes bench's peak memory: where that is None
    (Windows) the line leaves it out instead of crashing."""
    monkeypatch.setitem(sys.modules, "resource", None)
    out = plan.make_plan(rlhf.parse_args(["plan", "--preset", "tiny", "--data_dir", hh_dir])[1], repeats=1)
    assert out["basis"].startswith("measured") and "peak memory" not in out["basis"]


def test_gpu_process_group_takes_cpu_tensors_too(monkeypatch):
    """NCCL refuses CPU tensors, and all_ranks_mean all-reduces Python floats (PPO, every iteration) on the CPU:
    under torchrun on GPUs the process group needs gloo for the CPU ones (here: no GPU, no group, just its backend)."""
    backends = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: backends.append(backend))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert init_distributed() == (1, 2, 1)
    assert BackendConfig(dist.Backend(backends[0])).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
