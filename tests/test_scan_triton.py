"""The Triton selective scan against the plain-PyTorch reference: values and every gradient.

On a GPU the compiled kernels run; without one, Triton's interpreter runs the same kernels on
the CPU (tests/conftest.py switches it on).
"""
import functools

import pytest
import torch

pytest.importorskip("triton")

from model.conv_triton import causal_conv1d_silu_triton  # noqa: E402
from model.mamba import (MambaMixer, causal_conv1d_silu_ref, resolve_mamba_impl,  # noqa: E402
                         selective_scan_ref)
from model.s5vh import BidirectionalLayer  # noqa: E402
from model.scan_triton import BLOCK_E, selective_scan_triton  # noqa: E402
from utils.errors import UserError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan_inputs(b, E, L, N, z=True, bias=True, seed=0):
    """Inputs in the layouts the mixer produces them in (several non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    inputs = {
        "u": rand(b, L, E).transpose(1, 2),                  # (b, E, L) stored (b, L, E)
        "delta": rand(b, E, L, scale=0.5),
        "A": -(torch.rand(E, N, generator=gen) + 0.5).to(DEVICE),
        "B": rand(b, L, N).transpose(1, 2),
        "C": rand(b, N, L),
        "D": rand(E),
        "z": rand(b, L, E).transpose(1, 2) if z else None,
        "delta_bias": rand(E) if bias else None,
    }
    return {k: v.requires_grad_() if v is not None else None for k, v in inputs.items()}


def value_and_grads(scan, inputs, grad_out, softplus=True):
    y = scan(**inputs, delta_softplus=softplus)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(y, [inputs[k] for k in names], grad_out)
    return y, dict(zip(names, grads))


def assert_close(got, want, name, rtol=1e-5):
    scale = want.abs().max().clamp(min=1e-6)
    assert (got.float() - want.float()).abs().max() <= rtol * scale * 10, name


@pytest.mark.parametrize("b,E,L,N,z,bias,softplus", [
    (2, BLOCK_E + 16, 9, 16, True, True, True),   # two channel blocks, the last partial
    (3, 24, 5, 12, False, False, False),     # N not a power of two; no gate, bias or softplus
    (1, 8, 1, 4, True, True, True),          # a single step
    (2, 16, 30, 16, True, True, True),       # more steps than S5VH's 25
])
def test_triton_scan_matches_reference(b, E, L, N, z, bias, softplus):
    inputs = scan_inputs(b, E, L, N, z, bias)
    grad_out = torch.randn(b, E, L, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y_ref, g_ref = value_and_grads(selective_scan_ref, inputs, grad_out, softplus)
    y, g = value_and_grads(selective_scan_triton, inputs, grad_out, softplus)
    assert y.shape == (b, E, L) and y.dtype == torch.float32
    assert_close(y, y_ref, "y")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        assert_close(g[name], g_ref[name], name)


@pytest.mark.parametrize("L, segments", [(7, (1, 3, 7, 12)), (12, (4,))])
def test_triton_scan_backward_matches_reference_for_every_segment_length(L, segments):
    """Segments of 1 step, of several (the last one shorter, or not), one segment (every state
    kept) and a segment longer than the sequence all give the reference's gradients."""
    inputs = scan_inputs(2, 24, L, 8)
    grad_out = torch.randn(2, 24, L, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _, want = value_and_grads(selective_scan_ref, inputs, grad_out)
    for segment in segments:
        _, got = value_and_grads(functools.partial(selective_scan_triton, segment=segment),
                                 inputs, grad_out)
        for name in want:
            assert_close(got[name], want[name], f"{name}, segment {segment}")


def test_triton_scan_large_softplus_inputs_follow_torch_threshold():
    inputs = scan_inputs(1, 8, 4, 4)
    with torch.no_grad():
        inputs["delta"][:, :, 1:3] += 100.0         # exp overflows float32 without the threshold
        inputs["A"].mul_(0.01)                       # keep the decay away from exact zero
    grad_out = torch.ones(1, 8, 4, device=DEVICE)
    y_ref, g_ref = value_and_grads(selective_scan_ref, inputs, grad_out)
    y, g = value_and_grads(selective_scan_triton, inputs, grad_out)
    assert_close(y, y_ref, "y")
    for name in g_ref:
        assert_close(g[name], g_ref[name], name)


def test_triton_scan_keeps_bf16_inputs_and_computes_in_float32():
    inputs = scan_inputs(2, BLOCK_E, 7, 16)
    low = {k: v.detach().to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v.detach()
           for k, v in inputs.items()}
    y = selective_scan_triton(**low)
    want = selective_scan_ref(**{k: v.float() if v is not None else None for k, v in low.items()})
    assert y.dtype == torch.bfloat16
    assert_close(y, want, "y", rtol=1e-2)                                   # bf16 rounding of y


def test_triton_scan_rejects_mismatched_shapes():
    inputs = {k: v.detach() if v is not None else None for k, v in scan_inputs(2, 8, 5, 4).items()}
    inputs["C"] = inputs["C"][:, :, :4]
    with pytest.raises(ValueError, match=r"C must have shape \(2, 4, 5\)"):
        selective_scan_triton(**inputs)
    inputs["C"] = inputs["B"]
    with pytest.raises(ValueError, match="segment must be at least 1, got 0"):
        selective_scan_triton(**inputs, segment=0)


def direction_by_direction(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """A pair of directions as its definition: two reference scans, the second on its rows
    reversed in time, with parameter sets 0 and 1."""
    b = u.shape[0] // 2
    forward = selective_scan_ref(u[:b], delta[:b], A[0], B[:b], C[:b], D[0], z[:b],
                                 delta_bias[0], delta_softplus)
    backward = selective_scan_ref(*(t[b:].flip(-1) for t in (u, delta)), A[1],
                                  *(t[b:].flip(-1) for t in (B, C)), D[1], z[b:].flip(-1),
                                  delta_bias[1], delta_softplus)
    return torch.cat([forward, backward.flip(-1)])


@pytest.mark.parametrize("scan", [selective_scan_ref, selective_scan_triton])
def test_a_pair_of_directions_is_two_scans_one_reversed_in_time(scan):
    inputs = scan_inputs(4, 24, 7, 8)                  # 2 rows of each direction
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():                              # a second parameter set, unlike the first
        inputs["A"] = torch.stack([inputs["A"], inputs["A"] * 0.5 - 0.2])
        inputs["D"], inputs["delta_bias"] = (torch.stack([t, torch.randn(24, generator=gen)
                                                          .to(DEVICE)])
                                             for t in (inputs["D"], inputs["delta_bias"]))
    for name in ("A", "D", "delta_bias"):
        inputs[name].requires_grad_()
    grad_out = torch.randn(4, 24, 7, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y_ref, g_ref = value_and_grads(direction_by_direction, inputs, grad_out)
    y, g = value_and_grads(scan, inputs, grad_out)
    assert_close(y, y_ref, "y")
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        assert_close(g[name], g_ref[name], name)


def test_paired_bidirectional_layer_matches_direction_by_direction():
    """The Triton path's layer (both directions as one computation, no flips) against the plain
    path's (one mixer after the other on flipped sequences), with the same weights."""
    torch.manual_seed(0)
    layers = [BidirectionalLayer(8, make_mixer).to(DEVICE)
              for make_mixer in (MambaMixer, functools.partial(
                  MambaMixer, scan=selective_scan_triton, conv=causal_conv1d_silu_triton,
                  pair_directions=True))]
    reference, paired = layers
    paired.load_state_dict(reference.state_dict())
    assert paired.paired and not reference.paired
    h = torch.randn(2, 7, 8, device=DEVICE)
    out = [layer(h) for layer in layers]
    for o in out:
        o.square().sum().backward()
    assert torch.allclose(out[1], out[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), paired.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("conv", [causal_conv1d_silu_ref, causal_conv1d_silu_triton])
def test_mamba_mixer_with_triton_scan_matches_reference_mixer(conv):
    torch.manual_seed(0)
    reference = MambaMixer(8).to(DEVICE)
    fast = MambaMixer(8, scan=selective_scan_triton, conv=conv).to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 9, 8, device=DEVICE)
    for mixer in (reference, fast):
        mixer(x).square().sum().backward()
    assert torch.allclose(fast(x), reference(x), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-5), name


def test_implementation_choice():
    assert resolve_mamba_impl("auto", "cpu", 25) == "plain"
    assert resolve_mamba_impl("plain", "cuda", 25) == "plain"
    with pytest.raises(ValueError, match="model.mamba_impl must be one of"):
        resolve_mamba_impl("fast")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="model.mamba_impl='triton' needs a CUDA device"):
            resolve_mamba_impl("triton", "cpu")
    else:
        assert resolve_mamba_impl("auto", "cuda", 25) == "triton"
        assert resolve_mamba_impl("auto", "cuda", 10_000) in ("cuda", "triton")   # cuda if installed
        assert resolve_mamba_impl("triton", "cuda", 10_000) == "triton"
