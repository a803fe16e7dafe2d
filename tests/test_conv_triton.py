"""The Triton causal convolution + SiLU against the plain-PyTorch reference: values, every
gradient, layouts and dtypes.

On a GPU the compiled kernels run; without one, Triton's interpreter runs the same kernels on
the CPU (tests/conftest.py switches it on).
"""
import pytest
import torch

pytest.importorskip("triton")

from model.conv_triton import BLOCK_E, causal_conv1d_silu_triton  # noqa: E402
from model.mamba import causal_conv1d_silu_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def conv_inputs(b, E, L, K, seed=0):
    """x as the mixer makes it (a channel half of the projection, stored (b, L, 2E)), weight,
    bias, all requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    projected = torch.randn(b, L, 2 * E, generator=gen).to(DEVICE)
    x = projected.transpose(1, 2)[:, :E].detach().requires_grad_()
    weight = (0.5 * torch.randn(E, K, generator=gen)).to(DEVICE).requires_grad_()
    bias = torch.randn(E, generator=gen).to(DEVICE).requires_grad_()
    return x, weight, bias


def value_and_grads(conv, x, weight, bias, grad_out):
    y = conv(x, weight, bias)
    return y, torch.autograd.grad(y, (x, weight, bias), grad_out)


def assert_close(got, want, name, rtol=1e-5):
    scale = want.abs().max().clamp(min=1e-6)
    assert (got.float() - want.float()).abs().max() <= rtol * scale * 10, name


@pytest.mark.parametrize("b,E,L,K", [
    (2, BLOCK_E + 16, 9, 4),     # two channel blocks, the last partial
    (3, 24, 2, 4),               # fewer steps than taps
    (1, 8, 1, 4),                # a single step
    (2, 16, 25, 3),              # S5VH's decoder length, another kernel size
])
def test_triton_conv_matches_reference(b, E, L, K):
    x, weight, bias = conv_inputs(b, E, L, K)
    grad_out = torch.randn(b, L, E, generator=torch.Generator().manual_seed(1)).to(
        DEVICE).transpose(1, 2)                   # as the next projection's gradient comes
    y_ref, g_ref = value_and_grads(causal_conv1d_silu_ref, x, weight, bias, grad_out)
    y, g = value_and_grads(causal_conv1d_silu_triton, x, weight, bias, grad_out)
    assert y.shape == (b, E, L) and y.dtype == torch.float32
    assert_close(y, y_ref, "y")
    for name, got, want in zip(("x", "weight", "bias"), g, g_ref):
        assert got.shape == want.shape, name
        assert_close(got, want, name)
    # the parameters' gradients are contiguous: autograd would copy strided ones
    assert g[1].is_contiguous() and g[2].is_contiguous()


@pytest.mark.parametrize("conv", [causal_conv1d_silu_ref, causal_conv1d_silu_triton])
def test_a_pair_of_directions_is_two_convolutions_one_reversed_in_time(conv):
    x, weight, bias = conv_inputs(4, 24, 9, 4)                # 2 rows of each direction
    with torch.no_grad():                                     # a second set, unlike the first
        weight, bias = (torch.stack([t, t.flip(0) * 0.5]).requires_grad_()
                        for t in (weight, bias))
    grad_out = torch.randn(4, 24, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = conv(x, weight, bias)
    got = torch.autograd.grad(y, (x, weight, bias), grad_out)
    # the definition: the second half's rows convolved reversed in time with set 1
    forward = causal_conv1d_silu_ref(x[:2], weight[0], bias[0])
    backward = causal_conv1d_silu_ref(x[2:].flip(-1), weight[1], bias[1]).flip(-1)
    want_y = torch.cat([forward, backward])
    want = torch.autograd.grad(want_y, (x, weight, bias), grad_out)
    assert_close(y, want_y, "y")
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert g.shape == w.shape, name
        assert_close(g, w, name)


def test_triton_conv_keeps_bf16_inputs_and_computes_in_float32():
    x, weight, bias = (t.detach() for t in conv_inputs(2, BLOCK_E, 7, 4))
    y = causal_conv1d_silu_triton(x.to(torch.bfloat16), weight, bias)
    want = causal_conv1d_silu_ref(x.to(torch.bfloat16).float(), weight, bias)
    assert y.dtype == torch.bfloat16
    assert_close(y, want, "y", rtol=1e-2)                                   # bf16 rounding of y


def test_triton_conv_without_bias_matches_reference():
    x, weight, _ = conv_inputs(2, 8, 6, 4)
    grad_out = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want = torch.autograd.grad(causal_conv1d_silu_ref(x, weight, None), (x, weight), grad_out)
    got = torch.autograd.grad(causal_conv1d_silu_triton(x, weight, None), (x, weight), grad_out)
    for name, g, w in zip(("x", "weight"), got, want):
        assert_close(g, w, name)


def test_triton_conv_rejects_mismatched_weights():
    x, weight, bias = (t.detach() for t in conv_inputs(2, 8, 5, 4))
    with pytest.raises(ValueError, match=r"weight must be \(8, K\)"):
        causal_conv1d_silu_triton(x, weight[:4], bias)
