"""S5VH: bidirectional selective-state-space encoder, hash layer and masked-frame decoder
(docs/method.md §4). Shapes use the glossary of docs/method.md §2: b videos, M frames, D feature
size, v visible and m masked frames of a view, L the length a layer sees, d and d' the encoder
and decoder widths, B the code length.
"""
import torch
import torch.nn as nn

from model.mamba import IMPL_NAMES, MambaMixer, bidirectional_mamba
from model.mixers import mixer_factory, resolve_mixer
from utils.hashing import binarize

VARIANT_DEPTHS = {"mini": 1, "small": 6, "base": 12}
LN_EPS = 1e-6


def sinusoidal_table(length, dim):
    """(length, dim) fixed position table: sines in the first half, cosines in the second."""
    half = dim // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, :half], table[:, half:2 * half] = torch.sin(angles), torch.cos(angles)
    return table.float()


def gather_frames(x, index):
    """x: (b, M, c), index: (b, k) frame indices -> (b, k, c)."""
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples with probability p.

    The randomness is an input, not drawn here: `noise` (b,) uniform in [0, 1) keeps sample i
    where noise_i >= p. The trainer draws it from the epoch's generator, so a step is a function
    of its inputs (exact resume, runs that share a GPU, graph replay) and `forward` has no
    hidden state. No noise (evaluation) means no drop."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x, noise=None):
        if self.p == 0.0 or noise is None:
            return x
        keep = (noise >= self.p).to(x.dtype).view((x.shape[0],) + (1,) * (x.ndim - 1))
        return x * keep / (1.0 - self.p)


class BidirectionalLayer(nn.Module):
    """h <- h + DropPath(F(LN1(h)) + flip(G(LN2(flip(h))))), F and G separate mixers.

    share_directions=True reproduces the authors' release, where G is F (one set of weights);
    bidirectional=False keeps the forward scan only, h <- h + DropPath(F(LN1(h))) (an ablation).
    When F and G are `MambaMixer`s that pair directions (the Triton path), the two directions
    are computed together, by `bidirectional_mamba` (`paired`): LN and the mixers act per frame
    or walk time in either direction in their kernels, so F(LN1(h)) and flip(G(LN2(flip(h))))
    are one batched chain with no flip. Otherwise, with `side` (a SideStream, on a CUDA
    tensor), G runs on a second CUDA stream while F runs: the same kernels, issued in the same
    order, so autograd visits them in the same order too, but the GPU overlaps the two chains,
    and their gradients, which autograd runs on the stream of each forward op.
    """

    def __init__(self, dim, make_mixer, drop_path=0.0, share_directions=False,
                 bidirectional=True, side=None):
        super().__init__()
        self.bidirectional, self.side = bidirectional, side
        self.norm_forward = nn.LayerNorm(dim, eps=LN_EPS)
        self.mixer_forward = make_mixer(dim)
        if bidirectional:
            self.norm_backward = nn.LayerNorm(dim, eps=LN_EPS)
            self.mixer_backward = None if share_directions else make_mixer(dim)
        self.paired = bidirectional and isinstance(self.mixer_forward, MambaMixer) and \
            self.mixer_forward.pair_directions
        self.drop_path = DropPath(drop_path)

    def _backward_direction(self, h):
        backward_mixer = self.mixer_backward or self.mixer_forward
        return backward_mixer(self.norm_backward(h.flip(1))).flip(1)

    def forward(self, h, noise=None):
        """h: (b, L, d), noise: (b,) DropPath noise or None -> (b, L, d)."""
        if not self.bidirectional:
            out = self.mixer_forward(self.norm_forward(h))
        elif self.paired:
            both = bidirectional_mamba(self.mixer_forward,
                                       self.mixer_backward or self.mixer_forward,
                                       torch.stack([self.norm_forward(h), self.norm_backward(h)]))
            out = both[0] + both[1]
        elif self.side is not None and h.is_cuda:
            main = torch.cuda.current_stream(h.device)
            side = self.side.stream(h.device)
            side.wait_stream(main)          # the fork: G needs h, nothing F computes
            out = self.mixer_forward(self.norm_forward(h))
            with torch.cuda.stream(side):
                backward = self._backward_direction(h)
            main.wait_stream(side)
            backward.record_stream(main)    # made on the side stream, freed on this one
            out = out + backward
        else:
            out = self.mixer_forward(self.norm_forward(h)) + self._backward_direction(h)
        return h + self.drop_path(out, noise)


class SideStream:
    """One second CUDA stream per model and device, shared by its layers (which run one after
    the other), made when first needed. It comes from torch's pool of high-priority streams, so
    it is never the stream of a run (those come from the default-priority pool): work captured
    on it keeps per-stream state (cuBLAS workspaces) no other run touches."""

    def __init__(self):
        self._streams = {}

    def stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device, priority=-1)
        return self._streams[device]


def _layers(dim, depth, model_cfg, make_mixer, drop_path_max, side):
    rates = torch.linspace(0, drop_path_max, depth).tolist() if depth > 1 else [0.0] * depth
    return nn.ModuleList(BidirectionalLayer(dim, make_mixer, rate, model_cfg["share_directions"],
                                            model_cfg["bidirectional"], side)
                         for rate in rates)


class Encoder(nn.Module):
    """Frame embedding + positions -> visible frames (time order) -> layers -> LN -> Linear."""

    def __init__(self, feature_size, max_frames, model_cfg, make_mixer, side=None):
        super().__init__()
        dim = model_cfg["hidden_size"]
        depth = VARIANT_DEPTHS[model_cfg["variant"]]
        self.embed = nn.Linear(feature_size, dim)
        self.register_buffer("pos", sinusoidal_table(max_frames, dim), persistent=False)
        self.layers = _layers(dim, depth, model_cfg, make_mixer, model_cfg["drop_path"], side)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, dim)

    def forward(self, x, visible=None, path_noise=None):
        """x: (b, M, D), visible: (b, v) sorted frame indices or None (all), path_noise:
        (depth, b) DropPath noise or None (no drop) -> (b, v, d)."""
        if visible is None:
            h = self.embed(x) + self.pos[:x.shape[1]]
        else:  # embedding is per frame, so embed only the visible frames
            h = self.embed(gather_frames(x, visible)) + self.pos[visible]
        for i, layer in enumerate(self.layers):
            h = layer(h, None if path_noise is None else path_noise[i])
        return self.head(self.norm(h))


class SignSTE(torch.autograd.Function):
    """sign (0 -> +1) forward; hard-tanh gradient backward (1 where |u| < 1, else 0)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return binarize(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * (u.abs() < 1).to(grad.dtype)


class HashLayer(nn.Module):
    """u = LN_B(Linear(d -> B)(e)); frame codes b = sign(u) with a straight-through gradient."""

    def __init__(self, dim, nbits):
        super().__init__()
        self.proj = nn.Linear(dim, nbits)
        self.norm = nn.LayerNorm(nbits, eps=LN_EPS)

    def forward(self, e):
        """e: (b, v, d) -> frame codes (b, v, B) in {-1, +1}."""
        return SignSTE.apply(self.norm(self.proj(e)))


class Decoder(nn.Module):
    """Visible frame codes + mask tokens -> one bidirectional layer -> predicted masked features."""

    def __init__(self, nbits, feature_size, max_frames, model_cfg, make_mixer, side=None):
        super().__init__()
        dim = model_cfg["decoder_hidden_size"]
        self.order = model_cfg["decoder_order"]
        self.proj = nn.Linear(nbits, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sinusoidal_table(max_frames, dim), persistent=False)
        self.layers = _layers(dim, model_cfg["decoder_depth"], model_cfg, make_mixer, 0.0, side)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.predict = nn.Linear(dim, feature_size)

    def forward(self, codes, visible, masked):
        """codes: (b, v, B); visible: (b, v), masked: (b, m) sorted -> (b, m, D)."""
        tokens_visible = self.proj(codes) + self.pos[visible]                   # (b, v, d')
        tokens_masked = self.mask_token + self.pos[masked]                      # (b, m, d')
        num_masked = masked.shape[1]
        if self.order == "visible_first":  # MAE-style: visible tokens, then the mask tokens
            h = torch.cat([tokens_visible, tokens_masked], dim=1)
        else:                              # every token at its frame's time position
            order = torch.cat([visible, masked], dim=1).argsort(dim=1)
            h = gather_frames(torch.cat([tokens_visible, tokens_masked], dim=1), order)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        if self.order == "visible_first":
            h = h[:, -num_masked:]
        else:
            h = gather_frames(h, masked)
        return self.predict(h)


class S5VH(nn.Module):
    """Encoder + hash layer (+ decoder for training). `forward` is pure: no state is updated.

    The mixer implementation is chosen once, here, for a model meant for `device` (None: the GPU
    when there is one); `mixer_impl` and `describe_mixer()` say which it is."""

    def __init__(self, feature_size, max_frames, nbits, model_cfg, device=None):
        super().__init__()
        self.nbits, self.max_frames = nbits, max_frames
        self.mixer, self.mixer_impl = model_cfg["mixer"], resolve_mixer(model_cfg, device,
                                                                        max_frames)
        make_mixer = mixer_factory(model_cfg, self.mixer_impl)
        side = SideStream() if model_cfg["two_streams"] else None
        self.encoder = Encoder(feature_size, max_frames, model_cfg, make_mixer, side)
        self.decoder = Decoder(nbits, feature_size, max_frames, model_cfg, make_mixer, side)
        self._init_weights()
        self.hash_layer = HashLayer(model_cfg["hidden_size"], nbits)   # PyTorch's default init

    def _init_weights(self):
        """Xavier-uniform weights and zero biases for every Linear in the encoder and decoder
        (the mixers' projections too, so dt_proj.bias starts at 0); LayerNorms 1 and 0. The
        decoder's code projection keeps PyTorch's default init."""
        keep_default = {self.decoder.proj}
        for module in list(self.encoder.modules()) + list(self.decoder.modules()):
            if isinstance(module, nn.Linear) and module not in keep_default:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def describe_mixer(self):
        """e.g. 'mamba (Triton short-sequence selective scan), directions paired', 'attention
        (sdpa)', 'lstm', with ', directions on two CUDA streams' when they are."""
        if self.mixer == "mamba":
            text = f"mamba ({IMPL_NAMES[self.mixer_impl]})"
        else:
            text = f"{self.mixer} ({self.mixer_impl})" if self.mixer_impl else self.mixer
        layer = self.encoder.layers[0]
        on_gpu = any(p.is_cuda for p in self.parameters())
        if layer.paired:
            text += ", directions paired"
        elif layer.side is not None and layer.bidirectional and on_gpu:
            text += ", directions on two CUDA streams"
        return text

    @property
    def depth(self):
        """Encoder layers: the first dimension of `path_noise`."""
        return len(self.encoder.layers)

    def frame_codes(self, x, visible=None, path_noise=None):
        """x: (b, M, D), visible: (b, v) or None -> frame codes (b, v, B) in {-1, +1}."""
        return self.hash_layer(self.encoder(x, visible, path_noise))

    def forward(self, x, visible, masked, path_noise=None):
        """One masked view per row. x: (b, M, D); visible (b, v), masked (b, m) sorted indices;
        path_noise (depth, b) uniform noise for the encoder's DropPath (None: no drop).

        Returns frame_codes (b, v, B), video_code (b, B) = mean of the visible frame codes
        (real-valued, in [-1, 1]), and reconstruction (b, m, D) of the masked frames.
        """
        codes = self.frame_codes(x, visible, path_noise)
        return {"frame_codes": codes, "video_code": codes.mean(1),
                "reconstruction": self.decoder(codes, visible, masked)}

    @torch.no_grad()
    def encode(self, x):
        """x: (b, M, D) -> (b, B) ±1 video codes: sign of the mean code of all M frames."""
        return binarize(self.frame_codes(x).mean(1))


def build_model(cfg, device=None):
    """The S5VH model of a resolved config, on `device` (None: CPU, mixer chosen for the GPU
    when one is there)."""
    model = S5VH(cfg.feature_size, cfg.max_frames, cfg.nbits, cfg.model, device)
    return model if device is None else model.to(device)
