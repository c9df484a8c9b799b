"""One training step of a stage at a small shape, run alone in a process by tests/test_plan.py: prints the peak
resident memory the step added and plan.memory_parts' figure for it, as JSON. python tests/memory_step.py STAGE"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import actor_critic  # noqa: E402
import ppo  # noqa: E402
import rm  # noqa: E402
import train  # noqa: E402
from cd import ContextDistilled  # noqa: E402
from dpo import DPOPolicy  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from lab.plan import memory_parts  # noqa: E402
from reward import RewardModel  # noqa: E402
from runtime import Run, clip_and_step, grad_scaler  # noqa: E402

torch.set_num_threads(1)  # one thread: one malloc arena, the same peak every run

stage, rows, T = sys.argv[1], 8, 512  # 4,096 tokens a step: activations of ~0.3 GB, and the heads' chunks
cfg = GPTConfig(block_size=T + 1, vocab_size=8192, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
torch.manual_seed(0)


def status_kb(field):
    """A field of /proc/self/status in bytes: VmRSS (resident now), VmHWM (resident at its peak)."""
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


scaler = grad_scaler("cpu", "float32")
if stage in ("sft", "cd"):
    model = GPT(cfg) if stage == "sft" else ContextDistilled(cfg, GPT(cfg), list(range(1, 9)))
    n = T + 1 - 8 * (stage == "cd")  # cd: room for the teacher's 8-token prompt
    data = [(torch.randint(1, 8192, (n,)).tolist(), [1] * n) for _ in range(rows)]
    opt = model.configure_optimizer(0.0, 1e-4, (0.9, 0.95), "cpu")
    step = lambda: train.optimizer_step(model, opt, data, 0, train.LMTrainConfig(batch_size=rows), 0, T + 1, 0,
                                        "cpu", "float32")  # noqa: E731
    trained = [(rows, T, "lm_loss" if stage == "sft" else "distill")]
elif stage in ("pm", "dpo"):
    model = RewardModel(cfg) if stage == "pm" else DPOPolicy(cfg, GPT(cfg), 0.1)
    idx, mask = torch.randint(1, 8192, (rows, T)), torch.ones(rows, T, dtype=torch.long)
    batch = (idx, mask, torch.cat([torch.ones(rows // 2), torch.zeros(rows // 2)]), mask if stage == "dpo" else None)
    opt = model.configure_optimizer(0.0, 1e-4, (0.9, 0.95), "cpu")
    def step():
        rm.pair_step(model, batch, "ranking" if stage == "pm" else "dpo", rm.RMConfig(), Run(), scaler)
        clip_and_step(opt, list(model.parameters()), 1.0, scaler)
    trained = [(rows, T, None if stage == "pm" else "dpo")]
else:  # ppo, the value head on the policy's trunk
    Tq, N = T - 64, 64
    model = GPT(cfg)
    critic = actor_critic.build_critic(None, torch.randn(cfg.n_embd), torch.zeros(1))
    qr = torch.randint(1, 8192, (rows, T))
    r = lambda: torch.randn(rows, N)  # noqa: E731
    ro = {"query_response": qr, "attention_mask": torch.ones(rows, T, dtype=torch.bool), "responses": qr[:, Tq:],
          "mask": torch.ones(rows, N), "context_length": Tq, "logprobs": -r().abs(), "values": r(), "advantages": r(),
          "returns": r()}
    opt = torch.optim.Adam(list(model.parameters()) + list(critic.parameters()), lr=1e-5)
    pc = ppo.PPOConfig(batch_size=rows, minibatch_size=rows, ppo_epochs=1)
    step = lambda: ppo.ppo_update(model, critic, opt, ro, pc, torch.Generator().manual_seed(0), "float32")  # noqa: E731
    trained, logits = [(rows, T, None)], (rows, N)
logits = locals().get("logits")  # PPO's only
P = model.num_params(non_embedding=False)
before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the peak starts again from here (Linux >= 4.0): not the imports'
    f.write("5")
step()
peak = status_kb("VmHWM")
# the weights are in memory before the step
plan = sum(memory_parts(model, 4, 0, trained, logits=logits).values()) - 4 * P
print(json.dumps({"stage": stage, "measured": peak - before, "plan": plan}))
