"""Atomic file writes: write to a temporary name beside the target, then rename.

A killed process can leave a temporary file behind (`.NAME.XXXX.tmp`); it never has the target's
name, and `remove_stale_temporaries` clears such files from a directory the caller owns.
Written files get the mode the umask gives a new file (mkstemp alone would make them 0600).
"""
import contextlib
import errno
import glob
import json
import math
import os
import tempfile

from utils.errors import UserError

TMP_SUFFIX = ".tmp"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def writable_dir(path, what):
    """Create `path` if needed and check that files can be made in it; UserError otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the {what} {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"the {what} {path} is not writable")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it.
    A full disk or a read-only directory is a UserError naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=directory)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {path}: {err.strerror}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory):
    """Delete the temporaries killed writes left in `directory`; returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(directory), f".*{TMP_SUFFIX}")))
    for path in stale:
        os.remove(path)
    return [os.path.basename(p) for p in stale]


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _strict(value):
    """JSON-ready copy: dict keys as strings, numpy scalars as Python numbers, non-finite floats
    as None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, payload):
    """Strict JSON, written atomically."""
    atomic_write_text(path, json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n")


def read_json(path, what):
    """Parse a JSON file this project wrote; a missing or broken file is a UserError."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable {what} ({err})") from None
