"""
The language-modelling loss without the (N, V) logits.

The LM head's logits are the largest tensor of a training step: tokens x vocabulary floats (16 x 1024 x 50,257
x 4 bytes = 3.3 GB on the GPU default). The plain loss writes them, reads and writes them again in the
log-softmax, keeps that for backward and builds a gradient of the same size. None of it is needed at once:
a token's cross-entropy, ce_i = logsumexp(z_i) - z_i[y_i] with z_i = W h_i, has the closed-form gradient

    d ce_i / d z_i = softmax(z_i) - onehot(y_i)

so the loss can walk the tokens in chunks and, while a chunk's logits are still in cache, turn them straight
into the gradients of the hidden states and of the head (dh = dz W, dW += dz^T h). Backward then only scales
those by the gradient of the scalar loss. The numbers are F.cross_entropy's on the full logits (tests/
test_lm_loss.py), in a fraction of the memory; the time saved is in README, Speed. Liger Kernel's "fused
linear cross-entropy" does the same on the GPU in Triton; this is its plain-PyTorch form.
"""

import torch

CHUNK_LOGITS = 2 ** 25  # logits per chunk (128 MB in fp32): 667 tokens at vocab 50,257, 4,096 at 8,192


class _ChunkedLMLoss(torch.autograd.Function):
    """sum_i row_weights_i * ce_i over hidden (N, C) and the head weight (V, C); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, want_grads):
        N, V = hidden.size(0), weight.size(0)
        chunk = max(1, CHUNK_LOGITS // V)
        loss = torch.zeros((), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grads else None  # (N, C)
        grad_weight = torch.zeros_like(weight) if want_grads else None  # (V, C)
        for s in range(0, N, chunk):
            h, y, w = hidden[s:s + chunk], targets[s:s + chunk], row_weights[s:s + chunk]  # (n, C), (n,), (n,)
            rows = torch.arange(len(y), device=y.device)
            # fp32 log-softmax: under bf16 autocast the log-sum-exp over 50k logits is lossy
            logprobs = torch.log_softmax((h @ weight.t()).float(), -1)  # (n, V)
            loss -= (logprobs[rows, y] * w).sum()
            if want_grads:
                dlogits = logprobs.exp_()  # softmax, in place: the log-probs are not needed again
                dlogits[rows, y] -= 1.0
                dlogits *= w[:, None]  # (n, V) d loss / d logits
                grad_hidden[s:s + chunk] = dlogits @ weight  # (n, C)
                grad_weight.addmm_(dlogits.t(), h.to(grad_weight.dtype))  # (V, C)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def lm_loss(hidden, weight, targets, loss_mask=None):
    """The masked mean next-token cross-entropy, sum(ce * loss_mask) / sum(loss_mask) (every token if loss_mask
    is None), of the logits hidden @ weight.T: hidden (..., C), weight (V, C), targets and loss_mask (...).
    Equal to F.cross_entropy over the materialised logits, without materialising them (module docstring)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()  # (N, C), (N,)
    if loss_mask is None:
        row_weights = torch.full(targets.shape, 1.0 / targets.numel(), device=hidden.device)
    else:
        loss_mask = loss_mask.flatten().float()
        row_weights = loss_mask / loss_mask.sum().clamp(min=1.0)  # a batch with no loss tokens gives 0, not NaN
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLMLoss.apply(hidden, weight, targets, row_weights, want_grads)
