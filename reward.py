"""
The preference model (PM): what it is, how it scores, and how its scores are normalised. The rm stage
that trains PM-A and PM-B is rm.py; rejection sampling, PPO and the evaluation score with this file.

A GPT trunk (initialised from the SFT checkpoint) with a scalar head scores a whole
(prompt, reply) sequence at its final EOS token. Trained on human comparisons with the
ranking loss -log sigmoid(r_chosen - r_rejected); binary and LM baselines for comparison.
Its raw score gets a gain and bias so that the SFT policy's own replies score mean 0, std 1:
rewards then read as "SFT standard deviations".

References:
- Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", arXiv:2204.05862: the PM
  and its EOS token.
- Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", arXiv:2112.00861:
  ranked vs binary preference modeling vs imitation (LM).
- Ziegler et al. 2019 / OpenAI lm-human-preferences (reward normalisation to mean 0, std 1 on
  policy samples; head init N(0, 1/sqrt(d+1))), and Stiennon et al. 2020 (ranking loss).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig, scalar_head
from runtime import CheckpointError, autocast, load_checkpoint
from sampling import strip_end
from tokens import Tokenizer, pad_right, pm_example


# -----------------------------------------------------------------------------
# losses

def ranking_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Pairwise ranking loss -log sigmoid(r_c - r_r - margin), mean over pairs.

    The Bradley-Terry loss of Bai et al. 2022 and Askell et al. 2021. Only score
    differences matter, so it cannot fix the scale's origin; the optional centering term
    coef * (r_c + r_r)^2 pins it near 0 (the auxiliary centering loss of Eisenstein et al. 2023).
    r_chosen, r_rejected: (B,) raw scores.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef > 0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def binary_loss(scores, labels):
    """Binary discrimination: each reply alone is labelled good (1) or bad (0), BCE on its score.

    The "binary" baseline of Askell et al. 2021: it throws away the pairing, so the
    model must learn an absolute notion of good. scores, labels: (B,).
    """
    return F.binary_cross_entropy_with_logits(scores, labels.float())


def fit_normalization(raw_scores, scale=True):
    """Gain and bias so that gain * raw + bias has mean 0 (and std 1 if scale) on raw_scores.

    raw_scores are PM scores of replies sampled from the SFT policy on train prompts, as in
    lm-human-preferences: the reward PPO sees then starts centred, so the KL penalty and the
    reward are on a known scale whatever the PM's arbitrary offset is.
    """
    x = np.asarray(raw_scores, dtype=np.float64)
    gain = 1.0 / (x.std() + 1e-8) if scale else 1.0
    return float(gain), float(-gain * x.mean())


# -----------------------------------------------------------------------------
# the model: GPT trunk + scalar head read at the final EOS


class RewardModel(GPT):
    """A GPT whose output is one scalar per sequence: the head applied to the hidden state of the
    last real token, the EOS that pm_example appends (Bai et al. 2022 append an "end-of-context"
    token). It subclasses GPT so its state dict is the GPT's keys plus `head.*`, and
    train.load_model can still read the trunk of a PM checkpoint.
    """

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Linear(config.n_embd, 1)
        # lm-human-preferences: std 1/sqrt(d+1) gives initial scores of std ~1 on unit-variance features
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.reward_gain, self.reward_bias = 1.0, 0.0  # normalised score = gain * raw + bias (set after training)

    def forward(self, idx, attention_mask=None, labels=None, objective="ranking", margin=0.0, center_coef=0.0):
        """Raw scores (B,) and, given labels (B,) (1 = chosen/good, 0 = rejected/bad), the loss.

        idx, attention_mask (B, T), any padding side. For "ranking" the k-th label-1 row is compared
        with the k-th label-0 row, so a batch is cat([chosen, rejected]); "binary" scores each row alone.
        """
        B, T = idx.size()
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=idx.device)
        else:  # index of the last real token: the largest position whose mask is 1
            last = (torch.arange(T, device=idx.device) * attention_mask.long()).argmax(1)  # (B,)
        h = self.hidden_states(idx, attention_mask, last=last)  # (B, C) at the last real token only
        rewards = scalar_head(self.head, h)  # (B,) fp32
        if labels is None:
            return rewards, None
        if objective == "binary":
            return rewards, binary_loss(rewards, labels)
        return rewards, ranking_loss(rewards[labels == 1], rewards[labels == 0], margin, center_coef)


@torch.no_grad()
def lm_scores(gpt, idx, attention_mask, reply_mask):
    """The "lm" baseline's score: mean log-prob of the reply tokens under a language model.

    Askell et al. 2021 compare PMs to scoring by the likelihood of an imitation-trained LM: here
    the SFT model, trained on chosen replies. idx, attention_mask, reply_mask (B, T) -> (B,).
    """
    logits, _ = gpt(idx, attention_mask=attention_mask)                                 # (B, T, V)
    logp = F.log_softmax(logits[:, :-1].float(), -1).gather(2, idx[:, 1:, None])[..., 0]  # (B, T-1)
    m = reply_mask[:, 1:].float()                    # position t predicts token t+1
    return (logp * m).sum(1) / m.sum(1).clamp(min=1)


def load_reward_model(path, device="cpu"):
    """Rebuild a PM from pm_a.pt / pm_b.pt -> (RewardModel in eval mode, Tokenizer, ckpt).
    The model carries its normalisation (reward_gain, reward_bias) for score_replies."""
    ckpt = load_checkpoint(path)
    if "head.weight" not in ckpt.get("model", {}):
        raise CheckpointError(f"{path}: not a preference-model checkpoint (no scalar head)")
    model = RewardModel(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.reward_gain, model.reward_bias = ckpt.get("reward_gain", 1.0), ckpt.get("reward_bias", 0.0)
    return model.to(device).eval(), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------
# data: token ids of comparisons, and scoring in batches

def pm_block(model, data):
    """Longest PM sequence: prompt (left-truncated) + reply + EOS, within the model's context."""
    return min(model.config.block_size, data.max_prompt_tokens + data.max_reply_tokens + 1)


def encode_pairs(pairs, tok, block_size, max_reply_tokens):
    """[(chosen_ids, rejected_ids)] of prompt + reply + EOS, one per Pair."""
    texts = tok.encode_batch([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)])
    return [(pm_example(texts[3 * i], texts[3 * i + 1], tok, block_size, max_reply_tokens),
             pm_example(texts[3 * i], texts[3 * i + 2], tok, block_size, max_reply_tokens)) for i in range(len(pairs))]


@torch.no_grad()
def score_sequences(model, seqs, pad_id, batch_size, reply_masks=None, dtype="auto"):
    """Raw scores (N,) numpy of token sequences, batched by similar length to waste little padding.
    model is a RewardModel, or a GPT with reply_masks (the "lm" objective). The forwards run under
    runtime.autocast(dtype): bf16 on CUDA by default; the scores themselves come out in fp32."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs))
    for s in range(0, len(seqs), batch_size):
        rows = order[s:s + batch_size]
        idx, mask = pad_right([seqs[i] for i in rows], pad_id)                         # (b, T)
        with autocast(device.type, dtype):
            if reply_masks is None:
                scores = model(idx.to(device), mask.to(device))[0]
            else:
                rmask, _ = pad_right([reply_masks[i] for i in rows], 0)
                scores = lm_scores(model, idx.to(device), mask.to(device), rmask.to(device))
        out[rows] = scores.float().cpu().numpy()
    model.train(was_training)
    return out


def score_pairs(model, examples, pad_id, batch_size, dtype="auto"):
    """(r_chosen, r_rejected) numpy arrays for [(chosen_ids, rejected_ids)]."""
    scores = score_sequences(model, [c for c, _ in examples] + [r for _, r in examples], pad_id, batch_size,
                             dtype=dtype)
    return scores[:len(examples)], scores[len(examples):]


@torch.no_grad()
def score_replies(reward_model, tok, prompts, replies, batch_size=32, dtype="auto"):
    """Normalised PM scores (N,) float tensor on the model's device, for PPO and best-of-n.

    prompts, replies: lists of token-id lists (a reply as the policy sampled it, without padding).
    A trailing EOS or "\\n\\nHuman:" stop sequence is dropped and exactly one EOS appended, so the
    score is read at an EOS as in training; the prompt is left-truncated to fit the context.
    """
    block = reward_model.config.block_size
    seqs = [pm_example(list(p), strip_end(list(r), tok.eos_id, tok.stop_ids), tok, block, block)
            for p, r in zip(prompts, replies)]
    raw = torch.as_tensor(score_sequences(reward_model, seqs, tok.eos_id, batch_size, dtype=dtype), dtype=torch.float32)
    return (reward_model.reward_gain * raw + reward_model.reward_bias).to(next(reward_model.parameters()).device)


def pm_reward_fn(reward_model, tok, batch_size=64, dtype="auto"):
    """reward_fn for ppo_step from a preference model: reward.score_replies, the PM's normalised score
    of query + reply + EOS read at that EOS (the input it was trained on). A trailing EOS or stop
    sequence is replaced by one EOS, so an unfinished reply is scored as it stands: the truncated reply."""
    return lambda queries, responses: score_replies(reward_model, tok, queries, responses, batch_size, dtype)


def score_texts(reward_model, tok, prompts, replies, batch_size=32):
    """score_replies for strings (e.g. `rlhf.py chat`), -> list of floats."""
    return score_replies(reward_model, tok, [tok.encode(p) for p in prompts],
                         [tok.encode(r) for r in replies], batch_size).tolist()


# -----------------------------------------------------------------------------
# normalisation: the policy's own samples score mean 0, std 1

def normalize_pm(model, tok, ref_prompts, ref_replies, mode, batch_size, dtype="auto"):
    """Set the PM's gain and bias from its raw scores on the reference (SFT-sampled) replies."""
    if mode not in ("scale", "shift", "none"):
        raise ValueError(f"--rm.normalize must be scale, shift or none, got {mode!r}")
    model.reward_gain, model.reward_bias = 1.0, 0.0
    if mode != "none":
        raw = score_replies(model, tok, ref_prompts, ref_replies, batch_size, dtype).cpu().numpy()
        model.reward_gain, model.reward_bias = fit_normalization(raw, scale=mode == "scale")
