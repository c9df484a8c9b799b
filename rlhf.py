"""
rlhf.py: the one script that runs the whole HH-RLHF flow, stage by stage.

    python rlhf.py                        # every stage, default preset (gpu with CUDA, else cpu)
    python rlhf.py sft --preset tiny      # one stage
    python rlhf.py ppo --ppo.kl_coef=0.05 # any config field, --section.field=value

Stages (each writes a checkpoint in out_dir, resumes when rerun, is skipped once done unless --force):
  pretrain  base LM on hh-rlhf dialogue text, or OpenAI GPT-2 weights (the gpu presets)  base.pt
  sft       imitate the chosen replies, loss on reply tokens only                         sft.pt
  cd        context distillation: the base LM with an HHH prompt, distilled into its weights cd.pt
  rm        preference models PM-A and PM-B on disjoint halves of the comparisons      pm_a.pt, pm_b.pt
  rs        best-of-n against PM-A, then fine-tune on the winners                          rs.pt
  ppo       PPO against PM-A with a KL penalty to the SFT policy                           ppo.pt
  dpo       DPO from SFT on PM-A's half of the comparisons, no PM (and a beta sweep)       dpo.pt
  eval      rewards, held-out-PM rewards, KL, win rates, Elo, reward vs sqrt(KL) eval.json, report.md
the data loop: label (a person compares two replies, written in hh-rlhf's layout: label.py) and online (HH's rounds
after `all`: collect, label, train PM-A further, re-optimise: online.py); and the tools: sample, chat, export (a
Hugging Face GPT-2 folder), and the instruments in lab/, imported when run: plan (each stage's work, memory and time
before a run; `all` prints it first), bench (speed figures), studies (the PM studies, after rm), plot (figures).

References: Bai et al. 2022, "Training a Helpful and Harmless Assistant with Reinforcement Learning
from Human Feedback" (arXiv:2204.05862); the stage files cite the rest.
"""

import difflib
import os
import sys
import time
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import torch.distributed as dist

from cd import CDConfig, check_config, stage_cd
from data import DataConfig, DataError
from dpo import DPOConfig, betas, stage_dpo
from evaluate import EvalConfig, stage_eval
from hub import ExportConfig, stage_export
from label import LabelConfig, check_label, stage_label
from model import GPTConfig
from online import OnlineConfig, check_online, stage_online
from pm_metrics import evaluate_pms
from ppo import PPOConfig, stage_ppo
from rm import RMConfig, check_choices, stage_rm
from rs import RSConfig, stage_rs
from runtime import (CheckpointError, ConfigError, MetricsLog, NonFiniteLoss, Run, init_distributed, initial_policy,
                     pick_device, precision)
from sampling import SampleConfig, stage_chat, stage_sample
from train import LMTrainConfig, stage_pretrain, stage_sft


@dataclass
class PlanConfig:
    """`plan` (and the plan `all` prints before it starts): each stage's work, memory and time (plan.py)."""
    measure: bool = True         # time this device at the preset's shapes (seconds); false = --plan.gflops
    gpu: str = ""                # estimate for a GPU by name instead (h100, a100, rtx4090, ...), measuring nothing
    gflops: float = 100.0        # with measure=false: the GFLOP/s assumed for every kind of work
    sample_rows: int = 2000      # train pairs tokenised to estimate token counts (scaled by the pair counts)


@dataclass
class StudyConfig:
    """`studies` (lab/studies.py), after the rm stage: PM studies that train more PMs, each giving one table."""
    ablation: bool = False       # binary and lm scoring trained on half A beside ranking: one table of objectives
    pmp: bool = False            # accuracy with 25/50/100% of half A, with and without PMP: one table
    hh: bool = False             # PMs on helpful only, harmless only, and a mix: each one's accuracy on each subset
    size: bool = False           # PM-A/PM-B pairs at growing trunk sizes: accuracy, score KL A||B -> pm_size_study.json
    sizes: str = "1x64,2x128,4x192"  # trunks, LAYERSxWIDTH (pretrained here) or GPT-2 names (gpt2, ...)
    size_steps: int = 150        # pretraining steps of each LAYERSxWIDTH trunk (the pretrain section's other settings)


@dataclass
class Config:
    """The whole run. Sections are the stages' own configs; flags are --section.field=value."""
    preset: str = ""             # the preset applied (set by the CLI)
    out_dir: str = "out"         # checkpoints, metrics.jsonl, eval.json, report.md
    data_dir: str = ""           # local hh-rlhf copy ({subset}/{split}.jsonl.gz); "" = $HH_RLHF_DIR or download
    seed: int = 1337             # one seed for data order, init and sampling
    device: str = "auto"         # auto = cuda > mps > cpu
    dtype: str = "auto"          # auto, float32, bfloat16, float16. auto = bf16 autocast on a GPU with native bf16
                                 # (compute capability >= 8.0), fp16 + loss scaling on an older one, fp32 elsewhere;
                                 # bfloat16 on a CPU too (faster on CPUs with AVX512-BF16/AMX: `rlhf.py bench`)
    compile: bool = False        # torch.compile the model (GPU); eager, said in one line, where compiling fails
    micro_tokens: int = 0        # most tokens (rows x width, padding included) in one forward/backward of a trained
                                 # model: wider batches run in groups, gradients accumulated (0 = no cap); the GPU
                                 # presets size it to their card (`python rlhf.py plan` shows the peak memory)
    threads: int = 0             # torch CPU threads (0 = torch's default)
    force: bool = False          # rerun a stage even if its checkpoint is marked done
    policy_init: str = "sft"     # the initial policy of RS, PPO, DPO and the PMs' trunk: sft, or cd (context distilled)
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(lr=6e-4, max_steps=2000, keep_best=True))
    sft: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(lr=1e-4, max_steps=500, warmup_steps=20))
    cd: CDConfig = field(default_factory=CDConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rs: RSConfig = field(default_factory=RSConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    studies: StudyConfig = field(default_factory=StudyConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)


# Presets are named sets of overrides, applied before the command line's (and type-checked the same way).
GPU_MODEL = {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768, "model.block_size": 1024,  # GPT-2 small
             "data.vocab": "gpt2", "data.max_prompt_tokens": 768, "data.max_reply_tokens": 256, "compile": True,
             # at most 16 rows of 1,024 tokens a forward/backward: a PM step of 32 pairs that are all 1,024 wide runs
             # in 4 groups, ~7.5 GB at its peak instead of ~23 GB (`python rlhf.py plan --plan.gpu=rtx4090`)
             "micro_tokens": 16384}
# The GPU presets' stages, sized for the full hh-rlhf (153,558 train pairs after validation, 64,825 prompts):
GPU_STAGES = {
    # SFT: ~1 pass over the chosen replies, packed by best fit ~4.4 dialogues a 1,024-token row (~34,800 rows)
    "sft.max_steps": 545, "sft.batch_size": 16, "sft.grad_accum": 4, "sft.lr": 3e-5, "sft.eval_interval": 100,
    "sft.warmup_steps": 30, "sft.pack": True,
    # each PM: one epoch over its half (~76,800 pairs, 2,400 steps of 32), validated on 1,000 val pairs <= 10% of it
    "rm.batch_size": 32, "rm.lr": 3e-5, "rm.warmup_steps": 100, "rm.eval_batch_size": 64, "rm.group_by_length": True,
    # rejection sampling: best of 16 on 2,400 prompts, then 2 epochs over the ~2,160 winners
    "rs.num_prompts": 2400, "rs.n": 16, "rs.sample_batch_size": 256, "rs.max_steps": 270, "rs.batch_size": 16,
    "rs.lr": 1e-5, "rs.eval_interval": 90,
    # PPO: 20,480 episodes (320 iterations of 64), as minChatGPT-scale runs use
    "ppo.iterations": 320, "ppo.batch_size": 64, "ppo.minibatch_size": 16, "ppo.ppo_epochs": 4,
    "ppo.sample_every": 20, "ppo.save_every": 20,
    # DPO: one epoch over half A, as PM-A, in the same length-grouped batches of 32 pairs
    "dpo.batch_size": 32, "dpo.lr": 1e-5, "dpo.warmup_steps": 100, "dpo.eval_batch_size": 64,
    "dpo.group_by_length": True,
    # eval: 500 test prompts, so a win rate is good to about +-0.02
    "eval.num_prompts": 500, "eval.batch_size": 256,
}
PRESETS = {
    # the whole flow in a couple of minutes on a 2-core CPU: a smoke test, not a model
    "tiny": {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 256,
        "data.vocab": "trimmed", "data.max_pairs": 300, "data.max_test_pairs": 300,
        "data.max_prompt_tokens": 96, "data.max_reply_tokens": 64,
        "pretrain.max_steps": 40, "pretrain.batch_size": 8, "pretrain.eval_interval": 20,
        "pretrain.eval_batches": 2, "pretrain.log_interval": 5, "pretrain.warmup_steps": 5,
        "sft.max_steps": 20, "sft.batch_size": 8, "sft.eval_interval": 10, "sft.eval_batches": 2,
        "sft.log_interval": 5, "sft.warmup_steps": 2,
        "rm.max_steps": 20, "rm.eval_interval": 10, "rm.normalize_samples": 16,
        "rs.n": 4, "rs.num_prompts": 16, "rs.max_steps": 8, "rs.batch_size": 8, "rs.eval_interval": 4,
        "rs.eval_batches": 2, "rs.log_interval": 2, "rs.warmup_steps": 2,
        "ppo.iterations": 3, "ppo.batch_size": 8, "ppo.minibatch_size": 4, "ppo.ppo_epochs": 2,
        "ppo.max_prompt_tokens": 96, "ppo.max_new_tokens": 24, "ppo.sample_every": 2, "ppo.save_every": 2,
        "dpo.max_steps": 10, "dpo.eval_interval": 5,
        "cd.max_steps": 10, "cd.batch_size": 8, "cd.eval_interval": 5, "cd.eval_batches": 2, "cd.log_interval": 5,
        "cd.warmup_steps": 2,
        "eval.num_prompts": 8, "eval.n": 4, "eval.policy_samples": 2, "eval.num_examples": 2,
    },
    # the default without CUDA: <= 15 min on a 2-core CPU on the sample and on the full hh-rlhf alike, the numbers in
    # the README (shapes measured with bench.py). On the full data it reads a fixed tenth of the train pairs (its 500
    # pretraining steps see 2M tokens, a quarter of that tenth) and 1,000 of the 8,552 test pairs
    "cpu": {
        "model.n_layer": 4, "model.n_head": 3, "model.n_embd": 192, "model.block_size": 256,
        "data.vocab": "trimmed", "data.trimmed_max_size": 8192, "data.max_prompt_tokens": 160,
        "data.max_reply_tokens": 96, "data.max_pairs": 16000, "data.max_test_pairs": 1000,
        "model.dropout": 0.1,  # pretraining makes ~4 passes over the sample (SFT keeps it; PM, RS, PPO switch it off)
        "pretrain.max_steps": 500, "pretrain.batch_size": 16, "pretrain.lr": 2e-3, "pretrain.eval_interval": 125,
        "pretrain.warmup_steps": 25,
        "sft.max_steps": 100, "sft.batch_size": 16, "sft.lr": 3e-4, "sft.eval_interval": 50, "sft.warmup_steps": 10,
        "cd.max_steps": 60, "cd.batch_size": 16, "cd.lr": 3e-4, "cd.eval_interval": 30, "cd.eval_batches": 4,
        # rm: the sample's 63 val pairs every 30 steps are ~9% of training; on the full data 256 of its ~660
        "rm.max_steps": 90, "rm.eval_interval": 30, "rm.val_pairs": 256,
        "rs.n": 16, "rs.num_prompts": 64, "rs.max_steps": 40, "rs.batch_size": 16, "rs.lr": 1e-4,
        "rs.eval_interval": 20, "rs.eval_batches": 2,
        "ppo.iterations": 16, "ppo.batch_size": 32, "ppo.minibatch_size": 16, "ppo.ppo_epochs": 2,
        "ppo.lr": 1.5e-4, "ppo.kl_coef": 0.05, "ppo.max_prompt_tokens": 128, "ppo.max_new_tokens": 48,
        "ppo.share_trunk": True, "ppo.sample_every": 5, "ppo.save_every": 4,
        # dpo: PM-A's steps, validation and pairs (rm.*), ~1 min a beta (a sweep, --dpo.betas=0.03,0.3, adds that
        # a value); uncapped, one pass over the full data's half A would take ~21 min
        "dpo.lr": 1e-4, "dpo.max_steps": 90, "dpo.eval_interval": 30, "dpo.val_pairs": 256,
        "eval.num_prompts": 48, "eval.n": 16, "eval.policy_samples": 4,
    },
    # the default with CUDA: OpenAI's GPT-2 (124M) weights, then every stage on the full hh-rlhf: <= 2 h on one
    # 24 GB card (RTX 4090) by `python rlhf.py plan --plan.gpu=rtx4090`; see GPU_STAGES for each stage's share
    "gpu": {**GPU_MODEL, **GPU_STAGES, "pretrain.init": "gpt2"},
    # GPT-2-medium (355M, minChatGPT's size) on the same card: ~2.9x the parameters, micro-batches halved to fit 24 GB
    "gpu-medium": {**GPU_MODEL, **GPU_STAGES, "pretrain.init": "gpt2-medium", "model.n_layer": 24, "model.n_head": 16,
                   "model.n_embd": 1024, "micro_tokens": 8192, "sft.batch_size": 8, "sft.grad_accum": 8,
                   "rs.batch_size": 8, "rs.grad_accum": 2, "rm.batch_size": 16, "dpo.batch_size": 16,
                   "ppo.share_trunk": True},
    # GPT-2-small's shape pretrained from scratch on hh-rlhf dialogue text (~9 passes over it, the best-validation
    # weights kept), then the gpu preset's stages: a study of what pretraining alone gives, not a good policy
    "gpu-scratch": {**GPU_MODEL, **GPU_STAGES, "pretrain.max_steps": 5000, "pretrain.batch_size": 16,
                    "pretrain.grad_accum": 8, "pretrain.eval_interval": 250, "pretrain.warmup_steps": 200,
                    "sft.lr": 1e-4},
}

STAGES = ["all", "pretrain", "sft", "cd", "rm", "rs", "ppo", "dpo", "eval", "plan", "bench", "studies", "sample",
          "chat", "plot", "export", "label", "online"]
# short flags for the tools: `chat --policy ppo`, `export --policy ppo --to DIR`, `sample --prompt "..."`
ALIASES = {"policy": "sample.policy", "prompt": "sample.prompt", "to": "export.to"}


# ----------------------------------------------------------------------------------------------
# the command line: --section.field=value, typed by the dataclass fields


def set_field(cfg, dotted, value):
    """Set `cfg.a.b = value`, converting a string to the field's type; errors list the valid choices."""
    *sections, name = dotted.split(".")
    obj = cfg
    for s in sections:
        sub = getattr(obj, s, None)
        if not is_dataclass(sub):
            choices = [f.name for f in fields(obj) if is_dataclass(getattr(obj, f.name))]
            raise ConfigError(f"unknown config section {s!r} in --{dotted}; sections: {', '.join(choices)}")
        obj = sub
    types = {f.name: f.type for f in fields(obj) if not is_dataclass(getattr(obj, f.name))}
    if name not in types:
        near = difflib.get_close_matches(name, list(types), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; valid: {', '.join(types)}"
        raise ConfigError(f"unknown flag --{dotted}{hint}")
    want = types[name]
    if isinstance(value, str) and want is not str:
        try:
            if want is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            else:
                value = want(value)
        except ValueError:
            raise ConfigError(f"--{dotted} expects {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want):
        raise ConfigError(f"--{dotted} expects {want.__name__}, got {value!r}")
    setattr(obj, name, value)


def parse_args(argv):
    """`[STAGE] [--preset NAME] [--section.field=value | --section.field value | --flag] ...` -> (stage, cfg)."""
    args = list(argv)
    stage = args.pop(0) if args and not args[0].startswith("-") else "all"
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose from: {', '.join(STAGES)}")
    preset, overrides, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # `--key value`, or a bare `--flag` meaning true
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        if key == "preset":
            preset = value
        else:
            alias = "export.policy" if (stage, key) == ("export", "policy") else ALIASES.get(key, key)
            overrides.append((alias, value))
        i += 1
    preset = preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for key, value in list(PRESETS[preset].items()) + overrides:
        set_field(cfg, key, value)
    check_values(stage, cfg)
    return stage, cfg


def check_values(stage, cfg):
    """The values a type cannot check, checked before any stage runs: a typo found after pretraining loses it."""
    initial_policy(cfg)                      # --policy_init
    precision(pick_device(cfg.device), cfg.dtype)  # --dtype: one the device cannot run
    betas(cfg.dpo)                           # --dpo.beta, --dpo.betas
    check_choices(cfg.rm)                    # --rm.objective, --rm.init
    check_label(cfg.label)                   # --label.task, --label.policies, --label.best_of, --label.split
    check_online(cfg.online)                 # --online.method, --online.labeler
    if cfg.eval.elo_labels and not os.path.exists(cfg.eval.elo_labels):  # --eval.elo_labels
        raise ConfigError(f"--eval.elo_labels: {cfg.eval.elo_labels} not found (`python rlhf.py label` writes it)")
    if stage in ("all", "cd"):
        check_config(cfg.cd)                 # --cd.prompt_file, --cd.pack
    if cfg.studies.size and stage == "studies":
        from lab.studies import trunk_sizes
        trunk_sizes(cfg.studies.sizes, cfg.data.vocab)  # --studies.sizes


def preset_reason(preset):
    """Why this preset: the default for this machine, or the one --preset named."""
    default = "gpu" if torch.cuda.is_available() else "cpu"
    if preset != default:
        return f"{preset} (--preset)"
    return f"{preset} ({'CUDA found: ' + torch.cuda.get_device_name() if default == 'gpu' else 'no CUDA found'})"


def stage_plan(cfg, repeats=2):
    """Print what each stage will do, its memory and its time on this device (lab/plan.py); return the plan."""
    from lab.plan import print_plan
    return print_plan(cfg, preset_reason(cfg.preset), repeats)


def report_time(log, name, seconds, plan):
    """After each stage of `all`: its wall time against the plan's estimate, printed and in metrics.jsonl. Off by a
    ratio, or by seconds for a plan under 10 s, where a ratio says nothing."""
    from lab.plan import fmt_time
    planned = plan["stages"][name]["seconds"]
    off = f"{seconds / planned - 1:+.0%}" if planned >= 10 else f"{seconds - planned:+.1f} s"
    print(f"[time] {name}: {fmt_time(seconds)} (plan: {fmt_time(planned)}, {off})")
    log.log("time", 0, **{f"{name}/seconds": round(seconds, 1), f"{name}/plan_seconds": planned})


# the commands that measure rather than train: each imports its instrument from lab/ only when it runs

def stage_bench(cfg):
    """Speed figures at the preset's shapes, one JSON line (lab/bench.py)."""
    from lab.bench import run_bench
    return run_bench(cfg)


def stage_studies(run, cfg):
    """The PM studies --studies.* asks for, after the rm stage (lab/studies.py)."""
    from lab.studies import run_studies
    return run_studies(run, cfg.rm, cfg.studies, cfg.pretrain, cfg.model)


def stage_plot(out_dir):
    """Figures from metrics.jsonl, eval.json and frontier.jsonl (lab/plot.py; matplotlib is an optional extra)."""
    from lab.plot import make_plots
    try:
        paths = make_plots(out_dir)
    except (RuntimeError, FileNotFoundError) as e:  # matplotlib not installed, or no such out_dir
        raise ConfigError(str(e)) from None
    for path in paths:
        print(f"[plot] {path}")


# ----------------------------------------------------------------------------------------------

def run(stage, cfg):
    """Run one stage, or all of them in order. Under torchrun, pretrain, sft, cd, rm, rs, ppo and dpo run
    data-parallel (train.supervised_train, rm.train_pm, rs.stage_rs, ppo.stage_ppo, dpo.stage_dpo); eval then
    goes on in rank 0 alone."""
    rank, world_size, _ = init_distributed()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0's
    print(f"rlhf.py {stage} | preset {cfg.preset} | out_dir {cfg.out_dir}"
          + (f" | {world_size} processes" if world_size > 1 else ""))
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = MetricsLog(cfg.out_dir)
    run = Run(**{f.name: getattr(cfg, f.name) for f in fields(Run)})  # what every stage shares; each gets its section
    steps = {
        "pretrain": lambda: stage_pretrain(run, cfg.pretrain, cfg.model, cfg.sample, log),
        "sft": lambda: stage_sft(run, cfg.sft, cfg.sample, log),
        "cd": lambda: stage_cd(run, cfg.cd, cfg.sample, log),
        "rm": lambda: stage_rm(run, cfg.rm, cfg.ppo),
        "rs": lambda: stage_rs(run, cfg.rs, cfg.ppo),               # best-of-n samples as PPO does
        "ppo": lambda: stage_ppo(run, cfg.ppo),
        "dpo": lambda: stage_dpo(run, cfg.dpo, cfg.rm.split_halves),  # on the comparisons PM-A trained on
        "eval": lambda: evaluate_pms(run, cfg.rm) if cfg.eval.pm_only else stage_eval(run, cfg.eval, cfg.ppo, cfg.dpo),
        "plan": lambda: stage_plan(cfg),
        "bench": lambda: stage_bench(cfg),
        "studies": lambda: stage_studies(run, cfg),
        "plot": lambda: stage_plot(cfg.out_dir),
        "sample": lambda: stage_sample(run, cfg.sample),
        "chat": lambda: stage_chat(run, cfg.sample),
        "export": lambda: stage_export(run, cfg.export, cfg.sample),
        "label": lambda: stage_label(run, cfg.label, cfg.ppo),  # replies sampled as PPO samples them
        "online": lambda: stage_online(run, cfg.online, cfg.rm, cfg.rs, cfg.ppo, cfg.eval),
    }
    order = ["pretrain", "sft", "cd", "rm", "rs", "ppo", "dpo", "eval"] if stage == "all" else [stage]
    plan = None
    if stage == "all" and world_size == 1:  # (under torchrun each rank would time its own device: run `plan` first)
        plan = stage_plan(cfg, repeats=1)  # how long it will take, before it starts: ~1 s of timing on the tiny preset
        device = pick_device(cfg.device)
        if device.startswith("cuda"):  # a card too small for the preset: said now, not as an out-of-memory later
            from lab.plan import check_fits
            why = check_fits(plan, torch.cuda.get_device_properties(device).total_memory, cfg)
            if why:
                raise ConfigError(why)
    for name in order:
        if world_size > 1 and name not in ("pretrain", "sft", "cd", "rm", "rs", "ppo", "dpo"):
            dist.barrier()  # gloo can abort a rank that leaves while its peer is still talking
            dist.destroy_process_group()  # the rest runs in one process
            world_size = 1
            if rank != 0:
                return
        t0 = time.time()
        steps[name]()
        if plan:
            report_time(log, name, time.time() - t0, plan)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# start-up: settings glibc and libgomp read once, when the process starts

# glibc hands a freed block of over 32 MB (a batch's logits: 16 x 256 x 8,192 floats on the cpu preset) back to the
# OS at once, and the next step's first touch of a new one costs a page fault per 4 KB: ~150,000 a step, ~10% of a
# CPU training step. These limits keep such blocks in the process for reuse; the numbers computed do not change.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def start_env(environ, load_avg):
    """The variables rlhf.py restarts itself with, read only at start-up (by glibc, by libgomp), each unless the
    user set it: MALLOC_TUNABLES on Linux with glibc; and OMP_WAIT_POLICY=PASSIVE when other processes already
    use the CPU (a 1-minute load average of 1 or more), because libgomp's threads otherwise spin between parallel
    regions on cores those processes need (README, Speed: threads on a busy machine). Returns {name: value}."""
    extra = {}
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in environ and "glibc" in os.confstr("CS_GNU_LIBC_VERSION"):
        extra["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    if "OMP_WAIT_POLICY" not in environ and load_avg >= 1.0:
        extra["OMP_WAIT_POLICY"] = "PASSIVE"
    return extra


def restart_with_start_env():
    """Start this script again with start_env's variables (none to add: carry on). Once, or twice should the
    load average cross 1 between the two starts; each variable, once set, stays."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    extra = start_env(os.environ, load)
    if extra:
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **extra})


def main(argv):
    try:
        stage, cfg = parse_args(argv)
        run(stage, cfg)
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss, ValueError, AssertionError) as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)  # one line, no traceback (RLHF_DEBUG=1 shows it)
        return 2
    return 0


if __name__ == "__main__":
    restart_with_start_env()
    sys.exit(main(sys.argv[1:]))
