"""Mamba mixer: `MambaMixer` with a plain-PyTorch or a Triton selective scan, or `mamba_ssm.Mamba`.

`MambaMixer` has the constructor arguments, parameter names, shapes and initialisation of
`mamba_ssm.Mamba` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state_dicts move
freely between all three. Its selective scan is `selective_scan_ref`, which runs the recurrence
over time in plain PyTorch and is the reference every kernel is checked against;
`selective_scan_recompute`, the same loop with a hand-written backward pass that recomputes
states instead of keeping them (bit-identical, a fraction of the memory); or
`model.scan_triton.selective_scan_triton`, a kernel for short sequences (S5VH's 25 frames) that
is several times faster there than mamba_ssm's (`python -m tools.bench_scan`).

Its causal convolution and SiLU are likewise `causal_conv1d_silu_ref` (PyTorch's convolution) or
`model.conv_triton.causal_conv1d_silu_triton` (one fused kernel, several times faster at these
shapes: `python -m tools.bench_scan --conv`).

Implementations (`model.mamba_impl`), fixed when the model is built:
    plain   MambaMixer + selective_scan_recompute + causal_conv1d_silu_ref (any device; the CPU
            path)
    triton  MambaMixer + both Triton kernels (CUDA, Triton)
    cuda    mamba_ssm.Mamba (CUDA, the mamba-ssm package); chunked, best for long sequences
    auto    triton for models of at most SHORT_SCAN_MAX_FRAMES frames, else cuda, on a CUDA
            model when the package is there; plain otherwise

Shapes: (b, L, d) in and out (docs/method.md §2). Inside the scan the letters are mamba_ssm's
and local to it: E = expand * d channels, N = d_state states, and B, C, D the state-space
matrices (not the code length, not a video count).
"""
import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.errors import UserError

MAMBA_IMPLS = ("auto", "plain", "triton", "cuda")
# Longest sequence for which 'auto' picks the Triton scan. It walks time in one program per
# block of channels; mamba_ssm's chunked scan overtakes it between 64 and 128 steps at the
# training batch (256 rows x 512 channels, H100, `python -m tools.bench_scan`).
SHORT_SCAN_MAX_FRAMES = 64


def selective_scan_ref(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
    """Selective scan y = SSM(A, B, C, D)(u), gated by silu(z), computed step by step.

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L); D: (E,); delta_bias: (E,).
    Recurrence per channel e and state n:
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = <C_t, h_t> + D u_t.
    Computed in float32 (float64 when u is float64); returns y: (b, E, L) in the dtype of u.
    Autograd differentiates the loop, keeping two (b, E, N) tensors per step for the backward pass.

    A pair of directions is one call with A: (2, E, N), D, delta_bias: (2, E): rows [0, b/2)
    are scanned forward in time with parameter set 0, rows [b/2, b) backward in time (from
    step L - 1 to 0) with set 1; y keeps the time order of the inputs.
    """
    return _selective_scan(_recurrence, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_recompute(u, delta, A, B, C, D, z=None, delta_bias=None,
                             delta_softplus=True):
    """`selective_scan_ref` with a hand-written backward pass that keeps the state of every
    ceil(sqrt(L))-th step only and recomputes the others a segment at a time: about 2 sqrt(L)
    (b, E, N) states in memory instead of 2 L. The backward pass performs autograd's operations
    on the reference's loop in the same order, so values and gradients equal the reference's bit
    for bit (tests/test_model.py). The plain path (CPU) trains with it."""
    return _selective_scan(_RecomputedRecurrence.apply, u, delta, A, B, C, D, z, delta_bias,
                           delta_softplus)


def _selective_scan(recurrence, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if A.ndim == 3:   # a pair of directions (selective_scan_ref's doc)
        y = [_selective_scan(recurrence, _direction(u, i), _direction(delta, i), A[i],
                             _direction(B, i), _direction(C, i), D[i], _direction(z, i),
                             _direction_param(delta_bias, i), delta_softplus) for i in (0, 1)]
        return torch.cat([y[0], y[1].flip(-1)])
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = recurrence(delta, delta * u, A, B, C) + D.to(compute)[:, None] * u          # (b, E, L)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype)


def _direction(rows, i):
    """Direction i's rows of a pair's (b, ., L) tensor, in its own time order: the first b/2
    rows, or the last b/2 reversed in time (None stays None)."""
    if rows is None:
        return None
    half = rows.shape[0] // 2
    return rows[:half] if i == 0 else rows[half:].flip(-1)


def _direction_param(param, i):
    return None if param is None else param[i]


def _advance(state, delta_t, drive_scale_t, A, B_t):
    """One step h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) B_t: state (b, E, N); delta_t,
    drive_scale_t: (b, E); A: (E, N); B_t: (b, N) -> (b, E, N)."""
    decay = (delta_t[:, :, None] * A).exp_()
    drive = drive_scale_t[:, :, None] * B_t[:, None, :]
    return decay * state + drive


def _unbind_steps(delta, drive_scale, B, C):
    """Each step's inputs, unbound once (indexing inside a loop would make autograd write a full
    zero tensor per step in the backward pass): delta_t, drive_scale_t (b, E), B_t (b, N) and
    the readout C_t as (b, N, 1)."""
    return delta.unbind(-1), drive_scale.unbind(-1), B.unbind(-1), C.unsqueeze(-1).unbind(-2)


def _recurrence(delta, drive_scale, A, B, C):
    """Readouts <C_t, h_t>: delta, drive_scale (b, E, L); A (E, N); B, C (b, N, L) -> (b, E, L).
    The (b, E, N) terms of a step are made in the step."""
    deltas, scales, Bs, readouts = _unbind_steps(delta, drive_scale, B, C)
    state = delta.new_zeros(delta.shape[:2] + A.shape[1:])                   # (b, E, N)
    outputs = []
    for t in range(delta.shape[-1]):
        state = _advance(state, deltas[t], scales[t], A, Bs[t])
        outputs.append(torch.bmm(state, readouts[t]))                        # (b, E, 1)
    return torch.cat(outputs, dim=-1)


def _advance_into(out, state, delta_t, drive_scale_t, A, B_t, work, decay=None):
    """`_advance` without autograd, into `out` (b, E, N), with `work` (b, E, N) as scratch and
    the step's decay left in `decay` (b, E, N) when given: the same operations on the same
    values, hence the same result, without allocating."""
    decay = out if decay is None else decay
    torch.mul(delta_t[:, :, None], A, out=decay).exp_()
    torch.mul(decay, state, out=out)
    out.add_(torch.mul(drive_scale_t[:, :, None], B_t[:, None, :], out=work))
    return out


class _RecomputedRecurrence(torch.autograd.Function):
    """`_recurrence` (same arguments and result) keeping the states that start each segment of
    `segment` steps; the backward pass recomputes a segment's states from its start, then walks
    it in reverse. The element-wise work of a step goes into a few preallocated (b, E, N)
    buffers, which also keeps the allocator's churn low."""

    @staticmethod
    def forward(ctx, delta, drive_scale, A, B, C):
        length = delta.shape[-1]
        segment = math.isqrt(length - 1) + 1 if length > 1 else 1         # ceil(sqrt(L))
        deltas, scales, Bs, readouts = _unbind_steps(delta, drive_scale, B, C)
        state = delta.new_zeros(delta.shape[:2] + A.shape[1:])               # (b, E, N)
        spare, work = torch.empty_like(state), torch.empty_like(state)
        starts, out = [], delta.new_empty(delta.shape)                      # (b, E, L)
        for t in range(length):
            if t % segment == 0:
                starts.append(state.clone())
            state, spare = _advance_into(spare, state, deltas[t], scales[t], A, Bs[t], work), state
            out[..., t:t + 1] = torch.bmm(state, readouts[t])    # as the reference's bmm
        ctx.segment = segment
        ctx.save_for_backward(delta, drive_scale, A, B, C, *starts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Each line is the derivative autograd forms for the matching operation of `_advance`
        # and `_recurrence` (mul: grad * other, then a sum to the operand's shape; exp: grad *
        # result; bmm: its two products), in the order autograd's engine runs them: later steps
        # first. A's gradient is summed from the last step down, as autograd accumulates it.
        delta, drive_scale, A, B, C, *starts = ctx.saved_tensors
        deltas, scales, Bs, readouts = _unbind_steps(delta, drive_scale, B, C)
        length, segment = delta.shape[-1], ctx.segment
        # contiguous, as the stack that differentiates unbind makes them (the layout decides
        # the order of later sums over these gradients)
        g_delta, g_scale, g_B, g_C = (t.new_empty(t.shape) for t in (delta, drive_scale, B, C))
        # a segment's states h_first .. h_last and their decays, and two scratch buffers
        states = [torch.empty_like(starts[0]) for _ in range(segment)]
        decays = [torch.empty_like(starts[0]) for _ in range(segment)]
        g_carry, work = torch.empty_like(starts[0]), torch.empty_like(starts[0])
        g_A = None
        for first in reversed(range(0, length, segment)):
            steps = range(first, min(first + segment, length))
            prev = starts[first // segment]
            for i, t in enumerate(steps):
                prev = _advance_into(states[i], prev, deltas[t], scales[t], A, Bs[t], work,
                                     decays[i])
            for i, t in reversed(list(enumerate(steps))):
                state, decay = states[i], decays[i]
                prev = states[i - 1] if i else starts[first // segment]
                g_out = grad_out.narrow(-1, t, 1)                            # (b, E, 1)
                g_state = g_out.bmm(readouts[t].transpose(1, 2))             # (b, E, N)
                if t < length - 1:
                    g_state.add_(g_carry)
                g_C[..., t] = state.transpose(1, 2).bmm(g_out)[..., 0]
                torch.mul(g_state, Bs[t][:, None, :], out=work)
                g_scale[..., t] = work.sum([2], keepdim=True)[..., 0]
                torch.mul(g_state, scales[t][:, :, None], out=work)
                g_B[..., t] = work.sum([1], keepdim=True)[:, 0]
                g_exponent = torch.mul(g_state, prev, out=work).mul_(decay)
                torch.mul(g_state, decay, out=g_carry)
                torch.mul(g_exponent, A, out=decay)                          # decay is spent
                g_delta[..., t] = decay.sum([2], keepdim=True)[..., 0]
                g_exponent.mul_(deltas[t][:, :, None])
                g_A_t = g_exponent.sum([0], keepdim=True).view(A.shape)
                g_A = g_A_t if g_A is None else g_A.add_(g_A_t)
        return g_delta, g_scale, g_A, g_B, g_C


def causal_conv1d_silu_ref(x, weight, bias):
    """silu of the causal depthwise convolution of x: per channel e,
    y_t = silu(bias_e + sum_k weight_{e,k} x_{t-(K-1)+k}), x_t = 0 for t < 0.
    x: (b, E, L); weight: (E, K); bias: (E,) or None -> (b, E, L). A pair of directions, as in
    `selective_scan_ref`, is one call with weight: (2, E, K), bias: (2, E) or None: rows
    [b/2, b) run backward in time with set 1 (their convolution is anti-causal in stored order)."""
    if weight.ndim == 3:
        y = [causal_conv1d_silu_ref(_direction(x, i), weight[i], _direction_param(bias, i))
             for i in (0, 1)]
        return torch.cat([y[0], y[1].flip(-1)])
    length, taps = x.shape[-1], weight.shape[1]
    return F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=taps - 1,
                           groups=weight.shape[0])[..., :length])


class MambaMixer(nn.Module):
    """The Mamba block of mamba_ssm (same parameters, same computation) around a selective scan
    with the signature of `selective_scan_ref` (`scan`: that function or the Triton kernel) and
    a causal convolution with that of `causal_conv1d_silu_ref` (`conv`: it or its kernel).

    pair_directions=True: a bidirectional layer of two such mixers runs them as one computation
    (`bidirectional_mamba`), with half as many, larger kernels; the Triton path does, the plain
    path keeps the directions apart, as the reference."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 scan=selective_scan_recompute, conv=causal_conv1d_silu_ref,
                 pair_directions=False):
        super().__init__()
        self.scan, self.conv, self.pair_directions = scan, conv, pair_directions
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
        if self.scan is selective_scan_recompute and torch.is_grad_enabled():
            # on the plain path (CPU) the block is recomputed in the backward pass, so training
            # memory holds each block's input only, and the scan keeps a few states of one block
            # at a time (the same numbers: recomputing is exact)
            return checkpoint(self._block, hidden, use_reentrant=False)
        return self._block(hidden)

    def _block(self, hidden):
        # split before transposing: the gradients of x and z then join into the (b, L, 2E)
        # layout in_proj's backward multiplies with, not into one it has to copy first
        x, z = (part.transpose(1, 2) for part in self.in_proj(hidden).chunk(2, dim=-1))
        x = self.conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias)    # (b, E, L)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)              # (b, L, .)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)                    # (b, E, L)
        A = -torch.exp(self.A_log.float())                                   # (E, N)
        y = self.scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z=z,
                      delta_bias=self.dt_proj.bias, delta_softplus=True)             # (b, E, L)
        return self.out_proj(y.transpose(1, 2))


def bidirectional_mamba(forward_mixer, backward_mixer, hidden):
    """Two Mamba blocks of one shape as one computation: `forward_mixer` on hidden[0] in time
    order, `backward_mixer` on hidden[1] in reverse time order (both may be one mixer). Their
    projections are batched products over the two parameter sets and their convolution and scan
    are one call each on a pair of directions (`selective_scan_ref`'s doc), so nothing is
    flipped and each kernel is launched once for both.
    hidden: (2, b, L, d) -> (2, b, L, d), both in time order."""
    pair, b, length, d_model = hidden.shape
    first = forward_mixer

    def both(get):
        """A parameter of the two mixers stacked: (2, ...)."""
        return torch.stack([get(forward_mixer), get(backward_mixer)])

    def project(x, name, bias=True):
        """Both mixers' Linear `name` on x: (2, n, in) -> (2, n, out)."""
        weight = both(lambda m: getattr(m, name).weight).transpose(1, 2)
        if bias and getattr(first, name).bias is not None:
            return torch.baddbmm(both(lambda m: getattr(m, name).bias)[:, None], x, weight)
        return torch.bmm(x, weight)

    # rows [0, b) run forward in time, rows [b, 2b) backward: a pair of directions
    x, z = (part.transpose(1, 2) for part in                                 # (2b, E, L) each
            project(hidden.view(pair, b * length, d_model), "in_proj")
            .view(pair * b, length, -1).chunk(2, dim=-1))
    x = first.conv(x, both(lambda m: m.conv1d.weight.squeeze(1)),
                   both(lambda m: m.conv1d.bias) if first.conv1d.bias is not None else None)
    dt, B, C = project(x.transpose(1, 2).reshape(pair, b * length, -1), "x_proj").split(
        [first.dt_rank, first.d_state, first.d_state], dim=-1)               # (2, b L, .)
    dt = project(dt, "dt_proj", bias=False).view(pair * b, length, -1).transpose(1, 2)
    B, C = (t.reshape(pair * b, length, -1).transpose(1, 2) for t in (B, C))   # (2b, N, L)
    A = -torch.exp(both(lambda m: m.A_log).float())                          # (2, E, N)
    y = first.scan(x, dt, A, B, C, both(lambda m: m.D), z=z,
                   delta_bias=both(lambda m: m.dt_proj.bias), delta_softplus=True)  # (2b, E, L)
    out = project(y.transpose(1, 2).reshape(pair, b * length, -1), "out_proj")
    return out.view(pair, b, length, d_model)


def _gpu_and_package(name):
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def cuda_mamba_available():
    """A GPU and the mamba-ssm package."""
    return _gpu_and_package("mamba_ssm")


def triton_scan_available():
    """A GPU and Triton."""
    return _gpu_and_package("triton")


IMPL_NEEDS = {"triton": (triton_scan_available, "Triton (it ships with CUDA builds of torch)"),
              "cuda": (cuda_mamba_available,
                       "the mamba-ssm package (pip install mamba-ssm --no-build-isolation)")}
IMPL_NAMES = {"plain": "plain-PyTorch selective scan",
              "triton": "Triton short-sequence selective scan and causal convolution",
              "cuda": "mamba_ssm.Mamba (CUDA selective scan)"}


def resolve_mamba_impl(impl, device=None, max_frames=None):
    """'plain', 'triton' or 'cuda' for a model meant for `device` (None: the GPU when there is
    one) whose sequences are at most `max_frames` long; decided once, at construction."""
    if impl not in MAMBA_IMPLS:
        raise ValueError(f"model.mamba_impl must be one of {MAMBA_IMPLS}, got '{impl}'")
    on_gpu = device is None or torch.device(device).type == "cuda"
    if impl == "auto":
        short = max_frames is not None and max_frames <= SHORT_SCAN_MAX_FRAMES
        preferred = ("triton", "cuda") if short else ("cuda", "triton")
        impl = next((name for name in preferred if on_gpu and IMPL_NEEDS[name][0]()), "plain")
    elif impl in IMPL_NEEDS:
        available, package = IMPL_NEEDS[impl]
        if not (on_gpu and available()):
            raise UserError(f"model.mamba_impl='{impl}' needs a CUDA device, a model on it "
                            f"and {package}")
    return impl


def make_mamba(d_model, d_state, d_conv, expand, impl):
    """A Mamba mixer of a resolved implementation ('plain', 'triton' or 'cuda')."""
    if impl == "cuda":
        from mamba_ssm import Mamba
        return Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    scan, conv = selective_scan_recompute, causal_conv1d_silu_ref
    if impl == "triton":
        from model.conv_triton import causal_conv1d_silu_triton as conv
        from model.scan_triton import selective_scan_triton as scan
    return MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, scan=scan,
                      conv=conv, pair_directions=impl == "triton")
