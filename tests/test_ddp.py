"""Data parallel training: two CPU processes (gloo) that each take half of every global batch end with
the same weights as one process that takes all of it, for token streams and masked SFT examples
(train.supervised_train), for preference-model comparisons (rm.train_pm, and DPO through it) and for PPO (ppo.ppo_step:
each rank its own rollouts, advantages whitened over all of them, gradients averaged)."""
import copy
import json
import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppo
from model import GPT, GPTConfig
from actor_critic import build_critic
from dpo import DPOPolicy
from ppo import PPOConfig, ppo_step
from reward import RewardModel
from rm import RMConfig, train_pm
from runtime import MetricsLog, NonFiniteLoss, Run, init_distributed, load_checkpoint, save_checkpoint, stage_done
from train import LMTrainConfig, supervised_train


class Cfg:  # the run-level fields supervised_train reads
    seed, compile, dtype, micro_tokens = 0, False, "auto", 0


class Tok:  # what supervised_train needs of a tokenizer: the pad/EOS id and something to checkpoint
    eos_id = 0

    def state_dict(self):
        return {}


def data(kind):
    """A token stream (pretraining) or (ids, loss_mask) examples of different lengths and loss-token
    counts (SFT), where a naive per-rank mean would weight the ranks wrongly."""
    if kind == "stream":
        return (np.arange(4000) * 7 % 300).astype(np.uint16)
    g = np.random.default_rng(0)
    out = []
    for i in range(64):
        n = int(g.integers(6, 30))
        ids = g.integers(0, 300, n).tolist()
        reply = int(g.integers(1, n))  # the last `reply` tokens carry the loss
        out.append((ids, [0] * (n - reply) + [1] * reply))
    return out


def train(out_dir, kind):
    """A few steps of supervised_train on a tiny model; returns the final weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16))
    sc = LMTrainConfig(max_steps=6, batch_size=8, grad_accum=2 if kind == "stream" else 1, eval_interval=3,
                       eval_batches=1, log_interval=2, warmup_steps=2, lr=1e-2)
    d = data(kind)
    path = os.path.join(out_dir, "base.pt")
    supervised_train(Cfg, "pretrain", sc, model, Tok(), d, d[:500] if kind == "stream" else d[:16],
                     path, MetricsLog(out_dir))
    return model.state_dict()


def comparisons(n, seed):
    """[(chosen_ids, rejected_ids)] of different lengths, so every batch is padded."""
    g = np.random.default_rng(seed)
    return [tuple(g.integers(1, 300, int(g.integers(4, 20))).tolist() for _ in range(2)) for _ in range(n)]


def train_rm(out_dir, objective):
    """A few steps of train_pm on a tiny PM (PMP first for the ranking loss), validated once at the
    end so early stopping keeps the last weights; returns them."""
    torch.manual_seed(0)
    config, data = GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16), comparisons
    if objective == "dpo":  # a policy trained by the same loop (dpo.DPOPolicy), on (chosen, rejected, prompt length)
        ref = GPT(config)
        model = DPOPolicy(config, ref, beta=0.5)
        model.load_state_dict(ref.state_dict())
        data = lambda n, seed: [([7, 8] + c, [7, 8] + r, 2) for c, r in comparisons(n, seed)]  # noqa: E731
    else:
        model = RewardModel(config)
    rm = RMConfig(objective=objective, lr=1e-2, batch_size=8, max_steps=4, warmup_steps=2, pmp_steps=2,
                  eval_interval=100, log_interval=1, center_coef=0.1, eval_batch_size=8)
    train_pm(Run(seed=0), rm, model, Tok(), data(40, 0), data(8, 1), objective,
             pmp_ex=comparisons(24, 2) if objective == "ranking" else None,
             ckpt_path=os.path.join(out_dir, "pm_a.pt"), log=MetricsLog(out_dir), name="pm_a")
    return model.state_dict()


def train_ppo_steps(rank=0, world_size=1):
    """Two PPO iterations on a global batch of 4 prompts, this rank taking rows rank::world_size. The
    sampler is replaced by a fixed reply per prompt (different lengths), so one process and two see
    the same rollouts and only the update's arithmetic is compared. Returns policy + critic weights."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16))
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    critic = build_critic(None, torch.randn(16) * 0.1, torch.zeros(1))  # the value head on the policy's trunk
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)

    def fixed_replies(queries, query_mask, max_new_tokens, **kwargs):
        last = queries[:, -1:]                                                         # (B, 1)
        tokens = (last * 7 + torch.arange(max_new_tokens)) % 300                       # (B, N)
        mask = torch.arange(max_new_tokens) < 2 + last % (max_new_tokens - 1)          # (B, N) 2..N tokens
        return torch.where(mask, tokens, 0), torch.zeros(tokens.shape), mask
    policy.generate = fixed_replies
    queries = torch.tensor([[0, 0, 5, 9], [0, 3, 8, 2], [4, 4, 1, 7], [0, 0, 0, 6]])
    query_mask = (queries > 0).long()  # left padding: 0 = pad
    cfg = PPOConfig(batch_size=4 // world_size, minibatch_size=4 // world_size, ppo_epochs=2, max_new_tokens=6,
                    penalize_no_eos=False)
    reward_fn = lambda q, r: torch.tensor([sum(x) % 7 / 7.0 for x in r])  # any fixed function of the reply
    for it in range(2):
        ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries[rank::world_size],
                 query_mask[rank::world_size], cfg, 0.1, None, torch.Generator().manual_seed(it))
    return {**policy.state_dict(), **{f"critic.{k}": v for k, v in critic.state_dict().items()}}


def ppo_nan_on_one_rank(rank, world_size, out_dir):
    """PPO where rank 1 alone gets a NaN loss (as an overflow in one rank's forward would): every rank
    must stop with NonFiniteLoss, none may wait for the others forever. Records what each rank raised."""
    if rank == 1:
        real = ppo.ppo_losses
        ppo.ppo_losses = lambda *a, **k: (lambda pg, vf, st: (pg * float("nan"), vf, st))(*real(*a, **k))
    try:
        train_ppo_steps(rank, world_size)
        outcome = "finished"
    except NonFiniteLoss:
        outcome = "NonFiniteLoss"
    open(os.path.join(out_dir, f"rank{rank}.txt"), "w").write(outcome)
    return {}


def force_many_times(rank, out_dir, times=40):
    """Both ranks meet a finished checkpoint with --force at the same moment, again and again: each must
    see the stage as not done (it starts over), and no rank may trip over a file the other deletes."""
    path = os.path.join(out_dir, "stage.pt")
    for _ in range(times):
        if rank == 0:
            save_checkpoint(path, {"done": True})
        dist.barrier()
        assert not stage_done(path, True, "stage") and not os.path.exists(path)
        dist.barrier()
    return {}


def worker(rank, world_size, port, out_dir, kind):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        assert init_distributed() == (rank, world_size, rank)
        if kind == "ppo":
            state = train_ppo_steps(rank, world_size)
        elif kind == "ppo_nan":
            state = ppo_nan_on_one_rank(rank, world_size, out_dir)
        elif kind == "force":
            state = force_many_times(rank, out_dir)
        else:
            state = train_rm(out_dir, kind.removeprefix("rm_")) if kind.startswith("rm_") else train(out_dir, kind)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))  # to check the ranks agree
    finally:  # wait for rank 0's checkpoint write: gloo can abort a rank that leaves while its peer still talks
        dist.barrier()
        dist.destroy_process_group()
        open(os.path.join(out_dir, f"rank{rank}.left"), "w").close()  # this rank's work and teardown are done


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dirs(tmp_path):
    single_dir, ddp_dir = str(tmp_path / "single"), str(tmp_path / "ddp")
    os.makedirs(single_dir)
    os.makedirs(ddp_dir)
    return single_dir, ddp_dir


def spawn_with_timeout(out_dir, kind, timeout=120):
    """mp.spawn of two ranks that fails the test (instead of hanging it) if a rank never returns, or dies
    before it has destroyed its process group. A rank that aborts later, in the interpreter's own exit (a
    rare SIGABRT from gloo's threads, "terminate called without an active exception": 1 CI run, 0 in 60
    runs here), did everything the tests check: that is reported, not failed."""
    ctx = mp.spawn(worker, args=(2, free_port(), out_dir, kind), nprocs=2, join=False)
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"a rank hung for {timeout}s")
    except mp.ProcessExitedException as e:
        if not all(os.path.exists(os.path.join(out_dir, f"rank{r}.left")) for r in range(2)):
            raise
        warnings.warn(f"a rank died in the interpreter's exit, after its work and teardown: {e}")


def run_two_ranks(ddp_dir, kind, ckpt_name):
    """Train in 2 gloo processes -> (each rank's final weights, the checkpoint rank 0 alone wrote)."""
    spawn_with_timeout(ddp_dir, kind)
    ranks = [torch.load(os.path.join(ddp_dir, f"rank{r}.pt")) for r in range(2)]
    return ranks, load_checkpoint(os.path.join(ddp_dir, ckpt_name))


def assert_replicas_match(single, ranks, saved=None):
    """Both ranks end with identical weights (averaged gradients), those of one process to float tolerance
    (the summation order differs, and Adam turns the rounding noise of a gradient that is zero in exact
    arithmetic, the key bias that softmax ignores, into lr-sized steps), and rank 0 saved exactly them."""
    for name, w in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], w, rtol=0, atol=1e-4), name
        assert saved is None or torch.equal(saved[name], ranks[0][name]), name


@pytest.mark.parametrize("kind", ["stream", "examples"])
def test_two_gloo_processes_match_one_process(tmp_path, kind):
    single_dir, ddp_dir = dirs(tmp_path)
    single = train(single_dir, kind)
    ranks, ckpt = run_two_ranks(ddp_dir, kind, "base.pt")
    assert ckpt["done"] and ckpt["step"] == 6
    assert_replicas_match(single, ranks, ckpt["model"])
    logged = [json.loads(line) for line in open(os.path.join(ddp_dir, "metrics.jsonl"))]
    assert len(logged) == len(open(os.path.join(single_dir, "metrics.jsonl")).readlines())  # one writer
    assert logged[0]["step"] == 0 and "pretrain/val_loss" in logged[0]  # val loss curves start at step 0


@pytest.mark.parametrize("objective", ["ranking", "binary", "dpo"])
def test_two_gloo_processes_train_the_same_pm_as_one_process(tmp_path, objective):
    single_dir, ddp_dir = dirs(tmp_path)
    single = train_rm(single_dir, objective)
    ranks, ckpt = run_two_ranks(ddp_dir, f"rm_{objective}", "pm_a.pt")
    assert ckpt["step"] == (6 if objective == "ranking" else 4) and ckpt["best"]["step"] == ckpt["step"]
    assert_replicas_match(single, ranks, ckpt["model"])
    rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (single_dir, ddp_dir)]
    assert len(rows[0]) == len(rows[1])  # one writer
    for a, b in zip(*rows):  # the logged loss is the global batch's, all-reduced over the ranks
        assert a.keys() == b.keys() and a["stage"] == b["stage"]
        numbers = [k for k in a if k not in ("time", "stage")]  # (pytest 9.2's approx takes no strings in a dict)
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-4, abs=1e-5)


def test_two_gloo_processes_take_the_same_ppo_steps_as_one_process(tmp_path):
    single = train_ppo_steps()
    spawn_with_timeout(str(tmp_path), "ppo")
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert_replicas_match(single, ranks)
    torch.manual_seed(0)
    initial = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16)).state_dict()
    assert (single["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-3  # PPO did move it


def test_pm_batch_must_split_evenly_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr("rm.dist_info", lambda: (0, 3))
    with pytest.raises(AssertionError, match="rm.batch_size 8 must be divisible by the 3 processes"):
        train_rm(str(tmp_path), "ranking")


def test_batch_must_split_evenly_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr("train.dist_info", lambda: (0, 3))
    with pytest.raises(AssertionError, match="divisible by the 3 processes"):
        train(str(tmp_path), "stream")


def test_a_nan_on_one_ppo_rank_stops_every_rank(tmp_path):
    spawn_with_timeout(str(tmp_path), "ppo_nan")
    assert [open(os.path.join(tmp_path, f"rank{r}.txt")).read() for r in range(2)] == ["NonFiniteLoss"] * 2


def test_force_under_two_ranks_removes_the_checkpoint_once(tmp_path):
    spawn_with_timeout(str(tmp_path), "force")
