"""Checkpoints: written atomically, read with weights_only=True, checked against the config."""
import io
import os
import warnings

import torch

from utils.errors import UserError
from utils.fileio import write_bytes


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the model it is loaded for."""


def save_checkpoint(path, payload):
    """Serialised in memory first, so a full disk is an OSError of our write (a UserError)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def model_meta(cfg):
    """What a checkpoint must match to be loaded into a model of `cfg`."""
    return {"nbits": int(cfg.nbits), "feature_size": int(cfg.feature_size),
            "max_frames": int(cfg.max_frames), "mixer": cfg.model.mixer,
            "variant": cfg.model.variant}


def load_checkpoint(path, cfg=None, map_location="cpu", run_id=None, fingerprint=None):
    """Load `path` (weights_only=True); with `cfg`, check it was made for the same model; with
    `run_id` (and `fingerprint`), check it was written by that run (of that config)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():     # garbage can also warn about its "protocol"
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # garbage bytes raise almost any type from the unpickler
        # torch's own messages do not name the file, and some suggest weights_only=False
        raise CheckpointError(f"{path}: not a readable checkpoint (empty, truncated, or not "
                              f"written by this project; {type(err).__name__})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project")
    if cfg is not None:
        want, have = model_meta(cfg), payload.get("meta", {})
        wrong = [f"{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items()
                 if have.get(k) != v]
        if wrong:
            raise CheckpointError(f"{path} was made for another model ({'; '.join(wrong)})")
    if run_id is not None and (payload.get("run_id"), payload.get("config_fingerprint")) != (
            run_id, fingerprint or payload.get("config_fingerprint")):
        raise CheckpointError(f"{path} belongs to another run than the run directory's "
                              f"config.json")
    return payload
