"""
The GPT-2 language model used by every stage of the RLHF pipeline: the policy, the reference policy and (with a
scalar head, see reward.py) the preference model. It is nanoGPT's model.py plus what RLHF asks of it: batches of
prompts of many lengths (padding masks), several examples packed in one row, and batched sampling with a KV cache.
The weight files (safetensors, GPT-2 checkpoints, the Hugging Face export) are in hub.py.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.num_params())"

References: GPT-2, Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; Vaswani et al.
2017, "Attention Is All You Need"; nanoGPT's model.py, https://github.com/karpathy/nanoGPT/blob/master/model.py;
packing, Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination"; the KV cache, Pope et al.
2022, "Efficiently Scaling Transformer Inference"; nucleus sampling, Holtzman et al. 2019, "The Curious Case of
Neural Text Degeneration".
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from hub import load_gpt2_weights, read_gpt2
from lm_loss import lm_loss


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (number of learned positions)
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    dropout: float = 0.0  # 0 for fine-tuning/RLHF: dropout makes logprobs noisy
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


def one_query(q, attn_mask, query):
    """What it buys: a PM's scoring forward and training step skip the last block's work on all but one position.
    q (B, nh, T, hs) -> the query at position query (B,) of each row, (B, nh, 1, hs), and the mask row it
    attends with, (B, 1, 1, T): the given mask's row, or keys up to the query (causal) where there is none."""
    rows = torch.arange(q.size(0), device=q.device)
    if attn_mask is None:
        attn_mask = (torch.arange(q.size(2), device=q.device) <= query[:, None])[:, None, None, :]  # (B, 1, 1, T)
    else:
        attn_mask = attn_mask[rows, :, query].unsqueeze(2)  # (B, 1, 1, T)
    return q[rows, :, query].unsqueeze(2), attn_mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # attention dropout runs inside SDPA (dropout_p); its rate lives in an nn.Dropout so disable_dropout finds it
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, attn_mask, kv_cache, layer, query=None):
        """(B, T, C) -> (B, T, C). attn_mask: boolean (B, 1, T, S), True = may attend, or None: plain causal
        attention. With query (B,), the output at that one position of each row, (B, 1, C) (one_query)."""
        B, T, C = x.size()
        # query, key, value for all heads in one matmul, then split the heads off
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for t in self.c_attn(x).split(C, dim=2))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        if query is not None:
            q, attn_mask = one_query(q, attn_mask, query)  # (B, nh, 1, hs), (B, 1, 1, T)
        # softmax(q k^T / sqrt(hs)) v in one fused kernel (Vaswani et al. 2017, eq. 1); no mask: causal, as nanoGPT
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.attn_dropout.p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation ("gelu_new")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, kv_cache, layer, query=None):
        # pre-LayerNorm (GPT-2 sec 2.3): the residual stream itself is never normalized
        residual = x if query is None else x[torch.arange(x.size(0), device=x.device), query].unsqueeze(1)
        x = residual + self.attn(self.ln_1(x), attn_mask, kv_cache, layer, query)  # (B, T or 1, C)
        return x + self.mlp(self.ln_2(x))


def disable_dropout(model):
    """Switch off every dropout in `model`, in train mode too, and record it in its config (and checkpoints). The
    stages after SFT need it: PPO's ratio is 1 at first only if sampling and training are one function (lm-hp sets
    dropout 0), a PM's two scores must not be noisy in different ways, an RS fine-tune resumes bit for bit."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if isinstance(getattr(model, "config", None), GPTConfig):
        model.config.dropout = 0.0
    return model


def positions_and_mask(idx, attention_mask=None, kv_cache=None, segment_ids=None):
    """Each token's position id, (B or 1, T), and the keys it may attend to, a boolean (B, 1, T, S) mask (True =
    may attend) or None for plain causal attention. idx (B, T) is only read for its shape and device.
      - no padding, no cache: positions 0..T-1 and no mask, nanoGPT's case (SDPA's causal kernel)
      - packed rows, segment_ids (B, T) (tokens.pack_examples): each example is its own sequence, so positions
        restart at 0 where it begins and it sees only its own preceding tokens (Krell et al. 2021)
      - padding, attention_mask (B, T) 1 = real token, 0 = pad (either side), and/or kv_cache, which takes slots
        for these T tokens: a token's position is the number of real tokens before it, so a left-padded prompt
        gets the unpadded one's positions, and it sees the real keys up to its own slot
    """
    B, T = idx.size()
    t = torch.arange(T, device=idx.device)  # (T,)
    if segment_ids is not None:
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, T) True where a segment begins
        pos = t - torch.where(starts, t, 0).cummax(1).values  # (B, T) minus its segment's first index
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        return pos, (same & (t[None, :] <= t[:, None])).unsqueeze(1)  # (B, 1, T, T)
    if attention_mask is None and kv_cache is None:
        return t.unsqueeze(0), None  # (1, T)
    mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()  # (B, T)
    start, key_mask, first = (0, mask, 0) if kv_cache is None else kv_cache.extend(mask)  # KVCache.extend's
    pos = (first + mask.cumsum(1) - 1).clamp(min=0)  # (B, T) pads clamped to 0: their outputs are unused
    # query i sits in slot start+i and may see key slot j if j <= start+i and j is real. Every query also sees
    # itself, so a pad query never gets an all-False row (-> NaN)
    q_slot = (start + t).view(T, 1)  # (T, 1)
    k_slot = torch.arange(start + T, device=idx.device).view(1, start + T)  # (1, S)
    attn_mask = ((k_slot <= q_slot) & key_mask[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
    return pos, attn_mask.unsqueeze(1)  # (B, 1, T, S), broadcast over heads


class KVCache:
    """Keys/values of the tokens seen so far, so a new token costs O(T), not the O(T^2) recompute (Pope et al. 2022).
    max_len slots a layer, preallocated; all rows fill the same slots (prompts are left-padded) and key_mask marks
    the real tokens: a row's next position is its count of them, so every row goes on from its own last one."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.start, self.length = 0, 0  # slots [start, length) are being written by this forward
        self.kv = {}  # layer -> (k, v), each (B, nh, max_len, hs), allocated on first use
        self.key_mask = None  # (B, max_len) bool, True = a real token, allocated on first use

    def extend(self, mask):
        """Take slots for T new tokens, mask (B, T). Returns (first slot, key_mask (B, S), first position (B, 1))."""
        B, T = mask.shape
        assert self.length + T <= self.max_len, "KV cache is full"
        if self.key_mask is None:
            self.key_mask = torch.zeros(B, self.max_len, dtype=torch.bool, device=mask.device)
        self.start, self.length = self.length, self.length + T
        self.key_mask[:, self.start:self.length] = mask
        return self.start, self.key_mask[:, :self.length], self.key_mask[:, :self.start].sum(1, keepdim=True)

    def update(self, layer, k, v):
        """Store this layer's new k, v (B, nh, T, hs); return all keys/values so far (B, nh, S, hs)."""
        if layer not in self.kv:  # allocated lazily so dtype/device follow the model (e.g. bf16 autocast)
            self.kv[layer] = tuple(t.new_zeros(t.size(0), t.size(1), self.max_len, t.size(3)) for t in (k, v))
        ck, cv = self.kv[layer]
        ck[:, :, self.start:self.length] = k
        cv[:, :, self.start:self.length] = v
        return ck[:, :, :self.length], cv[:, :, :self.length]


def _sample(logits, temperature, top_k, top_p, generator):
    """One token per row from logits (B, V). Returns (tokens (B,), logprobs (B,)).
    What it buys: one uniform draw per row (inverse CDF), where torch.multinomial draws one per vocabulary entry."""
    if temperature == 0:
        tok = logits.argmax(-1)  # (B,)
        return tok, F.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
    if temperature != 1:
        logits = logits / temperature  # a copy of every logit: skipped at temperature 1
    logp = F.log_softmax(logits, -1)  # (B, V) the unfiltered policy distribution
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) [-1] keeps the dim
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus (Holtzman et al. 2019): keep the most likely tokens whose cumulative probability first reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # (B, V) mass before this token already reaches top_p
        drop[:, 0] = False  # the most likely token is always kept (top_p <= 0 included)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # inverse CDF: u uniform in [0, total mass), then the first token whose cdf exceeds it (right=True), so a
    # filtered token, whose cdf equals its predecessor's, is never chosen
    cdf = F.softmax(logits, -1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1)
    tok = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1).squeeze(1)  # (B,)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017), as GPT-2: the unembedding is the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer): 2 adds a block, variance kept flat
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without position embeddings (as nanoGPT): the token embeddings count,
        as they are also the lm_head's weights."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT's estimate_mfu: 6N for the
        weights' matmuls plus 12*L*H*Q*T for attention, at T tokens (default block_size). A forward is a third."""
        cfg = self.config  # Q: head size
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, T or cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    def hidden_states(self, idx, attention_mask=None, kv_cache=None, segment_ids=None, last=None):
        """Final (post ln_f) hidden states (B, T, C), shared by the LM head and the reward/value heads.
        idx (B, T) token ids; attention_mask (B, T) 1 = real token, 0 = padding (left or right); kv_cache: a
        KVCache to read the preceding tokens from and append these ones to; segment_ids (B, T): packed rows, several
        examples a row (positions_and_mask). last (B,) long: only that position of each row is read (a PM's
        score at its EOS), so the last block runs for it alone (one_query) and this returns (B, C).
        """
        assert last is None or kv_cache is None, "last reads a whole sequence, without a cache"
        pos, attn_mask = positions_and_mask(idx, attention_mask, kv_cache, segment_ids)
        # positions never exceed the slot index, so this bounds them without a host sync
        assert (idx.size(1) if kv_cache is None else kv_cache.length) <= self.config.block_size, "over block_size"
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, layer, last if layer == self.config.n_layer - 1 else None)
        x = self.transformer.ln_f(x)  # (B, T, C), or (B, 1, C) with `last`
        return x if last is None else x[:, 0]

    def logits(self, h):
        """The LM head, (..., C) -> (..., V); its weight is wte's (tied)."""
        return self.lm_head(h)

    def forward(self, idx, targets=None, loss_mask=None, attention_mask=None, kv_cache=None, segment_ids=None):
        """(Next-token logits (B, T, V), None), or given targets (B, T), (None, the masked mean cross-entropy
        sum(ce * loss_mask) / sum(loss_mask)) (every position if loss_mask is None: SFT trains on the reply tokens
        only). The loss never builds the (B, T, V) logits: lm_loss.py."""
        h = self.hidden_states(idx, attention_mask, kv_cache, segment_ids)  # (B, T, C)
        if targets is None:
            return self.logits(h), None
        return None, lm_loss(h, self.lm_head.weight, targets, loss_mask)

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        """AdamW with weight decay only on matrices (matmul weights, embeddings); biases and LayerNorm gains are
        1-D and decaying them only hurts (as in GPT-2/nanoGPT)."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight appears once
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel updates each tensor in one pass (CUDA: one launch; CPU: ~3x the foreach default's speed)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=64, temperature=1.0, top_k=None,
                 top_p=None, eos_id=None, stop_ids=None, generator=None, use_cache=True):
        """Sample continuations of a batch of LEFT-padded prompts idx (B, T).
        Returns tokens (B, N) long, logprobs (B, N) float and mask (B, N) bool, N <= max_new_tokens (the loop
        stops once every row is done). logprobs are log_softmax(logits / temperature) of the sampled token: the
        policy's distribution before top-k/top-p filtering, which is what PPO needs (at temperature 1 for greedy,
        temperature == 0). A row is done after eos_id or after the last token of any sequence in stop_ids (e.g.
        "\\n\\nHuman:", matched within the generated tokens only); mask is True up to and including that token,
        afterwards tokens are eos_id (0 if None) and mask False. use_cache=False recomputes the whole sequence
        every step: the slow reference."""
        B, T = idx.size()
        assert T + max_new_tokens <= self.config.block_size, (
            f"prompt length {T} + max_new_tokens {max_new_tokens} > block_size {self.config.block_size}")
        device = idx.device
        attention_mask = torch.ones_like(idx) if attention_mask is None else attention_mask.to(device)
        attention_mask = attention_mask.bool()
        assert attention_mask[:, -1].all(), "prompts must be left-padded (last column all real tokens)"
        stops = [torch.tensor(s, dtype=torch.long, device=device) for s in (stop_ids or []) if len(s) > 0]
        fill = 0 if eos_id is None else eos_id
        tokens = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        kv_cache = KVCache(T + max_new_tokens) if use_cache else None
        seq, seq_mask = idx, attention_mask  # with the cache: only the tokens it has not seen yet
        n = 0  # columns filled
        for t in range(max_new_tokens):
            h = self.hidden_states(seq, seq_mask, kv_cache)[:, -1]  # (B, C) the last position predicts the next
            tok, lp = _sample(self.logits(h).float(), temperature, top_k, top_p, generator)  # (B,), (B,)
            tokens[:, t] = torch.where(done, fill, tok)
            logprobs[:, t] = torch.where(done, 0.0, lp)
            mask[:, t] = ~done
            if eos_id is not None:
                done = done | (tok == eos_id)
            for s in stops:
                if t + 1 >= len(s):
                    done = done | (tokens[:, t + 1 - len(s):t + 1] == s).all(1)
            n = t + 1
            if done.all():  # the one host sync per step
                break
            new, new_mask = tokens[:, t:t + 1], torch.ones(B, 1, dtype=torch.bool, device=device)  # (B, 1)
            if use_cache:
                seq, seq_mask = new, new_mask
            else:
                seq, seq_mask = torch.cat([seq, new], 1), torch.cat([seq_mask, new_mask], 1)
        return tokens[:, :n], logprobs[:, :n], mask[:, :n]

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, n_head=None):
        """GPT-2 weights by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'; downloaded once) or from a local
        GPT-2-layout .safetensors file, the config inferred from the shapes (hub.py reads, checks and copies)."""
        path, shape, sd = read_gpt2(name_or_path, cache_dir, n_head)
        model = cls(GPTConfig(**shape))
        load_gpt2_weights(model, sd, path)
        return model


def scalar_head(head, h):
    """A scalar head (Linear(C, 1)) on hidden states h (..., C) -> (...,): the PM's score (reward.py), PPO's value
    (actor_critic.py). In fp32 even under bf16 autocast: every later number is made of it, and a bf16 output keeps
    8 bits of mantissa (a score of 3.3 rounded to +-0.008). One dot product a sequence: fp32 costs nothing."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.float()).squeeze(-1)
