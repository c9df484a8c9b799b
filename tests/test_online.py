"""online.py, `rlhf.py online`: a round's comparisons are collected, labelled by the simulated labeler and read back
as a subset; a killed run resumes to the result of an uninterrupted one. Tiny random models, a few seconds each."""
import io
import json
import os

import pytest
import torch

import rlhf
from conftest import write_tiny_flow
from data import DataConfig, read_pairs
from model import GPT
from reward import RewardModel, load_reward_model
from runtime import load_checkpoint
from sampling import strip_end

torch.set_num_threads(1)
FLAGS = ["--preset", "tiny", "--device", "cpu", "--online.prompts=4", "--online.n=4", "--online.pm_steps=2",
         "--online.eval_prompts=4", "--online.eval_samples=2", "--eval.n=2", "--rs.num_prompts=4", "--rs.n=2",
         "--rs.max_steps=2", "--rs.eval_interval=1", "--rm.normalize_samples=8", "--rm.eval_interval=1",
         "--ppo.max_new_tokens=8", "--ppo.max_prompt_tokens=40"]


def flow(tmp_path):
    """An out_dir as `all` leaves it (sft.pt, rs.pt, pm_a.pt, pm_b.pt) and an hh-rlhf dir."""
    out, data, _ = write_tiny_flow(tmp_path, {"sft": GPT, "rs": GPT, "pm_a": RewardModel, "pm_b": RewardModel})
    return out, data


def online(out, data, rounds):
    assert rlhf.main(["online", "--out_dir", out, "--data_dir", data, f"--online.rounds={rounds}"] + FLAGS) == 0
    with open(os.path.join(out, "online.json")) as f:
        return json.load(f)


def test_a_rounds_comparisons_are_labelled_by_pm_b_and_read_back_as_a_subset(tmp_path):
    out, data = flow(tmp_path)
    result = online(out, data, 1)
    assert [r["round"] for r in result["rounds"]] == [0, 1] and set(result["elo"]["policies"]) == {
        "sft", "round0", "round1"}
    labels = os.path.join(out, "online", "labels")
    pairs, _ = read_pairs(data, "train", DataConfig(vocab="trimmed", extra_dir=labels))
    mine = [p for p in pairs if p.subset == "online-round1"]
    assert len(mine) == result["rounds"][1]["comparisons"] > 0
    rows = load_checkpoint(os.path.join(out, "online", "round1", "comparisons.pt"))["rows"]
    assert all(b_chosen > b_rejected for *_, b_chosen, b_rejected in rows)  # the labeler picks PM-B's higher score
    tok = load_reward_model(os.path.join(out, "pm_b.pt"))[1]
    text = lambda ids: tok.decode(strip_end(ids, tok.eos_id, tok.stop_ids))  # noqa: E731
    assert [(p.prompt + p.chosen, p.prompt + p.rejected) for p in mine] == [
        (tok.decode(q) + text(c), tok.decode(q) + text(r)) for q, c, r, *_ in rows]
    assert load_checkpoint(os.path.join(out, "online", "round1", "pm_a.pt"))["train_pairs"] > len(mine)  # + half A


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Round by round (rounds=1, then 2), and killed inside round 2 (its PM-A and policy not yet written): the same
    online.json as one uninterrupted run of two rounds."""
    out, data = flow(tmp_path / "a")
    whole = online(out, data, 2)
    out, data = flow(tmp_path / "b")
    online(out, data, 1)
    online(out, data, 2)
    for name in ("pm_a.pt", "rs.pt", "rs_data.pt"):
        os.remove(os.path.join(out, "online", "round2", name))
    assert online(out, data, 2) == whole


def test_online_before_the_flow_names_the_stage_to_run(tmp_path, capsys):
    out, data = flow(tmp_path)
    os.remove(os.path.join(out, "rs.pt"))
    assert rlhf.main(["online", "--out_dir", out, "--data_dir", data] + FLAGS) == 2
    assert "run `python rlhf.py rs` first" in capsys.readouterr().err


def test_a_person_who_quits_mid_round_goes_on_where_they_stopped(tmp_path, monkeypatch, capsys):
    """--online.labeler=human: each verdict is kept as it is made; q stops the run, and the next run asks from the
    next comparison (4 prompts x 2 = 8 in all: 1 decided, then the quit, then the other 7)."""
    out, data = flow(tmp_path)
    args = ["online", "--out_dir", out, "--data_dir", data, "--online.rounds=1", "--online.labeler=human"] + FLAGS
    monkeypatch.setattr("sys.stdin", io.StringIO("1\nq\n"))
    with pytest.raises(SystemExit):
        rlhf.main(args)
    assert capsys.readouterr().out.count("which reply is") == 2
    partial = load_checkpoint(os.path.join(out, "online", "round1", "comparisons.pt.partial"))
    assert partial["done"] == 1 and len(partial["rows"]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("2\n" * 7))
    assert rlhf.main(args) == 0
    assert capsys.readouterr().out.count("which reply is") == 7
    rows = load_checkpoint(os.path.join(out, "online", "round1", "comparisons.pt"))["rows"]
    assert len(rows) == 8 and rows[0] == partial["rows"][0]
