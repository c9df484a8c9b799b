"""
plot.py: the figures of a run, drawn from the files the stages already write (no model is loaded).

    python plot.py --out_dir out          # -> out/figures/*.png (also: python rlhf.py plot --out_dir out)

  curves.png          learning curves from metrics.jsonl: pretrain / sft / rs loss, PM loss and accuracy,
                      PPO rewards (PM-A proxy, PM-B held-out judge), KL and beta, entropy and clipfrac
  pm_calibration.png  PM-A and PM-B reliability diagrams with their ECE (eval.json "pm")
  pm_agreement.png    how often PM-A and PM-B agree, by PM-A score decile (eval.json "pm")
  frontier.png        reward vs sqrt(KL) for best-of-n and PPO with the fitted curves (frontier.jsonl and
                      eval.json "frontier_fits")
  policies.png        PM-A / PM-B reward and win rate vs SFT, raw and length-controlled, of every policy (eval.json)
  pm_size_study.png   PM accuracy and PM-A/PM-B score KL vs trunk size (pm_size_study.json, studies --studies.size=true)
  elo.png             every policy's Elo by PM-B, raw and length-controlled, with 95% intervals (eval.json "elo")
  online.png          the rounds of `rlhf.py online`: what PM-A knew before training, and each round's policy
                      (online.json)

A figure whose data is missing is skipped with a note, so any partial out_dir works. matplotlib is an
optional extra (`pip install matplotlib`), imported only when make_plots runs.
References: Bai et al. 2022 (arXiv:2204.05862) for PM calibration, the PM-A/PM-B robustness study and
reward linear in sqrt(KL); Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"
(arXiv:2210.10760) for the best-of-n and RL forms of reward vs sqrt(KL).
"""

import argparse
import io
import json
import math
import os

POLICY_ORDER = ["sft", "cd", "bon", "rs", "ppo", "dpo"]


def read_json(path):
    """The parsed file, or None when it is missing or unreadable (e.g. half-written by a crash)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path):
    """The rows of a JSON-lines file; a line cut short by a crash is skipped. [] when missing."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


def load_metrics(path):
    """metrics.jsonl -> {key: ([steps], [values])}, one point per step, sorted by step.

    A series' group is its key minus the last part (`sft`, `ppo`, `rm/pm_a`). A step-0 row of a group
    that already has later steps starts the group over (a forced rerun replaces the previous run);
    otherwise the last value per step wins (a resumed run repeats the steps after its checkpoint)."""
    points = {}  # key -> {step: value}
    for row in read_jsonl(path):
        step = row.get("step")
        nums = {k: v for k, v in row.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not isinstance(step, (int, float)) or not nums:
            continue
        groups = {k.rsplit("/", 1)[0] for k in nums}
        if step == 0:
            restarted = {k.rsplit("/", 1)[0] for k, v in points.items() if max(v) > 0} & groups
            points = {k: v for k, v in points.items() if k.rsplit("/", 1)[0] not in restarted}
        for k, v in nums.items():
            points.setdefault(k, {})[step] = v
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in points.items()}


def new_figure(figsize, rows=1, cols=1, **kw):
    """A matplotlib Figure and its axes, made without pyplot: no global figure list to close, and the
    caller's display backend (a notebook's, say) is left alone."""
    from matplotlib.figure import Figure  # optional dependency: imported only when drawing
    fig = Figure(figsize=figsize, dpi=100)
    return fig, fig.subplots(rows, cols, **kw)


def save_png(fig, path):
    """Write the figure as a PNG with a 256-colour palette: line and bar plots need no more, and the
    file is ~3x smaller than matplotlib's RGBA (the README commits these). Pillow comes with matplotlib."""
    from PIL import Image
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)


# ----------------------------------------------------------------------------------------------
# 1. learning curves

# one panel each: (title, x label, [(key, label, matplotlib format, y axis)]); "right" is a twin y axis.
# PM-A is blue and PM-B orange everywhere; train lines are solid, validation / held-out ones dashed.
CURVE_PANELS = [
    ("pretrain loss", "step", [("pretrain/loss", "train", "C0-", "left"),
                               ("pretrain/val_loss", "val", "C1--", "left")]),
    ("sft loss", "step", [("sft/loss", "train", "C0-", "left"), ("sft/val_loss", "val", "C1--", "left")]),
    ("rs fine-tune loss", "step", [("rs/loss", "train", "C0-", "left"), ("rs/val_loss", "val", "C1--", "left")]),
    ("PM loss", "step", [(f"rm/{pm}/{kind}_loss", f"{name} {kind}", fmt, "left")
                         for pm, name, c in (("pm_a", "PM-A", "C0"), ("pm_b", "PM-B", "C1"))
                         for kind, fmt in (("pmp", f"{c}:"), ("train", f"{c}-"), ("val", f"{c}--"))]),
    ("PM val accuracy", "step", [("rm/pm_a/val_accuracy", "PM-A", "C0-", "left"),
                                 ("rm/pm_b/val_accuracy", "PM-B", "C1--", "left")]),
    ("PPO reward", "iteration", [("ppo/pm_a", "PM-A (proxy)", "C0-", "left"),
                                 ("ppo/pm_b", "PM-B (held out)", "C1--", "left")]),
    ("PPO KL to SFT (nats)", "iteration", [("ppo/kl", "KL", "C2-", "left"), ("ppo/kl_coef", "beta", "C3--", "right")]),
    ("PPO entropy / clipfrac", "iteration", [("ppo/entropy", "entropy", "C4-", "left"),
                                             ("ppo/clipfrac", "clipfrac", "C5--", "right")]),
]


def moving_mean(values, window):
    """Centred moving mean (shorter windows at the ends): the trend of a noisy per-step curve."""
    n, h, cum = len(values), window // 2, [0.0]
    for v in values:
        cum.append(cum[-1] + v)  # prefix sums: each window's mean in O(1)
    return [(cum[min(n, i + h + 1)] - cum[max(0, i - h)]) / (min(n, i + h + 1) - max(0, i - h)) for i in range(n)]


def plot_curves(series, path):
    """A grid of the CURVE_PANELS that have data, three to a row."""
    panels = [p for p in CURVE_PANELS if any(k in series for k, _, _, _ in p[2])]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure((3 * cols, 2.2 * rows), rows, cols, squeeze=False)
    for ax, (title, xlabel, specs) in zip(axes.flat, panels):
        twin, handles = None, []
        for key, label, fmt, side in specs:
            if key not in series:
                continue
            if side == "right" and twin is None:
                twin = ax.twinx()
                twin.set_ylabel(label)
            steps, values = series[key]
            target = twin if side == "right" else ax
            if len(steps) > 50:  # a noisy curve: the raw points faint, their moving mean on top
                target.plot(steps, values, fmt, lw=0.5, alpha=0.3)
                values = moving_mean(values, len(steps) // 25)
            handles += target.plot(steps, values, fmt, marker="." if len(steps) < 20 else None, lw=1, label=label)
        ax.set(title=title, xlabel=xlabel)
        ax.legend(handles=handles)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    save_png(fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# 2-3. the preference models (eval.json "pm", written by pm_metrics.evaluate_pms)

def plot_calibration(pm, path):
    """Reliability diagram: mean predicted P(chosen) per bin vs the observed frequency, both PMs."""
    curves = [(pm.get(k), pm.get(e), name) for k, e, name in
              (("calibration", "ece", "PM-A"), ("heldout_pm_calibration", "heldout_pm_ece", "PM-B (held out)"))]
    curves = [c for c in curves if c[0]]
    if not curves:
        return False
    fig, ax = new_figure((4.5, 4))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for i, (bins, ece, name) in enumerate(curves):
        full = [b for b in bins if b["n"]]  # an empty bin has no mean
        ece_str = f", ECE {ece:.3f}" if ece is not None else ""
        ax.plot([b["conf"] for b in full], [b["freq"] for b in full], "-o" if i == 0 else "--s", color=f"C{i}",
                mfc="none" if i else None, label=f"{name}{ece_str}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(chosen preferred)", ylabel="observed frequency",
           title=f"PM calibration ({pm.get('test_pairs', '?')} test pairs, both orders)")
    ax.legend(loc="upper left")
    save_png(fig, path)
    return True


def plot_agreement(pm, path):
    """Bars: fraction of test pairs where PM-A and PM-B pick the same reply, per PM-A score decile."""
    deciles = pm.get("agreement_by_decile")
    if not deciles:
        return False
    fig, ax = new_figure((6, 3.5))
    x = [d["decile"] + 1 for d in deciles]
    ax.bar(x, [d["agreement"] for d in deciles], color="C0", width=0.7)
    for xi, d in zip(x, deciles):
        ax.text(xi, d["agreement"] + 0.02, f"n={d['n']}", ha="center")
    if "agreement_a_b" in pm:
        ax.axhline(pm["agreement_a_b"], color="C1", ls="--", label=f"all pairs {pm['agreement_a_b']:.2f}")
    ax.axhline(0.5, color="gray", ls=":", label="chance")
    ax.set_xticks(x, [f"{xi}\n{d['mean_score']:+.1f}" for xi, d in zip(x, deciles)])
    ax.set(ylim=(0, 1.25), xlabel="PM-A score decile, low to high (its mean standardised score)",
           ylabel="PM-A and PM-B agree", title="Do the two PMs pick the same reply of a test pair?")
    ax.legend(loc="upper left", ncol=2)
    save_png(fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# 4-5. the policies (frontier.jsonl and eval.json, written by evaluate.py)

def fit_curve(fit, d, offset):
    """A frontier fit at d = sqrt(KL): Gao et al.'s forms fit the gain over the first point (add `offset`
    back), the linear form (Bai et al.) the raw reward."""
    a, b = fit["a"], fit["b"]
    if fit["form"] == "d*(a - b*d)":
        return [offset + x * (a - b * x) for x in d]
    if fit["form"] == "d*(a - b*log(d))":
        return [offset + (x * (a - b * math.log(x)) if x > 0 else 0.0) for x in d]
    return [a + b * x for x in d]


def plot_frontier(points, fits, path):
    """Reward vs sqrt(KL): best-of-n, PPO training rollouts and the final policies; PM-A (the proxy
    PPO optimised) solid markers and lines, PM-B (held-out judge) hollow markers and dashed lines."""
    if not points:
        return False
    groups = {"bon": [p for p in points if p["method"] == "bon"],
              "ppo": [p for p in points if p["method"] in ("sft", "ppo")],  # the order fit_frontiers saw
              "final": [p for p in points if p["method"].endswith("_final")]}
    style = {"bon": ("C0", "o", "best-of-n"), "ppo": ("C1", "s", "PPO (train rollouts)"), "final": ("C2", "D", "final")}
    fig, ax = new_figure((6, 4))
    for name, pts in groups.items():
        if not pts:
            continue
        color, marker, label = style[name]
        for pm, hollow in (("pm_a", False), ("pm_b", True)):
            d = [math.sqrt(max(p["kl"], 0.0)) for p in pts]
            ax.scatter(d, [p[pm] for p in pts], marker=marker, s=28, label=f"{label}, {'PM-B' if hollow else 'PM-A'}",
                       facecolors="none" if hollow else color, edgecolors=color)
            if name == "final":
                for x, p in zip(d, pts):
                    ax.annotate(p["method"][:-len("_final")], (x, p[pm]), xytext=(3, 3), textcoords="offset points")
            for suffix, ls_a, ls_b in (("", "-", "--"), ("_linear", (0, (1, 1)), (0, (1, 2)))):
                fit = fits.get(f"{name}_{pm}{suffix}")
                if fit:
                    xs = [max(d) * i / 50 for i in range(51)]
                    ax.plot(xs, fit_curve(fit, xs, fit.get("r0", pts[0][pm])), ls=ls_b if hollow else ls_a,
                            color=color, lw=1.2 if suffix == "" else 0.8)
    ax.set(xlabel="d = sqrt(KL to SFT), sqrt(nats)", ylabel="reward (normalised PM score)",
           title="Reward vs sqrt(KL): lines = Gao et al. fits, dotted = linear")
    ax.legend(ncol=2)
    save_png(fig, path)
    return True


def plot_policies(policies, path):
    """Two panels: mean PM-A and PM-B reward per policy, and PM-B win rate against SFT samples, raw and
    length-controlled; error bars are one standard error over prompts (absent in older eval.json files)."""
    names = [n for n in POLICY_ORDER if n in policies] + [n for n in policies if n not in POLICY_ORDER]
    if not names:
        return False
    fig, (ax_r, ax_w) = new_figure((max(7, 1.4 * len(names)), 3.2), 1, 2)
    x = range(len(names))
    col = lambda key: [policies[n].get(key, float("nan")) for n in names]  # noqa: E731
    ax_r.bar([i - 0.2 for i in x], col("pm_reward"), 0.4, yerr=col("pm_reward_se"), color="C0", label="PM-A (proxy)")
    ax_r.bar([i + 0.2 for i in x], col("heldout_pm_reward"), 0.4, yerr=col("heldout_pm_reward_se"), color="C1",
             label="PM-B (held out)")
    ax_r.axhline(0, color="black", lw=0.6)
    ax_r.set(xticks=list(x), xticklabels=names, ylabel="mean reward", title="reward on test prompts")
    ax_r.legend()
    ax_w.bar([i - 0.2 for i in x], col("win_rate_vs_sft"), 0.4, yerr=col("win_rate_se"), color="C1", label="raw")
    ax_w.bar([i + 0.2 for i in x], col("lc_win_rate_vs_sft"), 0.4, yerr=col("lc_win_rate_se"), color="C2",
             label="length-controlled")
    ax_w.axhline(0.5, color="gray", ls=":")
    ax_w.set(xticks=list(x), xticklabels=names, ylim=(0, 1), ylabel="P(PM-B prefers it to SFT)",
             title="win rate vs SFT (PM-B judge)")
    ax_w.legend()
    for ax in (ax_r, ax_w):
        ax.tick_params(axis="x", labelrotation=30 if len(names) > 6 else 0)  # a beta sweep's long names
    save_png(fig, path)
    return True


def plot_size_study(rows, path):
    """PM size vs robustness (pm_size_study.json): PM-A and PM-B test accuracy, and the KL between their score
    distributions, against trunk parameters (log scale). The HH paper: the KL falls as the PMs grow."""
    if not rows:
        return False
    fig, (ax_a, ax_k) = new_figure((7, 3.2), 1, 2)
    params = [r["params"] for r in rows]
    def with_ci(ax, key, **style):  # a value per row and its 95% interval as error bars
        ci = [r.get(f"{key}_ci", [r[key], r[key]]) for r in rows]
        ax.errorbar(params, [r[key] for r in rows], yerr=[[r[key] - c[0] for r, c in zip(rows, ci)],
                    [c[1] - r[key] for r, c in zip(rows, ci)]], capsize=3, **style)

    for key, label, color in (("accuracy", "PM-A", "C0"), ("heldout_pm_accuracy", "PM-B", "C1")):
        with_ci(ax_a, key, fmt="o-", color=color, label=label)
    ax_a.set(xscale="log", xlabel="trunk parameters", ylabel="test accuracy", title="accuracy (95% CI)")
    ax_a.legend()
    with_ci(ax_k, "score_kl_a_b", fmt="s-", color="C2")
    for r in rows:
        ax_k.annotate(r["size"], (r["params"], r["score_kl_a_b"]), xytext=(3, 3), textcoords="offset points")
    ax_k.set(xscale="log", xlabel="trunk parameters", ylabel="KL(A || B), nats", title="PM-A vs PM-B score KL (95% CI)")
    save_png(fig, path)
    return True


def plot_elo(elo, path):
    """Elo of every policy (eval.json or online.json "elo"), raw and length-controlled, SFT at 0, with the 95%
    bootstrap intervals: the HH paper's fig. 1 reports its policies this way."""
    if not elo:
        return False
    fig, ax = new_figure((6, 3))
    names = list(elo)
    for k, (key, label) in enumerate((("elo", "raw"), ("lc_elo", "length-controlled"))):
        x = [i + (k - 0.5) * 0.35 for i in range(len(names))]
        values = [elo[n][key] for n in names]
        err = [[v - elo[n][f"{key}_ci"][0] for n, v in zip(names, values)],
               [elo[n][f"{key}_ci"][1] - v for n, v in zip(names, values)]]
        ax.bar(x, values, 0.35, yerr=err, capsize=3, label=label, color=f"C{k}")
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="Elo vs SFT (PM-B judges)", title="Elo of every policy (95% bootstrap intervals over prompts)")
    ax.legend()
    save_png(fig, path)
    return True


def plot_online(rounds, path):
    """The rounds of `rlhf.py online` (online.json): PM-A's accuracy on each round's new comparisons before it
    trains on them and its agreement with the labeler in its top decile; each round's policy's labeler reward, KL
    and length-controlled win rate against SFT."""
    if not rounds:
        return False
    fig, (ax_pm, ax_pol) = new_figure((7, 3.2), 1, 2)
    later = [r for r in rounds if "comparisons" in r]
    x = [r["round"] for r in later]
    ax_pm.plot(x, [r["pm_a_accuracy"] for r in later], "o-", label="accuracy on new comparisons")
    ax_pm.plot(x, [r["top_decile_agreement"] for r in later], "s-", label="top-decile agreement")
    ax_pm.plot([r["round"] for r in rounds], [r["pm_a_test_accuracy"] for r in rounds], "^-", label="test accuracy")
    ax_pm.set(xlabel="round", ylabel="PM-A vs the labeler", title="what PM-A knew before training")
    ax_pm.legend()
    x = [r["round"] for r in rounds]
    ax_pol.errorbar(x, [r["heldout_pm_reward"] for r in rounds], [r["heldout_pm_reward_se"] for r in rounds],
                    fmt="o-", capsize=3, label="labeler reward")
    ax_pol.errorbar(x, [r["lc_win_rate_vs_sft"] for r in rounds], [r["lc_win_rate_se"] for r in rounds],
                    fmt="s-", capsize=3, label="LC win rate vs SFT")
    ax_pol.plot(x, [r["kl"] for r in rounds], "^--", label="KL to SFT (nats)")
    ax_pol.set(xlabel="round", title="each round's policy", xticks=x)
    ax_pm.set_xticks(x)
    ax_pol.legend()
    save_png(fig, path)
    return True


# ----------------------------------------------------------------------------------------------

def make_plots(out_dir, fig_dir=None):
    """Draw every figure whose data is in out_dir into fig_dir (default out_dir/figures); returns the
    PNG paths written. Missing inputs skip their figure with a printed note."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: no such run directory (pass the out_dir of a run)")
    fig_dir = fig_dir or os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    ev = read_json(os.path.join(out_dir, "eval.json")) or {}
    pm, policies = ev.get("pm") or {}, ev.get("policies") or {}
    online = read_json(os.path.join(out_dir, "online.json")) or {}
    jobs = [
        ("curves.png", "metrics.jsonl", lambda p: plot_curves(load_metrics(os.path.join(out_dir, "metrics.jsonl")), p)),
        ("pm_calibration.png", 'eval.json "pm"', lambda p: plot_calibration(pm, p)),
        ("pm_agreement.png", 'eval.json "pm"', lambda p: plot_agreement(pm, p)),
        ("frontier.png", "frontier.jsonl", lambda p: plot_frontier(
            read_jsonl(os.path.join(out_dir, "frontier.jsonl")), ev.get("frontier_fits") or {}, p)),
        ("policies.png", 'eval.json "policies"', lambda p: plot_policies(policies, p)),
        ("pm_size_study.png", "pm_size_study.json", lambda p: plot_size_study(
            read_json(os.path.join(out_dir, "pm_size_study.json")) or [], p)),
        ("elo.png", 'eval.json "elo"', lambda p: plot_elo((ev.get("elo") or {}).get("policies"), p)),
        ("online.png", "online.json", lambda p: plot_online((online.get("rounds") or []), p)),
    ]
    style = {"axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 9, "axes.labelsize": 8, "font.size": 7,
             "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7}
    written = []
    for name, source, draw in jobs:
        path = os.path.join(fig_dir, name)
        with matplotlib.rc_context(style):
            drawn = draw(path)
        if drawn:
            written.append(path)
        else:
            print(f"[plot] skipped {name}: no data in {source} of {out_dir}")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw a run's figures (needs matplotlib).")
    parser.add_argument("--out_dir", default="out", help="the run's out_dir (metrics.jsonl, eval.json, frontier.jsonl)")
    parser.add_argument("--fig_dir", default=None, help="where the PNGs go (default OUT_DIR/figures)")
    args = parser.parse_args()
    try:
        for path in make_plots(args.out_dir, args.fig_dir):
            print(f"[plot] {path}")
    except (RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
