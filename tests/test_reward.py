"""Tests for reward.py: loss math vs loops, metrics on hand-made inputs, PM behaviour on tiny data."""
import gzip
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import model
import pm_metrics
import reward
import rm
import runtime
import tokens
from data import read_pairs
from ppo import PPOConfig
from sampling import strip_end

torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared 2-core box


# --- losses -------------------------------------------------------------------

def test_ranking_loss_matches_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(7, generator=g), torch.randn(7, generator=g)
    margin, coef = 0.3, 0.05
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - margin)))) + coef * (c + r) ** 2
               for c, r in zip(rc.tolist(), rr.tolist())) / 7
    got = reward.ranking_loss(rc, rr, margin=margin, center_coef=coef).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_ranking_loss_invariant_to_shared_constant():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(5, generator=g), torch.randn(5, generator=g)
    base = reward.ranking_loss(rc, rr)
    assert reward.ranking_loss(rc + 3.7, rr + 3.7).item() == pytest.approx(base.item(), rel=1e-6)


# --- metrics ------------------------------------------------------------------

def test_wilson_interval_known_value():
    lo, hi = pm_metrics.wilson_interval(50, 100)            # textbook: p=0.5, n=100 -> [0.404, 0.596]
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert pm_metrics.pair_accuracy([1, 2, 3, 0], [0, 2, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_calibration_bins_and_ece_by_hand():
    # bin [0.2,0.3): two predictions 0.25, one positive -> conf .25, freq .5
    # bin [0.9,1.0]: two predictions 0.95 and 1.0, both positive -> conf .975, freq 1
    probs, labels = [0.25, 0.25, 0.95, 1.0], [1, 0, 1, 1]
    bins, ece = pm_metrics.calibration(probs, labels, n_bins=10)
    assert [b["n"] for b in bins] == [0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    assert bins[2]["freq"] == 0.5 and bins[9]["conf"] == pytest.approx(0.975)
    assert ece == pytest.approx(0.5 * 0.25 + 0.5 * 0.025)
    _, perfect = pm_metrics.calibration([0.0, 1.0], [0, 1])
    assert perfect == 0.0


def test_score_kl_by_hand():
    x = np.random.default_rng(0).normal(size=500)
    assert pm_metrics.score_kl(x, 10 * x + 3) == pytest.approx(0.0, abs=1e-12)  # same up to scale/shift
    # two bins over [-1, 1] after standardising; A = {-1, 1} (1 each), B = {-1 x3, 1 x1}
    a, b = np.array([-1.0, 1.0]), np.array([-1.0, -1.0, -1.0, 1.0])
    zb = (b - b.mean()) / b.std()                  # [-0.577 x3, 1.732] -> counts [3, 1]
    assert (zb < 0).sum() == 3
    p, q = np.array([1 + 1, 1 + 1]) / 4, np.array([3 + 1, 1 + 1]) / 6  # alpha = 1 smoothing
    want = float(np.sum(p * np.log(p / q)))
    assert pm_metrics.score_kl(a, b, n_bins=2, lim=1.0, alpha=1.0) == pytest.approx(want)


def test_score_kl_interval_resamples_pairs_and_narrows_with_more_of_them():
    """The size study compares KLs across PM sizes: only their intervals say whether a difference is real."""
    rng = np.random.default_rng(0)
    a_c, a_r = rng.normal(size=(2, 400))
    assert pm_metrics.score_kl_ci(a_c, a_r, 3 * a_c + 1, 3 * a_r + 1) == [0.0, 0.0]  # the same PM, rescaled
    skew = lambda x: x + 0.4 * x ** 2 + 0.3 * rng.normal(size=x.shape)  # noqa: E731  B spreads replies unlike A
    b_c, b_r = skew(a_c), skew(a_r)
    lo, hi = pm_metrics.score_kl_ci(a_c, a_r, b_c, b_r)
    assert 0 < lo < pm_metrics.score_kl(np.r_[a_c, a_r], np.r_[b_c, b_r]) < hi
    lo100, hi100 = pm_metrics.score_kl_ci(a_c[:100], a_r[:100], b_c[:100], b_r[:100])
    assert hi100 - lo100 > 1.2 * (hi - lo)  # a quarter of the pairs: wider (less than 2x: the smoothing)
    assert pm_metrics.score_kl_ci(a_c, a_r, b_c, b_r) == [lo, hi]  # seeded


@pytest.mark.parametrize("skew, want_kl", [(0.0, 0.0), (0.1, 0.0179)])
def test_score_kl_interval_covers_the_population_kl(skew, want_kl):
    """Coverage on a case with a known answer. PM-A's scores of a population of 100,000 pairs are N(0, 1), PM-B's
    a noisy copy, N(0, 1) as well, then skewed by `skew`. With skew 0 the two PMs spread replies alike: their KL
    is 0 however the scores are binned and smoothed. With skew 0.1 it is score_kl on the whole population with
    the smoothing of 150 pairs (alpha scaled to the population: 667 pseudo-counts a bin over 200,000 scores is
    1 over 300 scores): 0.018, where 150 pairs' estimate averages 0.053. Over 30 test sets of 150 pairs nearly
    every 95% interval holds it; percentile intervals, above the upward-biased estimate, held it 0 times in 30."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100_000, 2))                                           # (pairs, chosen/rejected)
    b = 0.6 * a + 0.8 * rng.normal(size=a.shape)
    b = b + skew * b ** 2
    kl = pm_metrics.score_kl(a.ravel(), b.ravel(), alpha=a.size / 300)
    assert kl == pytest.approx(want_kl, abs=2e-4)
    covered = 0
    for _ in range(30):
        i = rng.integers(0, len(a), 150)
        lo, hi = pm_metrics.score_kl_ci(a[i, 0], a[i, 1], b[i, 0], b[i, 1])
        covered += lo <= kl <= hi
    assert covered >= 26


def test_bag_of_tokens_learns_a_marker_token_and_is_symmetric():
    """The chosen reply holds token 7, the rejected one does not (both of random length): the
    lexical baseline must find it, and swapping the replies must flip every prediction."""
    g = np.random.default_rng(0)
    reply = lambda marker: g.integers(10, 60, int(g.integers(3, 12))).tolist() + ([7] if marker else [])
    pairs = lambda n: [(reply(True), reply(False)) for _ in range(n)]
    train, val, test = pairs(60), pairs(20), pairs(50)
    bow = pm_metrics.bag_of_tokens_baseline(train, val, test)
    assert bow["accuracy"] == 1.0 and bow["features"] == len({t for c, r in train for t in c + r}) + 1
    assert pm_metrics.bag_of_tokens_baseline(train, val, [(r, c) for c, r in test])["accuracy"] == 0.0


def test_report_text_names_a_skipped_baseline():
    """A test-only directory has no train split to fit the bag of tokens on: the report says so."""
    g = np.random.default_rng(0)
    a_c, a_r, b_c, b_r = (g.normal(size=40) for _ in range(4))
    pm = pm_metrics.pm_report([1, 2, 3, 5] * 10, g.integers(1, 50, 40), g.integers(1, 50, 40), a_c, a_r, b_c, b_r)
    text = pm_metrics.format_report(dict(pm, data_dir="DIR", bag_of_tokens_skipped="DIR: no train split"))
    assert "test pairs 40 (DIR)" in text and "bag of tokens     skipped: DIR: no train split" in text


def test_decile_agreement_counts():
    a_c = np.arange(10.0)
    a_r = a_c - 0.5                                  # A always prefers chosen
    b_c = a_c.copy()
    b_r = np.where(a_c >= 5, a_c + 1, a_c - 1)       # B disagrees on the top half
    rows = pm_metrics.decile_agreement(a_c, a_r, b_c, b_r, n_bins=2)
    assert [r["agreement"] for r in rows] == [1.0, 0.0] and [r["n"] for r in rows] == [5, 5]


def test_normalization_gives_mean0_std1():
    raw = np.random.default_rng(0).normal(4.0, 3.0, size=200)
    gain, bias = reward.fit_normalization(raw)
    z = gain * raw + bias
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0, abs=1e-6)
    gain, bias = reward.fit_normalization(raw, scale=False)
    assert gain == 1.0 and (raw + bias).mean() == pytest.approx(0.0, abs=1e-9)


# --- the model ------------------------------------------------------------------

def tiny_pm(seed=0, vocab=50, block=32):
    torch.manual_seed(seed)
    return reward.RewardModel(model.GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2,
                                              n_embd=16)).eval()


def test_score_read_at_eos_and_unchanged_by_padding():
    pm = tiny_pm()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (n,), generator=g).tolist() + [0] for n in (5, 9, 13)]  # 0 plays EOS
    alone = torch.stack([pm(torch.tensor([s]))[0][0] for s in seqs])                    # no padding at all
    right, mask_r = tokens.pad_right(seqs + [[7] * 20], pad_id=0)                        # extra long row: more padding
    left, mask_l = tokens.pad_left(seqs + [[7] * 20], pad_id=0)
    torch.testing.assert_close(pm(right, mask_r)[0][:3], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(pm(left, mask_l)[0][:3], alone, atol=1e-5, rtol=0)
    # the score is the head applied to the EOS hidden state, not to padding after it
    h = pm.hidden_states(torch.tensor([seqs[0]]))[0, -1]
    assert pm.head(h).item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_forward_ranking_pairs_kth_chosen_with_kth_rejected():
    pm = tiny_pm()
    idx = torch.randint(1, 50, (6, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1.0, 1, 1, 0, 0, 0])
    rewards, loss = pm(idx, labels=labels)
    assert loss.item() == pytest.approx(reward.ranking_loss(rewards[:3], rewards[3:]).item(), rel=1e-6)


def test_normalization_gives_mean0_std1_on_reference_replies():
    pm, tok = tiny_pm(), SimpleNamespace(eos_id=0, stop_ids=[[3, 4]])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 50, (6,), generator=g).tolist() for _ in range(20)]
    replies = [torch.randint(5, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (20,), generator=g)]
    reward.normalize_pm(pm, tok, prompts, replies, "scale", batch_size=7)
    z = reward.score_replies(pm, tok, prompts, replies, batch_size=5).numpy()
    assert z.mean() == pytest.approx(0.0, abs=1e-5) and z.std() == pytest.approx(1.0, abs=1e-4)
    # a trailing stop sequence / EOS is not part of the reply the PM scores
    again = reward.score_replies(pm, tok, prompts[:2], [r + [3, 4] for r in replies[:2]])
    torch.testing.assert_close(again, torch.as_tensor(z[:2]), atol=1e-5, rtol=0)


def test_length_trend_is_the_within_prompt_slope_by_hand():
    """Prompt p: lengths 1, 3, scores 0, 1; prompt q: lengths 10, 14, scores -9, -8; prompt r: one reply, 50 tokens,
    score -30. Across prompts the longer replies score lower (a negative slope); within each prompt the longer
    reply scores higher. Less their prompt's means, lengths are (-1, 1), (-2, 2) and scores (-1/2, 1/2) twice, r's
    reply is 0 and 0: slope = (1/2 + 1/2 + 1 + 1) / (1 + 1 + 4 + 4) = 0.3."""
    scores, lengths, prompts = [0, 1, -9, -8, -30], [1, 3, 10, 14, 50], ["p", "p", "q", "q", "r"]
    assert np.polyfit(lengths, scores, 1)[0] < 0
    assert reward.fit_length_trend(scores, lengths, prompts) == pytest.approx(0.3)
    assert reward.fit_length_trend(scores, lengths, ["p", "q", "r", "s", "t"]) == 0.0  # one reply a prompt: no slope


def test_the_length_debiased_score_has_no_trend_in_length_within_prompts():
    """normalize_pm fits gain and bias on the reference replies (one a prompt) and the length trend within prompts
    on `trend`, 10 prompts with 4 replies each: gain and bias are those of the reference replies alone, and with
    length_debias the score less that trend has no slope in length within prompts and mean 0 on the reference."""
    pm, tok = tiny_pm(), SimpleNamespace(eos_id=0, stop_ids=[[3, 4]])
    g = torch.Generator().manual_seed(3)
    reply = lambda: torch.randint(5, 50, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    prompts = [torch.randint(5, 50, (6,), generator=g).tolist() for _ in range(40)]
    replies = [reply() for _ in prompts]
    trend = [p for p in prompts[:10] for _ in range(4)], [reply() for _ in range(40)]
    reward.normalize_pm(pm, tok, prompts, replies, "scale", batch_size=8)
    gain, bias = pm.reward_gain, pm.reward_bias
    reward.normalize_pm(pm, tok, prompts, replies, "scale", batch_size=8, trend=trend)
    assert (pm.reward_gain, pm.reward_bias) == (gain, bias)
    lengths = np.array([len(r) for r in replies], dtype=np.float64)
    assert pm.length_mean == pytest.approx(lengths.mean())
    d = reward.score_replies(pm, tok, prompts, replies, batch_size=8, length_debias=True).numpy()
    assert d.mean() == pytest.approx(0.0, abs=1e-5)
    z = reward.score_replies(pm, tok, *trend, batch_size=8).numpy()
    d = reward.score_replies(pm, tok, *trend, batch_size=8, length_debias=True).numpy()
    within = lambda x: x - x.reshape(10, 4).mean(1).repeat(4)  # noqa: E731  less each prompt's mean
    tl = within(np.array([len(r) for r in trend[1]], dtype=np.float64))
    assert abs(within(z) @ tl) > 1.0 and within(d) @ tl == pytest.approx(0.0, abs=1e-3)
    assert pm.length_coef == pytest.approx((within(z) @ tl) / (tl @ tl), rel=1e-4)


# --- data and the whole stage -----------------------------------------------------

def marker_dir(root, n_train=200, n_test=60, seed=0, subset="harmless-base", flip=False):
    """hh-layout data where the chosen reply contains "please" and the rejected one does not;
    reply lengths are drawn independently, so length says nothing."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "runs", "blue", "tree", "sky", "dog", "jumps"]

    def reply(marker):
        w = rng.choice(words, size=rng.integers(3, 9)).tolist()
        if marker:
            w[rng.integers(len(w))] = "please"
        return " ".join(w)

    (root / subset).mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with gzip.open(root / subset / f"{split}.jsonl.gz", "wt") as f:
            for i in range(n):
                prompt = f"\n\nHuman: {split} question {i}?\n\nAssistant:"
                good, bad = reply(True), reply(False)
                f.write(json.dumps({"chosen": prompt + " " + (bad if flip else good),
                                    "rejected": prompt + " " + (good if flip else bad)}) + "\n")
    return str(root)


def test_pmp_reads_real_comparisons_from_pmp_dir_when_given(tmp_path):
    """--rm.pmp_dir: PMP on another corpus of comparisons in hh-rlhf's layout (every subset in it), instead of
    the automatic ones; a directory without that layout is one line naming it (data.DataError)."""
    from data import DataConfig, DataError, read_pairs
    run = SimpleNamespace(seed=0, data=DataConfig(subsets="harmless-base"))
    pmp_dir = marker_dir(tmp_path / "se", n_train=30, n_test=1, subset="stackexchange")
    pairs = rm.pmp_data(run, rm.RMConfig(pmp_dir=pmp_dir), [])
    assert pairs == read_pairs(pmp_dir, "train", DataConfig())[0] and len(pairs) == 30
    train, _ = read_pairs(marker_dir(tmp_path / "hh"), "train", DataConfig())
    auto = rm.pmp_data(run, rm.RMConfig(pmp=True), train)
    assert auto == rm.pmp_pairs(train, 0) and rm.pmp_data(run, rm.RMConfig(), train) is None
    with pytest.raises(DataError, match="nope"):
        rm.pmp_data(run, rm.RMConfig(pmp_dir=str(tmp_path / "nope")), train)


def test_halves_disjoint_and_deterministic(tmp_path):
    from data import DataConfig, read_pairs, split_halves
    pairs, _ = read_pairs(marker_dir(tmp_path), "train", DataConfig())
    a, b = split_halves(pairs)
    prompts_a, prompts_b = {p.prompt for p in a}, {p.prompt for p in b}
    assert not prompts_a & prompts_b and len(a) + len(b) == len(pairs)
    assert 0.35 < len(a) / len(pairs) < 0.65
    a2, _ = split_halves(list(reversed(pairs)))                  # order does not matter: a hash of the prompt
    assert {p.prompt for p in a2} == prompts_a


def stage_cfg(tmp_path, data_dir):
    from data import DataConfig
    from rlhf import StudyConfig
    from runtime import model_checkpoint, save_checkpoint
    from tokens import Tokenizer
    out = tmp_path / "out"
    out.mkdir()
    data = DataConfig(vocab="trimmed", max_prompt_tokens=24, max_reply_tokens=16, val_frac=0.1)
    tok = Tokenizer.trimmed(["the cat runs blue tree sky dog jumps please question train test Human Assistant ?"])
    torch.manual_seed(0)  # a random "SFT" trunk: the rule is simple enough to learn from scratch
    gpt = model.GPT(model.GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(str(out / "sft.pt"), model_checkpoint(gpt, tok, step=0, done=True))
    rm_cfg = rm.RMConfig(lr=3e-3, batch_size=8, epochs=4, warmup_steps=5, eval_interval=20,
                         normalize_samples=16, pmp_steps=10)
    ppo = PPOConfig(max_prompt_tokens=24, max_new_tokens=8)  # the shapes the PMs are normalised at
    return SimpleNamespace(out_dir=str(out), data_dir=data_dir, seed=0, device="cpu", dtype="auto", force=False,
                           micro_tokens=0, policy_init="sft", data=data, rm=rm_cfg, ppo=ppo, studies=StudyConfig())


def test_pm_normalisation_samples_as_ppo_and_eval_do(tmp_path, monkeypatch):
    """The SFT replies that fix a PM's gain and bias are drawn with PPO's prompt length, reply length and
    temperature: a PM's score moves with the reply's length, so "SFT scores mean 0" holds only there."""
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh"))
    cfg.rm.max_steps, cfg.ppo = 2, PPOConfig(max_prompt_tokens=10, max_new_tokens=5, temperature=0.7)
    calls, real = [], model.GPT.generate

    def recording(self, idx, attention_mask=None, max_new_tokens=0, **kwargs):
        calls.append((idx.size(1), max_new_tokens, kwargs.get("temperature")))
        return real(self, idx, attention_mask, max_new_tokens, **kwargs)
    monkeypatch.setattr(model.GPT, "generate", recording)
    rm.stage_rm(cfg, cfg.rm, cfg.ppo)
    assert calls and all(c == (10, 5, 0.7) for c in calls), calls


def test_the_length_trend_is_drawn_apart_from_the_normalisation_samples(tmp_path, monkeypatch):
    """Gain and bias are fitted on one SFT reply to each of normalize_samples prompts, as they always were (so the
    default flow's rewards stay as they are); the length trend on other draws, 4 replies to each of a quarter as
    many prompts, the same prompt for each 4 in a row."""
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh"))
    cfg.rm.max_steps = 2
    seen, real = [], rm.normalize_pm
    monkeypatch.setattr(rm, "normalize_pm",
                        lambda *args, **kwargs: seen.append((args, kwargs)) or real(*args, **kwargs))
    rm.stage_rm(cfg, cfg.rm, cfg.ppo)
    inp = rm.pm_inputs(cfg, cfg.rm)
    ref = rm.sft_samples(inp.policy, inp.tok, inp.train_pairs, 16, cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_tokens, 0,
                         cfg.rm.eval_batch_size, cfg.ppo.temperature)
    assert len(seen) == 2 and all(args[2:4] == ref for args, _ in seen)  # PM-A's and PM-B's
    prompts, replies = seen[0][1]["trend"]
    assert len(prompts) == len(replies) == 16 and len({tuple(p) for p in prompts}) == 4
    assert all(prompts[i] == prompts[4 * (i // 4)] for i in range(16))
    pm_a, _, ckpt = reward.load_reward_model(str(tmp_path / "out" / "pm_a.pt"))
    z = reward.score_replies(pm_a, inp.tok, prompts, replies).numpy()
    lengths = [len(strip_end(r, inp.tok.eos_id, inp.tok.stop_ids)) for r in replies]
    assert ckpt["length_coef"] == pytest.approx(reward.fit_length_trend(z, lengths, [tuple(p) for p in prompts]),
                                                abs=1e-6)


def test_pm_learns_marker_rule_end_to_end(tmp_path):
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh"))
    rm.stage_rm(cfg, cfg.rm, cfg.ppo)
    pm = json.load(open(tmp_path / "out" / "eval.json"))["pm"]
    assert pm["accuracy"] >= 0.9 and pm["heldout_pm_accuracy"] >= 0.9, pm
    assert pm["test_pairs"] == 60 and 0 <= pm["ece"] <= 1 and pm["score_kl_a_b"] >= 0
    model, tok, ckpt = reward.load_reward_model(str(tmp_path / "out" / "pm_a.pt"))
    assert ckpt["done"] and {"reward_gain", "reward_bias", "model_args", "tokenizer"} <= set(ckpt)
    mtime = os.path.getmtime(tmp_path / "out" / "pm_a.pt")
    rm.stage_rm(cfg, cfg.rm, cfg.ppo)                             # finished PMs are skipped, not retrained
    assert os.path.getmtime(tmp_path / "out" / "pm_a.pt") == mtime


def test_evaluate_pms_on_another_dir_keeps_policies(tmp_path):
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh"))
    cfg.rm.split_halves, cfg.rm.epochs = False, 2
    rm.stage_rm(cfg, cfg.rm, cfg.ppo)
    path = tmp_path / "out" / "eval.json"
    doc = json.load(open(path))
    doc["policies"] = {"sft": {"pm_a": 0.1}}
    json.dump(doc, open(path, "w"))
    other = marker_dir(tmp_path / "other", n_train=2, n_test=30, seed=1)
    marker_dir(tmp_path / "other", n_train=2, n_test=12, seed=2, subset="helpful-base", flip=True)  # "please" loses
    pm = pm_metrics.evaluate_pms(cfg, cfg.rm, other)  # no training: just score the other test split
    doc = json.load(open(path))
    assert pm["test_pairs"] == 42 and doc["pm"]["data_dir"] == other and doc["policies"] == {"sft": {"pm_a": 0.1}}
    # by subset: n, and each PM's accuracy, counted by hand from its scores of that subset's pairs alone
    pairs, _ = read_pairs(other, "test", cfg.data)
    pm_a, tok, _ = reward.load_reward_model(str(tmp_path / "out" / "pm_a.pt"))
    assert list(pm["by_subset"]) == ["harmless-base", "helpful-base"]
    for subset, n in (("harmless-base", 30), ("helpful-base", 12)):
        ex = reward.encode_pairs([p for p in pairs if p.subset == subset], tok, reward.pm_block(pm_a, cfg.data),
                                 cfg.data.max_reply_tokens)
        r_c, r_r = reward.score_pairs(pm_a, ex, tok.eos_id, 8)
        row = pm["by_subset"][subset]
        assert row["n"] == n and row["accuracy"] == pytest.approx(np.mean(r_c > r_r))
    assert pm["by_subset"]["harmless-base"]["accuracy"] > 0.8 > 0.2 > pm["by_subset"]["helpful-base"]["accuracy"]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Checkpoints every save_interval (3) steps, validations every eval_interval (5): killed at step 7,
    the run resumes from the step-6 checkpoint, between two validations, and must still end with the
    weights of step 5, the lowest validation loss of the run, which only that checkpoint remembers."""
    cfg, tok, ex = marker_examples(tmp_path, n_train=60)
    cfg.rm = rm.RMConfig(lr=1e-3, batch_size=4, max_steps=12, warmup_steps=2, eval_interval=5, save_interval=3)
    real_batch, real_validate, seen, crash_at = rm.pair_batch, rm.validate, [], [None]

    def batch(examples, index, *a):  # records the step; the kill comes as step crash_at draws its batch
        if index == crash_at[0]:
            raise KeyboardInterrupt
        seen.append(index)
        return real_batch(examples, index, *a)

    def validate(*a):  # the real numbers, but the validation loss rises after step 5
        acc, loss = real_validate(*a)
        return acc, loss + (0.0 if seen[-1] + 1 == 5 else 10.0)
    monkeypatch.setattr(rm, "pair_batch", batch)
    monkeypatch.setattr(rm, "validate", validate)

    def fit(path):
        torch.manual_seed(0)
        model, _ = rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")
        info = rm.train_pm(cfg, cfg.rm, model, tok, ex[:40], ex[40:], "ranking", ckpt_path=path)
        return model.state_dict(), info

    want, info = fit(None)
    assert info["best_step"] == 5
    crash_at[0] = 7
    with pytest.raises(KeyboardInterrupt):
        fit(str(tmp_path / "pm.pt"))
    ckpt = runtime.load_checkpoint(str(tmp_path / "pm.pt"))
    assert ckpt["step"] == 6 and ckpt["best"]["step"] == 5
    crash_at[0] = None
    got, info = fit(str(tmp_path / "pm.pt"))
    assert info["best_step"] == 5
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_checkpoints_follow_save_interval_not_validations(tmp_path, monkeypatch):
    """A PM checkpoint (weights, optimizer, best-so-far) is written every save_interval steps and after
    the last, not at every validation: at 124M parameters each one is ~2 GB."""
    cfg, tok, ex = marker_examples(tmp_path, n_train=40)
    cfg.rm = rm.RMConfig(batch_size=4, max_steps=10, warmup_steps=2, eval_interval=2, save_interval=4)
    saved, real = [], runtime.save_checkpoint
    monkeypatch.setattr(rm, "save_checkpoint", lambda path, ckpt: saved.append(ckpt["step"]) or real(path, ckpt))
    model, _ = rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")
    rm.train_pm(cfg, cfg.rm, model, tok, ex[:32], ex[32:], "ranking", ckpt_path=str(tmp_path / "pm.pt"))
    assert saved == [4, 8, 10]


def test_log_interval_sets_the_metrics_rows(tmp_path):
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh", n_train=40, n_test=4))
    cfg.rm = rm.RMConfig(batch_size=4, max_steps=10, warmup_steps=2, eval_interval=5, log_interval=4)
    tok = tokens.Tokenizer.from_state_dict(runtime.load_checkpoint(cfg.out_dir + "/sft.pt")["tokenizer"])
    from data import DataConfig, read_pairs
    ex = reward.encode_pairs(read_pairs(cfg.data_dir, "train", DataConfig())[0], tok, 40, 16)
    model, _ = rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")
    rm.train_pm(cfg, cfg.rm, model, tok, ex[:32], ex[32:], "ranking", log=runtime.MetricsLog(cfg.out_dir), name="pm_a")
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "rm/pm_a/train_loss" in r] == [0, 4, 8]
    assert [r["step"] for r in rows if "rm/pm_a/val_loss" in r] == [5, 10]

def test_binary_objective_scores_each_row_alone():
    pm = tiny_pm()
    idx = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1.0, 0, 1, 0])
    rewards, loss = pm(idx, labels=labels, objective="binary")
    want = -sum(math.log(1 / (1 + math.exp(-r))) if y else math.log(1 - 1 / (1 + math.exp(-r)))
                for r, y in zip(rewards.tolist(), labels.tolist())) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_pmp_pairs_prefer_real_replies_without_labels():
    from data import Pair
    pairs = [Pair(f"\n\nHuman: q{i}?\n\nAssistant:", f" good answer number {i} here", f" other reply {i} now", "x", 1)
             for i in range(30)]
    pmp = rm.pmp_pairs(pairs, seed=0)
    real = {p.prompt: {p.chosen, p.rejected} for p in pairs}
    assert len(pmp) > 50 and all(q.chosen in real[q.prompt] and q.rejected != q.chosen for q in pmp)
    assert sum(q.rejected in real[q.prompt] for q in pmp) == 0   # never a human-labelled pair in disguise
    assert [q.rejected for q in pmp] == [q.rejected for q in rm.pmp_pairs(pairs, seed=0)]  # deterministic


def test_pmp_corruptions_keep_the_reply_formatting():
    """A shuffled reply has the same words and the same whitespace gaps, in place; a cut reply is a prefix
    of the real one; a swapped reply is another dialogue's real reply. So only what each tests differs."""
    import re
    from data import Pair
    replies = [f" Sure.  Step {i}:\n1. mix\n2. bake {i}  times, then  rest." for i in range(40)]
    pairs = [Pair(f"\n\nHuman: q{i}?\n\nAssistant:", replies[i], f" No {i}.", "x", 1) for i in range(40)]
    real = {r for p in pairs for r in (p.chosen, p.rejected)}
    kinds = set()
    for q in rm.pmp_pairs(pairs, seed=0):
        words, bad_words = re.split(r"(\s+)", q.chosen), re.split(r"(\s+)", q.rejected)
        if q.rejected in real:
            kinds.add("other")
        elif q.chosen.startswith(q.rejected):
            kinds.add("cut")
            assert re.fullmatch(r"\s*\S+(\s+\S+)*", q.rejected)  # ends on a word, not on a gap
        else:
            kinds.add("shuffled")
            assert bad_words[1::2] == words[1::2] and sorted(bad_words[0::2]) == sorted(words[0::2])
    assert kinds == {"other", "cut", "shuffled"}


def test_pmp_corruptions_cannot_be_told_apart_by_formatting_on_real_replies():
    """On real hh-rlhf replies, trivial formatting features (a leading space; a first word glued to it or
    not) are as common in the corrupted replies as in the real ones."""
    from pathlib import Path
    from data import DataConfig, read_pairs
    root = Path(os.environ.get("HH_RLHF_DIR") or Path(__file__).resolve().parents[2] / "shared" / "hh-rlhf-sample")
    if not (root / "harmless-base" / "train.jsonl.gz").is_file():
        pytest.skip("real hh-rlhf sample not available")
    pmp = rm.pmp_pairs(read_pairs(root, "train", DataConfig(subsets="harmless-base"))[0], seed=0)
    features = {"leading space": lambda r: r.startswith(" "),
                "one space then a word": lambda r: r[:1] == " " and r[1:2] != "" and not r[1:2].isspace()}
    for name, f in features.items():
        good, bad = (np.mean([f(getattr(q, side)) for q in pmp]) for side in ("chosen", "rejected"))
        assert abs(good - bad) < 0.02, (name, good, bad)


# --- the schedule of validations and checkpoints (sized for the full dataset) --------

def marker_examples(tmp_path, n_train):
    """stage_cfg on the marker data, its tokenizer, and the train split as encoded comparisons."""
    from data import DataConfig, read_pairs
    cfg = stage_cfg(tmp_path, marker_dir(tmp_path / "hh", n_train=n_train, n_test=4))
    tok = tokens.Tokenizer.from_state_dict(runtime.load_checkpoint(cfg.out_dir + "/sft.pt")["tokenizer"])
    return cfg, tok, reward.encode_pairs(read_pairs(cfg.data_dir, "train", DataConfig())[0], tok, 40, 16)


def recorded_validations(monkeypatch):
    """Replace rm.validate by a recorder: a list of the examples of every call (and a fixed result)."""
    calls = []
    monkeypatch.setattr(rm, "validate", lambda model, examples, *a, **k: calls.append(examples) or (0.5, 0.7))
    return calls


def test_validation_scores_the_same_capped_subset_every_time(tmp_path, monkeypatch):
    """rm.val_pairs caps the pairs each validation scores: a fixed seeded subset of them, the same at every
    validation; with no more pairs than the cap, all of them in their order (the sample's 63, untouched)."""
    cfg, tok, ex = marker_examples(tmp_path, n_train=60)
    train_ex, val_ex = ex[:30], ex[30:]
    calls = recorded_validations(monkeypatch)
    cfg.rm = rm.RMConfig(batch_size=4, max_steps=6, warmup_steps=2, eval_interval=2, val_pairs=10)
    rm.train_pm(cfg, cfg.rm, rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")[0], tok, train_ex, val_ex, "ranking")
    assert len(calls) == 3 and all(c == calls[0] for c in calls)
    assert len(calls[0]) == 10 and all(e in val_ex for e in calls[0]) and calls[0] != val_ex[:10]
    calls.clear()
    cfg.rm.val_pairs = len(val_ex)
    rm.train_pm(cfg, cfg.rm, rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")[0], tok, train_ex, val_ex, "ranking")
    assert all(c == val_ex for c in calls) and len(calls) == 3


def test_auto_eval_interval_keeps_validation_within_a_tenth_of_training(tmp_path, monkeypatch):
    """eval_interval=0 validates every auto_eval_interval steps: the fewest steps for which scoring the
    validation pairs (forward only) costs at most 10% of training (forward + backward, ~3 forwards)."""
    k = rm.auto_eval_interval(1000, 8)
    share = lambda k: 2 * 1000 / (k * 3 * 2 * 8)  # noqa: E731  sequence-forwards: validation / training
    assert k == 417 and share(k) <= 0.1 < share(k - 1)
    cfg, tok, ex = marker_examples(tmp_path, n_train=60)
    calls = recorded_validations(monkeypatch)
    cfg.rm = rm.RMConfig(batch_size=4, max_steps=20, warmup_steps=2, eval_interval=0, val_pairs=0,
                             log_interval=100)
    every = rm.auto_eval_interval(len(ex[50:]), 4)
    assert every == 9                                          # 10 pairs at batch 4
    rm.train_pm(cfg, cfg.rm, rm.init_reward_model(cfg.out_dir + "/sft.pt", "cpu")[0], tok, ex[:50], ex[50:],
                    "ranking", log=runtime.MetricsLog(cfg.out_dir), name="pm_a")
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "rm/pm_a/val_loss" in r] == [9, 18, 20] and len(calls) == 3


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    """rm.group_by_length: batches of similar length (sorted within groups of 32 batches) still visit
    every pair once an epoch, in a seeded order that is a pure function of the step, and pad less."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=(32 * 8 * 3, 2))  # 3 groups of 32 batches of 8 pairs
    examples = [(list(range(a)), list(range(b))) for a, b in lengths]
    per_epoch = len(examples) // 8

    def batch_rows(i, group):  # the batch, and its pairs as (chosen length, rejected length)
        idx, mask, *_ = rm.pair_batch(examples, i, 8, seed=3, pad_id=0, group_by_length=group)
        n = mask.sum(1).tolist()
        return idx, list(zip(n[:8], n[8:]))

    seen = sorted(pair for i in range(per_epoch) for pair in batch_rows(i, True)[1])
    assert seen == sorted(map(tuple, lengths.tolist()))  # every pair once in the epoch
    assert batch_rows(5, True)[0].equal(batch_rows(5, True)[0])         # a pure function of the step
    grouped = np.mean([batch_rows(i, True)[0].size(1) for i in range(per_epoch)])
    plain = np.mean([batch_rows(i, False)[0].size(1) for i in range(per_epoch)])
    assert grouped < 0.75 * plain


def test_a_half_smaller_than_one_batch_is_one_batch_of_every_pair_grouped_or_not():
    """A PM's half of fewer pairs than rm.batch_size (a small data dir, the gpu preset's 32) trains on all of them
    a step, length-grouped or not (grouping had no batch to deal out: an IndexError)."""
    examples = [(list(range(3 + i)), list(range(9 - i))) for i in range(5)]
    for group in (False, True):
        idx, mask, labels, _ = rm.pair_batch(examples, 0, 8, seed=0, pad_id=0, group_by_length=group)
        assert idx.size(0) == 10 and labels.tolist() == [1.0] * 5 + [0.0] * 5
        assert sorted(mask[:5].sum(1).tolist()) == [3, 4, 5, 6, 7]
