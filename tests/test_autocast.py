"""bf16 autocast (--dtype=bfloat16; the default on CUDA) in the stages after SFT: preference-model training
and scoring, and PPO's rollout, scoring and update. On this CPU: the trunk's matmuls really run in bf16,
the numbers that need fp32 (log-probs, losses, the scalar heads) stay fp32, and one PM step and one PPO
step agree with fp32 within bf16's rounding (8 bits of mantissa: ~0.4% per operation). Measured here:
losses within 1e-3 relative, PPO log-probs and values within 2e-3, PM scores within 1.5e-2; the
tolerances below leave room for other CPUs' bf16 kernels."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ppo
import reward
import rm
import runtime
import actor_critic
from model import GPT, GPTConfig

torch.set_num_threads(1)

CONFIG = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def linear_dtypes(model):
    """Record the output dtype of every Linear in the trunk's blocks (attention and MLP matmuls), split by
    whether gradients were on (a training forward) or off (rollout, scoring, validation)."""
    seen = {True: set(), False: set()}
    for m in model.transformer.h.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen[torch.is_grad_enabled()].add(out.dtype))
    return seen


def test_the_autocast_context_runs_matmuls_in_bf16_only_when_asked():
    """runtime.autocast: the trunk's and the LM head's matmuls in bf16 with dtype="bfloat16", in fp32 with
    "auto" on a CPU (so the CPU presets' numbers are fp32 ones) or "float32". The final hidden state stays
    fp32 either way: autocast runs layer_norm in fp32, so the scalar heads read an fp32 ln_f output."""
    torch.manual_seed(0)
    model, idx = GPT(CONFIG), torch.randint(0, 64, (2, 8))
    seen = linear_dtypes(model)
    for dtype, want in (("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        seen[True].clear()
        with runtime.autocast("cpu", dtype):
            h = model.hidden_states(idx)                                                 # (B, T, C)
            assert seen[True] == {want} and model.logits(h).dtype == want and h.dtype == torch.float32


def comparisons(n, seed):
    g = np.random.default_rng(seed)
    return [tuple(g.integers(1, 64, int(g.integers(4, 20))).tolist() for _ in range(2)) for _ in range(n)]


def pm_step(dtype, tmp_path):
    """One train_pm step on a tiny PM, then its validation -> (train loss, val loss, Linear dtypes, scores)."""
    torch.manual_seed(0)
    model = reward.RewardModel(CONFIG)
    seen = linear_dtypes(model)
    rc = rm.RMConfig(lr=1e-3, batch_size=8, max_steps=1, warmup_steps=1, eval_interval=1, log_interval=1)
    log = runtime.MetricsLog(str(tmp_path / dtype))
    info = rm.train_pm(runtime.Run(seed=0, dtype=dtype), rc, model, SimpleNamespace(eos_id=0),
                           comparisons(16, 0), comparisons(24, 1), "ranking", log=log, name="pm")
    row = next(r for r in map(json.loads, open(log.path)) if "rm/pm/train_loss" in r)
    dtypes = copy.deepcopy(seen)
    with torch.no_grad(), runtime.autocast("cpu", dtype):
        scores = model(torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(2)))[0]
    return row["rm/pm/train_loss"], info["val_loss"], dtypes, scores


def test_pm_training_step_in_bf16_matches_fp32(tmp_path):
    loss32, val32, seen32, scores32 = pm_step("float32", tmp_path)
    loss16, val16, seen16, scores16 = pm_step("bfloat16", tmp_path)
    assert seen32 == {True: {torch.float32}, False: {torch.float32}}
    assert seen16 == {True: {torch.bfloat16}, False: {torch.bfloat16}}  # the training forward and validation
    assert scores16.dtype == torch.float32                                # the scalar head reads out in fp32
    assert loss16 == pytest.approx(loss32, rel=2e-2) and val16 == pytest.approx(val32, rel=2e-2)
    torch.testing.assert_close(scores16, scores32, atol=5e-2, rtol=0)


def ppo_setup():
    """test_ddp's tiny PPO: the value head on the policy's trunk, and a fixed reply per prompt in place of
    the sampler, so that fp32 and bf16 update on the same rollout and only their arithmetic differs."""
    torch.manual_seed(0)
    policy = GPT(CONFIG)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    critic = actor_critic.build_critic(None, torch.randn(32) * 0.1, torch.zeros(1))
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=1e-3)

    def fixed_replies(queries, query_mask, max_new_tokens, **kwargs):
        tokens = (queries[:, -1:] * 7 + torch.arange(max_new_tokens)) % 64                  # (B, N)
        mask = torch.arange(max_new_tokens) < 2 + queries[:, -1:] % (max_new_tokens - 1)    # (B, N)
        return torch.where(mask, tokens, 0), torch.zeros(tokens.shape), mask
    policy.generate = fixed_replies
    return policy, ref_policy, critic, optimizer


def ppo_run(dtype):
    policy, ref_policy, critic, optimizer = ppo_setup()
    seen = linear_dtypes(policy)
    queries = torch.randint(1, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    cfg = ppo.PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, penalize_no_eos=False)
    reward_fn = lambda q, r: torch.tensor([sum(x) % 7 / 7.0 for x in r])  # noqa: E731
    stats, rollout = ppo.ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries, torch.ones_like(queries),
                                  cfg, 0.1, None, torch.Generator().manual_seed(1), dtype=dtype)
    return stats, rollout, seen


def test_ppo_step_in_bf16_matches_fp32():
    stats32, roll32, seen32 = ppo_run("float32")
    stats16, roll16, seen16 = ppo_run("bfloat16")
    assert seen32 == {True: {torch.float32}, False: {torch.float32}}
    assert seen16 == {True: {torch.bfloat16}, False: {torch.bfloat16}}  # the rollout's forwards and the update's
    mask = roll32["response_mask"]
    assert roll16["logprobs"].dtype == torch.float32 and roll16["values"].dtype == torch.float32
    assert (roll16["logprobs"] - roll32["logprobs"])[mask].abs().max() < 5e-2
    assert (roll16["values"] - roll32["values"])[mask].abs().max() < 5e-2
    for k in ("vf_loss", "entropy", "values", "returns"):
        assert stats16[k] == pytest.approx(stats32[k], rel=2e-2), k
    assert abs(stats16["pg_loss"] - stats32["pg_loss"]) < 1e-3  # ~0 (whitened advantages): compared absolutely
    assert stats16["kl"] == 0.0 and stats32["kl"] == 0.0         # policy == reference, in either precision


def test_sampling_in_bf16_keeps_its_distribution_math_in_fp32():
    """Under bf16 the sampler's matmuls run in bf16, its log-probs come out in fp32, and they match a
    fp32 forward over the same tokens to bf16's rounding."""
    from actor_critic import sample_logprobs
    from sampling import sample_replies
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    seen = linear_dtypes(model)
    tok = SimpleNamespace(eos_id=0, stop_ids=[])
    queries = [[5, 6, 7], [8, 9, 10, 11, 12]]
    replies = sample_replies(model, queries, 2, 6, 4, tok, torch.Generator().manual_seed(1), 0.8, dtype="bfloat16")
    assert seen[False] == {torch.bfloat16} and all(replies)
    rep_q = [q for q in queries for _ in range(2)]
    lp16 = sample_logprobs(model, rep_q, replies, 4, 0, 0.8, dtype="bfloat16")
    lp32 = sample_logprobs(model, rep_q, replies, 4, 0, 0.8)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, atol=5e-2, rtol=0)  # sums over up to 6 tokens (measured: 1.5e-3)
