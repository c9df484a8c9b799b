"""
The PM studies: each trains more preference models on the rm stage's data and prints one table (and keeps
it in eval.json["pm"]). `python rlhf.py studies` runs those asked for, after the rm stage:

    python rlhf.py studies --preset=cpu --studies.ablation=true  # ranking vs binary vs lm scoring
    python rlhf.py studies --preset=cpu --studies.pmp=true       # accuracy vs human pairs, with and without PMP
    python rlhf.py studies --studies.hh=true                     # helpful vs harmless (both kinds of subset)
    python rlhf.py studies --preset=cpu --studies.size=true      # PM size vs robustness -> pm_size_study.json

References:
- Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", arXiv:2112.00861: ranked vs
  binary preference modeling vs imitation (LM), and preference-model pretraining (PMP).
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", arXiv:2204.05862: helpfulness and
  harmlessness in tension (sec. 2.4, 4.2), and PM robustness: two PMs on halves of the data agree more, their
  score distributions closer, the larger they are (sec. 4.5, fig. 15-16).
"""
import copy
import json
import os
import time
from dataclasses import replace

import numpy as np

from data import read_pairs, resolve_data_dir
from hub import GPT2_SIZES
from model import GPT
from pm_metrics import ci_str, pair_accuracy, pm_report, reply_pairs, update_eval_json, wilson_interval
from reward import load_reward_model, pm_block, score_pairs, score_sequences
from rm import init_reward_model, pm_inputs, pmp_data, train_pm
from runtime import (ConfigError, MetricsLog, barrier, dist_info, load_checkpoint, model_checkpoint, save_checkpoint,
                     set_seed)
from tokens import lm_tokens, sft_example
from train import supervised_train


# -----------------------------------------------------------------------------
# tables, and the two studies of Askell et al. 2021: PM objectives, and PMP against the number of human pairs

def print_table(title, header, rows):
    """Print a markdown table (easy to paste into report.md); rank 0 alone under torchrun."""
    if dist_info()[0] == 0:
        print("\n".join([f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                        + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]))


def accuracy_row(name, r_c, r_r, wall_s, **extra):
    acc = pair_accuracy(r_c, r_r)
    return {"name": name, "accuracy": acc, "accuracy_ci": list(wilson_interval(acc * len(r_c), len(r_c))),
            "wall_s": round(wall_s, 1), **extra}


def objective_ablation(run, rm_cfg, inp, test_pairs):
    """Ranking vs binary vs LM scoring on the same half-A pairs (Askell et al. 2021), judged by test
    accuracy. "lm" is not trained: it scores with the SFT policy's log-probs. "wall s" is training
    time (for lm: scoring time); the ranking row is PM-A itself when PM-A was trained that way."""
    device, rows, dtype, policy, tok = inp.device, [], run.dtype, inp.policy, inp.tok
    train_ex, test_ex, block = inp.enc(inp.halves[0]), inp.enc(test_pairs), pm_block(policy, run.data)
    for objective in ("ranking", "binary", "lm"):
        t0 = time.time()
        if objective == "lm":
            ex = [sft_example(p.prompt, r, tok, block, run.data.max_reply_tokens) for p in test_pairs
                  for r in (p.chosen, p.rejected)]
            s = score_sequences(policy, [e[0] for e in ex], tok.eos_id, rm_cfg.eval_batch_size, [e[1] for e in ex],
                                dtype)
            rows.append(accuracy_row("lm (SFT mean log-prob)", s[0::2], s[1::2], time.time() - t0))
            continue
        if objective == rm_cfg.objective and not (rm_cfg.pmp or rm_cfg.pmp_dir) and rm_cfg.split_halves:
            # PM-A itself: reuse it
            model, _, info = load_reward_model(os.path.join(run.out_dir, "pm_a.pt"), device)
        else:
            set_seed(run.seed)
            model, _ = init_reward_model(inp.init, device)
            info = train_pm(run, rm_cfg, model, tok, train_ex, inp.val_ex, objective, name=f"ablation_{objective}")
        scores = score_pairs(model, test_ex, tok.eos_id, rm_cfg.eval_batch_size, dtype)
        rows.append(accuracy_row(objective, *scores, info["wall_s"], steps=info["steps"], best_step=info["best_step"]))
    print_table(f"PM objectives: {len(train_ex)} half-A pairs, {len(test_ex)} test pairs, accuracy [95% Wilson CI]",
                ["objective", "test accuracy", "wall s"],
                [[r["name"], ci_str(r["accuracy"], r["accuracy_ci"]), r["wall_s"]] for r in rows])
    return rows


def pmp_study(run, rm_cfg, inp, test_pairs):
    """Test accuracy vs number of human pairs (25/50/100% of half A), with and without PMP (Askell
    et al. 2021: PMP helps most when human data is scarce). The PMP phase runs once and its weights
    start every "with PMP" run; "wall s" is the human-pair phase only."""
    device, rows, dtype, tok = inp.device, [], run.dtype, inp.tok
    train_ex, test_ex = inp.enc(inp.halves[0]), inp.enc(test_pairs)
    set_seed(run.seed)
    trunk, _ = init_reward_model(inp.init, device)
    pmp = inp.enc(pmp_data(run, replace(rm_cfg, pmp=True), inp.train_pairs))
    pmp_wall = train_pm(run, rm_cfg, trunk, tok, [], [], "ranking", pmp_ex=pmp, name="pmp")["wall_s"]
    pmp_state = copy.deepcopy(trunk.state_dict())
    order = np.random.default_rng(run.seed).permutation(len(train_ex))  # nested subsets: 25% within 50% within 100%
    for use_pmp in (False, True):
        for frac in (0.25, 0.5, 1.0):
            subset = [train_ex[i] for i in order[:int(frac * len(train_ex))]]
            set_seed(run.seed)
            model, _ = init_reward_model(inp.init, device)
            if use_pmp:
                model.load_state_dict(pmp_state)
            info = train_pm(run, rm_cfg, model, tok, subset, inp.val_ex, rm_cfg.objective,
                            name=f"study_{'pmp_' if use_pmp else ''}{frac}")
            scores = score_pairs(model, test_ex, tok.eos_id, rm_cfg.eval_batch_size, dtype)
            rows.append(accuracy_row(f"{'PMP + ' if use_pmp else ''}{len(subset)} pairs", *scores,
                                 info["wall_s"], pmp=use_pmp, pairs=len(subset), steps=info["steps"]))
    print_table(f"PMP study: {rm_cfg.pmp_steps} PMP steps ({pmp_wall:.0f}s, run once), {len(test_ex)} test pairs, "
                "accuracy [95% CI] (train s)",
                ["human pairs", "no PMP", "with PMP"],
                [[r["pairs"], f"{ci_str(r['accuracy'], r['accuracy_ci'])} ({r['wall_s']:.0f}s)",
                  f"{ci_str(p['accuracy'], p['accuracy_ci'])} ({p['wall_s']:.0f}s)"]
                 for r, p in zip(rows[:3], rows[3:])])
    return {"pmp_steps": rm_cfg.pmp_steps, "pmp_wall_s": round(pmp_wall, 1), "runs": rows}


# -----------------------------------------------------------------------------
# helpful vs harmless (Bai et al. 2022)

def hh_study(run, rm_cfg, inp, test_pairs):
    """PMs trained on the helpful subsets only, on harmless-base only, and on a half-and-half mix, the same
    number of half-A pairs each (so the kind of data differs, not its amount), each scored on every test
    subset. The HH paper (Bai et al. 2022, sec. 2.4, 4.2) found the two kinds pull against each other: a PM of
    one is weak on the other. Each PM early-stops on validation pairs of its own kind (the mix on as many of
    each as there are of the rarer): a mixed validation set also counts the other kind, whose loss rises as a
    single-kind PM learns its own, so it would stop such a PM early and understate the tension measured here."""
    kind = lambda ps: {"helpful": [p for p in ps if p.subset.startswith("helpful")],  # noqa: E731
                       "harmless": [p for p in ps if p.subset == "harmless-base"]}
    kinds, val_kinds = kind(inp.halves[0]), kind(inp.val_pairs)
    if not all(kinds.values()) or not all(val_kinds.values()):
        raise ConfigError(f"--studies.hh needs helpful-* and harmless-base pairs in train and in validation; the "
                          f"data has {sorted({p.subset for p in inp.halves[0]})} and "
                          f"{sorted({p.subset for p in inp.val_pairs})} (the shared sample holds harmless-base only)")
    n, rng = min(map(len, kinds.values())), np.random.default_rng(run.seed)
    pick = lambda ps, k: [ps[i] for i in np.sort(rng.permutation(len(ps))[:k])]  # noqa: E731
    train_sets = {"helpful": pick(kinds["helpful"], n), "harmless": pick(kinds["harmless"], n)}
    train_sets["mix"] = pick(kinds["helpful"], n // 2) + pick(kinds["harmless"], n - n // 2)
    m = min(map(len, val_kinds.values()))
    val_sets = {**val_kinds, "mix": pick(val_kinds["helpful"], m) + pick(val_kinds["harmless"], m)}
    test_ex, subsets = inp.enc(test_pairs), np.array([p.subset for p in test_pairs])
    rows = []
    for name, pairs in train_sets.items():
        set_seed(run.seed)
        model, _ = init_reward_model(inp.init, inp.device)
        info = train_pm(run, rm_cfg, model, inp.tok, inp.enc(pairs), inp.enc(val_sets[name]), rm_cfg.objective,
                        name=f"hh_{name}")
        r_c, r_r = score_pairs(model, test_ex, inp.tok.eos_id, rm_cfg.eval_batch_size, run.dtype)
        rows.append({"train": name, "pairs": len(pairs), "val_pairs": len(val_sets[name]),
                     "best_step": info["best_step"], "wall_s": round(info["wall_s"], 1), "test": {
            s: accuracy_row(s, r_c[subsets == s], r_r[subsets == s], 0, n=int((subsets == s).sum()))
            for s in sorted(set(subsets.tolist()))}})
    names = list(rows[0]["test"])
    print_table(f"Helpful vs harmless: PMs on {n} half-A pairs each, early-stopped on val pairs of their kind, "
                "test accuracy [95% CI] by subset",
                ["trained on"] + [f"{s} ({rows[0]['test'][s]['n']})" for s in names],
                [[r["train"]] + [ci_str(r["test"][s]["accuracy"], r["test"][s]["accuracy_ci"]) for s in names]
                 for r in rows])
    return rows


# -----------------------------------------------------------------------------
# PM size vs robustness (Bai et al. 2022 sec. 4.5)

def trunk_sizes(sizes, vocab):
    """--studies.sizes -> {spec: (n_layer, n_embd)}, or None for GPT-2's weights by name (which need
    --data.vocab=gpt2); one line of error for anything else. rlhf.py checks it before any stage runs."""
    out = {}
    for spec in [s.strip() for s in sizes.split(",") if s.strip()]:
        if spec in GPT2_SIZES:
            if vocab != "gpt2":
                raise ConfigError(f"--studies.sizes: {spec} is GPT-2's weights, which need --data.vocab=gpt2")
            out[spec] = None
            continue
        try:
            n_layer, n_embd = (int(x) for x in spec.split("x"))
        except ValueError:
            n_layer = n_embd = 0
        if n_layer < 1 or n_embd < 1:
            raise ConfigError(f"--studies.sizes: {spec!r} is neither LAYERSxWIDTH (e.g. 4x192) nor one of "
                              f"{', '.join(GPT2_SIZES)}")
        out[spec] = (n_layer, n_embd)
    if len(out) < 2:
        raise ConfigError(f"--studies.sizes needs two or more trunks to compare, got {sizes!r}")
    return out


def size_trunk(run, study_cfg, spec, size, inp, train_cfg, model_cfg, log):
    """The trunk of one size (trunk_sizes' (n_layer, n_embd), or None), as a checkpoint path (out_dir/pm_size_{spec}.pt,
    reused when rerun): GPT-2's weights by name (gpt2, gpt2-medium, gpt2-large: needs --data.vocab=gpt2), or
    LAYERSxWIDTH, a GPT of model_cfg's shape otherwise, pretrained here on the train dialogues for study_cfg.size_steps
    steps with the pretrain section's other settings (heads of 64 dimensions). No SFT: every size starts alike."""
    path = os.path.join(run.out_dir, f"pm_size_{spec}.pt")
    if os.path.exists(path) and load_checkpoint(path).get("done"):
        return path
    if size is None:  # GPT-2's weights
        if dist_info()[0] == 0:
            save_checkpoint(path, model_checkpoint(GPT.from_pretrained(spec), inp.tok, done=True))
        barrier()
        return path
    n_layer, n_embd = size
    set_seed(run.seed)
    trunk = GPT(replace(model_cfg, n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64),
                        vocab_size=inp.tok.vocab_size)).to(inp.device)
    supervised_train(run, f"pm_size_{spec}", replace(train_cfg, max_steps=study_cfg.size_steps, keep_best=False), trunk,
                     inp.tok, lm_tokens(inp.train_pairs, inp.tok), lm_tokens(inp.val_pairs, inp.tok), path, log)
    return path


def size_study(run, rm_cfg, study_cfg, inp, test_pairs, train_cfg, model_cfg):
    """For each trunk of study_cfg.sizes, PM-A on half A and PM-B on half B (as the rm stage trains them),
    both scored on the test pairs: parameters, each PM's accuracy, the KL between their standardised score
    distributions (pm_metrics.score_kl) and their agreement by PM-A score decile. The HH paper: the larger
    the PMs, the closer the two (lower KL), agreeing less where scores are high. -> out_dir/pm_size_study.json"""
    test_ex, log, rows = inp.enc(test_pairs), MetricsLog(run.out_dir), []
    replies = [(len(c), len(r)) for c, r in reply_pairs(test_pairs, inp.tok)]  # for pm_report's length baseline
    for spec, size in trunk_sizes(study_cfg.sizes, run.data.vocab).items():
        t0 = time.time()
        path = size_trunk(run, study_cfg, spec, size, inp, train_cfg, model_cfg, log)
        scores = []
        for k, half in enumerate(inp.halves):
            set_seed(run.seed + k)
            model, _ = init_reward_model(path, inp.device)
            train_pm(run, rm_cfg, model, inp.tok, inp.enc(half), inp.val_ex, rm_cfg.objective,
                     name=f"size_{spec}_{'ab'[k]}")
            scores += score_pairs(model, test_ex, inp.tok.eos_id, rm_cfg.eval_batch_size, run.dtype)
        pm = pm_report([p.n_turns for p in test_pairs], *zip(*replies), *scores)
        rows.append({"size": spec, "params": model.num_params(), **{k: pm[k] for k in (
            "accuracy", "accuracy_ci", "heldout_pm_accuracy", "heldout_pm_accuracy_ci", "score_kl_a_b",
            "score_kl_a_b_ci", "agreement_a_b")},
            "agreement_by_decile": [d["agreement"] for d in pm["agreement_by_decile"]],
            "wall_s": round(time.time() - t0, 1)})
    if dist_info()[0] == 0:
        with open(os.path.join(run.out_dir, "pm_size_study.json.tmp"), "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(os.path.join(run.out_dir, "pm_size_study.json.tmp"), os.path.join(run.out_dir, "pm_size_study.json"))
    print_table(f"PM size vs robustness: PM-A / PM-B on halves of {len(inp.train_pairs)} pairs, {len(test_ex)} test "
                "pairs", ["trunk", "params", "PM-A accuracy", "PM-B accuracy", "score KL A||B", "agreement", "wall s"],
                [[r["size"], f"{r['params'] / 1e6:.2f}M", ci_str(r["accuracy"], r["accuracy_ci"]),
                  ci_str(r["heldout_pm_accuracy"], r["heldout_pm_accuracy_ci"]),
                  f"{r['score_kl_a_b']:.3f} [{r['score_kl_a_b_ci'][0]:.3f}, {r['score_kl_a_b_ci'][1]:.3f}]",
                  f"{r['agreement_a_b']:.2f}", r["wall_s"]] for r in rows])
    return rows


def run_studies(run, rm_cfg, study_cfg, train_cfg, model_cfg):
    """The studies study_cfg asks for, after the rm stage has trained PM-A and PM-B: their tables go into
    eval.json["pm"] (objectives, pmp_study, hh_study), the size study into out_dir/pm_size_study.json."""
    if not (study_cfg.ablation or study_cfg.pmp or study_cfg.hh or study_cfg.size):
        return
    inp = pm_inputs(run, rm_cfg)
    test_pairs, _ = read_pairs(resolve_data_dir(run.data_dir or None), "test", run.data)
    extra = {}
    if study_cfg.hh:  # first: it refuses data without both kinds of subset before anything trains
        extra["hh_study"] = hh_study(run, rm_cfg, inp, test_pairs)
    if study_cfg.ablation:
        extra["objectives"] = objective_ablation(run, rm_cfg, inp, test_pairs)
    if study_cfg.pmp:
        extra["pmp_study"] = pmp_study(run, rm_cfg, inp, test_pairs)
    if extra and dist_info()[0] == 0:
        update_eval_json(run.out_dir, extra)
    if study_cfg.size:
        size_study(run, rm_cfg, study_cfg, inp, test_pairs, train_cfg, model_cfg)
    barrier()
