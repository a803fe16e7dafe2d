import math

import pytest
import torch
import torch.nn.functional as F

from model.mamba import MambaMixer, selective_scan_recompute, selective_scan_ref
from model.mixers import MIXERS
from model.s5vh import VARIANT_DEPTHS, SignSTE, build_model, sinusoidal_table
from tests.conftest import DEMO_CONFIG
from utils.config import build_config
from utils.hashing import binarize

FRAMES, DIM = 12, 40


def small_cfg(*overrides, nbits=16):
    return build_config(DEMO_CONFIG, [f"feature_size={DIM}", f"max_frames={FRAMES}",
                                      f"nbits={nbits}", "model.hidden_size=32",
                                      "model.decoder_hidden_size=24", "model.variant='mini'",
                                      "model.mamba_impl='plain'", *overrides])


def views(b, frames=FRAMES, visible=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(frames, generator=gen) for _ in range(b)])
    return perm[:, :visible].sort(1).values, perm[:, visible:].sort(1).values


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("variant", sorted(VARIANT_DEPTHS))
def test_shapes_and_codes(mixer, variant):
    torch.manual_seed(0)
    model = build_model(small_cfg(f"model.mixer={mixer!r}", f"model.variant={variant!r}"))
    assert len(model.encoder.layers) == VARIANT_DEPTHS[variant] and len(model.decoder.layers) == 1
    x = torch.rand(3, FRAMES, DIM)
    vis, msk = views(3)
    out = model(x, vis, msk)
    assert out["frame_codes"].shape == (3, 6, 16) and out["video_code"].shape == (3, 16)
    assert out["reconstruction"].shape == (3, FRAMES - 6, DIM)
    assert set(out["frame_codes"].unique().tolist()) <= {-1.0, 1.0}
    codes = model.encode(x)
    assert codes.shape == (3, 16) and set(codes.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("share", [False, True])
def test_every_parameter_gets_a_gradient(mixer, share):
    torch.manual_seed(0)
    model = build_model(small_cfg(f"model.mixer={mixer!r}", f"model.share_directions={share}",
                                  "model.variant='small'", "model.drop_path=0.0"))
    x = torch.rand(4, FRAMES, DIM)
    vis, msk = views(4)
    out = model(x, vis, msk)
    (out["reconstruction"].pow(2).mean() + out["video_code"].pow(2).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []
    has_backward = any("mixer_backward" in n for n, _ in model.named_parameters())
    assert has_backward is not share


def test_selective_scan_equals_stepwise_recurrence_float64():
    gen = torch.Generator().manual_seed(0)
    b, E, N, L = 2, 3, 4, 7
    u, delta, z = (torch.randn(b, E, L, generator=gen, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(E, N, generator=gen, dtype=torch.float64) * 2
    B, C = (torch.randn(b, N, L, generator=gen, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(E, generator=gen, dtype=torch.float64), torch.randn(E, generator=gen,
                                                                              dtype=torch.float64)
    got = selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias)
    assert got.dtype == torch.float64
    expected = torch.zeros(b, E, L, dtype=torch.float64)
    for i in range(b):
        for e in range(E):
            dt_all = [math.log1p(math.exp(float(delta[i, e, t] + bias[e]))) for t in range(L)]
            for n in range(N):
                h = 0.0
                for t in range(L):
                    h = math.exp(dt_all[t] * float(A[e, n])) * h + dt_all[t] * float(B[i, n, t]) * float(u[i, e, t])
                    expected[i, e, t] += h * float(C[i, n, t])
            for t in range(L):
                zt = float(z[i, e, t])
                expected[i, e, t] = (expected[i, e, t] + float(D[e]) * float(u[i, e, t])) * zt / (1 + math.exp(-zt))
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def _wkv_by_definition(k, v, w, u):
    """RWKV's wkv straight from its definition: at each t a softmax over i <= t of the
    exponents -(t-1-i) w + k_i (i < t) and u + k_t, weighting the values v_i."""
    out = []
    for t in range(k.shape[1]):
        exponents = [-(t - 1 - i) * w + k[:, i] for i in range(t)] + [u + k[:, t]]
        out.append((torch.stack(exponents, 1).softmax(1) * v[:, :t + 1]).sum(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("key_scale", [1.0, 15.0])
def test_rwkv_wkv_equals_its_definition(key_scale):
    """The factored, batched wkv equals the softmax of the definition, values and gradients,
    also with keys spread widely over the sequence (float32 against float64)."""
    from model.mixers import RWKVMixer
    gen = torch.Generator().manual_seed(0)
    mixer = RWKVMixer(8)
    with torch.no_grad():
        mixer.time_decay.copy_(torch.randn(8, generator=gen))
        mixer.time_first.copy_(2 * torch.randn(8, generator=gen))
    k = (key_scale * torch.randn(3, 13, 8, generator=gen)).requires_grad_()
    v = torch.randn(3, 13, 8, generator=gen).requires_grad_()
    weights = torch.randn(3, 13, 8, generator=gen, dtype=torch.float64)
    got = mixer.wkv(k, v)
    grads = torch.autograd.grad((got * weights.float()).sum(),
                                [k, v, mixer.time_decay, mixer.time_first])
    params = [t.detach().double().requires_grad_()
              for t in (k, v, mixer.time_decay, mixer.time_first)]
    want = _wkv_by_definition(params[0], params[1], params[2].exp(), params[3])
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4)


def test_plain_mamba_has_mamba_ssm_parameters():
    mixer = MambaMixer(32)
    shapes = {n: tuple(p.shape) for n, p in mixer.named_parameters()}
    assert shapes == {"A_log": (64, 16), "D": (64,), "in_proj.weight": (128, 32),
                      "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
                      "x_proj.weight": (34, 64), "dt_proj.weight": (64, 2),
                      "dt_proj.bias": (64,), "out_proj.weight": (32, 64)}
    assert torch.allclose(mixer.A_log[0].exp(), torch.arange(1.0, 17.0))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6


def test_plain_mamba_is_causal():
    torch.manual_seed(0)
    mixer = MambaMixer(16)
    x = torch.randn(2, 9, 16)
    y = mixer(x)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    y2 = mixer(x2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6) and not torch.allclose(y[:, 5:], y2[:, 5:])


@pytest.mark.parametrize("mixer", MIXERS)
def test_batch_independence(mixer):
    torch.manual_seed(0)
    model = build_model(small_cfg(f"model.mixer={mixer!r}")).eval()
    x = torch.rand(5, FRAMES, DIM)
    vis, msk = views(5)
    together = model(x, vis, msk)
    alone = model(x[2:3], vis[2:3], msk[2:3])
    for key in together:
        assert torch.allclose(together[key][2:3], alone[key], atol=1e-5)


def _encoder_output(model, x):
    return model.encoder(x)


def test_backward_mixer_sees_the_future():
    """With F causal, zeroing G's output projection makes the encoder causal; with G it is not."""
    torch.manual_seed(0)
    model = build_model(small_cfg("model.variant='small'")).eval()
    x = torch.rand(2, FRAMES, DIM)
    future = x.clone()
    future[:, -1] += 1.0
    changed = (_encoder_output(model, future) - _encoder_output(model, x)).abs().amax(-1)
    assert changed[:, 0].min() > 1e-6                                   # G carries the future back
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.mixer_backward.out_proj.weight.zero_()
    changed = (_encoder_output(model, future) - _encoder_output(model, x)).abs().amax(-1)
    assert changed[:, :-1].max() == 0 and changed[:, -1].min() > 1e-4


def test_shared_directions_use_one_mixer():
    torch.manual_seed(0)
    model = build_model(small_cfg("model.share_directions=True")).eval()
    layer = model.encoder.layers[0]
    h = torch.randn(2, FRAMES, 32)
    expected = h + layer.mixer_forward(layer.norm_forward(h)) + \
        layer.mixer_forward(layer.norm_backward(h.flip(1))).flip(1)
    assert torch.allclose(layer(h), expected, atol=1e-6)


def test_initialisation():
    torch.manual_seed(0)
    model = build_model(small_cfg())
    mixer = model.encoder.layers[0].mixer_forward
    assert torch.equal(mixer.dt_proj.bias, torch.zeros_like(mixer.dt_proj.bias))
    assert torch.equal(model.encoder.embed.bias, torch.zeros(32))
    bound = math.sqrt(6 / (DIM + 32))
    assert model.encoder.embed.weight.abs().max() <= bound
    assert model.hash_layer.proj.bias.abs().sum() > 0               # PyTorch default init kept
    assert model.decoder.mask_token.std() < 0.05


def test_sign_ste_forward_and_hardtanh_gradient():
    u = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    b = SignSTE.apply(u)
    assert b.tolist() == [-1, -1, 1, 1, 1, 1]
    b.backward(torch.arange(1.0, 7.0))
    assert u.grad.tolist() == [0, 2, 3, 4, 0, 0]
    assert binarize(torch.zeros(3)).tolist() == [1, 1, 1]


def test_video_code_of_even_frame_count_has_no_zero_bits():
    torch.manual_seed(0)
    model = build_model(small_cfg("max_frames=2"))
    x = torch.rand(64, 2, DIM)
    frame_means = model.frame_codes(x).mean(1)
    codes = model.encode(x)
    assert (frame_means == 0).any()                     # ties do occur with two frames
    assert torch.equal(codes[frame_means == 0], torch.ones_like(codes[frame_means == 0]))


def test_decoder_order_changes_the_input_sequence():
    torch.manual_seed(0)
    a = build_model(small_cfg()).eval()
    b = build_model(small_cfg("model.decoder_order='time'")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, FRAMES, DIM)
    vis, msk = views(2)
    ra, rb = a(x, vis, msk)["reconstruction"], b(x, vis, msk)["reconstruction"]
    assert ra.shape == rb.shape and not torch.allclose(ra, rb)


def test_state_dict_round_trip_between_configurations():
    """Weights move between configurations that differ only in how they compute (the decoder's
    token order): every tensor arrives, the encoder's codes agree, and the decoder (which the
    order changes) then gives its own reconstruction, the same as a model built that way."""
    torch.manual_seed(0)
    source = build_model(small_cfg()).eval()
    target = build_model(small_cfg("model.decoder_order='time'"))
    target.load_state_dict(source.state_dict(), strict=True)
    target.eval()
    for name, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[name]), name
    x = torch.rand(3, FRAMES, DIM)
    vis, msk = views(3)
    assert torch.equal(source.encode(x), target.encode(x))
    a, b = source(x, vis, msk), target(x, vis, msk)
    assert torch.equal(a["video_code"], b["video_code"])
    assert not torch.allclose(a["reconstruction"], b["reconstruction"])
    back = build_model(small_cfg())
    back.load_state_dict(target.state_dict(), strict=True)
    assert torch.equal(back.eval()(x, vis, msk)["reconstruction"], a["reconstruction"])


def test_drop_path_noise_is_an_input():
    torch.manual_seed(0)
    model = build_model(small_cfg("model.variant='small'", "model.drop_path=0.5")).train()
    x = torch.rand(4, FRAMES, DIM)
    vis, msk = views(4)
    no_noise = model(x, vis, msk)                      # no noise: no drop, as in evaluation
    assert torch.equal(no_noise["video_code"], model.eval()(x, vis, msk)["video_code"])
    model.train()
    noise = torch.rand(model.depth, 4, generator=torch.Generator().manual_seed(1))
    first, again = model(x, vis, msk, noise), model(x, vis, msk, noise)
    assert torch.equal(first["reconstruction"], again["reconstruction"])   # no hidden randomness
    # a row whose branches are all dropped is its embedding through the identity paths only
    rates = [layer.drop_path.p for layer in model.encoder.layers]
    drop_row0 = noise.clone()
    drop_row0[:, 0] = -1.0
    dropped = model.encoder(x[:1], vis[:1], drop_row0[:, :1])
    h = model.encoder.embed(x[:1, vis[0]]) + model.encoder.pos[vis[0]]
    for layer, rate in zip(model.encoder.layers, rates):
        if rate == 0:
            h = layer(h)
    assert torch.allclose(dropped, model.encoder.head(model.encoder.norm(h)), atol=1e-6)


def test_binarize_keeps_nan_visible():
    codes = binarize(torch.tensor([0.0, -0.0, 2.0, -3.0, float("nan")]))
    assert codes[:4].tolist() == [1.0, 1.0, 1.0, -1.0] and torch.isnan(codes[4])


def test_position_table():
    table = sinusoidal_table(10, 8)
    assert table.shape == (10, 8) and torch.allclose(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def _scan_inputs(b, E, N, L, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)
    return dict(u=draw(b, E, L), delta=draw(b, E, L), A=-4 * torch.rand(E, N, generator=gen,
                dtype=dtype), B=draw(b, N, L), C=draw(b, N, L), D=draw(E), z=draw(b, E, L),
                delta_bias=draw(E))


@pytest.mark.parametrize("length", [1, 2, 7, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [True, False])
def test_recomputing_scan_equals_the_reference_bit_for_bit(length, dtype, gated):
    """Values and every gradient, across segment boundaries (segments of ceil(sqrt(L)) steps)."""
    inputs = _scan_inputs(3, 8, 4, length, dtype)
    if not gated:
        inputs.update(z=None, delta_bias=None)
    grad_out = torch.randn(3, 8, length, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for scan in (selective_scan_ref, selective_scan_recompute):
        leaves = {k: (v.clone().requires_grad_() if v is not None else None)
                  for k, v in inputs.items()}
        y = scan(**leaves, delta_softplus=gated)
        grads = torch.autograd.grad(y, [v for v in leaves.values() if v is not None], grad_out)
        results.append((y, grads))
    (y_ref, g_ref), (y, g) = results
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))


def _saved_bytes(scan, inputs):
    """Bytes of the tensors autograd keeps for the backward pass of one scan call, inputs
    excluded."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    inputs_storage = {v.untyped_storage().data_ptr() for v in leaves.values()}
    saved = {}
    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs_storage:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scan(**leaves)
    return sum(saved.values())


def test_recomputing_scan_keeps_a_few_states_not_every_step():
    b, E, N, L = 4, 32, 16, 25
    inputs = _scan_inputs(b, E, N, L, torch.float32)
    state, per_frame = b * E * N * 4, b * E * L * 4          # one (b, E, N) state; a (b, E, L)
    kept_by_reference = _saved_bytes(selective_scan_ref, inputs)
    kept = _saved_bytes(selective_scan_recompute, inputs)
    assert kept_by_reference >= 2 * L * state
    # the segment starts (ceil(sqrt(25)) = 5 states) and a few (b, E, L) terms of the gating
    assert kept <= 5 * state + 6 * per_frame < kept_by_reference / 4


def test_the_plain_mixer_recomputes_its_block_without_changing_a_number():
    """Training through the plain mixer keeps neither its block's activations (checkpointed)
    nor every step's states; outputs and gradients are those of the reference kept whole."""
    torch.manual_seed(0)
    kept = MambaMixer(16, scan=selective_scan_ref)
    recomputed = MambaMixer(16)
    recomputed.load_state_dict(kept.state_dict())
    x = torch.rand(3, 9, 16, requires_grad=True)
    grads = []
    for mixer in (kept, recomputed):
        out = mixer(x)
        (out ** 2).sum().backward()
        grads.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in mixer.parameters()]))
        x.grad = None
    (a, xa, pa), (b, xb, pb) = grads
    assert torch.equal(a, b) and torch.equal(xa, xb)
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))
