"""lm_loss.py: the chunked LM loss and token log-probs compute what F.cross_entropy and log_softmax + gather
over the full logits compute (the slow, obvious references), values and gradients, whatever the chunking,
the mask and the autocast."""
import pytest
import torch
import torch.nn.functional as F

import lm_loss as lm_loss_module
from lm_loss import lm_loss, token_logprobs


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
    losses = (lambda: lm_loss(hidden, weight, targets, loss_mask), lambda: token_logprobs(hidden, weight, targets).sum())
    for loss_fn in losses:
        with MatmulDtypes() as mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
        assert mode.seen == {torch.bfloat16}
