"""A run killed at any moment (SIGKILL: power cut, OOM) and rerun with the same command ends exactly
where an uninterrupted run ends: the same final checkpoints, eval.json and online.json. Ctrl-C saves a
checkpoint and exits cleanly. Each stage is killed separately, at a seeded random moment of its run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, write_hh_dir
from evaluate import ppo_frontier
from runtime import load_checkpoint

STAGES = [("pretrain", ["base"]), ("sft", ["sft"]), ("cd", ["cd"]), ("rm", ["pm_a", "pm_b"]), ("rs", ["rs"]),
          ("ppo", ["ppo"]), ("dpo", ["dpo"]), ("eval", []), ("online", [])]
# small checkpoint intervals, so that a kill usually lands between two checkpoints; dropout on, as in the
# cpu preset, so that resuming must restore the RNG and every stage that should run without dropout does
FLAGS = ["--preset", "tiny", "--model.dropout=0.1", "--pretrain.eval_interval=10", "--sft.eval_interval=5",
         "--rm.eval_interval=5", "--rm.save_interval=3", "--dpo.save_interval=3",
         "--ppo.save_every=1", "--sample.num_samples=1", "--threads=1", "--online.prompts=4", "--online.n=4",
         "--online.pm_steps=4", "--online.eval_prompts=4", "--online.eval_samples=2"]


def rlhf(stage, out_dir, data_dir, **popen):
    cmd = [sys.executable, os.path.join(ROOT, "rlhf.py"), stage, "--out_dir", out_dir, "--data_dir", data_dir] + FLAGS
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(stage, out_dir, data_dir):
    proc = rlhf(stage, out_dir, data_dir)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return output


def same_checkpoint(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    keys = [k for k in a if isinstance(a[k], dict) and all(isinstance(v, torch.Tensor) for v in a[k].values())
            and k != "rng"]  # the model(s): "model", and PPO's "value_model" etc.
    assert keys and "model" in keys
    return all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in keys)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of every stage, timing each so kills can land inside it."""
    root = tmp_path_factory.mktemp("resume")
    data_dir, out = write_hh_dir(root / "hh"), str(root / "reference")
    durations = {}
    for stage, _ in STAGES:
        t0 = time.time()
        finish(stage, out, data_dir)
        durations[stage] = time.time() - t0
    return root, data_dir, out, durations


KILLS = int(os.environ.get("RESUME_KILLS", "1"))  # kill points per stage (RESUME_KILLS=5 for a longer check)


@pytest.mark.parametrize("stage, ckpts, kill", [(s, c, k) for s, c in STAGES for k in range(KILLS)],
                         ids=[f"{s}-{k}" for s, _ in STAGES for k in range(KILLS)])
def test_sigkill_at_a_random_moment_then_rerun_gives_the_same_result(reference, stage, ckpts, kill):
    root, data_dir, ref, durations = reference
    out = str(root / f"killed-{stage}-{kill}")
    os.makedirs(out)
    for prior, names in STAGES[:[s for s, _ in STAGES].index(stage)]:  # the finished prior stages
        for name in names:
            shutil.copy(os.path.join(ref, f"{name}.pt"), out)
    if stage == "eval":  # what the prior stages left: PPO's metrics log, the rm stage's part of eval.json
        shutil.copy(os.path.join(ref, "metrics.jsonl"), out)
        pm = json.load(open(os.path.join(ref, "eval.json")))["pm"]
        json.dump({"pm": pm}, open(os.path.join(out, "eval.json"), "w"))
    delay = random.Random(f"{stage}-{kill}").uniform(0.2, 0.95) * durations[stage]
    proc = rlhf(stage, out, data_dir)
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.communicate()
    finish(stage, out, data_dir)
    for name in ckpts:
        assert same_checkpoint(os.path.join(ref, f"{name}.pt"), os.path.join(out, f"{name}.pt")), name
    if stage == "ppo":  # redone iterations are logged twice; the frontier must count each once
        assert ppo_frontier(ref, 8) == ppo_frontier(out, 8)
    for name in {"eval": ["eval.json"], "online": ["online.json", "online/round2/pm_a.pt", "online/round2/rs.pt"]}.get(
            stage, []):  # online: its report, and the last round's PM-A and policy
        if name.endswith(".json"):
            assert json.load(open(os.path.join(ref, name))) == json.load(open(os.path.join(out, name))), name
        else:
            assert same_checkpoint(os.path.join(ref, name), os.path.join(out, name)), name


def test_rs_killed_once_its_winners_are_on_disk_gives_the_same_weights(reference):
    """The rerun of an rs stage killed right after it saved its winners (rs_data.pt) takes the other path,
    the winners read from disk: it must fine-tune exactly as the uninterrupted run did (dropout off, the
    same RNG start). The random kill points above reach this path only sometimes."""
    root, data_dir, ref, _ = reference
    out = str(root / "killed-rs-winners")
    os.makedirs(out)
    for name in ("base", "sft", "pm_a", "pm_b"):
        shutil.copy(os.path.join(ref, f"{name}.pt"), out)
    proc, deadline = rlhf("rs", out, data_dir), time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(out, "rs_data.pt")) and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    assert os.path.exists(os.path.join(out, "rs_data.pt"))
    finish("rs", out, data_dir)
    assert same_checkpoint(os.path.join(ref, "rs.pt"), os.path.join(out, "rs.pt"))


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(reference):
    root, data_dir, ref, durations = reference
    out = str(root / "interrupted")
    proc = rlhf("pretrain", out, data_dir)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and "pretrain/loss" in open(metrics).read()):
        time.sleep(0.01)  # wait for the first training step's row: the loop is running
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted: checkpoint saved" in output and "Traceback" not in output
    finish("pretrain", out, data_dir)
    assert same_checkpoint(os.path.join(ref, "base.pt"), os.path.join(out, "base.pt"))
