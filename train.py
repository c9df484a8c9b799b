"""
The supervised loop used by base-LM pretraining, SFT and rejection-sampling fine-tuning (they differ
only in their data and their loss mask), with its learning-rate schedule, batches and validation.
What every stage stands on (seeding, the device, checkpoints, torchrun, the metrics log) is runtime.py.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import pack_examples, pad_right
from runtime import (CheckpointError, NonFiniteLoss, autocast, barrier, check_compatible, cuda_peak_flops, dist_info,
                     load_checkpoint, model_checkpoint, rng_state, save_checkpoint, set_rng_state, to_device)


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


def lr_at(step, sc):
    """Linear warmup then cosine decay to `lr * min_lr_frac` (GPT-3 paper's schedule, as nanoGPT)."""
    if step < sc.warmup_steps:
        return sc.lr * (step + 1) / sc.warmup_steps
    progress = min(1.0, (step - sc.warmup_steps) / max(1, sc.max_steps - sc.warmup_steps))
    return sc.lr * (sc.min_lr_frac + (1 - sc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    n = len(data)
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    examples = [data[i] for i in perm[pos * batch_size:(pos + 1) * batch_size]]
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


def validation_batches(sc, n_examples):
    """Micro-batches in one validation pass: sc.eval_batches from a token stream (n_examples None),
    at most one pass over a list of n_examples examples (or packed rows)."""
    if n_examples is None:
        return sc.eval_batches
    return min(sc.eval_batches, max(1, n_examples // sc.batch_size))


@torch.no_grad()
def evaluate_loss(model, data, sc, block_size, pad_id, device, dtype="auto"):
    """Mean loss over the first `eval_batches` validation micro-batches (the same ones every time).
    Every rank computes the same full value, so no collective is needed."""
    model.eval()
    losses = []
    for i in range(validation_batches(sc, None if isinstance(data, np.ndarray) else len(data))):
        batch = get_batch(data, i, sc.batch_size, block_size, 0, pad_id)
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


def accumulate_gradients(model, data, step, sc, seed, block_size, pad_id, device, dtype):
    """Forward and backward over the sc.grad_accum micro-batches of optimizer step `step`, leaving the
    gradient of the step's mean loss in .grad. Returns the step's mean loss (a tensor on the device) and
    the real tokens of the global batch, all ranks together. Under torchrun this rank takes rows
    rank::world_size of each global micro-batch, and its mean is reweighted by its share of the loss tokens,
    so DDP's average of the gradients is the gradient of the global mean."""
    rank, world_size = dist_info()
    loss_sum, tokens = torch.zeros((), device=device), 0
    for micro in range(sc.grad_accum):
        batch = get_batch(data, step * sc.grad_accum + micro, sc.batch_size, block_size, seed, pad_id)
        tokens += int(batch[3].sum())
        idx, targets, loss_mask = to_device([t[rank::world_size] for t in batch[:3]], device)
        segment_ids = None if batch[4] is None else to_device([batch[4][rank::world_size]], device)[0]
        share = world_size * batch[2][rank::world_size].sum() / batch[2].sum().clamp(min=1.0)
        # DDP syncs gradients on every backward; with accumulation only the last one needs to
        sync = world_size == 1 or micro == sc.grad_accum - 1
        with nullcontext() if sync else model.no_sync():
            with autocast(device, dtype):  # the forward only: backward runs in the forward's dtypes
                # batches are right-padded, so under causal attention no real token ever sees a pad: no
                # attention mask is needed, and SDPA can take its fast is_causal path (packed rows pass
                # segment_ids instead: a block-diagonal mask keeps examples apart)
                _, loss = model(idx, targets, loss_mask=loss_mask, segment_ids=segment_ids)
            if world_size > 1:
                loss = loss * share.to(loss.device)
            # each micro-batch's mean is one grad_accum-th of the step's mean: scale before summing
            (loss / sc.grad_accum).backward()
        loss_sum += loss.detach() / sc.grad_accum
    return loss_sum, tokens


def supervised_train(cfg, stage, sc, model, tok, train_data, val_data, ckpt_path, log):
    """Train `model` on next-token prediction (masked by each example's loss_mask) and checkpoint it.

    Resumes from `ckpt_path` when it holds an unfinished run of this stage; returns the validation
    loss before and after. With sc.keep_best the stage ends with the weights of its lowest validation
    loss (every eval_interval steps and the last), and "after" is that loss. Ctrl-C writes a checkpoint
    and exits; a non-finite loss stops the stage and keeps the last good checkpoint (`NonFiniteLoss`).
    Under torchrun (after init_distributed) every rank takes rows rank::world_size of each global
    micro-batch and DistributedDataParallel averages the gradients, so N processes take the same
    steps as one process with the same batch_size; only rank 0 logs, prints and writes checkpoints."""
    device = next(model.parameters()).device.type
    dtype = getattr(cfg, "dtype", "auto")
    rank, world_size = dist_info()
    assert sc.batch_size % world_size == 0, (
        f"{stage}.batch_size {sc.batch_size} must be divisible by the {world_size} processes")
    raw = model
    optimizer = raw.configure_optimizer(sc.weight_decay, sc.lr, (0.9, sc.beta2), device)
    start, val_before, best = 0, None, {"step": None, "val_loss": math.inf}
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        check_compatible(ckpt_path, ckpt, raw)
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, val_before = ckpt["step"], ckpt.get("val_loss_before")
        best = resume_best(ckpt_path, ckpt) if sc.keep_best else best
        if rank == 0:
            print(f"[{stage}] resuming from {ckpt_path} at step {start}/{sc.max_steps}")
    elif rank == 0:  # a fresh start: a best file left by an earlier run is not this run's
        Path(best_path(ckpt_path)).unlink(missing_ok=True)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model  # validation runs on each rank's own copy, outside DDP (no gradients to sync)
    if world_size > 1:
        # DDP all-reduces (averages) the gradients during backward, bucket by bucket, overlapping
        # the communication with the rest of the backward pass
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    block_size = raw.config.block_size
    if sc.pack and not isinstance(train_data, np.ndarray):
        train_data, val_data = (pack_examples(d, block_size, tok.eos_id, cfg.seed) for d in (train_data, val_data))
    if val_before is None:
        val_before = evaluate_loss(eval_model, val_data, sc, block_size, tok.eos_id, device, dtype)
        if rank == 0:  # a fresh start only: a resumed run logged its step-0 row the first time
            log.log(stage, 0, val_loss=val_before)
            print(f"[{stage}] step 0 | val loss {val_before:.4f}")

    def checkpoint(step, done, val_loss=None, rng=None):
        if rank == 0:  # every rank holds the same weights: one writer
            save_checkpoint(ckpt_path, model_checkpoint(
                raw, tok, optimizer=optimizer.state_dict(), step=step, stage=stage, config=asdict(sc),
                seed=cfg.seed, rng=rng or rng_state(), done=done, val_loss_before=val_before, val_loss=val_loss, best=best))

    # model FLOPs utilisation for the log, on a GPU the table knows (tokens are counted over all ranks)
    peak = cuda_peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    model.train()
    bar = tqdm(range(start, sc.max_steps), desc=stage, initial=start, total=sc.max_steps, dynamic_ncols=True,
               disable=rank != 0)
    step, t0, tokens, step_rng = start, time.time(), 0, rng_state()
    # Ctrl-C is held until the step it lands in is over, so the checkpoint it writes never holds half a
    # step (weights mid-update, or RNG draws of dropout masks the rerun would not repeat). One process
    # only: under torchrun the ranks could stop at different steps.
    interrupted, old_handler = [], None
    if world_size == 1 and threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        for step in bar:
            step_rng = rng_state()  # where the rerun of this step must start
            if interrupted:
                raise KeyboardInterrupt
            lr = lr_at(step, sc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step > start and step % sc.eval_interval == 0:
                val_loss = evaluate_loss(eval_model, val_data, sc, block_size, tok.eos_id, device, dtype)
                improved = sc.keep_best and val_loss < best["val_loss"]
                if improved:
                    best = {"step": step, "val_loss": val_loss}
                if rank == 0:
                    log.log(stage, step, val_loss=val_loss)
                checkpoint(step, done=False, val_loss=val_loss)
                if improved and rank == 0:  # after the checkpoint that names it (see resume_best)
                    save_best(ckpt_path, raw, best)
            loss_sum, n_tokens = accumulate_gradients(model, train_data, step, sc, cfg.seed, block_size, tok.eos_id,
                                                      device, dtype)
            tokens += n_tokens
            if world_size > 1:  # the global loss for the log, and the same NaN verdict on every rank
                dist.all_reduce(loss_sum)
                loss_sum /= world_size
            loss_sum = loss_sum.item()
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"[{stage}] non-finite loss ({loss_sum}) at step {step}; "
                                    f"the last good checkpoint is kept in {ckpt_path}")
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}")
            if step % sc.log_interval == 0 and rank == 0:
                dt = time.time() - t0
                mfu = {"mfu": raw.flops_per_token() * tokens / max(dt, 1e-9) / (peak * world_size)} if peak else {}
                log.log(stage, step, loss=loss_sum, lr=lr, grad_norm=norm.item(), tokens_per_s=tokens / max(dt, 1e-9),
                        **mfu)
                t0, tokens = time.time(), 0
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step, done=False, rng=step_rng)  # `step` has not been applied yet: the rerun redoes it
        if rank == 0:
            print(f"\n[{stage}] interrupted: checkpoint saved at step {step} in {ckpt_path}; rerun the same command to resume")
        raise SystemExit(130)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    bar.close()
    val_last = evaluate_loss(eval_model, val_data, sc, block_size, tok.eos_id, device, dtype)
    if sc.keep_best and best["val_loss"] < val_last:  # an earlier validation was better: end with its weights
        raw.load_state_dict(load_best(ckpt_path, best))  # every rank, before rank 0 removes the file below
        barrier()
    else:
        best = {"step": sc.max_steps, "val_loss": val_last}
    if rank == 0:
        kept = {"best_step": best["step"], "best_val_loss": best["val_loss"]} if sc.keep_best else {}
        log.log(stage, sc.max_steps, val_loss=val_last, **kept)
    checkpoint(sc.max_steps, done=True, val_loss=best["val_loss"])
    if rank == 0:
        Path(best_path(ckpt_path)).unlink(missing_ok=True)  # the checkpoint now holds the best weights
    if world_size > 1:
        dist.barrier()  # the next stage reads this checkpoint: no rank moves on before rank 0 wrote it
    if rank == 0:
        kept = f" at step {best['step']} (the last step's: {val_last:.4f})" if best["step"] != sc.max_steps else ""
        print(f"[{stage}] done | val loss {val_before:.4f} -> {best['val_loss']:.4f}{kept} | checkpoint {ckpt_path}")
    if interrupted:  # Ctrl-C in the last step: the stage is complete and saved, the run stops here
        raise SystemExit(130)
    return val_before, best["val_loss"]
