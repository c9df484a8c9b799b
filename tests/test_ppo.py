"""Tests for ppo.py: the math against plain loops, masking, and a tiny learning run."""

import math

import pytest
import torch

import ppo
import runtime
import actor_critic
from model import GPT, GPTConfig
from ppo import adaptive_kl_coef, compute_gae, compute_rewards, masked_mean, masked_whiten, ppo_losses

torch.set_num_threads(1)


def random_mask(B, N, g):
    """Right-padded response masks with lengths 1..N."""
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    return (torch.arange(N)[None] < lengths[:, None]).float(), lengths


# ----------------------------------------------------------------------------------------------
# math

def test_gae_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    B, N, gamma, lam = 5, 9, 0.97, 0.9
    values, rewards = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    mask, lengths = random_mask(B, N, g)
    adv, ret = compute_gae(values, rewards, mask, gamma, lam)
    for b in range(B):
        L = int(lengths[b])
        v, r = values[b, :L].tolist(), rewards[b, :L].tolist()
        a, expected = 0.0, [0.0] * L
        for t in reversed(range(L)):
            nv = v[t + 1] if t + 1 < L else 0.0
            a = r[t] + gamma * nv - v[t] + gamma * lam * a
            expected[t] = a
        assert torch.allclose(adv[b, :L], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(ret[b, :L], torch.tensor(expected) + values[b, :L], atol=1e-5)
        assert (adv[b, L:] == 0).all()


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, -0.1, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.3]])
    adv, ret = compute_gae(values, rewards, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[1.9, 1.9, 2.0]]))
    assert torch.allclose(adv, ret - values)


def test_whitening_is_masked():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g)
    mask, _ = random_mask(4, 7, g)
    w = masked_whiten(x, mask)
    assert abs(float(masked_mean(w, mask))) < 1e-5
    assert abs(float(masked_mean(w ** 2, mask)) - 1) < 1e-4
    # garbage in the padding must not change the whitened real tokens
    x2 = torch.where(mask.bool(), x, torch.full_like(x, 1e4))
    assert torch.allclose(masked_whiten(x2, mask), w, atol=1e-6)
    assert (w[mask == 0] == 0).all()
    # shift_mean=False only rescales
    s = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(s, (w + masked_mean(x, mask)) * mask, atol=1e-6)


def test_reward_lands_on_last_real_token_and_kl_penalty():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).float()
    scores = torch.tensor([3.0, -2.0])
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards[0], torch.tensor([-0.05, 0.0, 0.1 + 3.0, 0.0]))   # score at index 2, not 3
    assert torch.allclose(rewards[1], torch.tensor([0.0, 0.0, 0.0, -2.0]))
    assert torch.allclose(kl[0], torch.tensor([0.5, 0.0, -1.0, 0.0]))                 # padding kl is 0


def test_adaptive_kl_controller():
    # lm-hp: error clipped to +-0.2, scaled by n_steps / horizon
    assert adaptive_kl_coef(0.1, 12.0, 1000, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 3.0, 1000, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 6.6, 10000, 6.0, 10000) == pytest.approx(0.1 * 1.1)
    beta = 0.1
    for _ in range(50):                     # far over target: beta keeps growing
        beta = adaptive_kl_coef(beta, 100.0, 64, 6.0, 640)
    assert beta > 0.1 * 1.02 ** 49


def test_ppo_losses_ratio_one_and_padding_invariant():
    g = torch.Generator().manual_seed(2)
    B, N = 4, 6
    mask, _ = random_mask(B, N, g)
    old_lp, old_v = -torch.rand(B, N, generator=g), torch.randn(B, N, generator=g)
    adv, ret = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    # policy == old policy: ratio 1, nothing clipped, approx_kl 0, pg_loss = -mean(A)
    pg, vf, st = ppo_losses(old_lp, old_v, old_lp, old_v, adv, ret, mask, 0.2, 0.2)
    assert float(st["ratio"]) == pytest.approx(1.0) and float(st["clipfrac"]) == 0 and float(st["approx_kl"]) == 0
    assert float(pg) == pytest.approx(-float(masked_mean(adv, mask)), abs=1e-6)
    assert float(vf) == pytest.approx(0.5 * float(masked_mean((old_v - ret) ** 2, mask)), abs=1e-6)
    # extra padded columns with garbage leave the losses unchanged
    lp = old_lp + 0.3 * torch.randn(B, N, generator=g)
    v = old_v + 0.3 * torch.randn(B, N, generator=g)
    ref = ppo_losses(lp, v, old_lp, old_v, adv, ret, mask, 0.2, 0.2)
    pad = lambda x: torch.cat([x, 50 * torch.randn(B, 3, generator=g)], 1)
    mask_p = torch.cat([mask, torch.zeros(B, 3)], 1)
    out = ppo_losses(pad(lp), pad(v), pad(old_lp), pad(old_v), pad(adv), pad(ret), mask_p, 0.2, 0.2)
    assert torch.allclose(out[0], ref[0]) and torch.allclose(out[1], ref[1])
    assert all(torch.allclose(out[2][k], ref[2][k]) for k in ref[2])


def test_ppo_clipping():
    # advantage > 0 and ratio above 1 + eps: clipped, no gradient
    old = torch.zeros(1, 1)
    lp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    pg, _, st = ppo_losses(lp, old, old, old, torch.ones(1, 1), old, torch.ones(1, 1), 0.2, 0.2)
    pg.backward()
    assert float(pg.detach()) == pytest.approx(-1.2) and float(st["clipfrac"]) == 1 and float(lp.grad) == 0
    # advantage < 0 and ratio above 1 + eps: not clipped (the pessimistic bound), gradient flows
    lp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    pg, _, _ = ppo_losses(lp, old, old, old, -torch.ones(1, 1), old, torch.ones(1, 1), 0.2, 0.2)
    pg.backward()
    assert float(pg.detach()) == pytest.approx(1.5) and float(lp.grad) == pytest.approx(1.5)


# ----------------------------------------------------------------------------------------------
# the loop, on tiny models


EOS, TARGET, V = 0, 5, 16


def tiny_setup(seed=0, **overrides):
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    ref = GPT(policy.config)
    ref.load_state_dict(policy.state_dict())
    trunk = GPT(policy.config)
    critic = actor_critic.build_critic(trunk, torch.zeros(32), torch.zeros(1))
    cfg = ppo.PPOConfig(batch_size=32, minibatch_size=8, ppo_epochs=4, lr=1e-3, max_new_tokens=8,
                        penalize_no_eos=False, kl_coef=0.02)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    opt = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=cfg.lr, eps=cfg.adam_eps)
    return policy, ref, critic, cfg, opt


def count_target(queries, responses):
    """The test's reward: how often the reply says TARGET."""
    return torch.tensor([float(sum(t == TARGET for t in r)) for r in responses])


def tiny_queries(g, B=32, T=4):
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    queries = torch.randint(1, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] >= T - lengths[:, None]).long()   # left-padded
    return torch.where(mask.bool(), queries, torch.full_like(queries, EOS)), mask


@pytest.mark.parametrize("share_trunk", [False, True])
def test_first_minibatch_ratio_one_and_zero_kl(share_trunk):
    # temperature != 1: the training pass must divide the logits by it too, or the ratio is not 1
    policy, ref, critic, cfg, opt = tiny_setup(temperature=0.7)
    if share_trunk:  # the value head on the policy's own trunk: one forward for logprobs and values
        critic = actor_critic.build_critic(None, torch.randn(32), torch.zeros(1))
        opt = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    q, qm = tiny_queries(g)
    stats, rollout = ppo.ppo_step(policy, ref, critic, opt, count_target, q, qm, cfg, cfg.kl_coef, EOS, g)
    first = rollout["mb_stats"][0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["clipfrac"] == 0
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)      # policy == reference at the start
    assert stats["minibatches"] == cfg.ppo_epochs * cfg.batch_size // cfg.minibatch_size
    assert rollout["mb_stats"][-1]["approx_kl"] > 0         # later minibatches see a moved policy


def test_rollout_recomputes_the_samplers_logprobs_because_they_differ():
    # which forwards PPO needs: the sampler already returns log pi_old of its tokens, but computed one
    # token at a time through the KV cache they equal the update's full forward only up to rounding.
    # The rollout forward is the update's own function, so the first ratio is exactly 1 (README, Speed)
    policy, _, _, cfg, _ = tiny_setup()
    q, qm = tiny_queries(torch.Generator().manual_seed(0))
    with torch.no_grad():
        responses, sampled, mask = policy.generate(q, qm, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
        qr, am = torch.cat([q, responses], 1), torch.cat([qm.bool(), mask], 1)
        again = [actor_critic.rollout_forward(policy, None, qr, am, responses, q.size(1), 1.0, 8)[0] for _ in range(2)]
    assert torch.equal(again[0], again[1])  # the same function twice: ratio exactly 1
    assert torch.allclose(again[0][mask], sampled[mask], atol=1e-5)  # the sampler's: the same up to rounding,
    assert not torch.equal(again[0][mask], sampled[mask])  # but not bit for bit


def test_approx_kl_early_stop_and_non_finite_loss():
    policy, ref, critic, cfg, opt = tiny_setup(max_approx_kl=1e-9)
    g = torch.Generator().manual_seed(3)
    q, qm = tiny_queries(g)
    stats, _ = ppo.ppo_step(policy, ref, critic, opt, count_target, q, qm, cfg, cfg.kl_coef, EOS, g)
    assert stats["minibatches"] == 2 and stats["early_stop"] == 1   # the first has approx_kl 0, the second > limit
    nan_reward = lambda queries, responses: torch.full((len(responses),), float("nan"))  # noqa: E731
    with pytest.raises(runtime.NonFiniteLoss, match="non-finite PPO loss"):
        ppo.ppo_step(policy, ref, critic, opt, nan_reward, q, qm, cfg, cfg.kl_coef, EOS, g)


def test_no_eos_penalty_replaces_the_score():
    policy, ref, critic, cfg, opt = tiny_setup(penalize_no_eos=True, no_eos_penalty=-3.0, ppo_epochs=1)
    g = torch.Generator().manual_seed(4)
    q, qm = tiny_queries(g)
    _, rollout = ppo.ppo_step(policy, ref, critic, opt, count_target, q, qm, cfg, cfg.kl_coef, EOS, g)
    ended = torch.tensor([r[-1] == EOS for r in rollout["r_list"]])
    assert 0 < ended.sum() < len(ended)  # both kinds in the batch
    assert torch.equal(rollout["scores"][ended], rollout["pm_scores"][ended])
    assert (rollout["scores"][~ended] == -3.0).all()


def test_forward_policy_ignores_padding():
    policy, ref, critic, cfg, _ = tiny_setup()
    g = torch.Generator().manual_seed(1)
    q, qm = tiny_queries(g, B=4)
    resp = torch.randint(1, V, (4, 5), generator=g)
    rmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    logits, values = actor_critic.forward_policy(policy, critic, torch.cat([q, resp], 1),
                                                 torch.cat([qm.bool(), rmask], 1), q.size(1), 0.7)
    # two more pad columns on the left of the queries and three on the right of the responses
    q2, qm2 = torch.cat([torch.zeros(4, 2).long(), q], 1), torch.cat([torch.zeros(4, 2).long(), qm], 1)
    resp2 = torch.cat([resp, torch.randint(1, V, (4, 3), generator=g)], 1)
    rmask2 = torch.cat([rmask, torch.zeros(4, 3).bool()], 1)
    logits2, values2 = actor_critic.forward_policy(policy, critic, torch.cat([q2, resp2], 1),
                                                   torch.cat([qm2.bool(), rmask2], 1), q2.size(1), 0.7)
    m = rmask
    assert torch.allclose(logits2[:, :5][m], logits[m], atol=1e-5)
    assert torch.allclose(values2[:, :5][m], values[m], atol=1e-5)
    # and so the losses computed from them are unchanged
    lp, lp2 = actor_critic.logprobs_from_logits(logits, resp), actor_critic.logprobs_from_logits(logits2, resp2)
    adv, ret = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    a = ppo_losses(lp, values, lp.detach() - 0.1, values.detach(), adv[:, :5], ret[:, :5], rmask, 0.2, 0.2)
    b = ppo_losses(lp2, values2, lp2.detach() - 0.1, values2.detach(), adv, ret, rmask2, 0.2, 0.2)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_ppo_learns_a_simple_reward():
    """A tiny random policy learns to say TARGET more often, with the KL to its start staying finite."""
    policy, ref, critic, cfg, opt = tiny_setup()
    g = torch.Generator().manual_seed(2)
    history = []
    for it in range(25):
        q, qm = tiny_queries(g)
        stats, _ = ppo.ppo_step(policy, ref, critic, opt, count_target, q, qm, cfg, cfg.kl_coef, EOS, g)
        history.append(stats)
    first = sum(s["score"] for s in history[:3]) / 3
    last = sum(s["score"] for s in history[-3:]) / 3
    print(f"score {first:.2f} -> {last:.2f}, kl {history[-1]['kl']:.2f}")
    assert last > first + 1.0, (first, last)
    assert math.isfinite(history[-1]["kl"]) and 0 < history[-1]["kl"] < 50
