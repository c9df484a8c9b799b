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

from lm_loss import token_logprobs
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


def fit_length_trend(scores, lengths, prompts):
    """The slope of scores in reply length (tokens) within prompts, fitted on several SFT replies to each prompt.

    A PM trained on hh-rlhf learns that the shorter reply often wins (README), and PPO exploits it by changing
    the length of its reply to a given prompt. Across prompts length goes with the prompt as well (a question
    drawing long replies may score high or low for other reasons), so the line is fitted with one intercept a
    prompt, the fixed-effects (within) estimator of panel data (Wooldridge 2010, sec. 10.5): both scores and
    lengths less their prompt's mean, slope = sum (s - s_p)(l - l_p) / sum (l - l_p)^2 over all replies. A prompt
    with one reply adds nothing; 0 where no prompt's replies differ in length. score - slope * (length - SFT's
    mean length) is the length-debiased PPO reward (--ppo.length_debias), one remedy for a policy that wins by
    shortening. scores, lengths: (N,); prompts: N keys, equal for the replies to one prompt."""
    scores, lengths = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    index = {}
    group = np.array([index.setdefault(p, len(index)) for p in prompts])               # (N,) prompt number
    within = lambda x: x - (np.bincount(group, x) / np.bincount(group))[group]  # noqa: E731  x less its prompt's mean
    ds, dl = within(scores), within(lengths)
    return float(ds @ dl / (dl @ dl)) if dl @ dl > 1e-9 else 0.0


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
        self.length_coef, self.length_mean = 0.0, 0.0  # its linear trend in reply length (normalize_pm)

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


def reply_logprobs(gpt, idx, attention_mask, reply_mask):
    """log p(reply | prompt) = sum over the reply tokens of log p(x_t | x_<t), (B,) fp32: the likelihood
    the "lm" baseline scores by (its mean, lm_scores) and DPO's implicit reward is made of (its sum, dpo.py).
    idx, attention_mask (B, T) right-padded prompt + reply rows, reply_mask (B, T) 1 on the reply tokens
    (and EOS): a prompt or pad token never enters. Position t predicts token t + 1; the LM head runs on the
    reply positions only and never builds their logits whole (lm_loss.token_logprobs), with gradients when
    the caller wants them."""
    B, T = idx.size()
    hidden = gpt.hidden_states(idx[:, :-1], attention_mask[:, :-1])                    # (B, T-1, C)
    reply = reply_mask[:, 1:].bool()                                                   # (B, T-1)
    logp = token_logprobs(hidden[reply], gpt.lm_head.weight, idx[:, 1:][reply])       # (M,) the reply tokens
    rows = torch.arange(B, device=idx.device)[:, None].expand(B, T - 1)[reply]         # (M,) their row
    return torch.zeros(B, device=idx.device).index_add(0, rows, logp)                  # (B,)


@torch.no_grad()
def lm_scores(gpt, idx, attention_mask, reply_mask):
    """The "lm" baseline's score: mean log-prob of the reply tokens under a language model.

    Askell et al. 2021 compare PMs to scoring by the likelihood of an imitation-trained LM: here
    the SFT model, trained on chosen replies. idx, attention_mask, reply_mask (B, T) -> (B,).
    """
    return reply_logprobs(gpt, idx, attention_mask, reply_mask) / reply_mask[:, 1:].sum(1).clamp(min=1)


def load_reward_model(path, device="cpu"):
    """Rebuild a PM from pm_a.pt / pm_b.pt -> (RewardModel in eval mode, Tokenizer, ckpt).
    The model carries its normalisation (reward_gain, reward_bias) for score_replies."""
    ckpt = load_checkpoint(path)
    if "head.weight" not in ckpt.get("model", {}):
        raise CheckpointError(f"{path}: not a preference-model checkpoint (no scalar head)")
    model = RewardModel(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.reward_gain, model.reward_bias = ckpt.get("reward_gain", 1.0), ckpt.get("reward_bias", 0.0)
    model.length_coef, model.length_mean = ckpt.get("length_coef", 0.0), ckpt.get("length_mean", 0.0)
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
    model is a RewardModel; or, with reply_masks, a GPT (the "lm" objective's mean log-prob) or a DPO policy
    (its implicit reward, dpo.DPOPolicy). The forwards run under
    runtime.autocast(dtype): bf16 on CUDA by default; the scores themselves come out in fp32."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs))
    for s in range(0, len(seqs), batch_size):
        rows = order[s:s + batch_size]
        idx, mask = pad_right([seqs[i] for i in rows], pad_id)                         # (b, T)
        with autocast(device.type, dtype):
            idx, mask = idx.to(device), mask.to(device)
            rmask = None if reply_masks is None else pad_right([reply_masks[i] for i in rows], 0)[0].to(device)
            if rmask is not None and type(model) is GPT:
                scores = lm_scores(model, idx, mask, rmask)
            else:
                scores = model(idx, mask)[0] if rmask is None else model(idx, mask, reply_mask=rmask)[0]
        out[rows] = scores.float().cpu().numpy()
    model.train(was_training)
    return out


def score_pairs(model, examples, pad_id, batch_size, dtype="auto"):
    """(r_chosen, r_rejected) numpy arrays for [(chosen_ids, rejected_ids)], or for DPO's
    [(chosen_ids, rejected_ids, prompt_length)] (a DPO policy's implicit rewards of the two replies)."""
    seqs = [ex[0] for ex in examples] + [ex[1] for ex in examples]
    masks = None
    if examples and len(examples[0]) == 3:  # 1 from the prompt's end on: the reply and its EOS
        masks = [[0] * ex[2] + [1] * (len(ex[i]) - ex[2]) for i in (0, 1) for ex in examples]
    scores = score_sequences(model, seqs, pad_id, batch_size, masks, dtype)
    return scores[:len(examples)], scores[len(examples):]


@torch.no_grad()
def score_replies(reward_model, tok, prompts, replies, batch_size=32, dtype="auto", length_debias=False):
    """Normalised PM scores (N,) float tensor on the model's device, for PPO and best-of-n.

    prompts, replies: lists of token-id lists (a reply as the policy sampled it, without padding).
    A trailing EOS or "\\n\\nHuman:" stop sequence is dropped and exactly one EOS appended, so the
    score is read at an EOS as in training; the prompt is left-truncated to fit the context.
    length_debias: minus the score's trend in reply length within prompts on SFT's samples (normalize_pm), so
    a reply gains nothing by its length alone: a PM that learned "shorter wins" pays for no shortcut.
    """
    block = reward_model.config.block_size
    replies = [strip_end(list(r), tok.eos_id, tok.stop_ids) for r in replies]
    seqs = [pm_example(list(p), r, tok, block, block) for p, r in zip(prompts, replies)]
    raw = torch.as_tensor(score_sequences(reward_model, seqs, tok.eos_id, batch_size, dtype=dtype), dtype=torch.float32)
    scores = reward_model.reward_gain * raw + reward_model.reward_bias
    if length_debias:
        lengths = torch.tensor([len(r) for r in replies], dtype=torch.float32)
        scores = scores - reward_model.length_coef * (lengths - reward_model.length_mean)
    return scores.to(next(reward_model.parameters()).device)


def pm_reward_fn(reward_model, tok, batch_size=64, dtype="auto", length_debias=False):
    """reward_fn for ppo_step from a preference model: reward.score_replies, the PM's normalised score
    of query + reply + EOS read at that EOS (the input it was trained on). A trailing EOS or stop
    sequence is replaced by one EOS, so an unfinished reply is scored as it stands: the truncated reply."""
    return lambda queries, responses: score_replies(reward_model, tok, queries, responses, batch_size, dtype,
                                                    length_debias)


def score_texts(reward_model, tok, prompts, replies, batch_size=32):
    """score_replies for strings (e.g. `rlhf.py chat`), -> list of floats."""
    return score_replies(reward_model, tok, [tok.encode(p) for p in prompts],
                         [tok.encode(r) for r in replies], batch_size).tolist()


# -----------------------------------------------------------------------------
# normalisation: the policy's own samples score mean 0, std 1

def normalize_pm(model, tok, ref_prompts, ref_replies, mode, batch_size, dtype="auto", trend=None):
    """Set the PM's gain and bias from its raw scores on the reference (SFT-sampled) replies, and its length
    trend (fit_length_trend) from its normalised scores on `trend`: (prompts, replies), several SFT replies to
    each prompt (default: the reference replies themselves, grouped by prompt). The trend is centred on the
    reference replies' mean length, so the debiased score has mean 0 on them too."""
    if mode not in ("scale", "shift", "none"):
        raise ValueError(f"--rm.normalize must be scale, shift or none, got {mode!r}")
    model.reward_gain, model.reward_bias = 1.0, 0.0
    raw = score_replies(model, tok, ref_prompts, ref_replies, batch_size, dtype).cpu().numpy()
    if mode != "none":
        model.reward_gain, model.reward_bias = fit_normalization(raw, scale=mode == "scale")
    lengths = lambda replies: [len(strip_end(list(r), tok.eos_id, tok.stop_ids)) for r in replies]  # noqa: E731
    prompts, replies = trend or (ref_prompts, ref_replies)
    scores = score_replies(model, tok, prompts, replies, batch_size, dtype).cpu().numpy()
    model.length_coef = fit_length_trend(scores, lengths(replies), [tuple(p) for p in prompts])
    model.length_mean = float(np.mean(lengths(ref_replies)))
