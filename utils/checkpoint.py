"""Checkpoints: written atomically, read with weights_only=True, checked against the config."""
import os

import torch

from utils.fileio import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the model it is loaded for."""


def save_checkpoint(path, payload):
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def model_meta(cfg):
    """What a checkpoint must match to be loaded into a model of `cfg`."""
    return {"nbits": int(cfg.nbits), "feature_size": int(cfg.feature_size),
            "max_frames": int(cfg.max_frames), "mixer": cfg.model.mixer,
            "variant": cfg.model.variant}


def load_checkpoint(path, cfg=None, map_location="cpu"):
    """Load `path` (weights_only=True); with `cfg`, check it was made for the same model."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if cfg is not None:
        want, have = model_meta(cfg), payload.get("meta", {})
        wrong = [f"{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items()
                 if have.get(k) != v]
        if wrong:
            raise CheckpointError(f"{path} was made for another model ({'; '.join(wrong)})")
    return payload
