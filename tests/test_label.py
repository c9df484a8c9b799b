"""Tests for label.py, `rlhf.py label`: a person's keys become hh-rlhf comparisons that survive a crash, a rerun
goes on where the last one stopped, and read_pairs reads them back through --data.extra_dir. The person is
sys.stdin; the policies and PM-A are tiny random models, so each test takes a second or two."""
import gzip
import math
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch

import label as labeller
import rlhf
from conftest import write_tiny_flow
from data import DataConfig, read_pairs
from model import GPT
from ppo import PPOConfig
from reward import RewardModel, load_reward_model, score_texts
from sampling import format_prompt, rl_prompts

torch.set_num_threads(1)


@pytest.fixture
def setup(tmp_path):
    """out_dir with random sft.pt, ppo.pt and pm_a.pt (2 layers x 32, block 64), a small hh-rlhf dir, and the
    Run-like namespace a stage takes."""
    out, data, tok = write_tiny_flow(tmp_path, {"sft": GPT, "ppo": GPT, "pm_a": RewardModel}, n_train=40)
    run = SimpleNamespace(out_dir=out, data_dir=data, seed=0, device="cpu", dtype="auto",
                          data=DataConfig(vocab="trimmed"))
    return run, tok


def label(run, keys, monkeypatch, **fields):
    """One `label` run on the keys typed (lines of stdin) -> (this run's decisions, every decision on disk)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(keys))
    label_cfg = labeller.LabelConfig(**fields)
    new = labeller.stage_label(run, label_cfg, PPOConfig(max_new_tokens=8))
    labels_dir = label_cfg.labels_dir or os.path.join(run.out_dir, "labels")
    return new, labeller.read_decisions(os.path.join(labels_dir, "decisions.jsonl"))


def rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_review_keys_become_rows_of_the_picks_only(setup, monkeypatch, capsys):
    """A pick of each side, a tie, a skip, a stray key, then q: four decisions on disk, two rows, each chosen the
    picked reply's whole dialogue, read back by read_pairs as subset online-helpful."""
    run, _ = setup
    new, on_disk = label(run, "1\nt\nx\ns\n2\nq\n", monkeypatch, num_prompts=10)
    assert "keys: 1 or 2 (the more helpful reply)" in capsys.readouterr().out
    assert [d["key"] for d in on_disk] == ["1", "t", "s", "2"] and new == on_disk
    assert all(sorted(d["policies"]) == ["ppo", "sft"] and d["mode"] == "review" for d in on_disk)
    picks = [on_disk[0], on_disk[3]]
    want = [{"chosen": d["prompt"] + " " + d["replies"][int(d["key"]) - 1],
             "rejected": d["prompt"] + " " + d["replies"][2 - int(d["key"])]} for d in picks]
    labels = os.path.join(run.out_dir, "labels")
    assert rows(os.path.join(labels, "online-helpful", "train.jsonl.gz")) == want
    pairs, _ = read_pairs(run.data_dir, "train", DataConfig(extra_dir=labels))
    online_pairs = [p for p in pairs if p.subset == "online-helpful"]
    assert [p.prompt + p.chosen for p in online_pairs] == [w["chosen"] for w in want]
    assert len(pairs) == 40 + 2
    assert len(read_pairs(run.data_dir, "test", DataConfig(extra_dir=labels))[0]) == 8  # the test split: hh only


def test_sides_are_shuffled_by_a_seeded_rng_and_each_reply_names_its_policy(setup):
    """Which side a policy's reply is on changes from prompt to prompt (seeded: the same again on a rerun), and
    the policy recorded beside each reply is the one that samples it."""
    run, tok = setup
    offer, _, names = labeller.load_offer(run, labeller.LabelConfig(), PPOConfig(max_new_tokens=8))
    prompts = [t for t, _ in rl_prompts(run, "train", tok, 0)][:12]
    offers = [offer(p) for p in prompts]
    assert names == ["sft", "ppo"] and {tuple(o["policies"]) for o in offers} == {("sft", "ppo"), ("ppo", "sft")}
    assert offers == [offer(p) for p in prompts]
    single, _, _ = labeller.load_offer(run, labeller.LabelConfig(policies="ppo,ppo"), PPOConfig(max_new_tokens=8))
    for prompt, o in zip(prompts, offers):
        j = o["policies"].index("ppo")
        assert o["replies"][j] in single(prompt)["replies"]  # ppo is the second policy in both: the same seed


def test_a_second_run_goes_on_where_the_first_stopped(setup, monkeypatch):
    """Prompts decided in the first run are not offered again; the second run (the command itself) appends."""
    run, tok = setup
    first, _ = label(run, "1\nq\n", monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("t\n2\nq\n"))
    assert rlhf.main(["label", "--preset", "tiny", "--device", "cpu", "--out_dir", run.out_dir,
                      "--data_dir", run.data_dir, "--ppo.max_new_tokens=8"]) == 0
    on_disk = labeller.read_decisions(os.path.join(run.out_dir, "labels", "decisions.jsonl"))
    prompts = [t for t, _ in rl_prompts(run, "train", tok, 0)]
    assert [d["prompt"] for d in on_disk] == prompts[:3] and on_disk[:1] == first
    assert [d["key"] for d in on_disk] == ["1", "t", "2"]
    labels = os.path.join(run.out_dir, "labels", "online-helpful", "train.jsonl.gz")
    assert [r["chosen"].startswith(p) for r, p in zip(rows(labels), (prompts[0], prompts[2]))] == [True, True]


@pytest.mark.parametrize("task", ["helpful", "harmless"])
def test_chat_picks_land_by_task_and_the_dialogue_goes_on_with_the_pick(setup, monkeypatch, task):
    """helpful: the pick is chosen; harmless (red-teaming): the pick, the more harmful reply, is rejected. The next
    turn's prompt is the dialogue so far plus the picked reply."""
    run, _ = setup
    _, on_disk = label(run, "hello there\n2\nand then?\n1\n\n", monkeypatch, chat=True, task=task)
    first, second = on_disk
    assert first["prompt"] == format_prompt("hello there") and first["mode"] == "chat" and first["task"] == task
    assert second["prompt"] == first["prompt"] + " " + first["replies"][1] + format_prompt("and then?")
    picked, other = (second["prompt"].rsplit(format_prompt("and then?"), 1)[0],
                     first["prompt"] + " " + first["replies"][0])
    row = rows(os.path.join(run.out_dir, "labels", f"online-{task}", "train.jsonl.gz"))[0]
    assert (row["chosen"], row["rejected"]) == ((picked, other) if task == "helpful" else (other, picked))
    extra = os.path.join(run.out_dir, "labels")
    pairs, _ = read_pairs(run.data_dir, "train", DataConfig(extra_dir=extra))
    assert [p.subset for p in pairs if p.subset != "harmless-base"] == [f"online-{task}"] * 2


def test_best_of_offers_pm_a_top_two_of_the_samples(setup, monkeypatch):
    """--label.best_of=5: the two replies offered are the two of the five samples that PM-A scores highest."""
    run, _ = setup
    calls, real = [], labeller.complete
    monkeypatch.setattr(labeller, "complete", lambda *a, **k: calls.append((a[2], real(*a, **k))) or calls[-1][1])
    _, (d,) = label(run, "2\nq\n", monkeypatch, best_of=5, policies="sft")
    prompts, samples = calls[0]  # (calls[1]: the prompt offered when q was typed)
    assert prompts == [d["prompt"]] * 5 and sorted(d["policies"]) == ["sft best-of-5 #1", "sft best-of-5 #2"]
    pm, tok, _ = load_reward_model(os.path.join(run.out_dir, "pm_a.pt"))
    scores = score_texts(pm, tok, prompts, [" " + s for s in samples])
    top = sorted(range(5), key=lambda i: -scores[i])[:2]
    assert sorted(d["replies"]) == sorted(samples[i] for i in top)
    assert sorted(d["pm_a"]) == pytest.approx(sorted(scores[i] for i in top), abs=1e-3)


def test_a_broken_line_is_reported_and_the_rest_kept(tmp_path, capsys):
    """A bad line in the middle and a half-written last one: each named by file and line, the good lines kept,
    and the next decision lands on a line of its own."""
    good = {"mode": "review", "task": "helpful", "prompt": format_prompt("hi"), "replies": ["a", "b"],
            "policies": ["sft", "ppo"], "key": "1"}
    path = tmp_path / "decisions.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "key": "2"}) + '\n{"mode": "rev')
    store = labeller.LabelStore(str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": broken line")[0] for line in out] == [f"[label] {path}:2", f"[label] {path}:4"]
    assert [d["key"] for d in store.decisions] == ["1", "2"]
    store.add({**good, "key": "t"})
    assert [d["key"] for d in labeller.read_decisions(str(path))] == ["1", "2", "t"]
    assert rows(tmp_path / "online-helpful" / "train.jsonl.gz")[1]["chosen"] == format_prompt("hi") + " b"


@pytest.mark.parametrize("flags, message", [
    ([], "ppo.pt not found: run `python rlhf.py ppo` first"),
    (["--label.best_of=4"], "pm_a.pt not found: run `python rlhf.py rm` first"),
])
def test_a_missing_checkpoint_names_the_stage_that_makes_it(setup, capsys, flags, message):
    run, _ = setup
    os.remove(os.path.join(run.out_dir, "ppo.pt") if not flags else os.path.join(run.out_dir, "pm_a.pt"))
    argv = ["label", "--preset", "tiny", "--device", "cpu", "--out_dir", run.out_dir, "--data_dir", run.data_dir]
    assert rlhf.main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(run.out_dir, "labels"))


def test_human_elo_ranks_the_policies_people_preferred():
    """People prefer ppo to sft in 150 of 200 helpful comparisons, and a red-teamer picks dpo as the more harmful
    in half of 200: ppo's Elo is that of a 75% win rate (400 log10 3, ~191), dpo's interval holds 0. A tie counts
    half; best-of-n decisions (one policy) and skips carry no verdict between policies."""
    helpful = [{"policies": ["ppo", "sft"] if i % 2 else ["sft", "ppo"], "task": "helpful",
                "key": ("1" if i % 2 else "2") if i < 150 else ("2" if i % 2 else "1")} for i in range(200)]
    harmless = [{"policies": ["dpo", "sft"], "task": "harmless", "key": "1" if i % 2 else "2"} for i in range(200)]
    noise = [{"policies": ["sft best-of-4 #1", "sft best-of-4 #2"], "task": "helpful", "key": "1"},
             {"policies": ["ppo", "sft"], "task": "helpful", "key": "s"}]
    elo = labeller.human_elo(helpful + harmless + noise, reps=100)
    assert elo["sft"]["elo"] == 0 and elo["ppo"]["comparisons"] == 200 and elo["dpo"]["comparisons"] == 200
    assert elo["ppo"]["elo"] == pytest.approx(400 * math.log10(3), rel=0.02) and elo["ppo"]["elo_ci"][0] > 100
    assert elo["dpo"]["elo_ci"][0] < 0 < elo["dpo"]["elo_ci"][1]
    assert labeller.human_elo(noise) == {}
