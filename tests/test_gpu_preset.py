"""The `gpu` preset's code paths at GPT-2-small's shape, on the CPU (slow: RLHF_SLOW=1 runs it).

Every stage of `python rlhf.py all --preset gpu` runs in a subprocess with the preset's shapes kept (12 layers,
12 heads, 768 wide, vocab 50,257, block 1,024, prompts cut to 768 tokens and replies to 256, PPO/eval replies
of ppo.max_new_tokens) and only the counts cut (steps, pairs per batch, samples, prompts) to one or two:
  - the weights: random GPT-2-small weights written in the hub's layout (hub.gpt2_hub_state_dict and
    hub.save_safetensors, the export's own writer), read back through --pretrain.init=PATH (hub.read_gpt2);
  - the data: an hh-rlhf-layout dir whose pairs are all wider than 1,024 GPT-2 tokens (multi-turn prompts of
    ~1,100 tokens, replies of ~330), so every batch is a full-width one: prompt 768 + reply 256.
What it checks is that nothing breaks at this shape (shapes, memory, the stages' hand-offs), not what is learnt.

    RLHF_SLOW=1 python -m pytest -q -s tests/test_gpu_preset.py     # ~6 min, peak RSS ~7.7 GiB, on an idle 2-core CPU
    python tests/test_gpu_preset.py OUT_DIR [extra flags]          # the same run by hand, kept in OUT_DIR
"""
import gzip
import json
import os
import random
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SLOW = os.environ.get("RLHF_SLOW") == "1"
STAGES = ("pretrain", "sft", "cd", "rm", "rs", "ppo", "dpo", "eval")
CHECKPOINTS = ("base", "sft", "cd", "pm_a", "pm_b", "rs", "ppo", "dpo")
POLICIES = ("sft", "bon", "cd", "rs", "ppo", "dpo")

# every count cut to one or two; the shapes are the preset's
COUNTS = [
    "--device=cpu", "--compile=false", "--sample.num_samples=1",
    "--micro_tokens=2048",  # 2 rows of 1,024 a pass: a PM or DPO step of 2 pairs runs as 2 groups, as on a GPU
    "--data.val_frac=0.25",  # a few val pairs out of 16 train pairs
    "--sft.max_steps=1", "--sft.batch_size=1", "--sft.grad_accum=1", "--sft.eval_batches=1", "--sft.warmup_steps=0",
    "--cd.max_steps=1", "--cd.batch_size=1", "--cd.grad_accum=1", "--cd.eval_batches=1", "--cd.warmup_steps=0",
    "--rm.max_steps=1", "--rm.batch_size=2", "--rm.val_pairs=2", "--rm.normalize_samples=2", "--rm.eval_batch_size=4",
    "--rm.warmup_steps=0",
    "--rs.num_prompts=2", "--rs.n=2", "--rs.sample_batch_size=4", "--rs.max_steps=1", "--rs.batch_size=1",
    "--rs.grad_accum=1", "--rs.eval_batches=1", "--rs.warmup_steps=0",
    "--ppo.iterations=1", "--ppo.batch_size=2", "--ppo.minibatch_size=1", "--ppo.ppo_epochs=1",
    "--dpo.max_steps=1", "--dpo.batch_size=2", "--dpo.val_pairs=2", "--dpo.eval_batch_size=4", "--dpo.warmup_steps=0",
    "--eval.num_prompts=8", "--eval.n=4", "--eval.policy_samples=2", "--eval.batch_size=32", "--eval.num_examples=1",
]

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "garden river market table window paper music river doctor road picture letter plant animal village").split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def long_dialogue(i, reply, rng):
    """A 4-turn hh-format dialogue of ~1,100 GPT-2 tokens before its last reply (each common word is one token)."""
    turns = "".join(f"\n\nHuman: {_text(rng, 140)} Question {i}.{t}?\n\nAssistant: {_text(rng, 130)}" for t in range(3))
    return f"{turns}\n\nHuman: {_text(rng, 120)} What about {i}?\n\nAssistant: {reply}"


def write_long_hh_dir(root, n_train=16, n_test=8):
    """harmless-base/{train,test}.jsonl.gz in hh-rlhf's layout, every pair wider than 1,024 GPT-2 tokens:
    a prompt of ~1,100 tokens (cut to 768) and replies of ~330 (cut to 256)."""
    os.makedirs(os.path.join(root, "harmless-base"))
    for split, n in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"{split}-{n}")
        with gzip.open(os.path.join(root, "harmless-base", f"{split}.jsonl.gz"), "wt", encoding="utf-8") as f:
            for i in range(n):
                seed = rng.random()  # the same prompt for both replies: built twice from one seed
                chosen = long_dialogue(i, f"I'm happy to help with {i}. " + _text(rng, 320), random.Random(seed))
                rejected = long_dialogue(i, f"No. Go away about {i}. " + _text(rng, 320), random.Random(seed))
                f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return root


def write_random_gpt2(path, seed=0):
    """Random GPT-2-small weights (GPT's own init) in the hub's model.safetensors layout, through the export's
    writer: what --pretrain.init=PATH reads (hub.read_gpt2 infers 12 x 12 x 768, vocab 50,257, block 1,024)."""
    import torch
    from hub import gpt2_hub_state_dict, save_safetensors
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, bias=True))
    save_safetensors(gpt2_hub_state_dict(model), path, metadata={"format": "pt"})
    return path


def check_widths(data_dir):
    """The data's precondition: every pair wider than 1,024 GPT-2 tokens, its prompt over 768 and its replies
    over 256, so that every stage's rows are cut to the preset's widths."""
    from data import DataConfig, read_pairs
    from tokens import Tokenizer
    tok = Tokenizer.gpt2()
    for split in ("train", "test"):
        pairs, _ = read_pairs(data_dir, split, DataConfig())
        for p in pairs:
            prompt, chosen, rejected = (len(tok.encode(t)) for t in (p.prompt, p.chosen, p.rejected))
            assert prompt > 768 and min(chosen, rejected) > 256 and prompt + min(chosen, rejected) > 1024


def gpu_preset_command(weights, data_dir, out_dir, extra=()):
    return [sys.executable, "rlhf.py", "all", "--preset", "gpu", f"--pretrain.init={weights}", "--data_dir", data_dir,
            "--out_dir", out_dir, *COUNTS, *extra]


def run_gpu_preset(tmp, extra=()):
    """Weights, data and the whole flow in tmp. Returns (returncode, output, wall seconds, peak RSS of the
    run in GiB, out_dir)."""
    weights = write_random_gpt2(os.path.join(tmp, "gpt2-random.safetensors"))
    data_dir = write_long_hh_dir(os.path.join(tmp, "hh"))
    check_widths(data_dir)
    out_dir = os.path.join(tmp, "out")
    cmd = gpu_preset_command(weights, data_dir, out_dir, extra)
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "RLHF_DEBUG": "1"}  # a traceback, not one line, if a stage fails
    cache = os.path.join(ROOT, "..", "shared", "tiktoken-cache")
    if "TIKTOKEN_CACHE_DIR" not in env and os.path.isdir(cache):
        env["TIKTOKEN_CACHE_DIR"] = os.path.abspath(cache)
    t0 = time.time()
    with open(os.path.join(tmp, "run.log"), "w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        log.seek(0)
        output = log.read()
    return os.waitstatus_to_exitcode(status), output, time.time() - t0, usage.ru_maxrss / 2 ** 20, out_dir


@pytest.mark.skipif(not SLOW, reason="GPT-2-small's shape on the CPU takes minutes: RLHF_SLOW=1 runs it")
def test_every_stage_of_the_gpu_preset_runs_at_gpt2_shape_on_the_cpu(tmp_path):
    import torch
    try:
        # bf16 autocast, as the preset runs on CUDA (--dtype=auto); --dtype=float32 takes the CPU's default path
        rc, output, wall, peak_gib, out = run_gpu_preset(str(tmp_path), ["--dtype=bfloat16"])
        print("\n".join(line for line in output.splitlines() if line.startswith(("[time]", "[eval]", "[plan] time"))))
        print(f"[gpu preset on cpu] wall {wall:.0f} s | peak RSS {peak_gib:.1f} GiB")
        assert rc == 0, output[-6000:]
        for name in CHECKPOINTS:
            ckpt = torch.load(os.path.join(out, f"{name}.pt"), map_location="cpu", weights_only=True, mmap=True)
            assert ckpt["done"], name
            assert {k: ckpt["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")} == \
                dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257), name
        ev = json.load(open(os.path.join(out, "eval.json")))
        assert set(POLICIES) <= set(ev["policies"]), sorted(ev["policies"])
        assert ev["pm"]["test_pairs"] == 8
        # every stage ran, and `all` timed it against its plan
        assert all(f"[time] {s}:" in output for s in STAGES), [s for s in STAGES if f"[time] {s}:" not in output]
    finally:  # ~9 GB of checkpoints (1.4 GB with AdamW's state each, ppo.pt 2.8 GB): pytest keeps its last tmp dirs
        for root, _, files in os.walk(tmp_path):
            for f in files:
                if f.endswith((".pt", ".safetensors")):
                    os.remove(os.path.join(root, f))


if __name__ == "__main__":  # python tests/test_gpu_preset.py OUT_DIR [extra flags]: the run by hand, kept
    os.makedirs(sys.argv[1], exist_ok=True)
    rc, output, wall, peak_gib, out = run_gpu_preset(sys.argv[1], sys.argv[2:])
    print(output)
    print(f"[gpu preset on cpu] rc {rc} | wall {wall:.0f} s | peak RSS {peak_gib:.1f} GiB")
