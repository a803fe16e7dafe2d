"""Mamba mixer: `mamba_ssm.Mamba` (CUDA selective-scan kernel) or a plain-PyTorch equivalent.

`PlainMamba` has the constructor arguments, parameter names, shapes and initialisation of
`mamba_ssm.Mamba` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state_dicts move
freely between the two. Its selective scan, `selective_scan_ref`, runs the recurrence over time in
plain PyTorch; it is the reference the CUDA kernel is checked against (`python -m inference.mamba_parity`).

Shapes: (b, L, d_model) in and out; inside, E = expand * d_model channels and N = d_state.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MAMBA_IMPLS = ("auto", "plain", "cuda")


def selective_scan_ref(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
    """Selective scan y = SSM(A, B, C, D)(u), gated by silu(z), computed step by step.

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L); D: (E,); delta_bias: (E,).
    Recurrence per channel e and state n:
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = <C_t, h_t> + D u_t.
    Computed in float32 (float64 when u is float64); returns y: (b, E, L) in the dtype of u.
    """
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # time-major and unbound once: indexing inside the loop would make autograd write a full
    # zero tensor per step in the backward pass
    decay = torch.exp(torch.einsum("bel,en->lben", delta, A)).unbind(0)      # L x (b, E, N)
    drive = torch.einsum("bel,bnl->lben", delta * u, B).unbind(0)             # L x (b, E, N)
    readout = C.permute(2, 0, 1).unsqueeze(-1).unbind(0)                      # L x (b, N, 1)
    state = torch.zeros_like(decay[0])                                        # (b, E, N)
    outputs = []
    for decay_t, drive_t, readout_t in zip(decay, drive, readout):
        state = decay_t * state + drive_t
        outputs.append(torch.bmm(state, readout_t))                           # (b, E, 1)
    y = torch.cat(outputs, dim=-1) + D.to(compute)[:, None] * u               # (b, E, L)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype)


class PlainMamba(nn.Module):
    """The Mamba block of mamba_ssm in plain PyTorch (same parameters, same computation)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # dt initialisation of mamba_ssm: weights U(-s, s), softplus(bias) log-uniform in
        # [dt_min, dt_max]; A = -(1..N) per channel (S4D-real), D = 1.
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden):
        """hidden: (b, L, d_model) -> (b, L, d_model)."""
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)          # (b, E, L) each
        x = F.silu(self.conv1d(x)[..., :length])                             # causal conv
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)              # (b, L, .)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)                    # (b, E, L)
        A = -torch.exp(self.A_log.float())                                   # (E, N)
        y = selective_scan_ref(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z=z,
                               delta_bias=self.dt_proj.bias, delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


def cuda_mamba_available():
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_mamba_impl(impl, device=None):
    """'auto' -> 'cuda' when mamba-ssm and a GPU are there and the model is meant for the GPU
    (`device` None or CUDA), else 'plain'; decided once, at construction."""
    if impl not in MAMBA_IMPLS:
        raise ValueError(f"model.mamba_impl must be one of {MAMBA_IMPLS}, got '{impl}'")
    available = cuda_mamba_available() and (device is None or torch.device(device).type == "cuda")
    if impl == "cuda" and not available:
        raise RuntimeError("model.mamba_impl='cuda' needs a CUDA device, a model on it and the "
                           "mamba-ssm package (pip install mamba-ssm --no-build-isolation)")
    resolved = "cuda" if impl == "cuda" or (impl == "auto" and available) else "plain"
    logger.info("Mamba mixer: %s", "mamba_ssm.Mamba (CUDA selective scan)" if resolved == "cuda"
                else "plain-PyTorch selective scan")
    return resolved


def make_mamba(d_model, d_state, d_conv, expand, impl):
    """A Mamba mixer of the resolved implementation ('plain' or 'cuda')."""
    if impl == "cuda":
        from mamba_ssm import Mamba
        return Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    return PlainMamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
