"""
bench_hf.py: the project's speed against Hugging Face transformers and TRL, side by side in one process.

    python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 trl==1.0.0
    /tmp/hfvenv/bin/python bench_hf.py                  # every figure, vocab 50257 and 8192
    /tmp/hfvenv/bin/python bench_hf.py --figures lm ppo --vocab 50257

An optional extra: transformers and TRL are never needed to train or to test, and without them this
script says so and stops. Both sides get the same shapes and the same work (4 layers, 4 heads, width
256, context 512, fp32, dropout 0, random token ids); each figure runs ours, theirs, ours, theirs, ...
`--repeats` times and keeps each side's best time, so load on the machine slows both alike; the range after
each ratio is the lowest and highest of the rounds' own ratios, the noise a best-time ratio sits in. Like
rlhf.py, it runs with glibc's malloc limits raised (rlhf.restart_with_start_env), for both sides. The
printed ratio is our throughput over theirs (> 1: we are faster).

  lm      one training step, batch 8 x 256, AdamW: GPT vs GPT2LMHeadModel (labels= computes its loss)
  sample  16 prompts x 64 tokens, +128 sampled tokens, temperature 1, no top-k/p, KV cache:
          GPT.generate vs GPT2LMHeadModel.generate
  pm      one PM training step, 8 pairs x 256 (right-padded, lengths 128..256), ranking loss, AdamW:
          RewardModel vs a plain loop on GPT2ForSequenceClassification
  ppo     one PPO iteration, 16 prompts x 64 + 64 new tokens, 4 epochs of 1 minibatch: ppo.ppo_step
          (separate critic, and shared trunk) vs TRL's PPOTrainer (separate value model); vocab 50257
"""

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
import warnings

import torch

import actor_critic
import ppo
from model import GPT, GPTConfig
from reward import RewardModel, ranking_loss
from rlhf import restart_with_start_env
from tokens import Tokenizer

L, H, C, BLOCK = 4, 4, 256, 512  # the shape of every model here


def peers():
    """transformers (and TRL for ppo), or a clear message and exit: this script is an optional extra."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_hf.py needs Hugging Face transformers (and trl for the ppo figure), an optional extra:\n"
                 "  pip install transformers==5.24.0 trl==1.0.0   (in a throwaway venv)")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_config(vocab, **kwargs):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=None, bos_token_id=None, **kwargs)


def ours_config(vocab):
    return GPTConfig(block_size=BLOCK, vocab_size=vocab, n_layer=L, n_head=H, n_embd=C, dropout=0.0)


def race(ours, theirs, repeats):
    """Best seconds of each side over `repeats` alternating runs (after one warm-up each), and each round's
    ratio theirs / ours: their spread shows how much of a best-time ratio the machine's noise could move."""
    ours(), theirs()
    best, rounds = [float("inf"), float("inf")], []
    for _ in range(repeats):
        seconds = []
        for side, fn in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
            best[side] = min(best[side], seconds[-1])
        rounds.append(seconds[1] / seconds[0])
    return best[0], best[1], rounds


# -----------------------------------------------------------------------------
# the figures: each returns (ours_fn, theirs_fn, units of work per call, unit name)

def optimizers(ours, theirs, lr):
    """AdamW on each side with the same settings (ours: model.configure_optimizer, as every stage builds it)."""
    return (ours.configure_optimizer(0.1, lr, (0.9, 0.95), "cpu"),
            torch.optim.AdamW(theirs.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1))


def training_step(loss_fn, optimizer):
    """One optimizer step as a closure: the loss, backward, the update, the gradients cleared."""
    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def lm_step(vocab):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (8, 257))
    ours, theirs = GPT(ours_config(vocab)).train(), GPT2LMHeadModel(hf_config(vocab)).train()
    opt, opt_hf = optimizers(ours, theirs, 3e-4)
    step_ours = training_step(lambda: ours(x[:, :-1], x[:, 1:])[1], opt)  # 256 inputs, 256 targets
    step_theirs = training_step(lambda: theirs(input_ids=x, labels=x).loss, opt_hf)  # 257 tokens, 256 shifted targets
    return step_ours, step_theirs, 8 * 256, "tok/s"


def sample(vocab):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    prompts = torch.randint(0, vocab, (16, 64))
    ours = GPT(ours_config(vocab)).eval()
    theirs = GPT2LMHeadModel(hf_config(vocab)).eval()
    theirs.generation_config.eos_token_id = None  # no early stop on either side: 128 tokens every row
    new = 128

    def gen_ours():
        ours.generate(prompts, max_new_tokens=new, temperature=1.0, generator=torch.Generator().manual_seed(0))

    def gen_theirs():
        with torch.no_grad():
            out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=new,
                                  min_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.size(1) == 64 + new
    return gen_ours, gen_theirs, 16 * new, "new tok/s"


def pm_batch(vocab):
    """8 pairs, right-padded to 256: chosen rows then rejected rows (RewardModel's batch layout)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(128, 257, (16,), generator=g)
    idx = torch.randint(1, vocab, (16, 256), generator=g)  # 0 is the pad id on both sides
    mask = torch.arange(256)[None, :] < lengths[:, None]  # (16, 256)
    return idx.masked_fill(~mask, 0), mask.long()


def pm_step(vocab):
    from transformers import GPT2ForSequenceClassification
    torch.manual_seed(0)
    idx, mask = pm_batch(vocab)
    labels = torch.tensor([1] * 8 + [0] * 8)
    ours = RewardModel(ours_config(vocab)).train()
    theirs = GPT2ForSequenceClassification(hf_config(vocab, num_labels=1)).train()
    opt, opt_hf = optimizers(ours, theirs, 1e-5)

    def loss_theirs():
        scores = theirs(input_ids=idx, attention_mask=mask).logits.squeeze(-1)  # (16,), read at the last real token
        return ranking_loss(scores[:8], scores[8:])
    return training_step(lambda: ours(idx, mask, labels)[1], opt), training_step(loss_theirs, opt_hf), 8, "pairs/s"


def ppo_iteration(vocab, share_trunk):
    """ppo.ppo_step against TRL's PPOTrainer.train() for one update, the same models on both sides: a
    policy, a frozen reference, a PM and a value model made from it (ours with share_trunk: the PM's
    head on the policy's trunk). No stop token: every reply is 64 tokens. Each TRL call is one
    train() of one update (its bookkeeping included, as a user would run it)."""
    from datasets import Dataset
    from tokenizers import Tokenizer as WordTokenizer
    from tokenizers.models import WordLevel
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    torch.manual_seed(0)
    queries = torch.randint(1, vocab, (16, 64))  # 0 is the pad id: TRL masks it out of a query
    # ours
    ppo_cfg = ppo.PPOConfig(batch_size=16, minibatch_size=16, ppo_epochs=4, max_new_tokens=64, kl_coef=0.05,
                       share_trunk=share_trunk)
    policy = GPT(ours_config(vocab))
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    pm = RewardModel(ours_config(vocab)).eval().requires_grad_(False)
    critic = actor_critic.build_critic(None if share_trunk else copy.deepcopy(pm), pm.head.weight, pm.head.bias)
    optimizer = ppo.build_optimizer(policy, critic, ppo_cfg, "cpu")
    reward_fn = ppo.pm_reward_fn(pm, Tokenizer(), 16)
    gen = torch.Generator().manual_seed(0)

    def step_ours():
        ppo.ppo_step(policy, ref_policy, critic, optimizer, reward_fn, queries, torch.ones_like(queries), ppo_cfg,
                     ppo_cfg.kl_coef, None, gen)
    # theirs
    word_tok = WordTokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=word_tok, pad_token="<pad>", eos_token="<unk>")
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=4, total_episodes=16, response_length=64, temperature=1.0,
                     local_rollout_forward_batch_size=16, num_sample_generations=0, report_to=[], use_cpu=True,
                     save_strategy="no", kl_coef=0.05, learning_rate=ppo_cfg.lr, stop_token=None,
                     missing_eos_penalty=None, bf16=False, fp16=False, disable_tqdm=True)
    hf_policy = GPT2LMHeadModel(hf_config(vocab))
    hf_pm = GPT2ForSequenceClassification(hf_config(vocab, num_labels=1))
    trainer = PPOTrainer(args=args, processing_class=tok, model=hf_policy, ref_model=copy.deepcopy(hf_policy),
                         reward_model=hf_pm, value_model=copy.deepcopy(hf_pm),
                         train_dataset=Dataset.from_dict({"input_ids": queries.tolist()}))

    def step_theirs():
        with contextlib.redirect_stdout(io.StringIO()):  # its per-update print of the metrics
            trainer.train()
    return step_ours, step_theirs, 16 * 64, "episode tok/s"


FIGURES = {
    "lm": lambda v: [("lm training step", lm_step(v))],
    "sample": lambda v: [("KV-cache sampling", sample(v))],
    "pm": lambda v: [("PM training step", pm_step(v))],
    "ppo": lambda v: [(f"PPO iteration, {name}", ppo_iteration(v, share)) for name, share in
                      (("separate critic", False), ("shared trunk", True))] if v == 50257 else [],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[50257, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    transformers = peers()
    restart_with_start_env()  # as rlhf.py runs: freed logits stay in the process, for both sides alike
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'figure':<34} {'vocab':>6} {'ours':>10} {'theirs':>10} {'unit':<14} ours/theirs  (each round)")
    for fig in args.figures:
        for vocab in args.vocab:
            for name, (ours, theirs, work, unit) in FIGURES[fig](vocab):
                t_ours, t_theirs, rounds = race(ours, theirs, args.repeats)
                print(f"{name:<34} {vocab:>6} {work / t_ours:>10.1f} {work / t_theirs:>10.1f} {unit:<14} "
                      f"{t_theirs / t_ours:.2f}x        ({min(rounds):.2f}-{max(rounds):.2f}x)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
