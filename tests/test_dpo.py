"""DPO (dpo.py): the loss is log 2 where it starts, the implicit reward is beta times the reply's log-ratio
summed over its tokens and EOS (never a prompt or pad token), and a step of the loss raises the chosen
reply against the rejected one. Resume is in test_resume.py, torchrun in test_ddp.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from dpo import DPOPolicy, betas, dpo_loss, implicit_rewards
from model import GPT, GPTConfig
from rm import pair_batch
from runtime import ConfigError
from tokens import dpo_example


class Tok:
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 50 + 1 for c in text]


def tiny_models(move=0.0):
    """A reference GPT and a DPOPolicy (beta 0.5) with its weights, each then moved by move * N(0, 1) (so that
    the log-ratios are not 0)."""
    torch.manual_seed(0)
    ref = GPT(GPTConfig(block_size=32, vocab_size=60, n_layer=1, n_head=2, n_embd=16))
    policy = DPOPolicy(ref.config, ref, beta=0.5)
    policy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(move * torch.randn_like(p))
    return ref, policy


EXAMPLES = [([5, 6, 7, 8, 9, 0], [5, 6, 7, 11, 0], 3), ([21, 22, 23, 24], [21, 30, 31, 32, 33, 34, 0], 1)]


def hand_logprob(model, ids, start):
    """The slow reference: log p(ids[t] | ids[:t]) summed over t >= start, for one unpadded sequence, from the
    plain GPT forward's full (1, T, V) logits (GPT.forward, also for a DPOPolicy, whose forward scores)."""
    with torch.no_grad():
        logits, _ = GPT.forward(model, torch.tensor([ids]))
    logp = F.log_softmax(logits[0].float(), -1)                              # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_the_loss_is_log_2_while_the_policy_is_its_reference():
    _, policy = tiny_models()
    idx, mask, labels, reply_mask = pair_batch(EXAMPLES, 0, 2, 0, 0)
    rewards, loss = policy(idx, mask, labels, reply_mask=reply_mask)
    assert torch.equal(rewards, torch.zeros(4))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_the_loss_on_a_hand_made_example():
    # chosen: log pi - log pi_ref = -3 - (-4) = 1; rejected: -5 - (-4.5) = -0.5; beta 0.1 -> margin 0.15
    assert implicit_rewards(torch.tensor([-3.0]), torch.tensor([-4.0]), 0.1).item() == pytest.approx(0.1)
    loss = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), 0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)


def test_implicit_rewards_sum_the_reply_tokens_only_and_ignore_padding():
    """Each row's reward, batched with right padding, equals beta * (policy - reference) log-probs of its reply
    tokens and EOS, computed one unpadded sequence at a time; prompt tokens never count."""
    ref, policy = tiny_models(move=0.3)
    idx, mask, labels, reply_mask = pair_batch(EXAMPLES, 0, 2, 0, 0)  # rows: chosen 0, 1, then rejected 0, 1
    rewards, _ = policy(idx, mask, labels, reply_mask=reply_mask)
    rows = [(ex[0], ex[2]) for ex in EXAMPLES] + [(ex[1], ex[2]) for ex in EXAMPLES]
    for r, (ids, start) in enumerate(rows):
        want = 0.5 * (hand_logprob(policy, ids, start) - hand_logprob(ref, ids, start))
        assert rewards[r].item() == pytest.approx(want, abs=1e-5)
    assert any(abs(x) > 1e-3 for x in rewards.tolist())  # the policy did move: the check compares something
    assert reply_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 0] and reply_mask[3].tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_a_prompt_token_changes_the_context_but_its_own_log_prob_never_counts():
    """Summing from the reply on: the reward depends on the prompt only through the reply's conditional
    log-probs. With a one-token reply, it is exactly that token's log-ratio, whatever the prompt's likelihood."""
    ref, policy = tiny_models(move=0.3)
    ids = [3, 4, 5, 6, 0]
    idx, mask, labels, reply_mask = pair_batch([(ids, ids, 4)], 0, 1, 0, 0)
    rewards, _ = policy(idx, mask, labels, reply_mask=reply_mask)
    with torch.no_grad():
        lp, lr = (F.log_softmax(GPT.forward(m, torch.tensor([ids]))[0][0, 3].float(), -1)[0].item() for m in (policy, ref))
    assert rewards[0].item() == pytest.approx(0.5 * (lp - lr), abs=1e-5)


def test_a_gradient_step_raises_the_chosen_reply_against_the_rejected_one():
    ref, policy = tiny_models()
    idx, mask, labels, reply_mask = pair_batch(EXAMPLES, 0, 2, 0, 0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)  # a small step: the first-order effect
    margin = lambda r: (r[:2] - r[2:]).mean().item()  # noqa: E731 implicit reward chosen - rejected
    rewards, loss = policy(idx, mask, labels, reply_mask=reply_mask)
    assert margin(rewards) == 0
    loss.backward()
    optimizer.step()
    after, new_loss = policy(idx, mask, labels, reply_mask=reply_mask)
    assert margin(after) > 1e-3 and new_loss.item() < math.log(2)
    assert all(p.grad is None for p in ref.parameters())  # the reference is frozen


def test_dpo_example_truncates_the_shared_prompt_the_same_for_both_replies():
    chosen, rejected, n = dpo_example("abcdefghij", "xy", "pqrstu", Tok(), block_size=8, max_reply_tokens=4)
    assert n == 4 and chosen[:n] == rejected[:n] == Tok().encode("ghij")  # room left by the longer reply
    assert chosen[n:] == Tok().encode("xy") + [0]      # EOS: the reply fit
    assert rejected[n:] == Tok().encode("pqrs")        # cut at max_reply_tokens: no EOS
    assert len(rejected) <= 8


def test_betas_name_the_sweep_and_refuse_bad_values():
    cfg = type("C", (), {"beta": 0.1, "betas": "0.03, 0.1,0.3"})
    assert betas(cfg) == [("dpo", 0.1), ("dpo_beta0.03", 0.03), ("dpo_beta0.3", 0.3)]
    for bad in ("0.1,x", "-1"):
        cfg.betas = bad
        with pytest.raises(ConfigError, match="--dpo.beta"):
            betas(cfg)
