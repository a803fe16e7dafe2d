"""Checkpoints: written atomically (in the background from a host copy), read with
weights_only=True, and checked for structure, finite weights and the model they fit."""
import concurrent.futures
import io
import warnings

import torch

from utils.errors import UserError
from utils.fileio import check_file, write_bytes
from utils.schema import check_structure


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the model it is loaded for."""


# What every checkpoint holds (best.pth, last.pth); RESUME_SPEC: what last.pth adds.
WEIGHTS_SPEC = {"model": dict, "criterion": dict, "epoch": int, "meta": dict, "run_id": str,
                "config_fingerprint": str}
RESUME_SPEC = {**WEIGHTS_SPEC, "optimizer": {"state": dict, "param_groups": list},
               "label_table": {"table": torch.Tensor},
               "best": {"score": (float, type(None)), "epoch": (int, type(None))}}


def save_checkpoint(path, payload):
    """Serialised in memory first, so a full disk is an OSError of our write (a UserError)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def host_copy(value):
    """A snapshot of a (nested) state on the host: every tensor detached and copied."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints in one background thread, in the order they were submitted, each with
    `save_checkpoint` (or the `write` given, for a file that must follow them); the caller hands
    over host copies, so training goes on meanwhile. An error of a write is raised by the next
    `submit` or by `wait`."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending = []

    def _raise_errors(self, block):
        for future in list(self._pending):
            if block or future.done():
                self._pending.remove(future)
                future.result()

    def submit(self, path, payload, write=save_checkpoint):
        self._raise_errors(block=False)
        self._pending.append(self._pool.submit(write, path, payload))

    def wait(self):
        """Wait until everything submitted is written; raise the first error of a write."""
        self._raise_errors(block=True)

    def close(self):
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def model_meta(cfg):
    """What a checkpoint must match to be loaded into a model of `cfg`."""
    m = cfg.model
    return {"nbits": int(cfg.nbits), "feature_size": int(cfg.feature_size),
            "max_frames": int(cfg.max_frames), "mixer": m.mixer, "variant": m.variant,
            "hidden_size": int(m.hidden_size), "decoder_hidden_size": int(m.decoder_hidden_size)}


def _check_finite(path, parts):
    for part in parts:
        for name, value in part.items():
            if not torch.is_tensor(value):
                raise CheckpointError(f"{path}: '{name}' is not a tensor (not written by this "
                                      f"project)")
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise CheckpointError(f"{path}: {bad} non-finite values (NaN/Inf) in its weights, "
                                      f"first in '{name}'; it cannot be scored or resumed")


def load_checkpoint(path, cfg=None, map_location="cpu", run_id=None, fingerprint=None,
                    spec=WEIGHTS_SPEC, max_epoch=None):
    """Load `path` (weights_only=True), check its structure (`spec`), that its weights are finite
    and, with `cfg`, that it was made for the same model; with `run_id` (and `fingerprint`), that
    it was written by that run (of that config); with `max_epoch`, that its epoch lies in
    1..max_epoch."""
    check_file(path, "checkpoint")
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
    check_structure(payload, spec, path)
    _check_finite(path, (payload["model"], payload["criterion"]))
    if cfg is not None:
        want, have = model_meta(cfg), payload["meta"]
        # keys an older checkpoint lacks are left to `load_weights`, which compares the shapes
        wrong = [f"{k}: checkpoint {have[k]!r}, config {v!r}" for k, v in want.items()
                 if have.get(k, v) != v]
        if wrong:
            raise CheckpointError(f"{path} was made for another model ({'; '.join(wrong)})")
    if run_id is not None and (payload["run_id"], payload["config_fingerprint"]) != (
            run_id, fingerprint or payload["config_fingerprint"]):
        raise CheckpointError(f"{path} belongs to another run than the run directory's "
                              f"config.json")
    if max_epoch is not None and not 1 <= payload["epoch"] <= max_epoch:
        raise CheckpointError(f"{path}: epoch {payload['epoch']} lies outside this run's "
                              f"schedule of {max_epoch} epochs")
    return payload


def load_weights(module, state, path):
    """module.load_state_dict(state), a mismatch being one line naming the checkpoint."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise CheckpointError(f"{path}: its weights do not fit the model ({detail})") from None
