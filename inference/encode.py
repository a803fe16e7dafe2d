"""Video codes from a model, for features in a tensor or streamed from a file.

Shapes (docs/method.md §2): N videos, M frames, D feature size, B code length.
"""
import torch

from dataset.io import FeatureFile, check_finite
from utils.errors import UserError


class NonFiniteCodes(UserError):
    """A model gave NaN/Inf codes (its weights or activations are not finite)."""


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context otherwise (CPU always runs float32)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=enabled and torch.device(device).type == "cuda")


@torch.no_grad()
def encode(model, source, device, batch_size=512):
    """(N, B) ±1 float codes on `device`.

    source: an (N, M, D) tensor on any device and in any float dtype, encoded `batch_size` rows at
    a time, or an iterable of (n, M, D) blocks (numpy arrays or tensors, e.g.
    `VideoSet.iter_blocks`). Either way each batch goes to `device` as float32. A code that is
    not ±1 (NaN from a broken model) raises NonFiniteCodes.
    """
    model.eval()
    blocks = source
    if torch.is_tensor(source):
        blocks = (source[i:i + batch_size] for i in range(0, len(source), batch_size))
    codes = torch.cat([model.encode(torch.as_tensor(block).to(device).float())
                       for block in blocks]).float()
    bad = int((~torch.isfinite(codes)).any(1).sum())
    if bad:
        raise NonFiniteCodes(f"the model gave non-finite codes (NaN) for {bad} of {len(codes)} "
                             f"videos: its weights or activations are not finite")
    return codes


def encode_feature_file(model, path, cfg, device, key="feats"):
    """(N, B) ±1 codes of every video of an (N, M, D) features file, checked against the
    model's config (frames, feature size) and for NaN/Inf, read `eval.batch_size` at a time."""
    def blocks():
        with FeatureFile(path, key, cfg.max_frames, cfg.feature_size) as feats:
            for idx, block in feats.iter_chunks(cfg.eval.batch_size):
                check_finite(block, path, key, offset=int(idx[0]))
                yield block

    try:
        return encode(model, blocks(), device, cfg.eval.batch_size)
    except NonFiniteCodes as err:
        raise NonFiniteCodes(f"{path}: {err}") from None
