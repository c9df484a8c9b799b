"""lm_loss.py: the chunked LM loss, token log-probs and distillation loss compute what F.cross_entropy,
log_softmax + gather and log_softmax + kl_div over the full logits compute (the slow, obvious references),
values and gradients, whatever the chunking, the mask and the autocast."""
import pytest
import torch
import torch.nn.functional as F

import lm_loss as lm_loss_module
from lm_loss import distill_loss, lm_loss, token_logprobs


def reference(hidden, weight, targets, loss_mask=None):
    """The plain loss: materialise the (..., V) logits, cross-entropy per token, masked mean."""
    ce = F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten(), reduction="none")
    if loss_mask is None:
        return ce.mean()
    return (ce * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1.0)


def inputs(V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 17, 16, generator=g, requires_grad=True)  # (B, T, C)
    weight = torch.randn(V, 16, generator=g, requires_grad=True)      # (V, C)
    targets = torch.randint(0, V, (3, 17), generator=g)
    loss_mask = (torch.rand(3, 17, generator=g) > 0.3).float()
    return hidden, weight, targets, loss_mask


@pytest.mark.parametrize("chunk_tokens", [1, 5, 17, 51, 1000])  # one token per chunk .. all in one chunk
@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_gradients_match_cross_entropy_over_the_logits(monkeypatch, chunk_tokens, masked):
    hidden, weight, targets, loss_mask = inputs()
    monkeypatch.setattr(lm_loss_module, "CHUNK_LOGITS", chunk_tokens * weight.size(0))
    mask = loss_mask if masked else None
    fast = lm_loss(hidden, weight, targets, mask)
    fast_grads = torch.autograd.grad(2.5 * fast, (hidden, weight))  # a scale, as grad accumulation applies
    plain = reference(hidden, weight, targets, mask)
    plain_grads = torch.autograd.grad(2.5 * plain, (hidden, weight))
    assert torch.allclose(fast, plain, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_empty_mask_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets, _ = inputs()
    loss = lm_loss(hidden, weight, targets, torch.zeros(3, 17))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_without_gradients_it_computes_the_loss_only():
    hidden, weight, targets, loss_mask = inputs()
    with torch.no_grad():
        loss = lm_loss(hidden, weight, targets, loss_mask)
    assert not loss.requires_grad
    assert torch.allclose(loss, reference(hidden, weight, targets, loss_mask), atol=1e-5)


def test_under_bf16_autocast_the_loss_stays_near_the_fp32_one():
    # the head's matmul runs in bf16, the log-softmax in fp32: as the plain loss does under autocast
    hidden, weight, targets, loss_mask = inputs(V=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = lm_loss(hidden, weight, targets, loss_mask)
        fast_grads = torch.autograd.grad(fast, (hidden, weight))
        plain = reference(hidden, weight, targets, loss_mask)
        plain_grads = torch.autograd.grad(plain, (hidden, weight))
    assert fast.dtype == torch.float32 and [g.dtype for g in fast_grads] == [torch.float32] * 2
    assert torch.allclose(fast, plain, rtol=1e-2)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("chunk_tokens", [1, 5, 51, 1000])
def test_token_logprobs_and_their_gradients_match_log_softmax_over_the_logits(monkeypatch, chunk_tokens):
    # a loss that is not linear in the log-probs (DPO's is not): backward recomputes each chunk's logits
    hidden, weight, targets, loss_mask = inputs()
    monkeypatch.setattr(lm_loss_module, "CHUNK_LOGITS", chunk_tokens * weight.size(0))
    def dpo_like(logprobs):  # (B, T) -> a scalar through per-row sums and a nonlinearity
        return -F.logsigmoid((logprobs * loss_mask).sum(1) * torch.tensor([1.0, -0.5, 2.0])).sum()
    fast = token_logprobs(hidden, weight, targets)
    fast_grads = torch.autograd.grad(dpo_like(fast), (hidden, weight))
    plain = F.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[..., None]).squeeze(-1)
    plain_grads = torch.autograd.grad(dpo_like(plain), (hidden, weight))
    assert fast.shape == targets.shape and torch.allclose(fast, plain, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_token_logprobs_backward_runs_under_the_forwards_autocast(monkeypatch):
    # backward's recomputed head matmuls run in bf16 when the forward's did (as autograd's own would)
    hidden, weight, targets, _ = inputs(V=64)
    seen = []
    real_pass = lm_loss_module.head_pass
    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real_pass(*args)
    monkeypatch.setattr(lm_loss_module, "head_pass", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = token_logprobs(hidden, weight, targets)
    logprobs.sum().backward()  # outside the autocast block, as a training loop calls it
    assert seen == [True, True] and logprobs.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_under_autocast_every_head_matmul_runs_in_bf16():
    # the gradient matmuls too: run in fp32 they would cost a GPU many times the bf16 ones
    from torch.utils._python_dispatch import TorchDispatchMode
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2}
            return func(*args, **(kwargs or {}))

    hidden, weight, targets, loss_mask = inputs(V=64)
    teacher_hidden, teacher_weight = hidden.detach() + 0.3, weight.detach().flip(0)
    losses = (lambda: lm_loss(hidden, weight, targets, loss_mask),
              lambda: token_logprobs(hidden, weight, targets).sum(),
              lambda: distill_loss(hidden, weight, teacher_hidden, teacher_weight, loss_mask))
    for loss_fn in losses:
        with MatmulDtypes() as mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
        assert mode.seen == {torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# context distillation's loss, sum_i w_i KL(p_teacher,i || p_student,i)

def distill_reference(hidden, weight, teacher_hidden, teacher_weight, loss_mask=None):
    """The plain loss: materialise both (..., V) logits, log-softmax each in fp32, KL per token, masked mean."""
    log_s = F.log_softmax((hidden @ weight.t()).float(), -1)                   # (..., V)
    log_t = F.log_softmax((teacher_hidden @ teacher_weight.t()).float(), -1)   # (..., V)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)     # (...)
    mask = torch.ones(kl.shape) if loss_mask is None else loss_mask
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def teacher_inputs(hidden, weight, seed=1):
    """A teacher near the student, as cd's is (the same base model, reading a prompt first): constants."""
    g = torch.Generator().manual_seed(seed)
    return (hidden.detach() + 0.5 * torch.randn(hidden.shape, generator=g),   # (B, T, C)
            weight.detach() + 0.5 * torch.randn(weight.shape, generator=g))   # (V, C)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 17, 51, 1000])  # one token per chunk .. all in one chunk
@pytest.mark.parametrize("masked", [False, True])
def test_distill_loss_and_gradients_match_kl_div_over_the_logits(monkeypatch, chunk_tokens, masked):
    hidden, weight, _, loss_mask = inputs()
    teacher_hidden, teacher_weight = teacher_inputs(hidden, weight)
    monkeypatch.setattr(lm_loss_module, "CHUNK_LOGITS", chunk_tokens * weight.size(0))
    mask = loss_mask if masked else None
    fast = distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask)
    fast_grads = torch.autograd.grad(2.5 * fast, (hidden, weight))  # a scale, as grad accumulation applies
    plain = distill_reference(hidden, weight, teacher_hidden, teacher_weight, mask)
    plain_grads = torch.autograd.grad(2.5 * plain, (hidden, weight))
    assert torch.allclose(fast, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_distill_loss_is_zero_where_teacher_and_student_agree_and_without_gradients_it_computes_the_loss_only():
    hidden, weight, _, loss_mask = inputs()
    assert distill_loss(hidden, weight, hidden.detach(), weight.detach(), loss_mask).abs().item() < 1e-6
    teacher_hidden, teacher_weight = teacher_inputs(hidden, weight)
    with torch.no_grad():
        loss = distill_loss(hidden, weight, teacher_hidden, teacher_weight, loss_mask)
    assert not loss.requires_grad
    assert torch.allclose(loss, distill_reference(hidden, weight, teacher_hidden, teacher_weight, loss_mask), atol=1e-6)
    empty = distill_loss(hidden, weight, teacher_hidden, teacher_weight, torch.zeros(3, 17))
    empty.backward()
    assert empty.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_distill_loss_under_bf16_autocast_stays_near_the_fp32_one():
    hidden, weight, _, loss_mask = inputs(V=64)
    teacher_hidden, teacher_weight = teacher_inputs(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = distill_loss(hidden, weight, teacher_hidden, teacher_weight, loss_mask)
        fast_grads = torch.autograd.grad(fast, (hidden, weight))
        plain = distill_reference(hidden, weight, teacher_hidden, teacher_weight, loss_mask)
        plain_grads = torch.autograd.grad(plain, (hidden, weight))
    assert fast.dtype == torch.float32 and [g.dtype for g in fast_grads] == [torch.float32] * 2
    assert torch.allclose(fast, plain, rtol=2e-2)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item())


def test_distill_loss_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    # no tensor, forward or backward, as large as the (N, V) logits: at most a chunk's, or the head's (V, C)
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    hidden, weight, _, loss_mask = inputs()  # N = 51 tokens, V = 101, C = 16
    teacher_hidden, teacher_weight = teacher_inputs(hidden, weight)
    monkeypatch.setattr(lm_loss_module, "CHUNK_LOGITS", 5 * weight.size(0))  # 5 tokens a chunk
    with LargestOutput() as mode:
        distill_loss(hidden, weight, teacher_hidden, teacher_weight, loss_mask).backward()
    assert mode.numel <= max(5 * 101, 101 * 16) < 51 * 101
