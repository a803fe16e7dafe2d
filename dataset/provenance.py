"""What a set of preprocessing artifacts was made from (docs/method.md §10).

A record is a JSON file beside the artifacts: the inputs the set depends on (the sha256 of every
byte of the training feature file, the rows used, and every config value that changes the
result) and the sha256 of every file of the set. A set is reused only when its record is
complete, its inputs equal what the current config asks for, and every file still has the
recorded hash, so a set whose writing was cut off part-way (new files beside old ones) never
passes. Writers mark the record incomplete before they replace any file and complete after the
last one. Digests come from utils.content_hash, so unchanged files are not read again.
"""
import os

from utils.content_hash import file_sha256
from utils.fileio import read_json, write_json
from utils.schema import check_structure

RECORD_SPEC = {"complete": bool, "inputs": dict, "files": dict}


def read_record(path):
    """The record at `path`, or None when there is none; a damaged record is a UserError."""
    if not os.path.lexists(path):
        return None
    record = check_structure(read_json(path, "provenance record"), RECORD_SPEC, path)
    for name, digest in record["files"].items():
        check_structure(digest, str, path, f"files.{name}")
    return record


def record_problem(record, inputs, files):
    """Why a set does not match (None when it does). files: {name: path}."""
    if record is None:
        return "no provenance record"
    if not record["complete"]:
        return "its last writing was interrupted"
    if record["inputs"] != inputs:
        changed = sorted(k for k in set(inputs) | set(record["inputs"])
                         if record["inputs"].get(k) != inputs.get(k))
        return f"made from other inputs ({', '.join(changed)} changed)"
    for name, path in files.items():
        if not os.path.isfile(path):
            return f"{os.path.basename(path)} is missing"
        if record["files"].get(name) != file_sha256(path, "artifact"):
            return f"{os.path.basename(path)} is not the file the record names"
    return None


def mark_incomplete(path, inputs):
    write_json(path, {"complete": False, "inputs": inputs, "files": {}})


def write_record(path, inputs, files):
    """The complete record of a set whose files {name: path} are all written."""
    write_json(path, {"complete": True, "inputs": inputs,
                      "files": {name: file_sha256(p, "artifact") for name, p in files.items()}})
