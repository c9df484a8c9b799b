"""Tests for evaluate.py: best-of-n selection and its KL, the unbiased estimator, the frontier fits."""

import gzip
import itertools
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import DataConfig, read_pairs
from dpo import DPOConfig, stage_dpo
from evaluate import EvalConfig, fit_bon, fit_frontiers, fit_linear, fit_rl, stage_eval
from model import GPT, GPTConfig
from ppo import PPOConfig, stage_ppo
from rs import RSConfig, best_of_n, bon_expected, bon_kl, pick_winners, stage_rs, winner_example
from runtime import load_checkpoint, model_checkpoint, save_checkpoint
from sampling import reply_lengths, rl_prompts
from tokens import Tokenizer, pad_left

torch.set_num_threads(1)


def test_best_of_n_picks_argmax():
    scores = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 5.0], [-3.0, -2.0, -1.0]])
    assert best_of_n(scores).tolist() == [1, 0, 2]


def test_rs_winner_is_the_best_finished_reply_else_the_best_cut_one():
    """Rejection sampling keeps each prompt's best finished reply; where none finished, the PM still picks
    among the cut ones (the old rule pushed cut scores down by 1e9, which float32 rounds to one value: a tie)."""
    scores = torch.tensor([[-0.5, 2.5, 1.0, 0.3], [0.1, 0.2, 3.0, -1.0], [1.5, -2.0, 0.7, 0.9]])
    ended = torch.tensor([[False, False, False, False], [True, False, False, True], [False, True, False, False]])
    assert pick_winners(scores, ended).tolist() == [1, 0, 1]


def test_rs_winner_example_keeps_a_cut_reply_whole_without_eos():
    """A winner cut at max_new_tokens is trained on every token it sampled and no EOS; a finished one on
    its reply without the stop sequence, then one EOS."""
    tok = Tokenizer()
    query, reply = tok.encode("\n\nHuman: hi\n\nAssistant:"), tok.encode(" Hello there, friend")
    ids, mask = winner_example(query, reply, False, tok, 64)
    assert ids == query + reply and mask == [0] * len(query) + [1] * len(reply)
    ids, mask = winner_example(query, reply + tok.stop_ids[0], True, tok, 64)
    assert ids == query + reply + [tok.eos_id] and sum(mask) == len(reply) + 1


def test_eval_prompts_take_the_subsets_in_turn(tmp_path):
    """rl_prompts takes the subsets in turn, each in file order: the data comes subset after subset, so the
    evaluation's first num_prompts would otherwise all be the first subset's (harmless-base, on the full set)."""
    for subset in ("harmless-base", "helpful-base"):
        (tmp_path / subset).mkdir()
        with gzip.open(tmp_path / subset / "test.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(3):
                prompt = f"\n\nHuman: {subset} question {i}?\n\nAssistant:"
                f.write(json.dumps({"chosen": prompt + " Yes.", "rejected": prompt + " No."}) + "\n")
    run = SimpleNamespace(data_dir=str(tmp_path), data=DataConfig())
    prompts = [text for text, _ in rl_prompts(run, "test", Tokenizer(), 64)]
    assert [text.split()[1] for text in prompts] == ["harmless-base", "helpful-base"] * 3
    assert len(set(prompts)) == 6


def test_reply_lengths_are_what_the_pm_reads():
    """The length-controlled win rate compares reply lengths: a reply is counted without the EOS or "\n\nHuman:"
    it ended with (what the PMs score), and a cut reply as it is."""
    tok = Tokenizer()
    reply = tok.encode(" Sure, here it is.")
    ended = [reply + [tok.eos_id], reply + tok.stop_ids[0], reply]
    assert reply_lengths(ended, tok.eos_id, tok.stop_ids).tolist() == [len(reply)] * 3


def test_bon_kl_values():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def test_bon_kl_matches_exact_and_monte_carlo_on_a_categorical():
    """Best-of-n over a categorical with K equally likely atoms of distinct reward: the exact
    distribution is q_i = (i/K)^n - ((i-1)/K)^n, and its KL tends to log n - (n-1)/n as K grows.
    A Monte-Carlo run of the real selection function gives the same KL (plug-in estimate)."""
    K, n, M = 200, 4, 200_000
    i = np.arange(1, K + 1)
    q = (i / K) ** n - ((i - 1) / K) ** n
    exact = float(np.sum(q * np.log(q * K)))
    assert exact == pytest.approx(bon_kl(n), abs=0.01) and exact <= bon_kl(n)
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(K, (M, n), generator=g)               # atom ids; reward of atom k = k
    reward = draws.float() + 0.0
    picked = draws.gather(1, best_of_n(reward)[:, None]).squeeze(1)
    q_hat = np.bincount(picked.numpy(), minlength=K) / M
    nz = q_hat > 0
    mc = float(np.sum(q_hat[nz] * np.log(q_hat[nz] * K)))
    assert mc == pytest.approx(bon_kl(n), abs=0.02)


def test_bon_expected_is_the_average_over_subsets():
    g = torch.Generator().manual_seed(1)
    P, N = 3, 6
    select, report = torch.randn(P, N, generator=g), torch.randn(P, N, generator=g)
    for n in (1, 2, 3, 6):
        est = bon_expected(select, report, n)
        for p in range(P):
            vals = [report[p, list(c)[int(select[p, list(c)].argmax())]].item()
                    for c in itertools.combinations(range(N), n)]
            assert est[p].item() == pytest.approx(np.mean(vals), abs=1e-5)
    assert torch.allclose(bon_expected(select, report, 1), report.mean(1))
    assert torch.allclose(bon_expected(select, select, N), select.max(1).values)


def test_frontier_fits_recover_parameters():
    d = np.linspace(0.1, 3.0, 12)
    b = fit_bon(d, d * (1.3 - 0.2 * d))
    assert (b["a"], b["b"]) == (pytest.approx(1.3), pytest.approx(0.2)) and b["rmse"] < 1e-9
    r = fit_rl(np.r_[0.0, d], np.r_[0.0, d * (0.9 - 0.4 * np.log(d))])
    assert (r["a"], r["b"]) == (pytest.approx(0.9), pytest.approx(0.4))
    rng = np.random.default_rng(0)
    lin = fit_linear(d, 0.5 + 0.7 * d + 0.01 * rng.standard_normal(len(d)))
    assert lin["a"] == pytest.approx(0.5, abs=0.03) and lin["b"] == pytest.approx(0.7, abs=0.03)


def test_frontier_fits_store_their_starting_reward():
    """Gao et al.'s forms fit the gain over the first point; r0 puts the curve back in reward units."""
    d = np.r_[0.0, np.linspace(0.2, 2.0, 6)]
    bon = [{"kl": x * x, "pm_a": 0.3 + x * (1.1 - 0.2 * x), "pm_b": -0.1 + 0.5 * x} for x in d]
    ppo = [{"kl": x * x, "pm_a": -0.4 + x * 0.8, "pm_b": 0.2} for x in d]
    fits = fit_frontiers(bon, ppo)
    assert fits["bon_pm_a"]["r0"] == pytest.approx(0.3) and fits["bon_pm_b"]["r0"] == pytest.approx(-0.1)
    assert fits["ppo_pm_a"]["r0"] == pytest.approx(-0.4) and fits["ppo_pm_b"]["r0"] == pytest.approx(0.2)
    assert (fits["bon_pm_a"]["a"], fits["bon_pm_a"]["b"]) == (pytest.approx(1.1), pytest.approx(0.2))
    assert "r0" not in fits["bon_pm_a_linear"]  # the linear form fits the raw reward: no offset

def test_win_rate_counts_ties_half():
    from evaluate import win_rate
    policy = torch.tensor([[1.0, 3.0]])            # (P=1, k=2)
    sft = torch.tensor([[0.0, 1.0, 2.0, 5.0]])      # (P=1, n=4)
    assert win_rate(policy, sft) == pytest.approx((1.5 + 3) / 8)


def judged(quality, length_bias, policy_len, sft_len, seed=0):
    """Synthetic PM-B scores for P prompts: quality (the policy's true edge) - length_bias * tokens + noise, for
    k policy replies and n SFT replies a prompt -> (policy scores (P, k), SFT scores (P, n))."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda x: torch.randn(x.shape, generator=g)  # noqa: E731
    return quality - length_bias * policy_len + noise(policy_len), -length_bias * sft_len + noise(sft_len)


def lengths(P, k, mean, seed):
    return torch.randint(mean - 8, mean + 9, (P, k), generator=torch.Generator().manual_seed(seed)).float()


def test_a_judge_that_only_prefers_shorter_replies_gives_an_lc_win_rate_of_one_half():
    from evaluate import lc_win_rate, win_rate
    policy_len, sft_len = lengths(400, 4, 12, 1), lengths(400, 8, 30, 2)  # the policy's replies are much shorter
    policy, sft = judged(0.0, 0.1, policy_len, sft_len)
    lc, coef = lc_win_rate(policy, sft, policy_len, sft_len)
    assert win_rate(policy, sft) > 0.85      # raw: the shortcut looks like a big win
    assert lc == pytest.approx(0.5, abs=0.03) and coef < 0


def test_a_real_quality_edge_survives_length_control():
    from evaluate import lc_win_rate, win_rate
    policy_len, sft_len = lengths(400, 4, 30, 1), lengths(400, 8, 30, 2)  # same lengths: nothing to take out
    policy, sft = judged(1.0, 0.1, policy_len, sft_len)
    lc, _ = lc_win_rate(policy, sft, policy_len, sft_len)
    assert lc > 0.7 and lc == pytest.approx(win_rate(policy, sft), abs=0.05)
    short_len = lengths(400, 4, 12, 3)  # the same edge, now also shorter: LC keeps the edge, not the length
    policy, sft = judged(1.0, 0.1, short_len, sft_len)
    assert lc_win_rate(policy, sft, short_len, sft_len)[0] == pytest.approx(lc, abs=0.05)
    assert win_rate(policy, sft) > lc + 0.1


def test_lc_win_rate_when_every_verdict_is_the_same_is_that_verdict():
    """All wins has no finite maximum-likelihood intercept (theta -> +inf: Newton's steps ended on a singular
    matrix), all losses neither (theta -> -inf), and length explains none of it: the fit's limit is the verdict
    itself, 1 or 0, with gamma = 0. Ties everywhere are 0.5, the finite maximum."""
    from evaluate import lc_win_rate
    t = torch.tensor
    assert lc_win_rate(t([[1.0]]), t([[0.0]]), t([[5.0]]), t([[5.0]])) == (1.0, 0.0)
    assert lc_win_rate(t([[1.0, 2.0]]), t([[0.0, -1.0, 0.5]]), t([[3.0, 9.0]]), t([[5.0, 6.0, 20.0]])) == (1.0, 0.0)
    assert lc_win_rate(t([[0.0, -1.0]]), t([[1.0, 2.0]]), t([[3.0, 9.0]]), t([[5.0, 4.0]])) == (0.0, 0.0)
    assert lc_win_rate(t([[1.0, 1.0]]), t([[1.0]]), t([[3.0, 9.0]]), t([[5.0]])) == (0.5, 0.0)


def test_a_bootstrap_resample_the_policy_wins_outright_is_no_error():
    """With few prompts, some bootstrap resamples hold only prompts where the policy won every comparison."""
    from evaluate import lc_win_rate, prompt_bootstrap_se
    policy, sft = (torch.tensor([[2.0, 3.0], [0.0, 1.0]]),              # (2, k)
                   torch.tensor([[0.0, 1.0, 1.5], [0.5, 2.0, -1.0]]))  # (2, n)
    policy_len, sft_len = torch.tensor([[4.0, 6.0], [5.0, 9.0]]), torch.tensor([[7.0, 3.0, 5.0], [6.0, 2.0, 8.0]])
    se = prompt_bootstrap_se(lambda *x: lc_win_rate(*x)[0], policy, sft, policy_len, sft_len, reps=50)
    assert se > 0


def test_lc_win_rate_with_ties_on_a_hand_solved_fit():
    """Four pairs, two at each length difference +-2 (so dlen / sd(dlen) = +-1): at +1 a win and a tie (mean
    verdict 3/4), at -1 a win and a loss (1/2). Two groups, two parameters: without the ridge the fit is exact,
    theta + gamma = logit(3/4) = log 3 and theta - gamma = 0, so theta = gamma = log(3) / 2 and the LC win rate
    is sigmoid(log(3) / 2) = sqrt(3) / (1 + sqrt(3))."""
    from evaluate import lc_win_rate
    policy, sft = torch.tensor([[1.0], [2.0], [1.0], [0.0]]), torch.tensor([[0.0], [2.0], [0.0], [1.0]])   # (4, 1)
    policy_len, sft_len = torch.tensor([[7.0], [7.0], [3.0], [3.0]]), torch.tensor([[5.0], [5.0], [5.0], [5.0]])
    lc, gamma = lc_win_rate(policy, sft, policy_len, sft_len, ridge=0.0)
    assert lc == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-9)
    assert gamma == pytest.approx(math.log(3) / 2, abs=1e-9)
    lc_ridge, gamma_ridge = lc_win_rate(policy, sft, policy_len, sft_len)  # the default ridge only pulls gamma in
    assert 0 < gamma_ridge < gamma and lc_ridge == pytest.approx(lc, abs=0.01)


def test_lc_win_rate_without_length_spread_is_the_raw_win_rate():
    """Every pair the same length difference: nothing separates length from quality, the ridge keeps gamma at 0,
    and theta alone fits the mean verdict: the LC win rate is the raw one, 3.5 of 6 here (ties count half)."""
    from evaluate import lc_win_rate, win_rate
    policy, sft = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    assert win_rate(policy, sft) == pytest.approx(3.5 / 6)
    for policy_len, sft_len in ((torch.full((1, 2), 7.0), torch.full((1, 3), 7.0)),     # dlen = 0
                                (torch.full((1, 2), 10.0), torch.full((1, 3), 7.0))):   # dlen = 3 everywhere
        lc, gamma = lc_win_rate(policy, sft, policy_len, sft_len)
        assert lc == pytest.approx(3.5 / 6, abs=1e-9) and gamma == pytest.approx(0.0, abs=1e-9)


def test_win_rate_standard_errors_resample_prompts_not_replies():
    """Replies to one prompt share its difficulty, so the error of a mean over P prompts x k replies is about
    sd(per-prompt means) / sqrt(P), not sd(replies) / sqrt(P k): the bootstrap must resample whole prompts."""
    from evaluate import prompt_bootstrap_se, prompt_se
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 1, generator=g) + 0.1 * torch.randn(200, 16, generator=g)  # (P, k): mostly the prompt
    mean = lambda x: x.mean().item()  # noqa: E731
    se = prompt_bootstrap_se(mean, scores, reps=400)
    assert se == pytest.approx(prompt_se(scores), rel=0.15)
    assert se > 3 * scores.std().item() / math.sqrt(scores.numel())  # what resampling single replies would give
    assert prompt_bootstrap_se(mean, scores, reps=400) == se  # seeded


def test_ppo_frontier_reads_the_last_run(tmp_path):
    from evaluate import ppo_frontier
    rows = [{"stage": "ppo", "step": s, "ppo/kl": 9.0, "ppo/pm_a": 9.0, "ppo/pm_b": 9.0} for s in range(3)]  # old run
    rows += [{"stage": "ppo", "step": s, "ppo/kl": float(s), "ppo/pm_a": 0.1 * s, "ppo/pm_b": 0.05 * s}
             for s in range(6)] + [{"stage": "rm", "step": 1}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    points = ppo_frontier(str(tmp_path), windows=3)
    assert [p["method"] for p in points] == ["sft", "ppo", "ppo", "ppo"]
    assert [p["step"] for p in points] == [0, 1, 3, 5]
    assert [p["kl"] for p in points] == [0.0, 0.5, 2.5, 4.5]


def test_the_frontier_is_in_raw_pm_a_when_ppo_optimised_the_length_debiased_one(tmp_path):
    """--ppo.length_debias: PPO's reward, logged as ppo/pm_a, is PM-A less its length trend; best-of-n and the final
    points are raw PM-A. PPO's path and its fits must be raw PM-A too (ppo/pm_a_raw), the reward it optimised kept
    beside it; rows of a debiased run that logged no raw PM-A give no PM-A point (NaN) and no PM-A fit."""
    from evaluate import ppo_frontier
    rows = [{"stage": "ppo", "step": s, "ppo/kl": float(s), "ppo/pm_a": 0.1 * s, "ppo/pm_a_raw": 1.0 + 0.3 * s,
             "ppo/pm_b": 0.05 * s} for s in range(6)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    points = ppo_frontier(str(tmp_path), windows=3)
    assert [p["pm_a"] for p in points] == pytest.approx([1.0, 1.15, 1.75, 2.35])    # windows {0, 1}, {2, 3}, {4, 5}
    assert [p["pm_a_debiased"] for p in points] == pytest.approx([0.0, 0.05, 0.25, 0.45])
    fits = fit_frontiers([], points)
    d = [math.sqrt(kl) for kl in (0.0, 0.5, 2.5, 4.5)]
    assert fits["ppo_pm_a_linear"]["a"] == pytest.approx(fit_linear(d, [1.0, 1.15, 1.75, 2.35])["a"])
    assert fits["ppo_pm_a"]["r0"] == pytest.approx(1.0)
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a debiased run logged before PPO logged raw PM-A
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "ppo/pm_a_raw"}) + "\n" for r in rows)
    old = ppo_frontier(str(tmp_path), windows=3, debiased=True)
    assert all(math.isnan(p["pm_a"]) for p in old) and [p["pm_a_debiased"] for p in old] == pytest.approx(
        [0.0, 0.05, 0.25, 0.45])
    fits = fit_frontiers([], old)
    assert "ppo_pm_a" not in fits and "ppo_pm_a_linear" not in fits and "ppo_pm_b" in fits
    assert [p["pm_a"] for p in ppo_frontier(str(tmp_path), windows=3)] == pytest.approx([0.0, 0.05, 0.25, 0.45])


# ----------------------------------------------------------------------------------------------
# the stages, on tiny checkpoints written here (sft.pt, and PMs in reward.py's checkpoint layout)

from dataclasses import dataclass, field  # noqa: E402

from runtime import Run  # noqa: E402



@dataclass
class RunConfig(Run):  # the shared values the stages get (runtime.Run), and the sections these tests pass them
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=lambda: DataConfig(vocab="trimmed"))
    rs: RSConfig = field(default_factory=lambda: RSConfig(
        n=4, num_prompts=8, max_new_tokens=6, sample_batch_size=16, max_steps=4, batch_size=4, eval_interval=2,
        eval_batches=1, log_interval=1, warmup_steps=1))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        iterations=3, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6, save_every=2, sample_every=2))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(max_steps=3, batch_size=4, eval_interval=2))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(
        num_prompts=6, n=4, max_new_tokens=6, policy_samples=2, batch_size=16, num_examples=2))


def write_tiny_run(hh_dir, out):
    """sft.pt and pm_{a,b}.pt for a 1-layer GPT over the test data's trimmed vocabulary."""
    os.makedirs(out, exist_ok=True)
    pairs, _ = read_pairs(hh_dir, "train", DataConfig())
    tok = Tokenizer.trimmed([p.prompt + p.chosen + p.rejected for p in pairs])
    gcfg = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    torch.manual_seed(0)
    save_checkpoint(os.path.join(out, "sft.pt"), model_checkpoint(GPT(gcfg), tok, done=True))
    for name in ("pm_a", "pm_b"):
        state = GPT(gcfg).state_dict()
        state.update({"head.weight": 0.1 * torch.randn(1, 16), "head.bias": torch.zeros(1)})
        save_checkpoint(os.path.join(out, f"{name}.pt"), {"model": state, "model_args": gcfg.__dict__,
                        "tokenizer": tok.state_dict(), "reward_gain": 2.0, "reward_bias": -0.5, "done": True})
    return tok


def test_rs_ppo_eval_stages_on_tiny_checkpoints(hh_dir, tmp_path):
    out = str(tmp_path / "out")
    write_tiny_run(hh_dir, out)
    json.dump({"pm": {"accuracy": 0.6}}, open(os.path.join(out, "eval.json"), "w"))
    cfg = RunConfig(out_dir=out, data_dir=hh_dir)
    stage_rs(cfg, cfg.rs, cfg.ppo)
    assert load_checkpoint(os.path.join(out, "rs.pt"))["done"]
    stage_ppo(cfg, cfg.ppo)
    ck = load_checkpoint(os.path.join(out, "ppo.pt"))
    assert ck["done"] and ck["iteration"] == 3 and "critic" in ck and "optimizer" in ck and "rng" in ck
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    ppo_rows = [r for r in rows if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo_rows] == [0, 1, 2]
    assert {"ppo/pm_a", "ppo/pm_b", "ppo/kl", "ppo/sqrt_kl", "ppo/kl_coef", "ppo/entropy", "ppo/clipfrac",
            "ppo/approx_kl", "ppo/vf_loss", "ppo/explained_var", "ppo/reply_len", "ppo/eos_rate"} <= set(ppo_rows[0])
    assert ppo_rows[0]["ppo/kl"] == pytest.approx(0, abs=1e-4)
    stage_dpo(cfg, cfg.dpo)
    ck = load_checkpoint(os.path.join(out, "dpo.pt"))
    assert ck["done"] and ck["beta"] == 0.1 and ck["steps"] == 3 and set(ck["model"]) == set(GPT(
        GPTConfig(**ck["model_args"])).state_dict())  # a plain GPT's weights: the reference is not saved
    ev = stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)
    saved = json.load(open(os.path.join(out, "eval.json")))
    assert saved["pm"] == {"accuracy": 0.6} and set(saved["policies"]) == {"sft", "bon", "rs", "ppo", "dpo"}
    assert saved["policies"]["dpo"]["beta"] == 0.1
    for p in saved["policies"].values():
        assert {"pm_reward", "heldout_pm_reward", "kl", "win_rate_vs_sft", "lc_win_rate_vs_sft", "judge_length_coef",
                "mean_reply_tokens"} <= set(p)
        assert 0 <= p["lc_win_rate_vs_sft"] <= 1 and p["win_rate_se"] >= 0 and p["lc_win_rate_se"] >= 0
    assert saved["policies"]["bon"]["n"] == 4 and saved["policies"]["bon"]["kl_analytic"] == pytest.approx(bon_kl(4))
    assert ev["policies"] == saved["policies"] and saved["temperature"] == 1.0
    for p in saved["policies"].values():
        assert 0 <= p["win_rate_vs_sft"] <= 1 and p["pm_reward_se"] > 0 and p["heldout_pm_reward_se"] > 0
        assert p["mean_reply_tokens"] <= 6 and p["temperature"] == 1.0
    assert saved["policies"]["bon"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    frontier = [json.loads(line) for line in open(os.path.join(out, "frontier.jsonl"))]
    assert {"bon", "ppo", "dpo_final"} <= {p["method"] for p in frontier}
    assert all({"method", "kl", "sqrt_kl", "pm_a", "pm_b"} <= set(p) for p in frontier)
    assert "| ppo |" in open(os.path.join(out, "report.md")).read()
    # done stages are skipped; --force reruns
    mtime = os.path.getmtime(os.path.join(out, "ppo.pt"))
    stage_ppo(cfg, cfg.ppo)
    assert os.path.getmtime(os.path.join(out, "ppo.pt")) == mtime


def test_length_debiased_ppo_logs_raw_pm_a_and_the_frontier_plots_it(hh_dir, tmp_path, monkeypatch):
    """With --ppo.length_debias PPO logs its reward as ppo/pm_a and raw PM-A as ppo/pm_a_raw: their gap is the
    length trend, length_coef * (mean reply tokens - length_mean), a reply counted as the PM reads it (no EOS or
    stop sequence). eval's frontier reads PPO's path in raw PM-A, the unit of best-of-n's curve."""
    import ppo
    from sampling import strip_end
    out = str(tmp_path / "out")
    tok = write_tiny_run(hh_dir, out)
    ckpt = load_checkpoint(os.path.join(out, "pm_a.pt"))
    save_checkpoint(os.path.join(out, "pm_a.pt"), {**ckpt, "length_coef": -0.25, "length_mean": 3.0})
    replies, real = [], ppo.ppo_step
    monkeypatch.setattr(ppo, "ppo_step", lambda *a, **k: (lambda r: replies.append(r[1]["r_list"]) or r)(real(*a, **k)))
    cfg = RunConfig(out_dir=out, data_dir=hh_dir)
    cfg.ppo.length_debias = True
    stage_ppo(cfg, cfg.ppo)
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["stage"] == "ppo"]
    assert len(rows) == len(replies) == 3
    for row, r_list in zip(rows, replies):
        tokens = np.mean([len(strip_end(r, tok.eos_id, tok.stop_ids)) for r in r_list])
        assert row["ppo/pm_a_raw"] - row["ppo/pm_a"] == pytest.approx(-0.25 * (tokens - 3.0), abs=1e-5)
    cfg.eval.frontier_windows = 3
    stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)
    path = [p for p in map(json.loads, open(os.path.join(out, "frontier.jsonl"))) if p["method"] in ("sft", "ppo")]
    assert [p["pm_a"] for p in path] == pytest.approx([rows[0]["ppo/pm_a_raw"]] + [r["ppo/pm_a_raw"] for r in rows])
    assert [p["pm_a_debiased"] for p in path] == pytest.approx([rows[0]["ppo/pm_a"]] + [r["ppo/pm_a"] for r in rows])


def test_ppo_resume_is_exact(hh_dir, tmp_path, monkeypatch):
    """A run stopped after its iteration-2 checkpoint and resumed ends with the same weights as a
    straight run: rollouts and minibatch order are pure functions of (seed, iteration)."""
    import ppo
    finals = []
    for name, crash in (("straight", False), ("resumed", True)):
        out = str(tmp_path / name)
        write_tiny_run(hh_dir, out)
        cfg = RunConfig(out_dir=out, data_dir=hh_dir)
        cfg.ppo.iterations, cfg.ppo.save_every, cfg.ppo.judge_every = 3, 2, 0
        if crash:
            real, calls = ppo.ppo_step, []

            def crashing(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise KeyboardInterrupt
                return real(*args, **kwargs)
            monkeypatch.setattr(ppo, "ppo_step", crashing)
            with pytest.raises(SystemExit):
                stage_ppo(cfg, cfg.ppo)
            assert load_checkpoint(os.path.join(out, "ppo.pt"))["iteration"] == 2
            monkeypatch.setattr(ppo, "ppo_step", real)
        stage_ppo(cfg, cfg.ppo)
        finals.append(load_checkpoint(os.path.join(out, "ppo.pt")))
    for key in ("model", "critic"):
        assert all(torch.equal(finals[0][key][k], finals[1][key][k]) for k in finals[0][key])
    assert finals[1]["iteration"] == 3 and finals[1]["done"]


def test_sample_logprobs_are_the_sampler_logprobs_at_its_temperature():
    """The KL estimate reads log pi(reply) from a full forward at the sampling temperature: it must equal
    what the sampler reported for the tokens it drew, at that temperature."""
    from actor_critic import sample_logprobs
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16)).eval()
    queries = [[5, 6, 7], [8, 9, 10, 11, 12]]
    for T in (0.5, 1.7):
        idx, mask = pad_left(queries, 0)
        tokens, logprobs, keep = model.generate(idx, mask, 6, temperature=T, generator=torch.Generator().manual_seed(1))
        replies = [t[k].tolist() for t, k in zip(tokens, keep)]
        want = (logprobs * keep).sum(1)
        torch.testing.assert_close(sample_logprobs(model, queries, replies, 2, 0, T), want, atol=1e-4, rtol=0)


def test_eval_samples_and_measures_kl_at_the_temperature_ppo_trained_at(hh_dir, tmp_path, monkeypatch):
    """ppo.pt records the temperature PPO sampled and computed its KL penalty at; eval uses it for every
    policy (whatever --ppo.temperature says now) and says so in eval.json. With the SFT weights as the
    "PPO" policy, the KL measured at that one temperature is 0."""
    out = str(tmp_path / "out")
    write_tiny_run(hh_dir, out)
    sft = load_checkpoint(os.path.join(out, "sft.pt"))
    save_checkpoint(os.path.join(out, "ppo.pt"), {**sft, "config": {"temperature": 0.5}, "iteration": 3})
    temperatures, real = [], GPT.generate
    monkeypatch.setattr(GPT, "generate",
                        lambda self, *a, **k: temperatures.append(k["temperature"]) or real(self, *a, **k))
    cfg = RunConfig(out_dir=out, data_dir=hh_dir)
    ev = stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)
    assert temperatures and set(temperatures) == {0.5}
    assert ev["temperature"] == 0.5 and ev["policies"]["ppo"]["temperature"] == 0.5
    assert ev["policies"]["ppo"]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_best_of_n_is_compared_with_sft_replies_its_picker_did_not_see(hh_dir, tmp_path, monkeypatch):
    """Best-of-n's win rate is P(its pick beats a fresh SFT reply). Compared with the n samples it was picked
    from, one comparison is the pick itself (a tie) and the rest are replies PM-A ranked below it: so the pick's
    PM-B score must be none of the baseline's for its prompt. Its pool is its own n draws: the row is the PM-A
    argmax of that pool, the best-of-n curve's top point (the estimator at n = N) the same pool's."""
    import evaluate
    out = str(tmp_path / "out")
    write_tiny_run(hh_dir, out)
    rows, real = {}, evaluate.policy_row
    monkeypatch.setattr(evaluate, "policy_row", lambda a, b, *rest: rows.setdefault(len(rows), (a, b, *rest)) and
                        real(a, b, *rest))
    cfg = RunConfig(out_dir=out, data_dir=hh_dir)
    ev = stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)
    (_, b_sft, *_), (a_bon, b_bon, _, _, _, b_baseline, _) = rows[0], rows[1]  # sft's row, then bon's
    assert torch.equal(b_baseline, b_sft) and a_bon.shape == (6, 1)
    assert not any(b_bon[p, 0].item() in b_sft[p].tolist() for p in range(6))
    top = ev["bon_curve"][-1]
    assert top["n"] == 4 and top["pm_a"] == pytest.approx(ev["policies"]["bon"]["pm_reward"], abs=1e-6)
    assert top["pm_b"] == pytest.approx(ev["policies"]["bon"]["heldout_pm_reward"], abs=1e-6)
    assert ev["policies"]["bon"]["baseline_unseen"] is True


def test_a_policy_row_does_not_depend_on_which_other_policies_were_evaluated(hh_dir, tmp_path):
    """Each policy samples from its own seeded generator: retraining or removing one policy must not move
    another's numbers, or a before/after comparison of eval.json would blame the wrong change."""
    out = str(tmp_path / "out")
    write_tiny_run(hh_dir, out)
    sft = load_checkpoint(os.path.join(out, "sft.pt"))
    for name in ("rs", "ppo"):
        save_checkpoint(os.path.join(out, f"{name}.pt"), sft)
    cfg = RunConfig(out_dir=out, data_dir=hh_dir)
    both = stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)["policies"]
    os.remove(os.path.join(out, "rs.pt"))
    alone = stage_eval(cfg, cfg.eval, cfg.ppo, cfg.dpo)["policies"]
    assert "rs" not in alone and alone["ppo"] == both["ppo"] and alone["sft"] == both["sft"]


def test_bradley_terry_recovers_known_strengths_from_synthetic_verdicts():
    """Verdicts drawn from P(i beats j) = sigmoid(s_i - s_j) give back s (player 0 the reference at 0)."""
    from pm_metrics import bradley_terry
    rng = np.random.default_rng(0)
    true = np.array([0.0, 1.0, -0.5, 2.0])
    first = rng.integers(0, 4, 20000)
    second = (first + rng.integers(1, 4, 20000)) % 4
    y = (rng.random(20000) < 1 / (1 + np.exp(true[second] - true[first]))).astype(float)
    s, gamma = bradley_terry(first, second, y, 4)
    assert s == pytest.approx(true, abs=0.08) and gamma == 0.0


def test_bradley_terry_with_length_takes_out_a_judge_that_likes_short_replies():
    """Player 1 is no better than player 0 but writes shorter replies, which the judge prefers: the raw strength
    credits it, the length-controlled one does not."""
    from pm_metrics import bradley_terry
    rng = np.random.default_rng(1)
    first, second = np.ones(20000, dtype=int), np.zeros(20000, dtype=int)
    dlen = rng.normal(-2.0, 1.0, 20000)                        # player 1's reply minus player 0's, in tokens / 10
    y = (rng.random(20000) < 1 / (1 + np.exp(0.8 * dlen))).astype(float)  # P(win) = sigmoid(-0.8 dlen)
    raw, _ = bradley_terry(first, second, y, 2)
    lc, gamma = bradley_terry(first, second, y, 2, dlen)
    assert raw[1] > 1.0 and abs(lc[1]) < 0.1 and gamma == pytest.approx(-0.8 * dlen.std(), abs=0.05)


def test_elo_table_ranks_policies_by_the_judge_with_the_reference_at_zero():
    """Three policies on the same 40 prompts whose judge scores are ordered best > ref > worst on every prompt: the Elo
    table puts the reference at 0, the others on either side, each inside its bootstrap interval."""
    from evaluate import elo_table
    torch.manual_seed(0)
    noise = torch.randn(40, 4)
    scores = {"sft": noise, "best": noise + 3.0, "worst": noise - 3.0}
    lengths = {k: torch.full((40, 4), 20.0) + torch.randint(0, 5, (40, 4)) for k in scores}
    table = elo_table(scores, lengths, reps=50)
    assert table["sft"]["elo"] == 0.0 and table["worst"]["elo"] < -200 < 200 < table["best"]["elo"]
    for row in table.values():
        assert row["elo_ci"][0] <= row["elo"] <= row["elo_ci"][1]
        assert row["lc_elo_ci"][0] <= row["lc_elo"] <= row["lc_elo_ci"][1]


def test_eval_measures_the_online_rounds_once_online_has_run(tmp_path):
    """After `rlhf.py online`, eval samples each round's policy too (online.json names them), so its Elo table holds
    every policy; before it, only the flow's."""
    from dpo import DPOConfig
    from evaluate import policy_paths
    assert list(policy_paths(str(tmp_path), DPOConfig())) == ["cd", "rs", "ppo", "dpo"]
    (tmp_path / "online.json").write_text(json.dumps({"config": {"rounds": 2, "method": "ppo"}}))
    paths = policy_paths(str(tmp_path), DPOConfig(betas="0.3"))
    assert list(paths) == ["cd", "rs", "ppo", "dpo", "dpo_beta0.3", "online1", "online2"]
    assert paths["online2"] == os.path.join(str(tmp_path), "online", "round2", "ppo.pt")
