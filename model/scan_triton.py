"""Selective scan in Triton for short sequences (tens to a few hundred frames).

The same function as `model.mamba.selective_scan_ref` (same arguments, same float32 arithmetic),
written for the shapes of S5VH training: many channels (b * E = 256 * 512) and few time steps
(L = 13 visible frames in the encoder, 25 in the decoder). One program owns a block of channels
of one video; the (channels, N) state lives in registers and the program walks the L steps
itself, so nothing is reduced across programs except dB and dC, which each program writes as a
partial sum that one `sum` adds up (no atomics).

The backward pass recomputes the states of the forward pass and runs the reverse recurrence
    g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t        (g_t = dLoss/dh_t)
from which every input gradient follows step by step. It needs the states in reverse order, so
it walks the sequence in segments of `segment` steps, last segment first: a first forward walk
keeps only the state entering each segment (a checkpoint), and each segment recomputes its own
states from its checkpoint into a small per-program scratch buffer just before its reverse
walk. The scratch is (segments - 1) + (segment - 1) states of (channels, N) per program instead
of L - 1 (at S5VH's shapes every state of every program is b * E * L * N floats, hundreds of
MB, written and read back once), at the price of computing the forward recurrence twice; on the
H200 that is faster (README, "GPU speed"). Work and memory are linear in L; the
programs are sequential in L, so very long sequences with few channels are better served by
mamba_ssm's chunked kernel (`model.mamba_impl='cuda'`).

A pair of directions (`selective_scan_ref`'s doc) is one launch: the programs of the second
half's rows take the second parameter set and walk time backward, reading and writing in place.

Shapes: u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L); D, delta_bias: (E,). Any strides.
The letters are mamba_ssm's and local to the scan (docs/method.md §2): E channels, N states, L
steps, and B, C, D the state-space matrices.
"""
import torch
import triton
import triton.language as tl

# Channels per program, warps per program, steps per segment of the backward pass (above;
# SEGMENT >= L keeps every state, as one segment) and steps of every time loop in flight at once
# (Triton's software pipelining of the loop's loads; 1: none ahead). The fastest of 32/64/128
# channels x 1/2 warps x 3/4/5/8/all steps x 1/2/3 stages for S5VH's training shapes on an
# H200 (`python -m tools.bench_scan --sweep`; 4-8 stages were no faster).
BLOCK_E = 64
NUM_WARPS = 1
SEGMENT = 5
STAGES = 3
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)   # as torch.nn.functional.softplus: identity above it
# Arguments that change with the batch (a full one, an epoch's last, an evaluation chunk) are
# not specialised on (== 1, divisible by 16): each kind of value would compile the kernel again
# (one ucf_dev run compiled 16 kernels in 10 s on an H200 with an empty Triton cache)
PER_BATCH_ARGS = ["ROWS_PER_PAIR"]


@triton.jit
def _softplus(x):
    # exp of the clipped value: the branch not taken must not overflow either
    return tl.where(x > SOFTPLUS_THRESHOLD, x,
                    tl.log(1.0 + tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))


@triton.jit
def _load_step(ptr, b, rows, t, stride_b, stride_row, stride_t, mask):
    """One time step of a (b, rows, L) tensor for one video as float32: (len(rows),)."""
    return tl.load(ptr + b * stride_b + rows * stride_row + t * stride_t, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _channel_params(A_ptr, D_ptr, bias_ptr, pair, e, n, e_ok, n_ok, E, N: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """A (BLOCK, N_PAD), D and delta_bias (BLOCK,) of a block of channels of direction `pair`
    (0, or 1 for a paired scan's time-reversed half)."""
    A_ptr, D_ptr, bias_ptr = A_ptr + pair * E * N, D_ptr + pair * E, bias_ptr + pair * E
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=e_ok[:, None] & n_ok[None, :],
                other=0.0)
    Dv = tl.load(D_ptr + e, mask=e_ok, other=0.0)
    bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0) if HAS_BIAS else 0.0
    return A, Dv, bias


@triton.jit
def _stored_step(t, pair, L):
    """Where step t of a walk through time is stored: t, or L - 1 - t in a pair's time-reversed
    half."""
    return t + pair * (L - 1 - 2 * t)


@triton.jit
def _input_and_step(u_ptr, dt_ptr, b, e, t, su_b, su_e, su_l, sdt_b, sdt_e, sdt_l, bias, e_ok,
                    SOFTPLUS: tl.constexpr):
    """u_t, delta_t + bias (before softplus) and the step size dt_t of a block of channels."""
    u = _load_step(u_ptr, b, e, t, su_b, su_e, su_l, e_ok)
    dt_in = _load_step(dt_ptr, b, e, t, sdt_b, sdt_e, sdt_l, e_ok) + bias
    dt = _softplus(dt_in) if SOFTPLUS else dt_in
    return u, dt_in, dt


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _scan_fwd_kernel(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, y_ptr,
                     E, L, ROWS_PER_PAIR,
                     su_b, su_e, su_l, sdt_b, sdt_e, sdt_l, sz_b, sz_e, sz_l,
                     sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_e, sy_l,
                     N: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pair = b // ROWS_PER_PAIR
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                         # (BLOCK,)
    n = tl.arange(0, N_PAD)                                                    # (N_PAD,)
    e_ok, n_ok = e < E, n < N
    A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, pair, e, n, e_ok, n_ok, E, N,
                                  HAS_BIAS)
    h = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)
    for step in tl.range(L, num_stages=STAGES):
        t = _stored_step(step, pair, L)
        u, _, dt = _input_and_step(u_ptr, dt_ptr, b, e, t, su_b, su_e, su_l, sdt_b, sdt_e,
                                   sdt_l, bias, e_ok, SOFTPLUS)
        Bt = _load_step(B_ptr, b, n, t, sB_b, sB_n, sB_l, n_ok)
        Ct = _load_step(C_ptr, b, n, t, sC_b, sC_n, sC_l, n_ok)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
        if HAS_Z:
            zt = _load_step(z_ptr, b, e, t, sz_b, sz_e, sz_l, e_ok)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_ptr + b * sy_b + e * sy_e + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=e_ok)


@triton.jit
def _recurrence_step(u_ptr, dt_ptr, B_ptr, b, e, n, t, su_b, su_e, su_l, sdt_b, sdt_e, sdt_l,
                     sB_b, sB_n, sB_l, A, bias, e_ok, n_ok, h, SOFTPLUS: tl.constexpr):
    """h_t from h_{t-1}: (BLOCK, N_PAD)."""
    u, _, dt = _input_and_step(u_ptr, dt_ptr, b, e, t, su_b, su_e, su_l, sdt_b, sdt_e, sdt_l,
                               bias, e_ok, SOFTPLUS)
    Bt = _load_step(B_ptr, b, n, t, sB_b, sB_n, sB_l, n_ok)
    return tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _scan_bwd_kernel(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dout_ptr,
                     scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dBC_ptr, dparams_ptr, E, L,
                     ROWS_PER_PAIR, SEG,
                     su_b, su_e, su_l, sdt_b, sdt_e, sdt_l, sz_b, sz_e, sz_l,
                     sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, so_b, so_e, so_l,
                     sg_b, sg_e, sg_l,
                     N: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     STAGES: tl.constexpr):
    """Gradients of one block of channels of one video, in segments of SEG steps.

    du, ddt, dz are written with the strides sg_* (one layout for the three). The reductions are
    partial sums the caller adds up, each kind in one buffer so that one sum adds it: over
    channels dB and dC as dBC (b, blocks, 2, N, L), over videos dA, dD and dbias as dparams
    (b, E, N + 2). The program's scratch holds (segments - 1) checkpoints,
    slot s - 1 the state h_{s SEG - 1} entering segment s, then SEG - 1 states of the segment
    being walked.
    """
    b = tl.program_id(0).to(tl.int64)
    pair = b // ROWS_PER_PAIR
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    e = block * BLOCK + tl.arange(0, BLOCK)
    n = tl.arange(0, N_PAD)
    e_ok, n_ok = e < E, n < N
    TILE: tl.constexpr = BLOCK * N_PAD
    tile = tl.arange(0, BLOCK)[:, None] * N_PAD + n[None, :]                  # (BLOCK, N_PAD)
    A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, pair, e, n, e_ok, n_ok, E, N,
                                  HAS_BIAS)
    segments = tl.cdiv(L, SEG)
    scratch = scratch_ptr + (b * blocks + block) * (segments + SEG - 2) * TILE   # this program's
    walked = segments - 1                                 # first slot of the segment's states

    # forward walk, keeping the checkpoints
    h = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)
    for t in tl.range(L - 1, num_stages=STAGES):
        h = _recurrence_step(u_ptr, dt_ptr, B_ptr, b, e, n, _stored_step(t, pair, L), su_b,
                             su_e, su_l, sdt_b, sdt_e, sdt_l, sB_b, sB_n, sB_l, A, bias, e_ok,
                             n_ok, h, SOFTPLUS)
        if (t + 1) % SEG == 0:
            tl.store(scratch + ((t + 1) // SEG - 1) * TILE + tile, h)

    carry = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)     # exp(delta_{t+1} A) g_{t+1}
    dA_sum = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)
    dD_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for back in range(segments):
        s = segments - 1 - back
        first = s * SEG
        last = tl.minimum(first + SEG, L) - 1
        # the segment's states again from its checkpoint (h_{-1} = 0: the mask, all of
        # tile < s * TILE, is true iff s > 0); h_first .. h_{last-1} to the scratch, h_last kept
        tl.debug_barrier()   # every thread has read the previous segment's states, and the
        #                      checkpoints are written, before this segment's are
        h = tl.load(scratch + (s - 1) * TILE + tile, mask=tile < s * TILE, other=0.0)
        for t in tl.range(first, last + 1, num_stages=STAGES):
            h = _recurrence_step(u_ptr, dt_ptr, B_ptr, b, e, n, _stored_step(t, pair, L),
                                 su_b, su_e, su_l, sdt_b, sdt_e, sdt_l, sB_b, sB_n, sB_l, A,
                                 bias, e_ok, n_ok, h, SOFTPLUS)
            if t < last:
                tl.store(scratch + (walked + t - first) * TILE + tile, h)
        tl.debug_barrier()   # the reverse walk reads states other threads of the program wrote

        for step in tl.range(last + 1 - first, num_stages=STAGES):
            t = last - step
            at = _stored_step(t, pair, L)
            u, dt_in, dt = _input_and_step(u_ptr, dt_ptr, b, e, at, su_b, su_e, su_l, sdt_b,
                                           sdt_e, sdt_l, bias, e_ok, SOFTPLUS)
            Bt = _load_step(B_ptr, b, n, at, sB_b, sB_n, sB_l, n_ok)
            Ct = _load_step(C_ptr, b, n, at, sC_b, sC_n, sC_l, n_ok)
            dy = _load_step(dout_ptr, b, e, at, so_b, so_e, so_l, e_ok)
            # h holds h_t; h_{t-1} is the segment's state before it, or at the segment's first
            # step its checkpoint (zero at t = 0: the mask is true iff t > 0). Each is read
            # once and becomes h of the next (earlier) step.
            slot = tl.where(t > first, walked + t - first - 1, s - 1)
            h_prev = tl.load(scratch + slot * TILE + tile, mask=tile < t * TILE, other=0.0)
            if HAS_Z:
                zt = _load_step(z_ptr, b, e, at, sz_b, sz_e, sz_l, e_ok)
                gate = tl.sigmoid(zt)
                y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                dz = dy * y * gate * (1.0 + zt * (1.0 - gate))
                tl.store(dz_ptr + b * sg_b + e * sg_e + at * sg_l,
                         dz.to(dz_ptr.dtype.element_ty), mask=e_ok)
                dy = dy * zt * gate
            g = carry + dy[:, None] * Ct[None, :]                              # dLoss/dh_t
            decay = tl.exp(dt[:, None] * A)
            g_decay_h = g * decay * h_prev
            g_B = tl.sum(g * Bt[None, :], axis=1)                              # (BLOCK,)
            ddt = tl.sum(g_decay_h * A, axis=1) + g_B * u
            du = g_B * dt + Dv * dy
            dA_sum += g_decay_h * dt[:, None]
            dD_sum += dy * u
            if SOFTPLUS:
                ddt = tl.where(dt_in > SOFTPLUS_THRESHOLD, ddt, ddt * tl.sigmoid(dt_in))
            dbias_sum += ddt
            tl.store(du_ptr + b * sg_b + e * sg_e + at * sg_l, du.to(du_ptr.dtype.element_ty),
                     mask=e_ok)
            tl.store(ddt_ptr + b * sg_b + e * sg_e + at * sg_l,
                     ddt.to(ddt_ptr.dtype.element_ty), mask=e_ok)
            partial = dBC_ptr + ((b * blocks + block) * 2 * N + n) * L + at
            tl.store(partial, tl.sum(g * (dt * u)[:, None], axis=0), mask=n_ok)       # dB
            tl.store(partial + N * L, tl.sum(h * dy[:, None], axis=0), mask=n_ok)     # dC
            carry = g * decay
            h = h_prev
    params = dparams_ptr + (b * E + e) * (N + 2)                              # (BLOCK,)
    tl.store(params[:, None] + n[None, :], dA_sum, mask=e_ok[:, None] & n_ok[None, :])
    tl.store(params + N, dD_sum, mask=e_ok)
    tl.store(params + N + 1, dbias_sum, mask=e_ok)


def _rows_per_pair(b, params):
    """Rows of each direction: b for one parameter set (A: (E, N), a convolution's weight:
    (E, K)), b / 2 for a pair's (2, E, N) or (2, E, K)."""
    return b // 2 if params.ndim == 3 else b


def _channels_last(b, E, L, like):
    """An empty (b, E, L) tensor like `like`, stored (b, L, E): the layout the projections use."""
    return torch.empty(b, L, E, device=like.device, dtype=like.dtype).transpose(1, 2)


class _SelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, num_warps,
                segment, stages):
        b, E, L = u.shape
        N = A.shape[-1]
        A, D = A.float().contiguous(), D.float().contiguous()
        bias = delta_bias.float().contiguous() if delta_bias is not None else D
        zz = z if z is not None else u
        y = _channels_last(b, E, L, u)
        grid = (b, triton.cdiv(E, block))
        _scan_fwd_kernel[grid](
            u, delta, zz, B, C, A, D, bias, y, E, L, _rows_per_pair(b, A),
            *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *y.stride(),
            N=N, N_PAD=triton.next_power_of_2(N), BLOCK=block, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), STAGES=stages,
            num_warps=num_warps)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.options = (bool(delta_softplus), block, num_warps, segment, stages)
        return y

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        delta_softplus, block, num_warps, segment, stages = ctx.options
        b, E, L = u.shape
        N = A.shape[-1]
        N_PAD = triton.next_power_of_2(N)
        blocks = triton.cdiv(E, block)
        f32 = dict(device=u.device, dtype=torch.float32)
        bias = delta_bias.float().contiguous() if delta_bias is not None else D
        zz = z if z is not None else u
        # du, ddelta, dz share one (b, L, E) layout, the one the projections produced them in
        du = _channels_last(b, E, L, u)
        ddelta = _channels_last(b, E, L, delta)
        dz = _channels_last(b, E, L, z) if z is not None else du     # unused without z
        segment = min(segment, L)
        slots = triton.cdiv(L, segment) + segment - 2          # per program (the kernel's doc)
        scratch = torch.empty(b * blocks * max(slots, 1) * block * N_PAD, **f32)
        dBC = torch.empty(b, blocks, 2, N, L, **f32)
        dparams = torch.empty(b, E, N + 2, **f32)
        _scan_bwd_kernel[(b, blocks)](
            u, delta, zz, B, C, A, D, bias, dout, scratch, du, ddelta, dz, dBC, dparams, E, L,
            _rows_per_pair(b, A), segment,
            *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(),
            *dout.stride(), *du.stride(),
            N=N, N_PAD=N_PAD, BLOCK=block, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, STAGES=stages,
            num_warps=num_warps)
        dB, dC = dBC.sum(1).unbind(1)
        # one sum per direction: (directions, b / directions, E, N + 2) -> (directions, E, N + 2)
        directions = A.shape[0] if A.ndim == 3 else 1
        sums = dparams.view(directions, b // directions, E, N + 2).sum(1)
        dA, dD, dbias = sums.view(A.shape[:-1] + (N + 2,)).split((N, 1, 1), dim=-1)
        return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD.squeeze(-1),
                dz if z is not None else None,
                dbias.squeeze(-1) if delta_bias is not None else None, None, None, None, None,
                None)


def selective_scan_triton(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True,
                          *, block=BLOCK_E, num_warps=NUM_WARPS, segment=SEGMENT,
                          stages=STAGES):
    """`selective_scan_ref` as two Triton kernels (forward; backward with recomputation).

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L); D, delta_bias: (E,); all on one CUDA
    device. A pair of directions (`selective_scan_ref`'s doc) has A: (2, E, N) and D,
    delta_bias: (2, E); its time-reversed rows are read and written in place, not flipped.
    `block` channels per program and `num_warps` per program tune the kernels, `segment` the
    backward pass's steps per segment (the module's doc), `stages` how many steps' loads the
    compiler keeps in flight (1: none ahead).
    Returns y: (b, E, L) in the dtype of u (stored (b, L, E)-major).
    """
    b, E, L = u.shape
    N = A.shape[-1]
    sets = (2,) if A.ndim == 3 else ()
    expected = {"delta": (delta, (b, E, L)), "A": (A, sets + (E, N)), "B": (B, (b, N, L)),
                "C": (C, (b, N, L)), "D": (D, sets + (E,)), "z": (z, (b, E, L)),
                "delta_bias": (delta_bias, sets + (E,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective scan: {name} must have shape {shape}, "
                             f"got {tuple(tensor.shape)}")
    if sets and b % 2:
        raise ValueError(f"selective scan: a pair of directions needs an even number of rows, "
                         f"got {b}")
    if segment < 1:
        raise ValueError(f"selective scan: segment must be at least 1, got {segment}")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block,
                                num_warps, segment, stages)
