"""
The language-modelling loss, the log-probs of given tokens, and context distillation's loss, without the (N, V)
logits. What it buys is memory: one chunk of logits at a time instead of all of them, their copies and gradient.

The LM head's logits are the largest tensor of a training step: tokens x vocabulary floats (16 x 1024 x 50,257
x 4 bytes = 3.3 GB on the GPU default). The plain loss writes them, reads and writes them again in the
log-softmax, keeps that for backward and builds a gradient of the same size. None of it is needed at once:
a token's log-probability, logp_i = z_i[y_i] - logsumexp(z_i) with z_i = W h_i, has the closed-form gradient

    d logp_i / d z_i = onehot(y_i) - softmax(z_i)

so a pass can walk the tokens in chunks and, while a chunk's logits are still in cache, turn them straight
into the gradients of the hidden states and of the head (dh = dz W, dW += dz^T h). For the LM loss (SFT,
pretraining, RS) d loss / d logp_i is known up front (-1/N, or the loss mask's weight), so that one forward
pass computes the loss and its gradients, and backward only scales them. For DPO's log-probs it is known only
in backward, which then recomputes each chunk's logits. The numbers are F.cross_entropy's and log_softmax's on
the full logits (tests/test_lm_loss.py), in a fraction of the memory; the time is in README, Speed. Liger
Kernel's "fused linear cross-entropy" does the same on the GPU in Triton; this is its plain-PyTorch form.

Context distillation (cd.py; Askell et al. 2021, arXiv:2112.00861, sec. 3) has two heads' logits a token, the
student's z_i and the frozen teacher's, and fp32 log-softmaxes of both: ~24 x V bytes a token in the plain form
(18 GB at GPT-2's vocabulary for 16 x 1,000 tokens). Its loss, sum_i w_i KL(p_teacher,i || softmax(z_i)), has
the gradient w_i (softmax(z_i) - p_teacher,i) in z_i, known up front too, so distill_loss is the same one pass
over chunks of tokens, holding one chunk's logits of both heads at a time (Liger Kernel's "fused linear JSD" is
the GPU kernel for such distillation losses).
"""

import torch

CHUNK_LOGITS = 2 ** 25  # logits per chunk (128 MB in fp32): 667 tokens at vocab 50,257, 4,096 at 8,192


def chunk_logits(h, weight):
    """A chunk's logits, (n, V) fp32: under bf16 autocast the matmul runs in bf16, and the log-sum-exp that reads
    them would be lossy in it."""
    return (h @ weight.t()).float()


def mask_weights(loss_mask, n, device):
    """Each token's weight in a masked mean, (n,): loss_mask / sum(loss_mask), or 1/n if loss_mask is None;
    a batch with no loss tokens gives 0, not NaN."""
    if loss_mask is None:
        return torch.full((n,), 1.0 / n, device=device)
    loss_mask = loss_mask.flatten().float()
    return loss_mask / loss_mask.sum().clamp(min=1.0)


def head_pass(hidden, weight, targets, token_grads=None):
    """One pass over the LM head in chunks of tokens: log p(target) of each token, (N,) fp32, and, given
    token_grads (N,) = d out / d logp_i, the gradients of hidden (N, C) and weight (V, C), from
    d logp_i / d z_i = onehot(y_i) - softmax(z_i) while the chunk's logits are in cache."""
    N, V = hidden.size(0), weight.size(0)
    chunk = max(1, CHUNK_LOGITS // V)
    token_logprobs = torch.empty(N, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if token_grads is not None else None  # (N, C)
    grad_weight = torch.zeros_like(weight) if token_grads is not None else None  # (V, C)
    for s in range(0, N, chunk):
        h, y = hidden[s:s + chunk], targets[s:s + chunk]  # (n, C), (n,)
        rows = torch.arange(len(y), device=y.device)
        logprobs = torch.log_softmax(chunk_logits(h, weight), -1)  # (n, V) fp32
        token_logprobs[s:s + chunk] = logprobs[rows, y]
        if token_grads is not None:
            dlogits = logprobs.exp_()  # softmax, in place: the log-probs are not needed again
            dlogits[rows, y] -= 1.0  # softmax - onehot = -d logp / d z; d out / d z is that times g
            # g scales whole rows: applied to the (n, C) sides of the two matmuls, not to the (n, V) logits
            g = -token_grads[s:s + chunk, None]  # (n, 1)
            # out-of-place matmuls, which autocast runs in bf16 where it is on (an in-place addmm_ it would not)
            grad_hidden[s:s + chunk] = g * (dlogits @ weight)  # (n, C)
            grad_weight += dlogits.t() @ (g * h)  # (V, C)
        logprobs = dlogits = None  # freed before the next chunk's are made: one chunk of logits at a time, not two
    return token_logprobs, grad_hidden, grad_weight


class _LMLoss(torch.autograd.Function):
    """-sum_i token_weights_i * logp_i: the gradients come out of the forward's one pass (module docstring),
    since d loss / d logp_i = -token_weights_i is known before backward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, want_grads):
        token_grads = -token_weights if want_grads else None  # d loss / d logp_i
        logprobs, grad_hidden, grad_weight = head_pass(hidden, weight, targets, token_grads)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return -(logprobs * token_weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


class _TokenLogprobs(torch.autograd.Function):
    """logp_i for each token, (N,), for a caller whose loss is not linear in them (DPO): backward gets
    d out / d logp_i only then, so it recomputes each chunk's logits (one more head matmul) instead of
    keeping them all, under the autocast the forward ran in."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        ctx.amp = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(hidden, weight, targets)
        return head_pass(hidden, weight, targets)[0]

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets = ctx.saved_tensors
        device, dtype, enabled = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            _, grad_hidden, grad_weight = head_pass(hidden, weight, targets, grad_logprobs)
        return grad_hidden, grad_weight, None


def lm_loss(hidden, weight, targets, loss_mask=None):
    """The masked mean next-token cross-entropy, sum(ce * loss_mask) / sum(loss_mask) (every token if loss_mask
    is None), of the logits hidden @ weight.T: hidden (..., C), weight (V, C), targets and loss_mask (...).
    Equal to F.cross_entropy over the materialised logits; it buys memory: it never materialises them (module
    docstring)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()  # (N, C), (N,)
    token_weights = mask_weights(loss_mask, targets.numel(), hidden.device)  # (N,)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LMLoss.apply(hidden, weight, targets, token_weights, want_grads)


def token_logprobs(hidden, weight, targets):
    """log softmax(hidden @ weight.T)[target] for each token, hidden (..., C), weight (V, C), targets (...)
    -> (...) fp32: log_softmax + gather over the materialised logits, without materialising them."""
    return _TokenLogprobs.apply(hidden.flatten(0, -2), weight, targets.flatten()).view(targets.shape)


# ----------------------------------------------------------------------------------------------
# context distillation

def distill_pass(hidden, weight, teacher_hidden, teacher_weight, token_weights, want_grads):
    """One pass over both heads in chunks of tokens: sum_i w_i KL(p_teacher,i || p_student,i), fp32, with
    hidden, teacher_hidden (N, C), weight, teacher_weight (V, C), token_weights (N,) = w; and, if want_grads,
    the gradients of hidden and weight, from d loss / d z_i = w_i (softmax(z_i) - p_teacher,i) while the chunk's
    logits are in cache. The teacher is a constant: it gets no gradient."""
    N, V = hidden.size(0), weight.size(0)
    chunk = max(1, CHUNK_LOGITS // V)
    loss = torch.zeros((), device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grads else None  # (N, C)
    grad_weight = torch.zeros_like(weight) if want_grads else None  # (V, C)
    for s in range(0, N, chunk):
        h, w = hidden[s:s + chunk], token_weights[s:s + chunk, None]  # (n, C), (n, 1)
        log_q = torch.log_softmax(chunk_logits(h, weight), -1)  # (n, V) the student's log-probs
        log_p = torch.log_softmax(chunk_logits(teacher_hidden[s:s + chunk], teacher_weight), -1)  # the teacher's
        p = log_p.exp()  # (n, V) the teacher's probabilities
        kl = log_p.sub_(log_q).mul_(p).sum(-1)  # (n,) KL_i = sum_v p (log p - log q), in place (log p is done with)
        loss += (w[:, 0] * kl).sum()
        if want_grads:
            dlogits = log_q.exp_().sub_(p)  # (n, V) softmax(z) - p_teacher = d KL_i / d z_i
            # w scales whole rows: applied to the (n, C) sides of the matmuls, out of place (bf16 under autocast)
            grad_hidden[s:s + chunk] = w * (dlogits @ weight)  # (n, C)
            grad_weight += dlogits.t() @ (w * h)  # (V, C)
        log_q = log_p = p = dlogits = None  # freed before the next chunk's are made: one chunk at a time, not two
    return loss, grad_hidden, grad_weight


class _DistillLoss(torch.autograd.Function):
    """sum_i w_i KL(p_teacher,i || p_student,i): as _LMLoss, the gradients come out of the forward's one pass,
    since d loss / d z_i is known before backward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, token_weights, want_grads):
        loss, grad_hidden, grad_weight = distill_pass(hidden, weight, teacher_hidden, teacher_weight,
                                                      token_weights, want_grads)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def distill_loss(hidden, weight, teacher_hidden, teacher_weight, loss_mask=None):
    """Context distillation's loss, the masked mean sum(KL_i * loss_mask_i) / sum(loss_mask) (every token if
    loss_mask is None) of KL_i = KL(softmax(teacher_hidden_i @ teacher_weight.T) || softmax(hidden_i @ weight.T)):
    hidden, teacher_hidden (..., C), weight, teacher_weight (V, C), loss_mask (...). Equal to log_softmax + kl_div
    over the materialised logits, without materialising them (module docstring). Gradients flow to hidden and
    weight only: the teacher is a constant."""
    hidden, teacher_hidden = hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)  # (N, C) each
    token_weights = mask_weights(loss_mask, hidden.size(0), hidden.device)  # (N,)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _DistillLoss.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), token_weights,
                              want_grads)
