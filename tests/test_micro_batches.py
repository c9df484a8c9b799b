"""A step's batch split into groups under a token budget (runtime.micro_batches, --micro_tokens) takes the same
optimizer step as the whole batch, in every trained stage: SFT (and cd, RS: train.supervised_train), the PMs and
DPO (rm.pair_step), and PPO's update (ppo.ppo_update). Checked in fp32, where only the summation order differs."""
import copy

import pytest
import torch

import actor_critic
import ppo
import rm
import train
from dpo import DPOPolicy
from model import GPT, GPTConfig
from reward import RewardModel
from runtime import Run, grad_scaler, micro_batches

torch.set_num_threads(1)


def test_micro_batches_cover_every_row_once_within_the_budget():
    widths = torch.tensor([5, 30, 12, 30, 7, 1, 18])
    groups = micro_batches(widths, 40)
    rows = torch.cat(groups).tolist()
    assert sorted(rows) == list(range(7))                                     # every row, once
    assert all(len(g) * int(widths[g].max()) <= 40 for g in groups)          # each group within the budget
    assert rows == torch.sort(widths, descending=True, stable=True).indices.tolist()  # widest first
    assert [len(g) for g in micro_batches(torch.tensor([50, 3]), 40)] == [1, 1]  # a row over budget: alone
    assert [g.tolist() for g in micro_batches(widths, 0)] == [list(range(7))]     # no budget: one group, in order
    assert [g.tolist() for g in micro_batches(widths, 7 * 30)] == [list(range(7))]  # it fits: the same


def tiny_gpt(cls=GPT, **kw):
    torch.manual_seed(0)
    return cls(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0), **kw)


def grads_after(model, step):
    """The gradients `step(model)` leaves, by parameter name."""
    model.zero_grad(set_to_none=True)
    step(model)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sft_step_split_under_a_budget_is_the_same_step():
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(4, 60, (12,), generator=g)]  # ragged: each group is cut to its width
    data = [(torch.randint(1, 50, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]
    sc = train.LMTrainConfig(batch_size=6, grad_accum=2)
    model = tiny_gpt()

    def step(max_tokens):
        return lambda m: train.accumulate_gradients(m, data, 0, sc, 0, 64, 0, "cpu", "auto", max_tokens,
                                                    grad_scaler("cpu", "float32"))[0]
    whole = grads_after(model, step(0))
    split = grads_after(model, step(100))  # ~2 rows a group at these widths
    assert_same(whole, split)
    loss0, loss1 = step(0)(model), step(100)(model)
    assert abs(float(loss0) - float(loss1)) < 1e-6


def pair_batch(seed=0, pairs=6, reply_mask=False):
    """A right-padded comparison batch as rm.pair_batch returns it: idx, mask (2B, T) as cat([chosen, rejected]),
    labels (2B,), and a reply mask (DPO) or None."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 60, (2 * pairs,), generator=g)
    mask = (torch.arange(60)[None] < lengths[:, None]).long()
    idx = torch.randint(1, 50, (2 * pairs, 60), generator=g) * mask
    labels = torch.cat([torch.ones(pairs), torch.zeros(pairs)])
    replies = mask * (torch.arange(60)[None] >= 3) if reply_mask else None
    return idx, mask, labels, replies


@pytest.mark.parametrize("objective", ["ranking", "binary", "dpo"])
def test_pm_and_dpo_step_split_under_a_budget_is_the_same_step(objective):
    if objective == "dpo":
        ref = tiny_gpt()
        model, batch = tiny_gpt(DPOPolicy, ref_policy=ref, beta=0.1), pair_batch(reply_mask=True)
    else:
        model, batch = tiny_gpt(RewardModel), pair_batch()
    rc = rm.RMConfig(center_coef=0.1)

    def step(max_tokens):
        return lambda m: rm.pair_step(m, batch, objective, rc, Run(micro_tokens=max_tokens),
                                      grad_scaler("cpu", "float32"))
    whole, split = grads_after(model, step(0)), grads_after(model, step(130))
    assert_same(whole, split)
    assert abs(float(step(0)(model)) - float(step(130)(model))) < 1e-6


def test_ppo_update_split_under_a_budget_is_the_same_update():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    ref = copy.deepcopy(policy)
    critic = actor_critic.build_critic(GPT(policy.config), torch.randn(32), torch.zeros(1))
    cfg = ppo.PPOConfig(batch_size=16, minibatch_size=8, ppo_epochs=2, lr=1e-3, max_new_tokens=8,
                        penalize_no_eos=False, kl_coef=0.02)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(1, 16, (16, 4), generator=g)
    qm = (torch.arange(4)[None] >= torch.randint(0, 3, (16, 1), generator=g)).long()
    reward = lambda queries, responses: torch.tensor([float(len(r)) for r in responses])  # noqa: E731
    ro = ppo.rollout(policy, ref, critic, reward, q * qm, qm, cfg, cfg.kl_coef, 0, g, [], "auto")

    def update(max_tokens):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        opt = torch.optim.Adam(list(p.parameters()) + list(c.parameters()), lr=cfg.lr, eps=cfg.adam_eps)
        stats, _ = ppo.ppo_update(p, c, opt, ro, cfg, torch.Generator().manual_seed(1), "auto", max_tokens)
        return p, stats
    (p0, s0), (p1, s1) = update(0), update(3 * ro["query_response"].size(1))  # 3 rows a group: 3 + 3 + 2
    for a, b in zip(p0.parameters(), p1.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "ratio"):
        assert [s[k] for s in s0] == pytest.approx([s[k] for s in s1], rel=1e-6, abs=1e-6), k
