"""
Human feedback at the terminal: `python rlhf.py label` shows a person two replies and records which one they
prefer, as comparisons in hh-rlhf's own layout, which the PMs then train on as one more subset.

    python rlhf.py label                                   # review: sft vs ppo on train prompts, key 1/2/t/s/q
    python rlhf.py label --label.chat=true                 # chat: write the Human turns, pick a reply at each turn
    python rlhf.py label --label.chat=true --label.task=harmless   # red-teaming: pick the MORE harmful reply
    python rlhf.py label --label.best_of=8 --label.policies=rs     # the best two of 8 samples by PM-A
    python rlhf.py rm --force --data.extra_dir=out/labels  # PMs trained on hh-rlhf plus these comparisons

The HH comparisons were collected this way (Bai et al. 2022, sec. 2.2-2.3): crowdworkers talked to deployed models
in open-ended dialogues and, at each turn, were offered two replies. For helpfulness they picked the more helpful
one, and the dialogue went on with it; for harmlessness they red-teamed the model and picked the more harmful one.
The "online" data came from the RLHF policies being trained, and the "rejection sampling" data from the best two
of 16 samples ranked by a PM. Here the two replies come from two policies (`--label.policies`, shown in a seeded
random order so a person cannot learn which side is which), or are PM-A's best two of `--label.best_of` samples of
one policy.

Every decision, ties and skips too, is one line of labels_dir/decisions.jsonl, written and fsynced before the next
reply is shown; labels_dir/online-{task}/train.jsonl.gz, rows {"chosen", "rejected"} as hh-rlhf's, is rebuilt
from it after each decision by an atomic rename. Ctrl-C loses nothing, and a second run goes on with the same
files (review mode offers only prompts not yet decided). --data.extra_dir=labels_dir reads them back (data.py).
"""
import gzip
import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass

import numpy as np

from pm_metrics import bootstrap, bradley_terry
from reward import load_reward_model, score_texts
from runtime import ConfigError, load_model, pick_device
from sampling import SampleConfig, complete, format_prompt, policy_path, rl_prompts


@dataclass
class LabelConfig:
    """`label`: which replies a person compares, and where the comparisons go."""
    policies: str = "sft,ppo"    # the two policies compared: checkpoints in out_dir (base, sft, cd, rs, ppo, dpo)
                                 # or .pt paths; with best_of, the first one's samples
    best_of: int = 0             # > 0: HH's rejection-sampling interface: PM-A's best two of this many samples
    chat: bool = False           # true: the person writes the Human turns of an open-ended dialogue (HH's interface)
    task: str = "helpful"        # helpful: pick the more helpful reply (chosen); harmless: red-teaming, pick the
                                 # more harmful reply (rejected)
    split: str = "train"         # review mode: the split whose prompts are offered (train or test)
    num_prompts: int = 20        # review mode: prompts offered a run, those decided before left out (0 = all)
    show_turns: int = 4          # review mode: the dialogue's last turns shown above the two replies
    labels_dir: str = ""         # decisions.jsonl and online-{task}/train.jsonl.gz; "" = out_dir/labels
    max_new_tokens: int = 0      # reply length cap (0 = ppo.max_new_tokens); the temperature is PPO's


TASKS = {"helpful": "more helpful", "harmless": "more harmful"}  # what key 1 or 2 says about a reply
KEYS = ("1", "2", "t", "s", "q")
MADE_BY = {"base": "pretrain", "sft": "sft", "cd": "cd", "rs": "rs", "ppo": "ppo", "dpo": "dpo", "pm_a": "rm"}


def check_label(label_cfg):
    """The label section's values a type cannot check, before any model loads -> the policies' names."""
    names = [p.strip() for p in label_cfg.policies.split(",") if p.strip()]
    if label_cfg.task not in TASKS:
        raise ConfigError(f"--label.task must be helpful or harmless, got {label_cfg.task!r}")
    if label_cfg.split not in ("train", "test"):
        raise ConfigError(f"--label.split must be train or test, got {label_cfg.split!r}")
    if label_cfg.best_of < 0 or label_cfg.best_of == 1:
        raise ConfigError(f"--label.best_of must be 0 (two policies) or at least 2 (PM-A's best two of that many "
                          f"samples), got {label_cfg.best_of}")
    if label_cfg.best_of and not names:
        raise ConfigError("--label.best_of samples the first of --label.policies, which is empty")
    if not label_cfg.best_of and len(names) != 2:
        raise ConfigError(f"--label.policies needs two policies, e.g. sft,ppo, got {len(names)} "
                          f"({label_cfg.policies!r}); or --label.best_of=N: the best two of N samples of one")
    return names


# ----------------------------------------------------------------------------------------------
# storage: decisions.jsonl, appended one fsynced line at a time, and the comparisons made of it

def append_decision(path, decision):
    """One decision as one JSON line, on disk (flushed and fsynced) before the next reply is shown. A file whose
    last line was cut short (a crash mid-write) gets a newline first, so the new line stays whole."""
    line = json.dumps(decision, ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))  # (append mode: the write goes to the end wherever the seek left it)
        f.flush()
        os.fsync(f.fileno())


def decision_problem(d):
    """What makes a parsed line unusable as a decision, or None."""
    if not isinstance(d, dict):
        return f"expected a JSON object, got {type(d).__name__}"
    for key in ("mode", "task", "prompt", "key"):
        if not isinstance(d.get(key), str):
            return f"no string {key!r}"
    if not (isinstance(d.get("replies"), list) and len(d["replies"]) == 2 and all(isinstance(r, str)
                                                                                  for r in d["replies"])):
        return "'replies' is not two strings"
    if d["key"] not in KEYS[:4] or d["task"] not in TASKS or not d["prompt"].endswith("\n\nAssistant:"):
        return "a key, task or prompt this labeller does not write"
    return None


def read_decisions(path):
    """Every decision in decisions.jsonl. A broken line (a half-written last one, an edit gone wrong) is reported
    in one line naming the file and line and left out; the rest are kept."""
    if not os.path.exists(path):
        return []
    decisions = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
                why = decision_problem(d)
            except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
                why = f"not JSON ({str(e)[:60]})"
            if why:
                print(f"[label] {path}:{line_no}: broken line left out ({why}); the other lines are kept")
            else:
                decisions.append(d)
    return decisions


def comparison(d):
    """A decision as an hh-rlhf row, or None for a tie or a skip. helpful: the picked reply is chosen; harmless
    (red-teaming): the picked reply is the more harmful one, so it is rejected. Both dialogues are the prompt
    plus " " + a reply, as hh-rlhf's are: identical up to the last Assistant turn."""
    if d["key"] not in ("1", "2"):
        return None
    picked, other = d["replies"][int(d["key"]) - 1], d["replies"][2 - int(d["key"])]
    chosen, rejected = (other, picked) if d["task"] == "harmless" else (picked, other)
    return {"chosen": f"{d['prompt']} {chosen}", "rejected": f"{d['prompt']} {rejected}"}


def write_comparisons(labels_dir, task, decisions):
    """labels_dir/online-{task}/train.jsonl.gz from every decision of that task (write_subset). None while the task
    has no comparison (read_pairs refuses an empty file) -> the path, or None."""
    rows = [r for d in decisions if d["task"] == task and (r := comparison(d))]
    return write_subset(labels_dir, f"online-{task}", rows) if rows else None


def write_subset(labels_dir, subset, rows):
    """labels_dir/subset/train.jsonl.gz holding rows {"chosen", "rejected"} as hh-rlhf's: a temp file, fsynced,
    renamed over the old one, so a reader never sees half a file. -> the path."""
    path = os.path.join(labels_dir, subset, "train.jsonl.gz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(path + ".tmp", path)
    return path


def human_elo(decisions, reference="sft", reps=200, seed=0):
    """The Elo of the policies a person compared (HH fig. 1 from people's verdicts): every decided comparison of two
    different policies (helpful: the pick wins; harmless: the pick, the more harmful, loses; a tie is half),
    fitted as a Bradley-Terry model (pm_metrics) with `reference` at 0, 95% intervals from a bootstrap over the
    decisions. -> {policy: {"elo", "elo_ci", "comparisons"}}, or {} without a decided comparison with `reference`."""
    rows = [d for d in decisions if d["key"] in ("1", "2", "t") and len(set(d.get("policies", []))) == 2
            and not any("best-of-" in p for p in d["policies"])]
    names = sorted({p for d in rows for p in d["policies"]} - {reference})
    if not rows or not any(reference in d["policies"] for d in rows):
        return {}
    names = [reference] + names
    first, second = (np.array([names.index(d["policies"][k]) for d in rows]) for k in (0, 1))
    y = np.array([0.5 if d["key"] == "t" else float((d["key"] == "1") != (d["task"] == "harmless")) for d in rows])
    fit = lambda idx: bradley_terry(first[idx], second[idx], y[idx], len(names))[0] * 400 / np.log(10)  # noqa: E731
    point, boot = fit(np.arange(len(rows))), bootstrap(fit, len(rows), reps, seed)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {n: {"elo": round(float(point[k]), 1), "elo_ci": [round(float(lo[k]), 1), round(float(hi[k]), 1)],
                "comparisons": int(sum(n in d["policies"] for d in rows))} for k, n in enumerate(names)}


class LabelStore:
    """decisions.jsonl and the comparisons rebuilt from it; a second run reads both and goes on."""

    def __init__(self, labels_dir):
        os.makedirs(labels_dir, exist_ok=True)
        self.dir, self.path = labels_dir, os.path.join(labels_dir, "decisions.jsonl")
        self.decisions = read_decisions(self.path)
        for task in TASKS:  # a crash between a decision's line and its rename: the comparisons catch up
            write_comparisons(self.dir, task, self.decisions)

    def add(self, decision):
        append_decision(self.path, decision)
        self.decisions.append(decision)
        write_comparisons(self.dir, decision["task"], self.decisions)


# ----------------------------------------------------------------------------------------------
# the two replies

def checkpoint_path(out_dir, name):
    """The checkpoint of a policy name (or pm_a), which must exist: else one line naming the stage that makes it."""
    path = policy_path(out_dir, name)
    if not os.path.exists(path):
        stage = MADE_BY.get(name)
        raise ConfigError(f"{path} not found: " + (f"run `python rlhf.py {stage}` first" if stage else
                                                    "--label.policies names base, sft, cd, rs, ppo, dpo or a .pt"))
    return path


def load_offer(run, label_cfg, ppo_cfg):
    """Load the policies (and PM-A for best_of) -> (offer, the first policy's tokenizer, the policies' names).
    offer(prompt) gives two replies to a dialogue ending in "\\n\\nAssistant:", with the policy each came from,
    in a random order seeded by the prompt: {"replies", "policies"[, "pm_a"]}. Replies are sampled as PPO samples
    (its temperature, no top-k or top-p), each policy with its own seed, so two samples of one policy differ."""
    names = check_label(label_cfg)
    names = names[:1] if label_cfg.best_of else names
    paths = [checkpoint_path(run.out_dir, n) for n in names + (["pm_a"] if label_cfg.best_of else [])]
    device = pick_device(run.device)
    policies = [load_model(p, device)[:2] for p in paths[:len(names)]]
    sample_cfg = SampleConfig(max_new_tokens=label_cfg.max_new_tokens or ppo_cfg.max_new_tokens,
                              temperature=ppo_cfg.temperature, top_k=0, top_p=1.0)
    pm, pm_tok, _ = load_reward_model(paths[-1], device) if label_cfg.best_of else (None, None, None)

    def offer(prompt):
        seed, n = run.seed + zlib.crc32(prompt.encode("utf-8")), label_cfg.best_of
        extra = {}
        if n:  # 1. n samples of one policy  2. PM-A scores each  3. the best two
            (model, tok), = policies
            samples = complete(model, tok, [prompt] * n, sample_cfg, seed, run.dtype)
            scores = score_texts(pm, pm_tok, [prompt] * n, [" " + s for s in samples])
            top = sorted(range(n), key=lambda i: -scores[i])[:2]
            replies = [samples[i] for i in top]
            sources = [f"{names[0]} best-of-{n} #{rank}" for rank in (1, 2)]
            extra = {"pm_a": [round(scores[i], 4) for i in top]}
        else:
            replies = [complete(model, tok, [prompt], sample_cfg, seed + j, run.dtype)[0]
                       for j, (model, tok) in enumerate(policies)]
            sources = names
        order = [0, 1] if random.Random(f"order:{seed}").random() < 0.5 else [1, 0]
        return {"replies": [replies[i] for i in order], "policies": [sources[i] for i in order],
                **{k: [v[i] for i in order] for k, v in extra.items()}}

    return offer, policies[0][1], names


# ----------------------------------------------------------------------------------------------
# the terminal: input() reads each key and each Human turn (Ctrl-D = quit), so a test feeds sys.stdin

def read_line(question):
    """One line typed after `question`, or None at Ctrl-D (end of input) or Ctrl-C."""
    try:
        return input(question)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def read_key(task):
    """1, 2, t, s or q, asked again until it is one of them; Ctrl-D is q."""
    question = f"which reply is {TASKS[task]}? 1, 2, t (tie), s (skip), q (quit): "
    while (key := read_line(question)) is not None:
        if key.strip().lower() in KEYS:
            return key.strip().lower()
        print(f"  keys: 1 or 2 (the {TASKS[task]} reply), t (a tie), s (skip it), q (quit)")
    return "q"


def show_dialogue(prompt, n_turns):
    """The dialogue's last n_turns turns, without the empty Assistant turn it ends with."""
    turns = [t.strip() for t in re.split(r"\n\n(?=Human:|Assistant:)", prompt) if t.strip()][:-1]
    if len(turns) > n_turns:
        print(f"  ({len(turns) - n_turns} turn{'s' * (len(turns) - n_turns > 1)} before these)")
    for turn in turns[-n_turns:]:
        print(turn)


def show_replies(replies):
    for i, reply in enumerate(replies, 1):
        print(f"[{i}] Assistant: " + (reply or "(an empty reply)").replace("\n", "\n    "))


def decision(mode, task, prompt, offered, key):
    """What decisions.jsonl keeps of one decision: enough to rebuild its comparison and audit it."""
    return {"mode": mode, "task": task, "prompt": prompt, **offered, "key": key, "time": round(time.time(), 1)}


# ----------------------------------------------------------------------------------------------
# the two modes

def ask(mode, label_cfg, prompt, offer, store):
    """Two replies to `prompt`, the person's key, and the decision recorded (q records nothing) -> (key, offered)."""
    offered = offer(prompt)
    show_replies(offered["replies"])
    key = read_key(label_cfg.task)
    if key != "q":
        store.add(decision(mode, label_cfg.task, prompt, offered, key))
    return key, offered


def review(run, label_cfg, offer, tok, store):
    """Review mode: the split's prompts in rl_prompts' order, those of this task decided before left out; two
    replies to each, one key each."""
    decided = {d["prompt"] for d in store.decisions if d["mode"] == "review" and d["task"] == label_cfg.task}
    prompts = [t for t, _ in rl_prompts(run, label_cfg.split, tok, 0) if t not in decided]
    prompts = prompts[:label_cfg.num_prompts or None]
    print(f"[label] review: {len(prompts)} {label_cfg.split} prompts ({len(decided)} decided before)")
    for i, prompt in enumerate(prompts, 1):
        print(f"\n--- {i}/{len(prompts)} ---")
        show_dialogue(prompt, label_cfg.show_turns)
        if ask("review", label_cfg, prompt, offer, store)[0] == "q":
            return


def chat(label_cfg, offer, store):
    """Chat mode, HH's interface: the person writes each Human turn, picks one of the two replies, and the
    dialogue goes on with the picked one (reply 1 after a tie or a skip). An empty line ends the dialogue and
    starts another; an empty first turn, q or Ctrl-D quits."""
    print(f"[label] chat ({label_cfg.task}): write a Human turn; an empty line ends the dialogue, Ctrl-D quits")
    while True:
        dialogue = ""
        while True:
            human = read_line("Human: ")
            if human is None or not (human.strip() or dialogue):
                return
            if not human.strip():
                break
            dialogue += format_prompt(human)
            key, offered = ask("chat", label_cfg, dialogue, offer, store)
            if key == "q":
                return
            picked = offered["replies"][int(key) - 1 if key in ("1", "2") else 0]
            print(f"Assistant: {picked}")
            dialogue += " " + picked
        print("\n--- a new dialogue ---")


def stage_label(run, label_cfg, ppo_cfg):
    """`label`: a person compares two replies at a time; the comparisons land in labels_dir. Returns the
    decisions of this run."""
    offer, tok, names = load_offer(run, label_cfg, ppo_cfg)
    labels_dir = label_cfg.labels_dir or os.path.join(run.out_dir, "labels")
    store = LabelStore(labels_dir)
    n_before = len(store.decisions)
    what = f"PM-A's best two of {label_cfg.best_of} samples of {names[0]}" if label_cfg.best_of else " vs ".join(names)
    print(f"[label] {what} | task {label_cfg.task} | {n_before} decisions in {store.path}")
    try:
        chat(label_cfg, offer, store) if label_cfg.chat else review(run, label_cfg, offer, tok, store)
    except KeyboardInterrupt:
        print()
    new = store.decisions[n_before:]
    rows = [r for d in store.decisions if d["task"] == label_cfg.task and (r := comparison(d))]
    print(f"[label] {len(new)} decisions saved ({sum(d['key'] in ('1', '2') for d in new)} comparisons); "
          f"{len(rows)} {label_cfg.task} comparisons in {labels_dir}: train on them with --data.extra_dir={labels_dir}")
    return new
