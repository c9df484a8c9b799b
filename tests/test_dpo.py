"""DPO (dpo.py): the loss is log 2 where it starts, the implicit reward is beta times the reply's log-ratio
summed over its tokens and EOS (never a prompt or pad token), and a step of the loss raises the chosen
reply against the rejected one. The stage's own path is checked against a hand computation: rm.pair_step's loss
(split into micro-batches or not), rm.validate's rewards and loss, and train_pm's reported validation loss.
Resume is in test_resume.py, torchrun in test_ddp.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpo import DPOConfig, DPOPolicy, betas, dpo_loss, implicit_rewards, pm_config
from model import GPT, GPTConfig
from reward import score_pairs
from rm import pair_batch, pair_step, train_pm, validate
from runtime import ConfigError, Run, batch_rows, grad_scaler
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
        lp, lr = (F.log_softmax(GPT.forward(m, torch.tensor([ids]))[0][0, 3].float(), -1)[0].item()
                  for m in (policy, ref))
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


def stage_examples():
    """Half-A-style pairs as the stage builds them (tokens.dpo_example): replies that fit (EOS), one cut at
    max_reply_tokens (no EOS), prompts left-truncated to fit the block."""
    pairs = [("hello there", "fine, thanks", "go away"), ("what is two plus two", "four", "five, or six, or more"),
             ("a long question " * 3, "short", "a much longer reply than the limit")]
    return [dpo_example(p, c, r, Tok(), block_size=24, max_reply_tokens=10) for p, c, r in pairs]


def hand_dpo(policy, ref, examples, beta=0.5):
    """Each reply's implicit reward beta (log pi - log pi_ref), summed from the prompt's end on with the slow
    one-sequence-at-a-time forward: (chosen rewards, rejected rewards, mean loss -log sigmoid(r_c - r_r))."""
    reward = lambda ids, n: beta * (hand_logprob(policy, ids, n) - hand_logprob(ref, ids, n))  # noqa: E731
    r_c, r_r = [reward(c, n) for c, _, n in examples], [reward(r, n) for _, r, n in examples]
    return r_c, r_r, sum(math.log1p(math.exp(b - a)) for a, b in zip(r_c, r_r)) / len(examples)


def test_the_stage_trains_on_the_hand_computed_loss_and_validates_on_the_same_rewards():
    """rm.pair_step (the training step train_pm runs, whole or in micro-batches) and rm.validate (its early-stopping
    signal, through reward.score_pairs' own reply masks) must see the same implicit rewards: beta times the
    log-ratio summed over the reply and its EOS, which the hand computation reads from plain forwards. Rewards are
    compared one by one: a token of the shared prompt counted in one path cancels in the loss, not in a reward."""
    ref, policy = tiny_models(move=0.3)
    examples = stage_examples()
    assert examples[2][1][-1] != Tok.eos_id and examples[0][1][-1] == Tok.eos_id  # a cut reply and a finished one
    r_c, r_r, want = hand_dpo(policy, ref, examples)
    margins = [a - b for a, b in zip(r_c, r_r)]
    assert max(abs(m) for m in margins) > 1e-2  # the policy moved: the check compares something
    rc, scaler = pm_config(DPOConfig()), grad_scaler("cpu")
    batch = pair_batch(examples, 0, len(examples), 0, Tok.eos_id)
    order = batch_rows(len(examples), 0, len(examples), 0)    # the batch's pairs, as pair_batch drew them
    with torch.no_grad():
        trained = policy(*batch[:3], reply_mask=batch[3])[0]  # (2B,) chosen rows, then rejected
    assert trained.tolist() == pytest.approx([r_c[i] for i in order] + [r_r[i] for i in order], abs=1e-5)
    assert [*np.concatenate(score_pairs(policy, examples, Tok.eos_id, 2))] == pytest.approx(r_c + r_r, abs=1e-5)
    grads = []
    for micro_tokens in (0, 40):  # one group, then the pairs in groups of at most 40 tokens
        policy.zero_grad()
        loss = pair_step(policy, batch, "dpo", rc, Run(device="cpu", micro_tokens=micro_tokens), scaler)
        assert loss.item() == pytest.approx(want, abs=1e-5)
        grads.append([p.grad.clone() for p in policy.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    accuracy, val_loss = validate(policy, examples, Tok.eos_id, batch_size=2)
    assert val_loss == pytest.approx(want, abs=1e-5)
    assert accuracy == pytest.approx(sum(m > 0 for m in margins) / len(margins))


def test_train_pm_reports_the_validation_loss_of_the_weights_it_keeps():
    """The stage's loop (rm.train_pm, as stage_dpo calls it) ends with the best validation's weights, and the loss
    it reports is theirs, by the hand computation. Validated on the training pairs flipped, a validation loss
    that rises as training lowers the training loss: the best is the first validation (step 2 of 4), not the last."""
    ref, policy = tiny_models()
    train_ex = stage_examples()
    val_ex = [(r, c, n) for c, r, n in train_ex]
    rc = pm_config(DPOConfig(max_steps=4, batch_size=3, eval_interval=2, lr=1e-2, warmup_steps=1))
    info = train_pm(Run(device="cpu", seed=0), rc, policy, Tok(), train_ex, val_ex, "dpo")
    assert info["best_step"] == 2 and info["val_loss"] > math.log(2) + 1e-3  # it moved, away from the flipped pairs
    assert info["val_loss"] == pytest.approx(hand_dpo(policy, ref, val_ex)[2], abs=1e-5)


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
