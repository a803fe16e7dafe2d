"""The Mamba block's causal depthwise convolution and SiLU, fused, in Triton.

The same function as `model.mamba.causal_conv1d_silu_ref`: per channel e,
    y_t = silu(bias_e + sum_k w_{e,k} x_{t-(K-1)+k}),   x_t = 0 for t < 0,
in float32 arithmetic. PyTorch runs it as a generic depthwise convolution, a slice and a SiLU,
and the convolution's backward pass alone took about 100 us per call at S5VH's training shapes
(256 rows x 512 channels x 13 frames, H200): a fifth of the training step with the forward. Here
one program owns a block of channels of one video and walks the L steps, reading K inputs a
step; the backward pass recomputes the pre-activations, so nothing but x is kept.

Shapes: x (b, E, L), any strides; weight (E, K); bias (E,). E channels, K taps (mamba_ssm's
d_conv), L steps; local to the convolution, as the scan's letters are (docs/method.md §2).
"""
import torch
import triton
import triton.language as tl

# the pair convention and the output layout are the scan's, so the two kernels agree on them
from model.scan_triton import PER_BATCH_ARGS, _channels_last, _rows_per_pair, _stored_step

# Channels per program, warps per program and steps of every time loop in flight at once
# (Triton's software pipelining of the loop's loads; 1: none ahead): the fastest of 32-256
# channels x 1/2/4 warps x 1/2/3 stages at S5VH's training shapes on an H200
# (`python -m tools.bench_scan --conv --sweep`).
BLOCK_E = 128
NUM_WARPS = 4
STAGES = 1


@triton.jit
def _tap(w_ptr, e, e_ok, k, K: tl.constexpr):
    """Tap k of a block of channels' weights: (BLOCK,) float32 (read once per step; cached)."""
    return tl.load(w_ptr + e * K + k, mask=e_ok, other=0.0).to(tl.float32)


@triton.jit
def _input(x_ptr, b, e, src, pair, L, sx_b, sx_e, sx_l, e_ok):
    """x at step `src` (0 before the first step) of a block of channels: (BLOCK,) float32."""
    steps = e * 0 + src                      # the step as a vector: masks are per element
    return tl.load(x_ptr + b * sx_b + e * sx_e + _stored_step(src, pair, L) * sx_l,
                   mask=e_ok & (steps >= 0), other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_ptr, w_ptr, bias, b, e, t, pair, L, sx_b, sx_e, sx_l, e_ok,
                    K: tl.constexpr):
    """s_t = bias + sum_k w_k x_{t-(K-1)+k} of a block of channels: (BLOCK,) float32."""
    s = bias
    for k in tl.static_range(K):
        s += _tap(w_ptr, e, e_ok, k, K) * _input(x_ptr, b, e, t - (K - 1) + k, pair, L, sx_b,
                                                  sx_e, sx_l, e_ok)
    return s


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, E, L, ROWS_PER_PAIR, sx_b, sx_e, sx_l,
                     sy_b, sy_e, sy_l, K: tl.constexpr, BLOCK: tl.constexpr,
                     STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pair = b // ROWS_PER_PAIR              # 0, or 1 in a pair's time-reversed half
    w_ptr, bias_ptr = w_ptr + pair * E * K, bias_ptr + pair * E
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < E
    bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    for t in tl.range(L, num_stages=STAGES):
        s = _pre_activation(x_ptr, w_ptr, bias, b, e, t, pair, L, sx_b, sx_e, sx_l, e_ok, K)
        y = s * tl.sigmoid(s)
        tl.store(y_ptr + b * sy_b + e * sy_e + _stored_step(t, pair, L) * sy_l,
                 y.to(y_ptr.dtype.element_ty), mask=e_ok)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, ds_ptr, dx_ptr, dparams_ptr, E, L,
                     ROWS_PER_PAIR, sx_b, sx_e, sx_l, sdy_b, sdy_e, sdy_l, sdx_b, sdx_e, sdx_l,
                     K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     STAGES: tl.constexpr):
    """First pass: ds_t = dy_t silu'(s_t) into ds_ptr ((b, E, L) float32, contiguous), and the
    video's partial sums of dw and dbias, in one buffer (b, E K + E) for one sum whose dw (E, K)
    and dbias (E,) are contiguous slices (a strided gradient would be copied by autograd).
    Second pass: dx_t = sum_k w_k ds_{t+(K-1)-k}. ds is kept in the pass's time order."""
    b = tl.program_id(0).to(tl.int64)
    pair = b // ROWS_PER_PAIR
    w_ptr, bias_ptr = w_ptr + pair * E * K, bias_ptr + pair * E
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < E
    taps = tl.arange(0, K_PAD)[None, :]                                        # (1, K_PAD)
    bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK, K_PAD), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    ds_row = ds_ptr + (b * E + e) * L
    for t in tl.range(L, num_stages=STAGES):
        s = _pre_activation(x_ptr, w_ptr, bias, b, e, t, pair, L, sx_b, sx_e, sx_l, e_ok, K)
        gate = tl.sigmoid(s)
        dy = tl.load(dy_ptr + b * sdy_b + e * sdy_e + _stored_step(t, pair, L) * sdy_l,
                     mask=e_ok, other=0.0)
        ds = dy.to(tl.float32) * gate * (1.0 + s * (1.0 - gate))
        tl.store(ds_row + t, ds, mask=e_ok)
        dbias += ds
        for k in tl.static_range(K):
            x = _input(x_ptr, b, e, t - (K - 1) + k, pair, L, sx_b, sx_e, sx_l, e_ok)
            dw += tl.where(taps == k, (ds * x)[:, None], 0.0)
    tl.debug_barrier()   # the second pass reads ds other threads of the program may have written
    for t in tl.range(L, num_stages=STAGES):
        dx = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            dst = t + (K - 1) - k
            ds = tl.load(ds_row + dst, mask=e_ok & (e * 0 + dst < L), other=0.0)
            dx += _tap(w_ptr, e, e_ok, k, K) * ds
        tl.store(dx_ptr + b * sdx_b + e * sdx_e + _stored_step(t, pair, L) * sdx_l,
                 dx.to(dx_ptr.dtype.element_ty), mask=e_ok)
    params = dparams_ptr + b * (E * K + E)                    # this video's dw (E, K), dbias
    tl.store(params + e[:, None] * K + taps, dw, mask=e_ok[:, None] & (taps < K))
    tl.store(params + E * K + e, dbias, mask=e_ok)


class _CausalConvSiLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, block, num_warps, stages):
        b, E, L = x.shape
        weight, bias = weight.contiguous(), bias.contiguous()
        y = _channels_last(b, E, L, x)
        _conv_fwd_kernel[(b, triton.cdiv(E, block))](
            x, weight, bias, y, E, L, _rows_per_pair(b, weight), *x.stride(), *y.stride(),
            K=weight.shape[-1], BLOCK=block, STAGES=stages, num_warps=num_warps)
        ctx.save_for_backward(x, weight, bias)
        ctx.options = (block, num_warps, stages)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        block, num_warps, stages = ctx.options
        b, E, L = x.shape
        K = weight.shape[-1]
        f32 = dict(device=x.device, dtype=torch.float32)
        dx = _channels_last(b, E, L, x)
        ds = torch.empty(b, E, L, **f32)
        dparams = torch.empty(b, E * K + E, **f32)
        _conv_bwd_kernel[(b, triton.cdiv(E, block))](
            x, weight, bias, dy, ds, dx, dparams, E, L, _rows_per_pair(b, weight), *x.stride(),
            *dy.stride(), *dx.stride(), K=K, K_PAD=triton.next_power_of_2(K), BLOCK=block,
            STAGES=stages, num_warps=num_warps)
        # one sum per direction: (directions, b / directions, E K + E) -> (directions, E K + E)
        directions = weight.shape[0] if weight.ndim == 3 else 1
        sums = dparams.view(directions, b // directions, E * K + E).sum(1)
        dw, dbias = sums.view(weight.shape[:-2] + (E * K + E,)).split((E * K, E), dim=-1)
        return (dx, dw.view(weight.shape).to(weight.dtype), dbias.to(bias.dtype), None, None,
                None)


def causal_conv1d_silu_triton(x, weight, bias, *, block=BLOCK_E, num_warps=NUM_WARPS,
                              stages=STAGES):
    """`causal_conv1d_silu_ref` as two Triton kernels (forward; backward with recomputation).

    x: (b, E, L); weight: (E, K); bias: (E,) or None; on one CUDA device. A pair of directions
    (`causal_conv1d_silu_ref`'s doc) has weight: (2, E, K) and bias: (2, E) or None; its
    time-reversed rows are read and written in place, not flipped. Returns y: (b, E, L) in the
    dtype of x, stored (b, L, E)-major. `block` channels per program, `num_warps` and `stages`
    (steps' loads in flight) tune the kernels.
    """
    b, E = x.shape[:2]
    sets = weight.shape[:-2]
    if bias is None:
        bias = weight.new_zeros(sets + (E,))
    if weight.ndim not in (2, 3) or sets not in ((), (2,)) or weight.shape[-2] != E or \
            bias.shape != sets + (E,):
        raise ValueError(f"causal conv: weight must be ({E}, K) and bias ({E},), or (2, {E}, K) "
                         f"and (2, {E}) for a pair, got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if sets and b % 2:
        raise ValueError(f"causal conv: a pair of directions needs an even number of rows, "
                         f"got {b}")
    return _CausalConvSiLU.apply(x, weight, bias, block, num_warps, stages)
