"""
Stage `cd`: context distillation (Askell et al. 2021, sec. 3), the HH work's first policy.

    python rlhf.py cd --preset cpu                           # cd.pt: the base LM with the HHH prompt distilled in
    python rlhf.py cd --cd.prompt_file=my_prompt.txt         # any prompt in hh-rlhf's format
    python rlhf.py all --preset cpu --policy_init=cd         # the seed's order: base -> cd -> PM -> RS / PPO

A base LM continues a dialogue the way its training text would. Prepend a prompt C of a few dialogues where
the assistant is helpful, honest about what it does not know, and declines harmful requests (hhh_prompt.txt,
a plain text file to edit), and the same model behaves more like an assistant: Anthropic's first policy was
a 52B model with such an HHH prompt. A prompt costs context on every call, so it is distilled into the weights:
the student (the base LM, no prompt) is trained to match the teacher (the frozen base LM, with the prompt) on
the distribution of every next token of training dialogues x,
    L = mean_t KL( p_teacher(. | C, x_<t) || p_student(. | x_<t) ),
a full-distribution distillation (every vocabulary entry, not samples of the teacher). The loss before
training is how much the prompt changes the base model; after, how much of that the student still misses.

It is next-token training with another target, so train.supervised_train runs it unchanged: ContextDistilled
is a GPT whose forward returns that loss where a GPT returns its cross-entropy (resume, validation, torchrun).
The loss is lm_loss.distill_loss, from the two models' hidden states and head weights: as the LM loss, it walks
the tokens in chunks and never holds the two (B, T, V) logits. Each row is one dialogue after the prompt, so
--cd.pack, which would put several in a row, is refused (check_config).

References
- Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", arXiv:2112.00861, sec. 3.
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", arXiv:2204.05862, sec. 2.3.
"""
import os
from dataclasses import dataclass

import torch

from lm_loss import distill_loss
from model import GPT, disable_dropout
from runtime import ConfigError, load_model, pick_device, set_seed
from sampling import show_samples
from tokens import sft_example
from train import LMTrainConfig, already_done, ckpt_path, load_data, supervised_train

PROMPT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hhh_prompt.txt")


# ----------------------------------------------------------------------------------------------
# the student

class ContextDistilled(GPT):
    """The student: a GPT whose forward(idx, targets, loss_mask) returns the distillation loss against the
    teacher, the frozen `teacher` GPT reading `context` (C's ids) before idx, instead of the cross-entropy
    with targets (which it ignores): supervised_train trains it as any LM. The teacher is a plain attribute,
    not a submodule, so it is neither trained nor saved: the checkpoint is an ordinary GPT's."""

    def __init__(self, config, teacher, context):
        super().__init__(config)
        self.__dict__["teacher"] = teacher.requires_grad_(False).eval()
        self.register_buffer("context", torch.as_tensor(context, dtype=torch.long), persistent=False)

    def forward(self, idx, targets=None, loss_mask=None, attention_mask=None, kv_cache=None, segment_ids=None):
        if targets is None:  # a plain LM (sampling)
            return super().forward(idx, attention_mask=attention_mask, kv_cache=kv_cache)
        assert segment_ids is None, "packed rows: context distillation reads one dialogue a row (check_config)"
        B, T = idx.size()
        L = self.context.numel()
        hidden = self.hidden_states(idx)                                               # (B, T, C)
        with torch.no_grad():  # the same tokens after C: position L + t of the teacher is position t here
            prompted = torch.cat([self.context.expand(B, L), idx], 1)                 # (B, L + T)
            teacher_hidden = self.teacher.hidden_states(prompted)[:, L:]               # (B, T, C)
        loss = distill_loss(hidden, self.lm_head.weight, teacher_hidden, self.teacher.lm_head.weight, loss_mask)
        return None, loss  # as GPT.forward: the loss, no logits


# ----------------------------------------------------------------------------------------------
# the stage

@dataclass
class CDConfig(LMTrainConfig):
    """Context distillation: the LMTrainConfig fields configure the distillation run."""
    prompt_file: str = ""        # the HHH prompt, in hh-rlhf's format ("" = hhh_prompt.txt beside rlhf.py)
    max_steps: int = 200         # distillation steps
    lr: float = 1e-4             # a small step from the base model
    warmup_steps: int = 10       # linear warmup
    eval_interval: int = 50      # steps between validation passes (held-out KL) and checkpoints


def prompt_text(cd_cfg):
    """The HHH prompt's text, from cd_cfg.prompt_file (hhh_prompt.txt by default); one line of error if it cannot be
    read or is empty. rlhf.py calls it before any stage runs, so a typo does not cost the stages before cd."""
    path = cd_cfg.prompt_file or PROMPT_FILE
    try:
        text = open(path, encoding="utf-8").read().rstrip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--cd.prompt_file: {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise ConfigError(f"--cd.prompt_file: {path} is empty")
    return text


def check_config(cd_cfg):
    """The CDConfig values a type cannot check, one line of error each: the prompt file (prompt_text) and pack.
    Packed rows (LMTrainConfig.pack) are refused: a row of several dialogues would let the student attend across
    them and give the teacher the prompt once a row, before the first dialogue only."""
    if cd_cfg.pack:
        raise ConfigError("--cd.pack=true: context distillation reads one dialogue a row (the teacher reads the "
                          "prompt before each); leave --cd.pack false")
    prompt_text(cd_cfg)


def read_prompt(cd_cfg, tok, block_size):
    """C's token ids (prompt_text) and how many tokens were cut from its start so that 64 or more of the context
    are left to the dialogue (a small trimmed vocabulary spells words it lacks in pieces, which can make the prompt
    long): (ids, cut)."""
    ids = tok.encode(prompt_text(cd_cfg))
    keep = min(len(ids), block_size - 64)
    return ids[len(ids) - keep:], len(ids) - keep


def cd_examples(dialogues, tok, room):
    """(ids, loss_mask) of each (prompt, chosen reply) dialogue (text or ids), left-truncated to `room` tokens
    (room for C in the teacher's context); the mask is 1 from the second token on: every next token is distilled."""
    examples = [sft_example(prompt, reply, tok, room, room)[0] for prompt, reply in dialogues]
    return [(ids, [0] + [1] * (len(ids) - 1)) for ids in examples]


def stage_cd(run, cd_cfg, sample, log):
    """Stage cd: the base LM (base.pt) distilled from itself with the HHH prompt -> cd.pt, a policy like
    sft.pt. Its validation loss is the held-out per-token KL(teacher || student): logged before and after."""
    check_config(cd_cfg)
    if already_done(run, "cd"):
        return
    device = pick_device(run.device)
    teacher, tok, _ = load_model(ckpt_path(run, "base"), device)
    disable_dropout(teacher)
    context, cut = read_prompt(cd_cfg, tok, teacher.config.block_size)
    _, train_pairs, val_pairs = load_data(run, tok)
    set_seed(run.seed)
    student = ContextDistilled(teacher.config, teacher, context).to(device)
    student.load_state_dict(teacher.state_dict())
    room = teacher.config.block_size - len(context)  # + 1: get_batch feeds ids[:-1], so L + T <= block_size
    print(f"[cd] HHH prompt {cd_cfg.prompt_file or PROMPT_FILE}: {len(context)} tokens"
          + (f" (its first {cut} cut: the context is {teacher.config.block_size})" if cut else "")
          + f"; dialogues cut to {room}")
    train_ex, val_ex = (cd_examples([(p.prompt, p.chosen) for p in ps], tok, room + 1)
                        for ps in (train_pairs, val_pairs))
    before, after = supervised_train(run, "cd", cd_cfg, student, tok, train_ex, val_ex, ckpt_path(run, "cd"), log)
    print(f"[cd] held-out KL(teacher || student) per token: {before:.4f} nats before distilling (what the prompt "
          f"changes), {after:.4f} after")
    show_samples(student, tok, val_pairs, sample, run.seed, "cd", run.dtype)
