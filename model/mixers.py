"""Sequence mixers for the backbone comparison, all (b, L, d) -> (b, L, d) and causal
(letters: docs/method.md §2).

Each one is one scan direction: the bidirectional layer runs one mixer on the sequence and another
on the time-reversed sequence, exactly as it does with Mamba. All parameters are created here, at
construction, so every backbone is trained like the Mamba one.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.mamba import make_mamba, resolve_mamba_impl

MIXERS = ("mamba", "lstm", "attention", "retention", "rwkv")
ATTENTION_IMPLS = ("sdpa", "explicit")


def _causal_mask(length, device):
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class LSTMMixer(nn.Module):
    """One-directional LSTM; two of them in a bidirectional layer make a BiLSTM."""

    def __init__(self, dim):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class AttentionMixer(nn.Module):
    """Causal multi-head self-attention.

    impl='sdpa' uses torch's fused scaled_dot_product_attention; impl='explicit' forms the
    (b, heads, L, L) score matrix and softmax(QK^T / sqrt(dh)) V, whose memory grows with L^2.
    """

    def __init__(self, dim, num_heads, impl="sdpa"):
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got '{impl}'")
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])          # (b, h, L, L)
            scores = scores.masked_fill(~_causal_mask(length, x.device), float("-inf"))
            out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class RetentionMixer(nn.Module):
    """Multi-scale retention (RetNet), parallel form: (QK^T * decay mask) V per head.

    Head h decays with gamma_h = 1 - 2^(-5-h); each head's output is group-normalised and the
    whole gated by swish(x W_g).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.group_norm = nn.GroupNorm(num_heads, dim)
        gammas = 1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float32))
        self.register_buffer("log_gamma", torch.log(gammas), persistent=False)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        t = torch.arange(length, device=x.device, dtype=x.dtype)
        lag = t[:, None] - t[None, :]                                              # (L, L)
        decay = torch.exp(self.log_gamma[:, None, None].to(x.dtype) * lag.clamp(min=0))
        decay = decay * _causal_mask(length, x.device)                             # (h, L, L)
        decay = decay / decay.sum(-1, keepdim=True).sqrt()                         # row scale
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) * decay        # (b, h, L, L)
        scores = scores / scores.sum(-1, keepdim=True).abs().clamp(min=1.0)
        out = (scores @ v).transpose(1, 2).reshape(b * length, dim)
        out = self.group_norm(out).view(b, length, dim)
        return self.proj(F.silu(self.gate(x)) * out)


class RWKVMixer(nn.Module):
    """RWKV time mixing: token shift, then a per-channel decayed weighted average of values.

    wkv_t = sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t, normalised by the same sum
    without v, i.e. a softmax over i <= t of those exponents; output = W_o(sigmoid(r) * wkv).
    """

    def __init__(self, dim):
        super().__init__()
        self.time_decay = nn.Parameter(torch.linspace(-1.0, 1.0, dim))     # w = exp(time_decay)
        self.time_first = nn.Parameter(torch.zeros(dim))                   # u
        self.mix_k = nn.Parameter(torch.full((dim,), 0.5))
        self.mix_v = nn.Parameter(torch.full((dim,), 0.5))
        self.mix_r = nn.Parameter(torch.full((dim,), 0.5))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        shifted = F.pad(x, (0, 0, 1, -1))                                   # x_{t-1}, 0 at t=0
        k = self.key(x * self.mix_k + shifted * (1 - self.mix_k))           # (b, L, d)
        v = self.value(x * self.mix_v + shifted * (1 - self.mix_v))
        r = self.receptance(x * self.mix_r + shifted * (1 - self.mix_r))
        return self.output(torch.sigmoid(r) * self.wkv(k, v))

    def wkv(self, k, v):
        """wkv (b, L, d) in float32 from keys and values k, v (b, L, d).

        Each past term factors as e^{-(t-1-i) w} e^{k_i}: a (L, L) decay per channel times a
        weight per frame, so both sums are one batched product over the d channels (no
        (b, L, L, d) tensor). Every exponent is shifted by its channel's largest one, which the
        ratio does not see, so no term exceeds 1; a channel whose exponents over one sequence
        span more than about 80 would underflow its earliest frames in float32.
        """
        with torch.autocast(k.device.type, enabled=False):
            k, v = k.float(), v.float()
            b, length, _ = k.shape
            w, u = torch.exp(self.time_decay), self.time_first                # (d,)
            t = torch.arange(length, device=k.device, dtype=torch.float32)
            lag = t[:, None] - 1 - t[None, :]                                   # (L, L): t-1-i
            decay = torch.exp(-lag.clamp(min=0) * w[:, None, None]) * (lag >= 0)   # (d, L, L)
            shift = (k.amax(1, keepdim=True) + u.clamp(min=0)).detach()         # (b, 1, d)
            weight = torch.exp(k - shift)                                       # i < t terms
            first = torch.exp(u + k - shift)                                    # the i = t term
            terms = torch.cat([weight * v, weight]).permute(2, 1, 0)            # (d, L, 2b)
            past = torch.bmm(decay, terms).permute(2, 1, 0)                     # (2b, L, d)
            return (past[:b] + first * v) / (past[b:] + first)


def resolve_mixer(model_cfg, device=None, max_frames=None):
    """The implementation the configured mixer will run, decided once per model: for Mamba
    'plain', 'triton' or 'cuda' (model/mamba.py), for the others the attention kernel or ''."""
    kind = model_cfg["mixer"]
    if kind == "mamba":
        return resolve_mamba_impl(model_cfg["mamba_impl"], device, max_frames)
    return model_cfg["attention_impl"] if kind == "attention" else ""


def mixer_factory(model_cfg, impl):
    """make(d) -> a new mixer of the configured kind at width d, with the resolved `impl`."""
    kind = model_cfg["mixer"]
    if kind == "mamba":
        return lambda dim: make_mamba(dim, model_cfg["d_state"], model_cfg["d_conv"],
                                      model_cfg["expand"], impl)
    if kind == "lstm":
        return LSTMMixer
    if kind == "attention":
        return lambda dim: AttentionMixer(dim, model_cfg["num_heads"], impl)
    if kind == "retention":
        return lambda dim: RetentionMixer(dim, model_cfg["num_heads"])
    if kind == "rwkv":
        return RWKVMixer
    raise ValueError(f"model.mixer must be one of {MIXERS}, got '{kind}'")
