"""plot.py on a synthetic out_dir written in the stages' formats (the key layout of a real tiny run's
metrics.jsonl, eval.json and frontier.jsonl). Skipped where matplotlib, an optional extra, is absent."""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from lab import plot  # noqa: E402
from evaluate import fit_bon, fit_linear, fit_rl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ["curves.png", "pm_calibration.png", "pm_agreement.png", "frontier.png", "policies.png", "pm_size_study.png"]


def metrics_rows():
    """MetricsLog rows of every stage: supervised loss/val_loss, rm/<pm>/..., ppo/..."""
    rows = []
    for stage, steps in (("pretrain", 40), ("sft", 20), ("rs", 8)):
        for step in range(0, steps, 5):
            rows.append({"stage": stage, "step": step, "time": 0.0, f"{stage}/loss": 8.0 - step / 10,
                         f"{stage}/lr": 3e-4, f"{stage}/grad_norm": 1.0, f"{stage}/tokens_per_s": 900.0})
        rows.append({"stage": stage, "step": steps, "time": 0.0, f"{stage}/val_loss": 7.5})
    for pm in ("pm_a", "pm_b"):  # both PMs log under stage "rm" and both start at step 0
        for step in (0, 10):
            rows.append({"stage": "rm", "step": step, "time": 0.0, f"rm/{pm}/train_loss": 0.69,
                         f"rm/{pm}/lr": 1e-5, f"rm/{pm}/grad_norm": 1.5})
        rows.append({"stage": "rm", "step": 20, "time": 0.0, f"rm/{pm}/val_loss": 0.68, f"rm/{pm}/val_accuracy": 0.6})
    for it in range(6):
        rows.append({"stage": "ppo", "step": it, "time": 0.0, "ppo/pg_loss": -0.01, "ppo/clipfrac": 0.1,
                     "ppo/approx_kl": 1e-3, "ppo/pm_a": 0.1 * it, "ppo/kl": 0.5 * it, "ppo/kl_coef": 0.15,
                     "ppo/entropy": 8.5, "ppo/sqrt_kl": math.sqrt(0.5 * it), "ppo/pm_b": 0.05 * it, "ppo/time": 20.0})
    return rows


def eval_json():
    """eval.json as reward.py ("pm") and evaluate.py ("policies", "bon_curve", "frontier_fits") write it."""
    bins = [{"lo": b / 10, "hi": (b + 1) / 10, "n": 0 if b in (0, 9) else 20,
             "conf": None if b in (0, 9) else b / 10 + 0.05, "freq": None if b in (0, 9) else b / 10 + 0.02}
            for b in range(10)]
    pm = {"test_pairs": 80, "accuracy": 0.6, "accuracy_ci": [0.5, 0.7], "heldout_pm_accuracy": 0.58,
          "calibration": bins, "ece": 0.03, "heldout_pm_calibration": bins, "heldout_pm_ece": 0.04,
          "agreement_a_b": 0.7, "agreement_by_decile": [{"decile": d, "n": 8, "mean_score": d / 3 - 1.5,
                                                         "agreement": 0.8 - d / 30} for d in range(10)]}
    policies = {name: {"pm_reward": r, "heldout_pm_reward": r / 2, "kl": kl, "win_rate_vs_sft": w,
                       "mean_reply_tokens": 24.0} for name, r, kl, w in
                (("sft", 0.0, 0.0, 0.5), ("bon", 0.4, 1.2, 0.6), ("rs", 0.3, 0.5, 0.55), ("ppo", 0.5, 2.0, 0.52))}
    policies["bon"].update(n=4, kl_analytic=1.2)
    fit = {"a": 0.2, "b": 0.05, "rmse": 0.01, "points": 3}
    fits = {"bon_pm_a": {"form": "d*(a - b*d)", **fit}, "bon_pm_a_linear": {"form": "a + b*d", **fit},
            "ppo_pm_b": {"form": "d*(a - b*log(d))", **fit}, "ppo_pm_b_linear": {"form": "a + b*d", **fit}}
    return {"pm": pm, "policies": policies, "bon_curve": [], "frontier_fits": fits, "notes": []}


def frontier_rows():
    rows = [{"method": "bon", "n": n, "kl": math.log(n) - (n - 1) / n, "pm_a": 0.1 * n, "pm_b": 0.05 * n,
             "prompts": "test"} for n in (1, 2, 4)]
    rows.append({"method": "sft", "step": 0, "kl": 0.0, "pm_a": 0.0, "pm_b": 0.0, "prompts": "train"})
    rows += [{"method": "ppo", "step": s, "kl": 0.4 * s, "pm_a": 0.1 * s, "pm_b": 0.04 * s, "prompts": "train"}
             for s in range(3)]
    rows += [{"method": f"{m}_final", "step": None, "kl": 0.5, "pm_a": 0.3, "pm_b": 0.1, "prompts": "test"}
             for m in ("rs", "ppo")]
    return [{**r, "sqrt_kl": math.sqrt(r["kl"])} for r in rows]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert 3_000 < len(data) < 100_000, (path, len(data))  # a drawn figure, small enough to commit


def test_make_plots_writes_every_figure(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", metrics_rows())
    write_jsonl(tmp_path / "frontier.jsonl", frontier_rows())
    (tmp_path / "eval.json").write_text(json.dumps(eval_json()))
    (tmp_path / "pm_size_study.json").write_text(json.dumps([  # as studies.size_study writes it
        {"size": s, "params": n, "accuracy": a, "accuracy_ci": [a - 0.05, a + 0.05], "heldout_pm_accuracy": a - 0.02,
         "heldout_pm_accuracy_ci": [a - 0.07, a + 0.03], "score_kl_a_b": kl}
        for s, n, a, kl in (("1x64", 6e5, 0.55, 0.2), ("2x128", 1.5e6, 0.57, 0.15), ("4x192", 3.4e6, 0.58, 0.1))]))
    paths = plot.make_plots(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == FIGURES
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path / "figures")
        assert_png(p)
    assert plot.make_plots(str(tmp_path), str(tmp_path / "elsewhere"))[0] == str(tmp_path / "elsewhere" / "curves.png")


def test_partial_out_dir_draws_what_it_has(tmp_path, capsys):
    write_jsonl(tmp_path / "metrics.jsonl", metrics_rows()[:12])  # pretrain only, as after stage 1
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "step": 0, "sft/lo')  # a row cut short by a crash
    paths = plot.make_plots(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["curves.png"]
    assert_png(paths[0])
    assert "skipped frontier.png" in capsys.readouterr().out
    (tmp_path / "eval.json").write_text(json.dumps({"pm": eval_json()["pm"]}))  # after the rm stage
    assert len(plot.make_plots(str(tmp_path))) == 3


def test_load_metrics_keeps_the_last_run_and_the_last_row_per_step(tmp_path):
    rows = metrics_rows()
    ppo = [r for r in rows if r["stage"] == "ppo"]
    resumed = [{**r, "ppo/pm_a": -1.0} for r in ppo[4:]]                 # resumed from iteration 4: repeats 4, 5
    forced = [{**r, "ppo/kl": 9.0} for r in ppo[:2]]                     # then a --force rerun, cut after 2
    val_first = [{"stage": "sft", "step": 0, "sft/val_loss": 8.0}]       # a val row before the loss row of step 0
    write_jsonl(tmp_path / "metrics.jsonl", val_first + rows + resumed + forced)
    series = plot.load_metrics(str(tmp_path / "metrics.jsonl"))
    assert series["ppo/kl"] == ([0, 1], [9.0, 9.0])
    assert series["ppo/pm_a"] == ([0, 1], [0.0, 0.1])
    assert series["rm/pm_a/train_loss"][0] == [0, 10] and series["rm/pm_b/val_accuracy"] == ([20], [0.6])
    assert series["sft/val_loss"] == ([0, 20], [8.0, 7.5])
    write_jsonl(tmp_path / "metrics.jsonl", rows + resumed)
    pm_a = plot.load_metrics(str(tmp_path / "metrics.jsonl"))["ppo/pm_a"]
    assert pm_a[0] == list(range(6)) and pm_a[1] == pytest.approx([0, 0.1, 0.2, 0.3, -1, -1])


def test_fit_curves_read_evaluate_forms():
    """The frontier lines use evaluate.py's fits: Gao et al.'s forms are fitted to the gain over the
    first point, so adding that point's reward back reproduces exact data; linear fits the raw reward."""
    d = [0.0, 0.5, 1.0, 1.5]
    bon = [0.3 + x * (0.8 - 0.2 * x) for x in d]
    rl = [0.3 + (x * (0.8 - 0.2 * math.log(x)) if x > 0 else 0.0) for x in d]
    line = [0.3 + 0.7 * x for x in d]
    for fit, r in ((fit_bon(d, [x - bon[0] for x in bon]), bon), (fit_rl(d, [x - rl[0] for x in rl]), rl),
                   (fit_linear(d, line), line)):
        assert plot.fit_curve(fit, d, r[0]) == pytest.approx(r, abs=1e-6), fit["form"]


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plot.make_plots(str(tmp_path))
    # and importing plot.py itself never imports matplotlib
    code = "import sys, lab.plot; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
