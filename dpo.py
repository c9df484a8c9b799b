"""
Stage `dpo`: direct preference optimisation (Rafailov et al. 2023), RLHF's objective without a PM or PPO.

    python rlhf.py dpo --preset cpu                        # dpo.pt: DPO from SFT on PM-A's half, beta 0.1
    python rlhf.py dpo --preset cpu --dpo.betas=0.03,0.3   # and dpo_beta0.03.pt, dpo_beta0.3.pt: a frontier

RLHF maximises E[r(x, y)] - beta KL(pi || pi_ref). For any reward r, the policy that maximises it is
pi_r(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so a reward can be read off the policy optimal for it:
    r(x, y) = beta log pi_r(y|x) / pi_ref(y|x) + beta log Z(x).
Put that into the PM's Bradley-Terry loss -log sigma(r(x, y_c) - r(x, y_r)). Z(x) cancels, because both
replies answer the same prompt, and what is left trains the policy directly on the comparisons (eq. 7):
    L = -log sigma(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])
with log pi(y|x) summed over the reply's tokens and its EOS. The policy *is* a preference model whose
score of a reply is its implicit reward beta log pi/pi_ref. This file takes that literally: DPOPolicy is
a GPT whose forward returns those scores and that loss, and rm.train_pm, the loop that trains PM-A, trains
it on PM-A's own half of the comparisons (the same batches, early stopping on the validation loss, resume
and torchrun). Same data, no PM: the fair comparison with best-of-n, RS and PPO, which use PM-A.

beta plays the part of PPO's KL coefficient: small beta lets the policy move far from SFT, large beta keeps
it close. `--dpo.betas` trains one policy per value; eval places each on the reward-vs-sqrt(KL) frontier.

References
- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
  arXiv:2305.18290: sec. 4 (the derivation, eq. 7), sec. 5 (the implicit reward).
"""
import os
from dataclasses import asdict, dataclass, fields, replace

import torch

from data import resolve_data_dir, train_comparisons
from model import GPT, disable_dropout
from reward import ranking_loss, reply_logprobs
from rm import PairTrainConfig, RMConfig, train_pm
from runtime import (ConfigError, MetricsLog, barrier, dist_info, initial_policy, load_model, model_checkpoint,
                     pick_device, rng_state, save_checkpoint, set_seed, stage_done)
from tokens import dpo_example, tokenize_pairs


# ----------------------------------------------------------------------------------------------
# the math: the implicit reward and the DPO loss

def implicit_rewards(logp, ref_logp, beta):
    """DPO's reward of a reply, beta (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. sec. 5): what the
    policy "thinks" the reply is worth, up to the prompt's beta log Z(x). (B,), (B,) -> (B,)."""
    return beta * (logp - ref_logp)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """Rafailov et al. eq. 7: -log sigma(r_c - r_r) of the implicit rewards, the PM's ranking loss
    (reward.ranking_loss) with the policy as the PM. log 2 while pi = pi_ref; mean over pairs. Each
    argument (B,): log-probabilities summed over a reply's tokens and EOS."""
    return ranking_loss(implicit_rewards(logp_chosen, ref_chosen, beta),
                        implicit_rewards(logp_rejected, ref_rejected, beta))


class DPOPolicy(GPT):
    """A GPT policy that scores replies like a PM: forward returns the implicit rewards (B,) of prompt + reply
    rows and, given labels (1 = chosen, 0 = rejected, as cat([chosen, rejected])), the DPO loss. So train_pm
    can train it. The frozen reference (SFT) is a plain attribute, not a submodule: it is neither trained
    nor saved, and the checkpoint is an ordinary GPT's (runtime.load_model reads it)."""

    def __init__(self, config, ref_policy, beta):
        super().__init__(config)
        self.__dict__["ref_policy"] = ref_policy.requires_grad_(False).eval()
        self.beta = beta

    def forward(self, idx, attention_mask=None, labels=None, objective="dpo", margin=0.0, center_coef=0.0,
                reply_mask=None):
        """idx, attention_mask, reply_mask (B, T): right-padded prompt + reply rows, reply_mask 1 on the reply
        and its EOS (rm.reply_mask). Returns (implicit rewards (B,) fp32, loss or None)."""
        assert objective == "dpo" and reply_mask is not None, "DPOPolicy scores replies: pass reply_mask"
        logp = reply_logprobs(self, idx, attention_mask, reply_mask)                      # (B,)
        with torch.no_grad():
            ref_logp = reply_logprobs(self.ref_policy, idx, attention_mask, reply_mask)   # (B,)
        rewards = implicit_rewards(logp, ref_logp, self.beta)
        if labels is None:
            return rewards, None
        return rewards, ranking_loss(rewards[labels == 1], rewards[labels == 0], margin, center_coef)


# ----------------------------------------------------------------------------------------------
# the stage

@dataclass
class DPOConfig(PairTrainConfig):
    """DPO from the SFT policy, with SFT as the reference, on the comparisons PM-A trained on (half A). The training
    fields (PairTrainConfig) configure rm.train_pm as they do for a PM; these defaults differ from a PM's."""
    beta: float = 0.1            # KL strength of the objective DPO solves (the policy eval calls "dpo")
    betas: str = ""              # more betas, comma-separated (0.03,0.3): policies dpo_beta0.03, ... on the frontier
    lr: float = 5e-5             # peak AdamW learning rate (linear warmup + cosine)
    warmup_steps: int = 10       # linear LR warmup


def betas(dpo_cfg):
    """[(policy name, beta)]: "dpo" at dpo_cfg.beta, then "dpo_beta{b}" for each other value of dpo_cfg.betas."""
    try:
        extra = [float(b) for b in dpo_cfg.betas.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--dpo.betas expects comma-separated numbers, got {dpo_cfg.betas!r}") from None
    out = [("dpo", dpo_cfg.beta)] + [(f"dpo_beta{b:g}", b) for b in dict.fromkeys(extra) if b != dpo_cfg.beta]
    if any(b <= 0 for _, b in out):
        raise ConfigError(f"--dpo.beta and --dpo.betas must be > 0, got {dpo_cfg.beta} and {dpo_cfg.betas!r}")
    return out


def pm_config(dpo_cfg):
    """The RMConfig train_pm reads: this stage's values for the training fields (PairTrainConfig)."""
    return replace(RMConfig(), **{f.name: getattr(dpo_cfg, f.name) for f in fields(PairTrainConfig)})


def stage_dpo(run, dpo_cfg, split_halves=True):
    """Stage dpo: for each beta (betas), a DPOPolicy initialised from sft.pt (or cd.pt: --policy_init), its reference,
    trained by rm.train_pm on half A's comparisons (all of train with split_halves=False, as PM-A) and
    validated on the val pairs by the DPO loss -> out_dir/dpo.pt (and dpo_beta{b}.pt). Finished ones are
    skipped unless run.force; an unfinished one resumes. Under torchrun, data-parallel as a PM is."""
    device, rank, rm_cfg = pick_device(run.device), dist_info()[0], pm_config(dpo_cfg)
    sft_path = initial_policy(run)  # the SFT policy (or the CD one: --policy_init), trained and the reference
    train_ex = val_ex = None  # read once, only if some beta is still to train
    for name, beta in betas(dpo_cfg):
        path = os.path.join(run.out_dir, f"{name}.pt")
        if stage_done(path, run.force, "dpo"):
            continue
        ref, tok, _ = load_model(sft_path, device)
        disable_dropout(ref)
        if train_ex is None:
            _, val_pairs, (half_a, _) = train_comparisons(resolve_data_dir(run.data_dir or None), run.data,
                                                          split_halves)
            enc = lambda ps: [dpo_example(*ids, tok, ref.config.block_size, run.data.max_reply_tokens)  # noqa: E731
                              for ids in tokenize_pairs(ps, tok)]
            train_ex, val_ex = enc(half_a), enc(val_pairs)
            print(f"[dpo] {len(train_ex)} half-A pairs (PM-A's), {len(val_ex)} val pairs | reference {sft_path}")
        set_seed(run.seed)
        policy = DPOPolicy(ref.config, ref, beta).to(device)
        policy.load_state_dict(ref.state_dict())
        info = train_pm(run, rm_cfg, policy, tok, train_ex, val_ex, "dpo", ckpt_path=path, log=MetricsLog(run.out_dir),
                        name=name)
        if rank == 0:
            save_checkpoint(path, model_checkpoint(policy, tok, stage="dpo", config=asdict(dpo_cfg), beta=beta,
                                                   seed=run.seed, rng=rng_state(), done=True, train_pairs=len(train_ex),
                                                   **info))
            print(f"[dpo] {name}: beta {beta:g}, best step {info['best_step']}/{info['steps']}, val loss "
                  f"{info['val_loss']:.3f} (log 2 = 0.693 at the start), implicit-reward val accuracy "
                  f"{info['val_accuracy']:.3f}, {info['wall_s']:.0f}s -> {path}")
        barrier()
