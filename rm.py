"""
Stage `rm`: preference models PM-A and PM-B, each trained on a disjoint half of the train comparisons
(the PM itself, its losses and scoring are reward.py). PM-A is the reward for rejection sampling and
PPO; PM-B is a held-out judge of the policies PM-A trained (Bai et al. 2022, sec. 4.5). The numbers
reported about the PMs (accuracy, calibration, A-vs-B robustness) are plain numpy functions of their
scores, in pm_metrics.py; the studies that train more PMs (objectives, PMP, helpful vs harmless, size) are in
lab/studies.py.

    python rlhf.py rm --preset=cpu                     # pm_a.pt, pm_b.pt, eval.json["pm"]

References:
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", arXiv:2204.05862: PM
  calibration, and the robustness study with two PMs on halves of the data.
- Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", arXiv:2112.00861:
  ranked vs binary preference modeling vs imitation (LM), and preference-model pretraining (PMP).
"""
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data import read_pairs, resolve_data_dir, train_comparisons
from model import GPTConfig
from pm_metrics import evaluate_pms, pair_accuracy
from reward import RewardModel, encode_pairs, normalize_pm, pm_block, score_pairs
from runtime import (MetricsLog, all_ranks_mean, autocast, barrier, batch_rows, clip_and_step, dist_info,
                     epoch_permutation, grad_scaler, initial_policy, load_model, micro_batches, model_checkpoint,
                     pick_device, restore, rng_state, save_checkpoint, set_seed, stage_done)
from sampling import sample_replies
from tokens import pad_right, prompt_ids
from train import lr_at


# -----------------------------------------------------------------------------
# the stage's config

@dataclass
class PairTrainConfig:
    """What training on comparisons needs, PM or DPO policy alike: train_pm reads these (dpo.DPOConfig shares them)."""
    lr: float = 1e-4             # peak AdamW learning rate (linear warmup + cosine)
    min_lr_frac: float = 0.1     # cosine decays to lr * min_lr_frac
    warmup_steps: int = 20       # linear LR warmup (per phase: PMP, then human pairs)
    weight_decay: float = 0.0    # AdamW weight decay on matrices
    batch_size: int = 8          # comparisons per step (2x sequences)
    group_by_length: bool = False  # batches of pairs of similar length (pair_batch): far less padding on long data
    epochs: int = 1              # passes over the half (a PM's val loss bottoms out within one on the sample)
    max_steps: int = 0           # >0: exactly this many steps on human pairs (overrides epochs)
    grad_clip: float = 1.0       # clip the global grad norm (0 = off)
    eval_interval: int = 0       # steps between validations, whose lowest val loss is kept (early stopping);
                                 # 0 = auto_eval_interval: validation at most 10% of the training compute
    val_pairs: int = 1000        # validate on at most this many val pairs, a fixed seeded subset (0 = all);
                                 # the test split is scored whole (up to data.max_test_pairs)
    save_interval: int = 1000    # steps between resumable checkpoints (weights, optimizer, best so far), and one at the
                                 # end: ~10 on the full data, where one a validation wrote ~380 of ~2 GB per PM
    log_interval: int = 10       # steps between metrics.jsonl rows
    eval_batch_size: int = 32    # sequences per scoring forward pass


@dataclass
class RMConfig(PairTrainConfig):
    """PM-A and PM-B: the objective, the trunk, PMP and the normalisation (the training fields: PairTrainConfig)."""
    objective: str = "ranking"   # PM loss: "ranking" (-log sigmoid(r_c - r_r)) or "binary" (BCE per reply);
                                 # "lm": ablation only
    init: str = "policy"         # trunk: "policy" (the initial policy: --policy_init), or "sft", "cd", "base"
                                 # (out_dir/NAME.pt)
    margin: float = 0.0          # ranking: -log sigmoid(r_c - r_r - margin)
    center_coef: float = 0.0     # ranking: + coef * mean((r_c + r_r)^2), keeps scores centred at 0
    split_halves: bool = True    # PM-A / PM-B on disjoint halves of train (False: both see all pairs)
    pmp: bool = False            # preference-model pretraining on unlabelled, auto-built comparisons first
    pmp_steps: int = 200         # PMP steps (batch_size comparisons each)
    pmp_dir: str = ""            # PMP on real preference data in hh-rlhf's layout (DIR/NAME/train.jsonl.gz rows of
                                 # {"chosen", "rejected"}: StackExchange, Reddit, ...) instead of pmp_pairs';
                                 # implies pmp
    normalize: str = "scale"     # "scale": gain+bias so SFT samples score mean 0, std 1; "shift": bias only; "none"
    normalize_samples: int = 512 # SFT samples (train prompts, PPO's shapes and temperature) that fit gain and bias;
                                 # the fitted mean is off by ~1/sqrt(this) SFT standard deviations


# -----------------------------------------------------------------------------
# data: preference-model pretraining's comparisons, and batches of comparisons

def pmp_pairs(pairs, seed):
    """Comparisons built from dialogue text alone, for preference-model pretraining (PMP).

    Askell et al. 2021 pretrain PMs on comparisons mined from the web before the human
    data. With no such corpus here, every real reply (chosen and rejected alike: no human label
    is used) is preferred to a corrupted one, drawn at random: a reply from another dialogue
    (tests relevance), the same words shuffled (fluency), or the reply cut to 20-60% of its words
    (completeness). Each corruption keeps the reply's formatting (its leading space, the whitespace
    between words): a pair must differ only in what it tests, or a PM learns to spot the formatting.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(pairs):
        for reply in (p.chosen, p.rejected):
            kind = rng.integers(3)
            if kind == 0:
                other = pairs[(i + 1 + rng.integers(len(pairs) - 1)) % len(pairs)] if len(pairs) > 1 else p
                bad = other.chosen if rng.random() < 0.5 else other.rejected
            else:
                parts = re.split(r"(\s+)", reply)  # words at even indices, the whitespace between them at odd
                slots = [j for j in range(0, len(parts), 2) if parts[j]]  # the words ("" where whitespace leads)
                if kind == 1:  # shuffle the words in their slots; every gap stays where it was
                    for j, w in zip(slots, [parts[j] for j in rng.permutation(slots)]):
                        parts[j] = w
                    bad = "".join(parts)
                else:          # a prefix of the reply, cut after a word
                    keep = max(1, int(len(slots) * rng.uniform(0.2, 0.6)))
                    bad = "".join(parts[:slots[keep - 1] + 1]) if slots else reply
            if bad != reply:
                out.append(type(p)(p.prompt, reply, bad, "pmp", p.n_turns))
    return out


def pmp_data(run, rm_cfg, train_pairs):
    """PMP's comparisons: every train pair of rm_cfg.pmp_dir when given (read as hh-rlhf is, every subset in it),
    else the automatic ones of pmp_pairs; None without PMP."""
    if rm_cfg.pmp_dir:
        return read_pairs(rm_cfg.pmp_dir, "train", replace(run.data, max_pairs=0, subsets="", extra_dir=""))[0]
    return pmp_pairs(train_pairs, run.seed) if rm_cfg.pmp else None


def pair_batch(examples, index, batch_size, seed, pad_id, group_by_length=False, group=32):
    """Comparison batch number `index`: a pure function of (index, seed), like train.get_batch, so a resumed run sees
    the same batches. Returns idx, attention_mask (2B, T) as cat([chosen, rejected]), labels (2B,), and for DPO's
    (chosen, rejected, prompt_length) examples the reply mask (2B, T), else None. group_by_length: each run of `group`
    batches of the epoch's permutation is sorted by length and dealt out in a seeded order, so a batch holds pairs of
    similar length (a batch is as wide as its longest sequence: at 32 pairs of GPT-2 tokens on the full data, ~272
    tokens wide instead of ~783, by `rlhf.py plan`) and each pair still comes once an epoch (the length-grouped sampler
    of fairseq and Hugging Face's group_by_length)."""
    if group_by_length:  # this batch's group of batches, sorted by length, dealt out in a seeded order
        per_epoch = max(1, len(examples) // batch_size)
        epoch, pos = divmod(index, per_epoch)
        first = pos // group * group
        perm = epoch_permutation(len(examples), epoch, seed)
        rows = sorted(perm[first * batch_size:min(first + group, per_epoch) * batch_size],
                      key=lambda i: max(len(examples[i][0]), len(examples[i][1])))
        slots = torch.randperm(max(1, len(rows) // batch_size),  # (a half smaller than one batch: one batch)
                               generator=torch.Generator().manual_seed((seed * 7919 + epoch) * 100003 + first))
        k = int(slots[pos - first])
        batch = [examples[i] for i in rows[k * batch_size:(k + 1) * batch_size]]
    else:
        batch = [examples[i] for i in batch_rows(len(examples), index, batch_size, seed)]
    idx, mask = pad_right([ex[0] for ex in batch] + [ex[1] for ex in batch], pad_id)  # (2B, T)
    labels = torch.cat([torch.ones(len(batch)), torch.zeros(len(batch))])            # (2B,)
    return idx, mask, labels, reply_mask(mask, [ex[2] for ex in batch] * 2) if len(batch[0]) == 3 else None


def reply_mask(attention_mask, prompt_lengths):
    """1 on the reply tokens (and EOS) of right-padded prompt + reply rows, 0 on prompt and padding: for DPO's
    (chosen, rejected, prompt_length) examples (tokens.dpo_example). (B, T), [B] -> (B, T) long."""
    start = torch.as_tensor(prompt_lengths)[:, None]                                   # (B, 1)
    return attention_mask * (torch.arange(attention_mask.size(1)) >= start)


# -----------------------------------------------------------------------------
# training: early stopping on a fixed validation subset, resumable

def init_reward_model(path, device):
    """A RewardModel whose trunk is the GPT stored in `path` (sft.pt or base.pt), with a fresh head
    and dropout off (dropout would make the two scores of a comparison noisy in different ways)."""
    gpt, tok, ckpt = load_model(path, "cpu")
    model = RewardModel(GPTConfig(**dict(ckpt["model_args"], dropout=0.0)))
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
    return model.to(device), tok


def val_subset(examples, cap, seed):
    """At most `cap` of the validation comparisons, drawn once by a seeded permutation and kept in file
    order, so every validation of a run (and of its resumed continuation) scores the same pairs and the
    early-stopping curve moves only with the weights. No more than `cap` (or cap 0): all, untouched."""
    if not cap or len(examples) <= cap:
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:cap])
    return [examples[i] for i in keep]


def auto_eval_interval(n_val, batch_size, budget=0.1):
    """Steps between validations that keep them within `budget` of the training compute. A validation
    scores 2 * n_val sequences, forward only; a step trains on 2 * batch_size, forward and backward, about
    three forwards' worth (the backward costs ~2x the forward: 6N vs 2N FLOPs per token, Kaplan et al.
    2020). Every k steps validation then costs n_val / (3 * batch_size * k) of training, so
    k = ceil(n_val / (3 * batch_size * budget)): 417 for 1,000 pairs at batch 8 (every 25 steps on all
    ~8,000 val pairs of the full data cost 13x the training). It overestimates a little: validation
    batches sequences of similar length (less padding) and stores no activations."""
    return max(1, math.ceil(n_val / (3 * batch_size * budget)))


def validate(model, examples, pad_id, batch_size, dtype="auto"):
    """(accuracy, loss) on comparisons; loss = mean -log sigmoid(r_c - r_r), the early-stopping signal
    (smoother than accuracy on a few dozen validation pairs)."""
    r_c, r_r = score_pairs(model, examples, pad_id, batch_size, dtype)
    return pair_accuracy(r_c, r_r), float(np.mean(np.logaddexp(0.0, -(r_c - r_r))))


def pm_steps(rm_cfg, n_pairs):
    """Steps on n_pairs human comparisons: rm_cfg.max_steps, or rm_cfg.epochs passes of rm_cfg.batch_size pairs a
    step (at least one step). train_pm runs this many; rlhf.py plan counts them the same way."""
    return rm_cfg.max_steps or rm_cfg.epochs * max(1, n_pairs // rm_cfg.batch_size)


def resume_pm(ckpt_path, model, optimizer, scaler):
    """Continue an unfinished train_pm run from ckpt_path -> (step, wall seconds so far, best-so-far dict);
    (0, 0.0, an empty best) when there is nothing to resume."""
    best = {"val_loss": float("inf"), "val_accuracy": float("nan"), "step": 0, "state": None}
    if not (ckpt_path and os.path.exists(ckpt_path)):
        return 0, 0.0, best
    ckpt = restore(ckpt_path, model, optimizer, scaler=scaler)
    return ckpt["step"], ckpt["wall_s"], ckpt["best"]


def pair_step(model, batch, objective, rm_cfg, run, scaler):
    """Forward and backward of one comparison batch (pair_batch's idx, mask, labels, reply mask), leaving the
    gradient of its mean loss in .grad; returns that loss (detached). Under torchrun this rank takes pairs
    rank::world_size, the k-th chosen row with the k-th rejected, and DDP averages the ranks' gradients. Pairs of
    more than run.micro_tokens tokens in all (2 rows a pair, each as wide as the wider) run in groups
    (runtime.micro_batches), each group's loss weighted by its share of the pairs: the loss is a mean over pairs
    (ranking, DPO) or rows (binary), so the groups' gradients add up to the whole batch's."""
    idx, mask, labels, replies = batch
    (rank, world_size), device = dist_info(), next(model.parameters()).device
    B = idx.size(0) // 2
    mine = torch.arange(rank, B, world_size)                                        # this rank's pairs
    widths = torch.maximum(mask[mine].sum(1), mask[B + mine].sum(1))                 # (b,) the wider of each pair
    groups = micro_batches(2 * widths, run.micro_tokens)
    loss_sum = torch.zeros((), device=device)
    for g, pairs in enumerate(groups):
        rows = torch.cat([mine[pairs], B + mine[pairs]])                             # chosen rows, then rejected
        width = int(widths[pairs].max())
        x, m, y = idx[rows, :width].to(device), mask[rows, :width].to(device), labels[rows].to(device)
        extra = () if replies is None else (replies[rows, :width].to(device),)       # DPO's reply mask (dpo.DPOPolicy)
        sync = world_size == 1 or g == len(groups) - 1  # DDP all-reduces on the group's backward that ends the step
        with nullcontext() if sync else model.no_sync():
            with autocast(device.type, run.dtype):  # the forward only; the loss is fp32 (the head's output is)
                _, loss = model(x, m, y, objective, rm_cfg.margin, rm_cfg.center_coef, *extra)
            if len(groups) > 1:
                loss = loss * (len(pairs) / len(mine))
            scaler.scale(loss).backward()  # under DDP: gradients all-reduced (averaged over ranks) on the last
        loss_sum += loss.detach()
    return loss_sum


def train_pm(run, rm_cfg, model, tok, train_ex, val_ex, objective, pmp_ex=None, ckpt_path=None, log=None, name="pm"):
    """Fit `model` on comparisons [(chosen_ids, rejected_ids)], after rm_cfg.pmp_steps of PMP if pmp_ex is
    given, and end with the weights of the lowest validation loss (early stopping). Validation scores at
    most rm_cfg.val_pairs of val_ex (val_subset), every rm_cfg.eval_interval steps (auto_eval_interval if 0).
    With ckpt_path, an unfinished run there is resumed and progress is checkpointed every rm_cfg.save_interval
    steps and after the last: the checkpoint keeps the best-so-far weights, so a run resumed between two
    validations still ends with the best of all of them.
    Returns {"steps", "best_step", "val_accuracy", "val_loss", "wall_s"}.
    Under torchrun every rank takes comparisons rank::world_size of each global batch (chosen and
    rejected rows together) and DDP averages the gradients: with equal pairs per rank that is the
    gradient of the global mean, so N processes take the steps of one. Every rank validates (the same
    early-stopping verdict everywhere); only rank 0 logs, prints and writes the checkpoint."""
    device, dtype = next(model.parameters()).device, run.dtype
    rank, world_size = dist_info()
    assert rm_cfg.batch_size % world_size == 0, (
        f"rm.batch_size {rm_cfg.batch_size} must be divisible by the {world_size} processes")
    n_pmp = rm_cfg.pmp_steps if pmp_ex else 0
    n_human = pm_steps(rm_cfg, len(train_ex)) if train_ex else 0
    val = val_subset(val_ex, rm_cfg.val_pairs, run.seed)
    every = rm_cfg.eval_interval or (auto_eval_interval(len(val), rm_cfg.batch_size) if val else max(1, n_pmp, n_human))
    optimizer = model.configure_optimizer(rm_cfg.weight_decay, rm_cfg.lr, (0.9, 0.95), device.type)
    scaler = grad_scaler(device.type, dtype)  # fp16 only: the loss scaler; a no-op otherwise
    start, wall, best = resume_pm(ckpt_path, model, optimizer, scaler)
    if rank == 0:
        print(f"[rm] {name}: {'resuming from ' + ckpt_path + ' at' if start else 'from'} step {start}/{n_pmp + n_human}"
              + (f" | validating on {len(val)} of {len(val_ex)} val pairs every {every} steps" if val else ""))
    ddp = model
    if world_size > 1:  # only the training forward goes through DDP: `model` is what is validated and saved
        ddp = DDP(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)

    def save(step):
        if rank == 0:  # every rank holds the same weights: one writer
            save_checkpoint(ckpt_path, model_checkpoint(
                model, tok, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, stage="rm",
                config=asdict(rm_cfg), seed=run.seed, rng=rng_state(), done=False, best=best,
                wall_s=wall + time.time() - t0))

    t0 = time.time()
    model.train()
    for step in range(start, n_pmp + n_human):
        pmp = step < n_pmp  # phase 1: PMP (always the ranking loss), phase 2: human comparisons
        data, i, n = (pmp_ex, step, n_pmp) if pmp else (train_ex, step - n_pmp, n_human)
        lr = lr_at(i, replace(rm_cfg, max_steps=n))  # warmup + cosine within each phase
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx, mask, labels, replies = pair_batch(data, i, rm_cfg.batch_size, run.seed + pmp, tok.eos_id,
                                                rm_cfg.group_by_length)  # (2B, T), (2B,)
        loss = pair_step(ddp, (idx, mask, labels, replies), "ranking" if pmp else objective, rm_cfg, run, scaler)
        norm = clip_and_step(optimizer, list(model.parameters()), rm_cfg.grad_clip, scaler)
        loss = all_ranks_mean(loss)  # the global batch's loss, for the log
        phase = "pmp" if pmp else "train"
        if log and rank == 0 and step % rm_cfg.log_interval == 0:
            log.log("rm", step, **{f"{name}/{phase}_loss": loss.item(), f"{name}/lr": lr,
                                   f"{name}/grad_norm": norm.item()})
        if (i + 1) % every == 0 or i + 1 == n:
            line = f"[rm] {name} {phase} step {step + 1}/{n_pmp + n_human} | loss {loss.item():.3f} | lr {lr:.1e}"
            if not pmp and val:
                acc, vloss = validate(model, val, tok.eos_id, rm_cfg.eval_batch_size, dtype)
                if vloss < best["val_loss"]:
                    best = {"val_loss": vloss, "val_accuracy": acc, "step": step + 1,
                            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                line += f" | val loss {vloss:.3f} | val acc {acc:.3f}"
                if log and rank == 0:
                    log.log("rm", step + 1, **{f"{name}/val_loss": vloss, f"{name}/val_accuracy": acc})
            if rank == 0:
                print(f"{line} | {time.time() - t0 + wall:.0f}s")
        if ckpt_path and ((rm_cfg.save_interval and (step + 1) % rm_cfg.save_interval == 0)
                          or step + 1 == n_pmp + n_human):
            save(step + 1)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"steps": n_pmp + n_human, "best_step": best["step"], "val_accuracy": best["val_accuracy"],
            "val_loss": best["val_loss"], "wall_s": wall + time.time() - t0}


@torch.no_grad()
def sft_samples(policy, tok, pairs, n, max_new_tokens, max_prompt_tokens, seed, batch_size, temperature=1.0,
                dtype="auto", replies_per_prompt=1):
    """(prompt_ids, reply_ids) lists sampled at `temperature` from `policy`, replies_per_prompt replies to each of
    n seeded-random prompts of `pairs` (prompt-major): the reference replies whose PM scores are normalised to
    mean 0, std 1 (one a prompt), or those the within-prompt length trend is fitted on (several). Called with
    the shapes PPO and eval sample at (prompt and reply lengths, temperature), so that "SFT scores mean 0,
    std 1" holds where the rewards are used: a PM's score moves with the reply's length."""
    device = next(policy.parameters()).device
    rows = np.random.default_rng(seed).permutation(len(pairs))[:n]
    max_prompt = min(max_prompt_tokens, policy.config.block_size - max_new_tokens)
    prompts = [prompt_ids(pairs[i].prompt, tok, max_prompt) for i in rows]
    policy.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    replies = sample_replies(policy, prompts, replies_per_prompt, max_new_tokens, batch_size, tok, gen, temperature,
                             dtype)
    return [p for p in prompts for _ in range(replies_per_prompt)], replies


TREND_REPLIES = 4  # SFT replies a prompt that the length trend is fitted on (normalize_samples of them in all)


def normalisation_samples(policy, tok, train_pairs, rm_cfg, ppo_cfg, seed, dtype):
    """(ref, trend): the SFT samples a PM is normalised on, drawn as PPO and eval draw theirs (sft_samples), one a
    prompt for gain and bias; and those its length trend is fitted on, within prompts: other draws, TREND_REPLIES a
    prompt, from their own seed, so they leave `ref` as it is."""
    shape = (ppo_cfg.max_new_tokens, ppo_cfg.max_prompt_tokens)
    ref = sft_samples(policy, tok, train_pairs, rm_cfg.normalize_samples, *shape, seed, rm_cfg.eval_batch_size,
                      ppo_cfg.temperature, dtype)
    trend = sft_samples(policy, tok, train_pairs, max(1, rm_cfg.normalize_samples // TREND_REPLIES), *shape,
                        seed + 1, rm_cfg.eval_batch_size, ppo_cfg.temperature, dtype, replies_per_prompt=TREND_REPLIES)
    return ref, trend


# -----------------------------------------------------------------------------
# the stage: PM-A and PM-B, then the optional studies, then the test-set evaluation

@dataclass
class PMInputs:
    """What the rm stage and the PM studies (lab/studies.py) start from."""
    device: str
    init: str            # the trunk's checkpoint: the initial policy, or out_dir/sft.pt, cd.pt or base.pt (--rm.init)
    policy: object       # the SFT policy (the base LM before SFT exists): samples to normalise on, the lm baseline
    tok: object
    train_pairs: list
    val_pairs: list
    halves: tuple        # (half A, half B) of train_pairs (data.train_comparisons)
    enc: object          # pairs -> [(chosen_ids, rejected_ids)] as the PM reads them (reward.encode_pairs)
    val_ex: list


def check_choices(rm_cfg):
    """--rm.objective and --rm.init, one line each if neither of their choices (rlhf.py calls it as it reads them)."""
    if rm_cfg.objective not in ("ranking", "binary"):
        raise ValueError(f"--rm.objective must be ranking or binary, got {rm_cfg.objective!r} "
                         "(lm has no head to train; it is one row of --studies.ablation=true)")
    if rm_cfg.init not in ("policy", "sft", "cd", "base"):
        raise ValueError(f"--rm.init must be policy, sft, cd or base, got {rm_cfg.init!r}")


def pm_inputs(run, rm_cfg):
    """Check rm_cfg's choices, then read the model and data every PM of a run trains from (PMInputs)."""
    check_choices(rm_cfg)
    device, policy_path = pick_device(run.device), initial_policy(run)
    init = policy_path if rm_cfg.init == "policy" else os.path.join(run.out_dir, f"{rm_cfg.init}.pt")
    policy, tok, _ = load_model(policy_path if os.path.exists(policy_path) else init, device)  # PPO's first policy
    train_pairs, val_pairs, halves = train_comparisons(resolve_data_dir(run.data_dir or None), run.data,
                                                       rm_cfg.split_halves)
    enc = lambda ps: encode_pairs(ps, tok, pm_block(policy, run.data), run.data.max_reply_tokens)  # noqa: E731
    return PMInputs(device, init, policy, tok, train_pairs, val_pairs, halves, enc, enc(val_pairs))


def stage_rm(run, rm_cfg, ppo_cfg):
    """Stage rm: PM-A on half A and PM-B on half B of the train pairs (Bai et al. 2022), each normalised on replies
    sampled from the SFT policy; then the test-set evaluation (evaluate_pms). The studies that train more PMs
    (`python rlhf.py studies`) are lab/studies.py's. A finished PM is skipped unless run.force. Under torchrun the PMs
    train data-parallel (train_pm); normalisation, checkpoints, eval.json and the evaluation are rank 0's, and the
    other ranks wait at a barrier."""
    (rank, _), dtype, inp = dist_info(), run.dtype, pm_inputs(run, rm_cfg)
    init, policy, tok, train_pairs, halves, enc, val_ex = (inp.init, inp.policy, inp.tok, inp.train_pairs, inp.halves,
                                                           inp.enc, inp.val_ex)
    if rank == 0:
        print(f"[rm] {len(train_pairs)} train pairs -> half A {len(halves[0])} / half B {len(halves[1])}, "
              f"{len(val_ex)} val pairs | init {init} | objective {rm_cfg.objective}"
              + (f" + PMP on {rm_cfg.pmp_dir or 'automatic comparisons'}" if rm_cfg.pmp or rm_cfg.pmp_dir else ""))
    log, ref = MetricsLog(run.out_dir), None
    for name, half in zip(("pm_a", "pm_b"), halves):
        path = os.path.join(run.out_dir, f"{name}.pt")
        if stage_done(path, run.force, "rm"):  # all ranks skip or train this PM together
            continue
        set_seed(run.seed + (name == "pm_b"))
        model, _ = init_reward_model(init, inp.device)
        pmp = pmp_data(run, rm_cfg, train_pairs)
        pmp_ex = enc(pmp) if pmp else None
        info = train_pm(run, rm_cfg, model, tok, enc(half), val_ex, rm_cfg.objective, pmp_ex, path, log, name)
        if rank == 0:
            if ref is None:  # the same SFT samples normalise both PMs, drawn as PPO and eval draw theirs
                ref, trend = normalisation_samples(policy, tok, train_pairs, rm_cfg, ppo_cfg, run.seed, dtype)
            normalize_pm(model, tok, *ref, rm_cfg.normalize, rm_cfg.eval_batch_size, dtype, trend=trend)
            save_checkpoint(path, model_checkpoint(
                model, tok, step=info["steps"], stage="rm", config=asdict(rm_cfg), seed=run.seed, rng=rng_state(),
                done=True, reward_gain=model.reward_gain, reward_bias=model.reward_bias,
                length_coef=model.length_coef, length_mean=model.length_mean, train_pairs=len(half), **info))
            print(f"[rm] {name}: {len(half)} pairs, best step {info['best_step']}/{info['steps']}, val acc "
                  f"{info['val_accuracy']:.3f}, gain {model.reward_gain:.3f} bias {model.reward_bias:+.3f}, "
                  f"{model.length_coef:+.4f} a reply token, "
                  f"{info['wall_s']:.0f}s -> {path}")
        barrier()  # no rank reads the checkpoint (the ablation reuses pm_a.pt) before rank 0 has written it
    if rank == 0:
        evaluate_pms(run, rm_cfg)
    barrier()  # the other ranks wait for the evaluation
