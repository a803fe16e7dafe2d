"""What a set of preprocessing artifacts was made from (docs/method.md §10).

A record is a JSON file beside the artifacts: the inputs the set depends on (a fingerprint of the
training features and every config value that changes the result) and the sha256 of every file
of the set. A set is reused only when its record is complete, its inputs equal what the current
config asks for, and every file still has the recorded hash, so a set whose writing was cut off
part-way (new files beside old ones) never passes. Writers mark the record incomplete before they
replace any file and complete after the last one.
"""
import hashlib
import os

import h5py
import numpy as np

from dataset.io import DataError
from utils.fileio import read_json, write_json

SAMPLED_VIDEOS = 64        # videos whose bytes enter a feature file's fingerprint
HASH_BLOCK = 1 << 20


def feature_fingerprint(path, key, rows):
    """sha256 of a feature file's shape and dtype, the rows used, and the raw bytes of up to
    SAMPLED_VIDEOS evenly spaced videos among those rows (first and last included): cheap at any
    size, and it changes when the features are replaced."""
    rows = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as f:
            data = f[key]
            digest.update(repr((data.shape, str(data.dtype))).encode())
            digest.update(rows.tobytes())
            picks = np.unique(np.linspace(0, len(rows) - 1, min(SAMPLED_VIDEOS, len(rows)))
                              .round().astype(np.int64))
            for row in rows[picks]:
                digest.update(np.ascontiguousarray(data[int(row)]).tobytes())
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: cannot fingerprint '{key}' ({err})") from None
    return digest.hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(path):
    """The record at `path`, or None when there is none."""
    return read_json(path, "provenance record") if os.path.exists(path) else None


def record_problem(record, inputs, files):
    """Why a set does not match (None when it does). files: {name: path}."""
    if record is None:
        return "no provenance record"
    if not record.get("complete"):
        return "its last writing was interrupted"
    if record.get("inputs") != inputs:
        changed = sorted(k for k in set(inputs) | set(record.get("inputs", {}))
                         if record.get("inputs", {}).get(k) != inputs.get(k))
        return f"made from other inputs ({', '.join(changed)} changed)"
    for name, path in files.items():
        want = record.get("files", {}).get(name)
        if not os.path.isfile(path):
            return f"{os.path.basename(path)} is missing"
        if want != file_sha256(path):
            return f"{os.path.basename(path)} is not the file the record names"
    return None


def mark_incomplete(path, inputs):
    write_json(path, {"complete": False, "inputs": inputs, "files": {}})


def write_record(path, inputs, files):
    """The complete record of a set whose files {name: path} are all written."""
    write_json(path, {"complete": True, "inputs": inputs,
                      "files": {name: file_sha256(p) for name, p in files.items()}})
