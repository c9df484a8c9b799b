"""
The tools around the flow: `sample` and `chat` (talk to any policy), `export` (a Hugging Face GPT-2
folder), `plot` (figures from a run's logs; matplotlib is an optional extra).

    python rlhf.py chat --policy ppo [--sample.show_score=true]
    python rlhf.py sample --policy sft --prompt "How do I bake bread?"
    python rlhf.py export --policy ppo --to DIR
    python rlhf.py plot
"""
import os
from dataclasses import dataclass

from data import read_pairs, resolve_data_dir
from hub import export_hf, save_safetensors
from runtime import ConfigError, load_model, pick_device
from sampling import complete, show_samples
@dataclass
class SampleConfig:
    """`sample` and `chat`: which policy to talk to and how to decode."""
    policy: str = "sft"          # base | sft | rs | ppo, or a checkpoint path
    prompt: str = ""             # one Human turn to complete; "" = a few held-out test prompts
    prompts_file: str = ""       # a text file with one Human turn per line
    num_samples: int = 4         # prompts taken from the test split when no prompt is given
    max_new_tokens: int = 128    # reply length cap
    temperature: float = 0.7     # sampling temperature (0 = greedy)
    top_k: int = 0               # 0 = off
    top_p: float = 0.95          # nucleus sampling (1.0 = off)
    show_score: bool = False     # chat: print the held-out PM-B's score of each reply


@dataclass
class ExportConfig:
    """`export`: write a checkpoint as a Hugging Face GPT-2 folder (weights, config, GPT-2's tokenizer files)."""
    policy: str = "ppo"          # base | sft | rs | ppo | pm_a | pm_b, or a checkpoint path
    to: str = ""                 # output folder ("" = out_dir/hf/<policy>)


# ----------------------------------------------------------------------------------------------
# sample and chat

def format_prompt(human_turn):
    """One Human turn in hh-rlhf's dialogue format, ready for the Assistant's reply."""
    return f"\n\nHuman: {human_turn.strip()}\n\nAssistant:"


def policy_path(out_dir, policy):
    """--sample.policy: base | sft | rs | ppo (a checkpoint in out_dir), or a path to any .pt."""
    p = policy
    return p if p.endswith(".pt") else os.path.join(out_dir, f"{p}.pt")


def stage_sample(run, sc):
    """Print completions from any checkpoint, for one prompt, a file of prompts, or held-out prompts."""
    model, tok, _ = load_model(policy_path(run.out_dir, sc.policy), pick_device(run.device))
    if sc.prompt or sc.prompts_file:
        if sc.prompts_file:
            try:
                with open(sc.prompts_file, encoding="utf-8") as f:
                    turns = [line.strip() for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--sample.prompts_file: cannot read {sc.prompts_file} ({e})") from None
        else:
            turns = [sc.prompt]
        for turn, reply in zip(turns, complete(model, tok, [format_prompt(t) for t in turns], sc, run.seed, run.dtype)):
            print(f"Human: {turn}\nAssistant: {reply}\n")
    else:
        test_pairs, _ = read_pairs(resolve_data_dir(run.data_dir or None), "test", run.data)
        show_samples(model, tok, test_pairs, sc, run.seed, sc.policy, run.dtype)


def stage_chat(run, sc):
    """An interactive multi-turn chat, kept in hh-rlhf's Human/Assistant format."""
    from reward import load_reward_model, score_texts  # only needed with --sample.show_score
    device = pick_device(run.device)
    model, tok, _ = load_model(policy_path(run.out_dir, sc.policy), device)
    judge = load_reward_model(os.path.join(run.out_dir, "pm_b.pt"), device) if sc.show_score else None
    print(f"chatting with {policy_path(run.out_dir, sc.policy)} (empty line or Ctrl-D to quit, /reset to start over)")
    dialogue, turn = "", 0
    while True:
        try:
            human = input("Human: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not human:
            return
        if human == "/reset":
            dialogue = ""
            continue
        dialogue += format_prompt(human)
        reply = complete(model, tok, [dialogue], sc, run.seed + turn, run.dtype)[0]
        turn += 1
        score = f"   [PM-B score {score_texts(*judge[:2], [dialogue], [' ' + reply])[0]:+.2f}]" if judge else ""
        print(f"Assistant: {reply}{score}")
        dialogue += " " + reply


# ----------------------------------------------------------------------------------------------
# export and plot

def stage_export(run, ec, sc):
    """Write a policy (or a preference model's trunk plus its head) as a Hugging Face GPT-2 folder."""
    path = ec.policy if ec.policy.endswith(".pt") else os.path.join(run.out_dir, f"{ec.policy}.pt")
    model, tok, ckpt = load_model(path)
    to = ec.to or os.path.join(run.out_dir, "hf", os.path.basename(path).removesuffix(".pt"))
    # generate() and pipeline() then sample as `sample` and `chat` do
    export_hf(model, to, keep=tok.keep, enc=tok.enc,
              generation=dict(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p))
    if "head.weight" in ckpt["model"]:  # a PM: score = gain * (w . h_EOS + b) + bias
        head = {"weight": ckpt["model"]["head.weight"], "bias": ckpt["model"]["head.bias"]}
        save_safetensors(head, os.path.join(to, "reward_head.safetensors"),
                         metadata={"gain": str(ckpt.get("reward_gain", 1.0)), "bias": str(ckpt.get("reward_bias", 0.0)),
                                   "read_at": "final hidden state (after ln_f) of the EOS token appended to the reply"})
    print(f"[export] {path} -> {to} ({', '.join(sorted(os.listdir(to)))})")


def stage_plot(out_dir):
    """Figures from metrics.jsonl, eval.json and frontier.jsonl (needs matplotlib, an optional extra)."""
    from plot import make_plots  # optional: nothing else imports matplotlib
    try:
        paths = make_plots(out_dir)
    except (RuntimeError, FileNotFoundError) as e:  # matplotlib not installed, or no such out_dir
        raise ConfigError(str(e)) from None
    for path in paths:
        print(f"[plot] {path}")
