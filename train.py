"""
Stages 1 and 2, pretrain and sft, and the supervised loop they share with rejection-sampling
fine-tuning (the three differ only in their data and their loss mask): its learning-rate schedule,
batches and validation. What every stage stands on (seeding, the device, checkpoints, torchrun, the
metrics log) is runtime.py.

    python rlhf.py pretrain --preset cpu   # base.pt: a base LM of the dialogue text (or OpenAI's GPT-2)
    python rlhf.py sft --preset cpu        # sft.pt: imitate the chosen replies (loss on their tokens)

The loop is the one in nanoGPT's train.py, written as a function:

    for step in range(start, max_steps):
        lr -> (eval + checkpoint) -> grad-accumulated forward/backward -> clip -> step -> log

Resuming is exact on CPU: a batch is a pure function of (seed, step), so a checkpoint only needs
the model, the optimizer, the step and the RNG states, and a rerun continues bit for bit.
References: karpathy/nanoGPT train.py.
"""

import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import format_stats, read_pairs, resolve_data_dir, split_train_val
from model import GPT
from runtime import (CheckpointError, ConfigError, NonFiniteLoss, autocast, barrier, batch_rows, clip_and_step,
                     compile_model, cuda_peak_flops, dist_info, grad_scaler, load_checkpoint, load_model, micro_batches,
                     model_checkpoint, pick_device, restore, rng_state, save_checkpoint, set_seed, stage_done,
                     to_device)
from sampling import show_samples
from tokens import Tokenizer, build_tokenizer, lm_tokens, pack_examples, pad_right, sft_example


# ----------------------------------------------------------------------------------------------
# the supervised loop: pretraining, SFT, rejection-sampling fine-tuning

@dataclass
class LMTrainConfig:
    """One dataclass for every next-token stage; pretrain, sft and rs each hold their own instance."""
    max_steps: int = 1000        # optimizer steps
    batch_size: int = 16         # sequences per micro-batch
    grad_accum: int = 1          # micro-batches per optimizer step
    lr: float = 3e-4             # peak learning rate
    min_lr_frac: float = 0.1     # cosine decays to lr * min_lr_frac
    warmup_steps: int = 50       # linear warmup
    weight_decay: float = 0.1    # AdamW, on matrices only
    beta2: float = 0.95          # AdamW beta2 (beta1 = 0.9)
    grad_clip: float = 1.0       # max global grad norm (0 = off)
    eval_interval: int = 100     # steps between validation passes and checkpoints
    eval_batches: int = 10       # validation micro-batches per pass
    log_interval: int = 10       # steps between metrics.jsonl rows
    init: str = ""               # pretrain only: "" = random init, or gpt2 / gpt2-medium / path.safetensors
    pack: bool = False           # sft/rs: several examples per block_size row (data.pack_examples), not one
    keep_best: bool = False      # end with the weights of the lowest validation loss, not the last (pretrain's default)


def lr_at(step, train_cfg):
    """Linear warmup then cosine decay to `lr * min_lr_frac` (GPT-3 paper's schedule, as nanoGPT)."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    progress = min(1.0, (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps))
    return train_cfg.lr * (train_cfg.min_lr_frac
                           + (1 - train_cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(data, index, batch_size, block_size, seed, pad_id):
    """Micro-batch number `index`, a pure function of (data, index, seed) so that resuming needs no
    loader state. `data` is either a token stream (np.ndarray: random windows, as nanoGPT) or a list of
    (ids, loss_mask) examples or (ids, loss_mask, segment_ids) packed rows (data.pack_examples), shuffled
    once per epoch by a seeded permutation and right-padded.
    Returns idx, targets, loss_mask, attention_mask, each (B, T), and segment_ids (B, T) for packed
    rows, else None."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if isinstance(data, np.ndarray):
        assert len(data) > block_size + 1, f"token stream of {len(data)} tokens is shorter than one block"
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
        chunk = torch.stack([torch.from_numpy(data[s:s + block_size + 1].astype(np.int64)) for s in starts])
        ones = torch.ones(batch_size, block_size)
        return chunk[:, :-1], chunk[:, 1:], ones, ones, None
    examples = [data[i] for i in batch_rows(len(data), index, batch_size, seed)]
    seqs = [e[0] for e in examples]
    idx, attention_mask = pad_right(seqs, pad_id)                       # (B, T+1)
    loss_mask, _ = pad_right([e[1] for e in examples], 0)               # (B, T+1)
    # position t predicts token t+1, so the loss there counts iff token t+1 is a reply token
    segment_ids = None
    if len(examples[0]) == 3:  # packed rows: every row is full width; the real tokens are segments >= 0
        segment_ids = pad_right([e[2] for e in examples], -1)[0]        # (B, T+1)
        attention_mask = (segment_ids >= 0).long()
        segment_ids = segment_ids[:, :-1]
    return idx[:, :-1], idx[:, 1:], loss_mask[:, 1:].float(), attention_mask[:, :-1], segment_ids


def validation_batches(train_cfg, n_examples):
    """Micro-batches in one validation pass: train_cfg.eval_batches from a token stream (n_examples None),
    at most one pass over a list of n_examples examples (or packed rows)."""
    if n_examples is None:
        return train_cfg.eval_batches
    return min(train_cfg.eval_batches, max(1, n_examples // train_cfg.batch_size))


@torch.no_grad()
def evaluate_loss(model, data, train_cfg, block_size, pad_id, device, dtype="auto"):
    """Mean loss over the first `eval_batches` validation micro-batches (the same ones every time).
    Every rank computes the same full value, so no collective is needed."""
    model.eval()
    losses = []
    for i in range(validation_batches(train_cfg, None if isinstance(data, np.ndarray) else len(data))):
        batch = get_batch(data, i, train_cfg.batch_size, block_size, 0, pad_id)
        idx, targets, loss_mask = to_device(batch[:3], device)
        segment_ids = None if batch[4] is None else to_device([batch[4]], device)[0]
        with autocast(device, dtype):
            _, loss = model(idx, targets, loss_mask=loss_mask, segment_ids=segment_ids)  # see supervised_train
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


# keep_best: the weights of the lowest validation loss so far live in their own file, written only when
# validation improves. The checkpoint, written at every validation, then carries no second copy of the
# weights (0.5 GB on top of its 1.5 GB at 124M parameters) and none sits in memory. The checkpoint names
# the best's step and loss and is written first: if a kill falls between the two writes, the best is
# the checkpoint's own weights, and resume_best rewrites the file from them.

def best_path(ckpt_path):
    """Where keep_best keeps the best weights while the stage runs: base.pt -> base.best.pt."""
    return ckpt_path.removesuffix(".pt") + ".best.pt"


def save_best(ckpt_path, model, best):
    """Write the weights of the best validation so far, with its step, atomically."""
    save_checkpoint(best_path(ckpt_path), {"model": model.state_dict(), **best})


def load_best(ckpt_path, best):
    """The weights save_best wrote for `best` ({"step", "val_loss"}), checking that they are that step's."""
    saved = load_checkpoint(best_path(ckpt_path))
    if saved["step"] != best["step"]:
        raise CheckpointError(f"{best_path(ckpt_path)} holds step {saved['step']}, not the best step {best['step']}; "
                              "use --force to start the stage over")
    return saved["model"]


def resume_best(ckpt_path, ckpt):
    """The best-so-far of a resumed run, its file rewritten from the checkpoint's weights where the
    checkpoint is the best and the file is missing or stale (a kill between the two writes)."""
    best = ckpt.get("best", {"step": None, "val_loss": math.inf})
    if best["step"] == ckpt["step"] and dist_info()[0] == 0:
        path = best_path(ckpt_path)
        if not os.path.exists(path) or load_checkpoint(path)["step"] != best["step"]:
            save_checkpoint(path, {"model": ckpt["model"], **best})
    return best


def accumulate_gradients(model, data, step, train_cfg, seed, block_size, pad_id, device, dtype, max_tokens=0,
                         scaler=None):
    """Forward and backward over the train_cfg.grad_accum micro-batches of optimizer step `step`, leaving the
    gradient of the step's mean loss in .grad. Returns the step's mean loss (a tensor on the device) and
    the real tokens of the global batch, all ranks together. A micro-batch wider than max_tokens tokens
    (rows x width) runs as several groups (runtime.micro_batches), each group's mean loss weighted by its
    share of the micro-batch's loss tokens: the same gradient, in the memory of the budget. Under torchrun
    this rank takes rows rank::world_size of each global micro-batch and weights them the same way by their
    share, so DDP's average of the gradients is the gradient of the global mean."""
    rank, world_size = dist_info()
    loss_sum, tokens = torch.zeros((), device=device), 0
    for micro in range(train_cfg.grad_accum):
        batch = get_batch(data, step * train_cfg.grad_accum + micro, train_cfg.batch_size, block_size, seed, pad_id)
        tokens += int(batch[3].sum())
        total = batch[2].sum().clamp(min=1.0)  # the global micro-batch's loss tokens
        mine = [t[rank::world_size] if t is not None else None for t in batch]
        groups = micro_batches(mine[3].sum(1), max_tokens)  # right-padded rows: a row's width is its real tokens
        for g, rows in enumerate(groups):
            width = int(mine[3][rows].sum(1).max())
            idx, targets, loss_mask = to_device([t[rows, :width] for t in mine[:3]], device)
            segment_ids = None if mine[4] is None else to_device([mine[4][rows, :width]], device)[0]
            # DDP syncs gradients on every backward; with accumulation only the step's last one needs to
            last = micro == train_cfg.grad_accum - 1 and g == len(groups) - 1
            with nullcontext() if world_size == 1 or last else model.no_sync():
                with autocast(device, dtype):  # the forward only: backward runs in the forward's dtypes
                    # batches are right-padded, so under causal attention no real token ever sees a pad: no
                    # attention mask is needed, and SDPA can take its fast is_causal path (packed rows pass
                    # segment_ids instead: a block-diagonal mask keeps examples apart)
                    _, loss = model(idx, targets, loss_mask=loss_mask, segment_ids=segment_ids)
                if world_size > 1 or len(groups) > 1:  # this group's share of the global micro-batch's mean
                    loss = loss * (world_size * mine[2][rows].sum() / total).to(loss.device)
                # each micro-batch's mean is one grad_accum-th of the step's mean: scale before summing
                loss = loss / train_cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
    return loss_sum, tokens


def resume_lm(ckpt_path, model, optimizer, train_cfg, stage, scaler):
    """(first step, validation loss before training, that step's validation loss, best so far) of the
    unfinished run in ckpt_path, its weights, optimizer and RNG restored; or a fresh start, where a best file
    a previous run left is removed. The step's validation loss is None where its validation has not run:
    a Ctrl-C checkpoint written before it (supervised_train runs it then)."""
    rank, best = dist_info()[0], {"step": None, "val_loss": math.inf}
    if not os.path.exists(ckpt_path):
        if rank == 0:
            Path(best_path(ckpt_path)).unlink(missing_ok=True)
        return 0, None, None, best
    ckpt = restore(ckpt_path, model, optimizer, scaler=scaler)
    if rank == 0:
        print(f"[{stage}] resuming from {ckpt_path} at step {ckpt['step']}/{train_cfg.max_steps}")
    return (ckpt["step"], ckpt.get("val_loss_before"), ckpt.get("val_loss"),
            resume_best(ckpt_path, ckpt) if train_cfg.keep_best else best)


def optimizer_step(train_model, optimizer, data, step, train_cfg, seed, block_size, pad_id, device, dtype, max_tokens=0,
                   scaler=None):
    """One step: accumulate the gradients of train_cfg.grad_accum micro-batches (in groups of at most max_tokens
    tokens), clip, update (through the fp16 loss scaler where there is one). Returns the global loss (every
    rank's average, so that all ranks stop together on a non-finite one), the gradient norm and the tokens."""
    scaler = scaler or grad_scaler(device, "float32")  # off: a plain step
    loss_sum, n_tokens = accumulate_gradients(train_model, data, step, train_cfg, seed, block_size, pad_id, device,
                                              dtype, max_tokens, scaler)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    loss_sum = loss_sum.item()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(f"non-finite loss ({loss_sum}) at step {step}")
    norm = clip_and_step(optimizer, list(train_model.parameters()), train_cfg.grad_clip, scaler)
    return loss_sum, norm, n_tokens


def hold_ctrl_c():
    """Ctrl-C is held until the step it lands in is over, so the checkpoint it writes never holds half a
    step (weights mid-update, or RNG draws of dropout masks the rerun would not repeat). One process only:
    under torchrun the ranks could stop at different steps. Returns (flag list, previous handler or None)."""
    interrupted = []
    if dist_info()[1] > 1 or threading.current_thread() is not threading.main_thread():
        return interrupted, None
    return interrupted, signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))


def supervised_train(run, stage, train_cfg, model, tok, train_data, val_data, ckpt_path, log):
    """Train `model` on next-token prediction (masked by each example's loss_mask) and checkpoint it.

    Resumes from `ckpt_path` when it holds an unfinished run of this stage; returns the validation loss before and
    after. With train_cfg.keep_best the stage ends with the weights of its lowest validation loss (every eval_interval
    steps and the last), and "after" is that loss. Ctrl-C writes a checkpoint and exits; a non-finite loss stops the
    stage and keeps the last good checkpoint (`NonFiniteLoss`). Under torchrun (after init_distributed) every rank takes
    rows rank::world_size of each global micro-batch and DistributedDataParallel averages the gradients, so N processes
    take the same steps as one process with the same batch_size; only rank 0 logs, prints and writes checkpoints."""
    device, dtype, (rank, world_size) = next(model.parameters()).device.type, run.dtype, dist_info()
    assert train_cfg.batch_size % world_size == 0, (
        f"{stage}.batch_size {train_cfg.batch_size} must be divisible by the {world_size} processes")
    optimizer = model.configure_optimizer(train_cfg.weight_decay, train_cfg.lr, (0.9, train_cfg.beta2), device)
    scaler = grad_scaler(device, dtype)  # fp16 only: the loss scaler; a no-op otherwise
    start, val_before, val_loss, best = resume_lm(ckpt_path, model, optimizer, train_cfg, stage, scaler)
    eval_model = train_model = compile_model(model, run.compile)  # validation: outside DDP
    if world_size > 1:  # DDP averages the gradients during backward, overlapping it with the communication
        train_model = DDP(train_model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    block_size = model.config.block_size
    if train_cfg.pack and not isinstance(train_data, np.ndarray):
        train_data, val_data = (pack_examples(d, block_size, tok.eos_id, run.seed) for d in (train_data, val_data))
    validate = lambda: evaluate_loss(eval_model, val_data, train_cfg, block_size, tok.eos_id, device, dtype)  # noqa: E731
    if val_before is None:
        val_before = validate()
        if rank == 0:  # a fresh start only: a resumed run logged its step-0 row the first time
            log.log(stage, 0, val_loss=val_before)
            print(f"[{stage}] step 0 | val loss {val_before:.4f}")

    def checkpoint(step, done, best, val_loss=None, rng=None):
        if rank == 0:  # every rank holds the same weights: one writer
            save_checkpoint(ckpt_path, model_checkpoint(
                model, tok, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, stage=stage,
                config=asdict(train_cfg), seed=run.seed, rng=rng or rng_state(), done=done, val_loss_before=val_before,
                val_loss=val_loss, best=best))
    peak = cuda_peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None  # for the log's MFU
    train_model.train()
    bar = tqdm(range(start, train_cfg.max_steps), desc=stage, initial=start, total=train_cfg.max_steps,
               dynamic_ncols=True, disable=rank != 0)
    step, t0, tokens, step_rng = start, time.time(), 0, rng_state()
    if start == 0:
        val_loss = val_before  # step 0's validation is the "before" one
    interrupted, old_handler = hold_ctrl_c()
    try:
        for step in bar:
            step_rng = rng_state()  # where the rerun of this step must start
            if step > start:
                val_loss = None  # `step`'s validation loss, once it has run (the resumed step's may have)
            if interrupted:
                raise KeyboardInterrupt
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step % train_cfg.eval_interval == 0 and val_loss is None:
                val_loss = validate()
                best = validate_and_save(stage, step, val_loss, best, train_cfg, model, ckpt_path, checkpoint, log)
            try:
                loss, norm, n_tokens = optimizer_step(train_model, optimizer, train_data, step, train_cfg, run.seed,
                                                      block_size, tok.eos_id, device, dtype, run.micro_tokens, scaler)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"[{stage}] {e}; the last good checkpoint is kept in {ckpt_path}") from None
            tokens += n_tokens
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if step % train_cfg.log_interval == 0 and rank == 0:
                log.log(stage, step, loss=loss, lr=lr, grad_norm=norm.item(),
                        **speed(model, tokens, t0, peak, world_size))
                t0, tokens = time.time(), 0
    except KeyboardInterrupt:
        bar.close()
        save_interrupted(stage, step, best, val_loss, step_rng, checkpoint, ckpt_path, rank)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    bar.close()
    best = finish(stage, train_cfg, model, ckpt_path, validate(), best, checkpoint, log)
    if rank == 0:
        print(f"[{stage}] done | val loss {val_before:.4f} -> {best['val_loss']:.4f}{best['note']} "
              f"| checkpoint {ckpt_path}")
    if interrupted:  # Ctrl-C in the last step: the stage is complete and saved, the run stops here
        raise SystemExit(130)
    return val_before, best["val_loss"]


def speed(model, tokens, t0, peak, world_size):
    """The log's tokens/s since t0 and, on a GPU whose peak FLOP/s runtime knows, the model FLOPs utilisation (tokens
    are counted over all ranks)."""
    rate = tokens / max(time.time() - t0, 1e-9)
    return {"tokens_per_s": rate, **({"mfu": model.flops_per_token() * rate / (peak * world_size)} if peak else {})}


def save_interrupted(stage, step, best, val_loss, step_rng, checkpoint, ckpt_path, rank):
    """Ctrl-C: a checkpoint, then exit 130. `step` has not been applied yet: the rerun redoes it, and runs its
    validation where val_loss says that it has not run (Ctrl-C held from the step before), so an interrupted run
    validates where an uninterrupted one does: the same metrics rows and, with keep_best, the same weights kept."""
    checkpoint(step, False, best, val_loss=val_loss, rng=step_rng)
    if rank == 0:
        print(f"\n[{stage}] interrupted: checkpoint saved at step {step} in {ckpt_path}; "
              "rerun the same command to resume")
    raise SystemExit(130)


def validate_and_save(stage, step, val_loss, best, train_cfg, model, ckpt_path, checkpoint, log):
    """A validation inside the loop: logged, and a checkpoint written; with keep_best, a new lowest loss
    also writes the best file (after the checkpoint that names it: see resume_best). Returns best."""
    if train_cfg.keep_best and val_loss < best["val_loss"]:
        best = {"step": step, "val_loss": val_loss}
    if dist_info()[0] == 0:
        log.log(stage, step, val_loss=val_loss)
    checkpoint(step, False, best, val_loss=val_loss)
    if best["step"] == step and dist_info()[0] == 0:
        save_best(ckpt_path, model, best)
    return best


def finish(stage, train_cfg, model, ckpt_path, val_last, best, checkpoint, log):
    """The end of a supervised stage: with keep_best and a prior validation lower than the last, its
    weights come back; the final checkpoint (done) holds the weights kept, and the best file goes.
    Returns best, with a note for the log line naming the step kept."""
    rank = dist_info()[0]
    if train_cfg.keep_best and best["val_loss"] < val_last:  # a prior validation was better: end with its weights
        model.load_state_dict(load_best(ckpt_path, best))  # every rank, before rank 0 removes the file below
        barrier()
    else:
        best = {"step": train_cfg.max_steps, "val_loss": val_last}
    if rank == 0:
        kept = {"best_step": best["step"], "best_val_loss": best["val_loss"]} if train_cfg.keep_best else {}
        log.log(stage, train_cfg.max_steps, val_loss=val_last, **kept)
    checkpoint(train_cfg.max_steps, True, best, val_loss=best["val_loss"])
    if rank == 0:
        Path(best_path(ckpt_path)).unlink(missing_ok=True)  # the checkpoint now holds the best weights
    barrier()  # the next stage reads this checkpoint: no rank moves on before rank 0 wrote it
    note = f" at step {best['step']} (the last step's: {val_last:.4f})" if best["step"] != train_cfg.max_steps else ""
    return {**best, "note": note}


# ----------------------------------------------------------------------------------------------
# stages 1 and 2: the base LM (pretrain) and SFT

def load_data(run, tok=None):
    """Read the train split once and split off validation; build the tokenizer if none is given
    (a trimmed vocabulary is made from the training text, then stored in every checkpoint)."""
    data_dir = resolve_data_dir(run.data_dir or None)
    pairs, stats = read_pairs(data_dir, "train", run.data)
    train_pairs, val_pairs = split_train_val(pairs, run.data.val_frac)
    print(f"data: {data_dir} | {format_stats(stats, 'train')} | {len(train_pairs)} train / {len(val_pairs)} val")
    return tok or build_tokenizer(run.data, train_pairs), train_pairs, val_pairs


def ckpt_path(run, name):
    return os.path.join(run.out_dir, f"{name}.pt")


def already_done(run, name):
    """A finished stage is skipped unless --force; --force starts it over (runtime.stage_done)."""
    return stage_done(ckpt_path(run, name), run.force, name)


def stage_pretrain(run, train_cfg, model_cfg, sample, log):
    """Stage 1: a base language model of hh-rlhf dialogue text (or OpenAI GPT-2's weights)."""
    if already_done(run, "base"):
        return
    device = pick_device(run.device)
    if train_cfg.init:  # GPT-2 already is a language model: store it as the base checkpoint
        if run.data.vocab != "gpt2":
            raise ConfigError("--pretrain.init loads GPT-2, which needs --data.vocab=gpt2")
        model = GPT.from_pretrained(train_cfg.init)
        if dist_info()[0] == 0:
            save_checkpoint(ckpt_path(run, "base"), model_checkpoint(model, Tokenizer.gpt2(), step=0, stage="pretrain",
                                                                      seed=run.seed, done=True))
        barrier()
        print(f"[pretrain] loaded {train_cfg.init} ({model.num_params() / 1e6:.1f}M parameters) as base.pt")
        return
    tok, train_pairs, val_pairs = load_data(run)
    model_cfg = replace(model_cfg, vocab_size=tok.vocab_size)
    set_seed(run.seed)
    model = GPT(model_cfg).to(device)
    print(f"[pretrain] {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, device {device}")
    train_tokens, val_tokens = lm_tokens(train_pairs, tok), lm_tokens(val_pairs, tok)
    print(f"[pretrain] {len(train_tokens):,} train tokens, {len(val_tokens):,} val tokens")
    supervised_train(run, "pretrain", train_cfg, model, tok, train_tokens, val_tokens, ckpt_path(run, "base"), log)
    show_samples(model, tok, val_pairs, sample, run.seed, "base", run.dtype)


def sft_examples(pairs, tok, run, block_size):
    """(ids, loss_mask) for prompt + chosen reply: the assistant imitates the preferred replies."""
    return [sft_example(p.prompt, p.chosen, tok, block_size, run.data.max_reply_tokens) for p in pairs]


def stage_sft(run, train_cfg, sample, log):
    """Stage 2: supervised fine-tuning on the chosen replies (loss on reply tokens and EOS only)."""
    if already_done(run, "sft"):
        return
    model, tok, _ = load_model(ckpt_path(run, "base"), pick_device(run.device))
    _, train_pairs, val_pairs = load_data(run, tok)
    set_seed(run.seed)
    block_size = model.config.block_size
    supervised_train(run, "sft", train_cfg, model, tok, sft_examples(train_pairs, tok, run, block_size),
                     sft_examples(val_pairs, tok, run, block_size), ckpt_path(run, "sft"), log)
    show_samples(model, tok, val_pairs, sample, run.seed, "sft", run.dtype)
