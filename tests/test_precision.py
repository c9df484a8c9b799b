"""The precision a run computes in, on the machines people have (runtime.precision): bf16 only where the GPU has it
natively, fp16 with a loss scaler on an older GPU, fp32 on a CPU by default; and torch.compile falling back to eager
in one line where it cannot compile."""
import pytest
import torch

import runtime
import train
from model import GPT, GPTConfig
from runtime import ConfigError, precision

torch.set_num_threads(1)


@pytest.fixture
def turing_gpu(monkeypatch):
    """A CUDA GPU of compute capability 7.5 (a T4 or an RTX 20xx): tensor cores for fp16, none for bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))


def test_a_gpu_without_native_bf16_runs_fp16_autocast_with_a_loss_scaler(turing_gpu):
    assert precision("cuda", "auto")[0] is torch.float16
    ctx = runtime.autocast("cuda", "auto")
    assert ctx.fast_dtype is torch.float16  # bf16 there would run without tensor cores
    with pytest.raises(ConfigError, match="--dtype=float16"):  # asked for bf16: one line, naming the fix
        precision("cuda", "bfloat16")


def test_ampere_and_later_run_bf16_and_a_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert precision("cuda", "auto")[0] is torch.bfloat16
    assert precision("cpu", "auto")[0] is None and precision("cuda", "float32")[0] is None
    assert precision("cpu", "float16")[0] is torch.float16 and precision("cpu", "bfloat16")[0] is torch.bfloat16


class Cfg:  # the run-level fields supervised_train reads
    seed, compile, micro_tokens = 0, False, 0
    dtype = "float16"


class Tok:
    eos_id = 0

    def state_dict(self):
        return {}


def test_fp16_training_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    """Under fp16 the loss is multiplied by the scaler's factor before backward and the gradients divided by it
    before the step; the factor is part of the checkpoint, so a resumed run scales as the unbroken one would."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    data = torch.randint(1, 40, (400,)).numpy()
    sc = train.LMTrainConfig(max_steps=3, batch_size=4, eval_interval=2, eval_batches=1, warmup_steps=1)
    path = str(tmp_path / "m.pt")
    train.supervised_train(Cfg, "pretrain", sc, model, Tok(), data, data, path, runtime.MetricsLog(str(tmp_path)))
    ckpt = runtime.load_checkpoint(path)
    assert ckpt["scaler"]["scale"] > 1  # the loss really was scaled
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failing_compile_runs_eagerly_with_one_line(monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*args, **kwargs):
        raise BackendCompilerFailed("inductor", RuntimeError("Failed to find C compiler"), None)
    monkeypatch.setattr(torch, "compile", lambda model: broken)
    model = torch.nn.Linear(3, 2)
    compiled = runtime.compile_model(model, True)
    x = torch.randn(4, 3)
    assert torch.equal(compiled(x), model(x)) and torch.equal(compiled(x), model(x))
    out = capsys.readouterr().out
    assert out.count("[compile] torch.compile failed") == 1 and "running eagerly" in out
    assert compiled.weight is model.weight  # the model's own attributes, for the loops that read them


def test_an_error_of_the_model_itself_is_not_hidden_by_the_fallback(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("bad input")
    monkeypatch.setattr(torch, "compile", lambda model: broken)
    with pytest.raises(ValueError, match="bad input"):
        runtime.compile_model(torch.nn.Linear(3, 2), True)(torch.randn(1, 3))


def test_the_plan_says_which_precision_and_why(turing_gpu, hh_dir):
    from lab import plan
    import rlhf
    cfg = rlhf.parse_args(["plan", "--preset", "tiny", "--device", "cuda", "--plan.measure=false",
                           "--data_dir", hh_dir])[1]
    made = plan.make_plan(cfg)
    assert (made["precision"].startswith("fp16 autocast + loss scaling")
            and "compute capability < 8.0" in made["precision"])
