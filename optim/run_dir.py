"""Run directories: owned by one run, whose files belong together (docs/method.md §10).

A fresh run starts only in a missing or empty directory (or one it is told to replace, which it
empties first), holds a lock on the directory for its whole life, and saves its resolved config
as data (`config.json`: the keys, their fingerprint and a run id). Every log line and checkpoint
carries the run id and fingerprint, so a resume can check that checkpoint, config and log
belong together.
"""
import json
import os
import shutil
import uuid

from utils.config import config_fingerprint, load_saved_config, save_config
from utils.errors import UserError
from utils.fileio import atomic_write_text, json_text, read_json, writable_dir

CONFIG_FILE = "config.json"
# keys a resume may change: they do not change what is computed, only how it is logged or batched
SAFE_ON_RESUME = ("train.log_every", "train.checkpoint_every", "eval.batch_size",
                  "eval.query_chunk")


class RunDirError(UserError):
    """A run directory that cannot be used as asked."""


def new_run_id():
    return uuid.uuid4().hex[:12]


def check_fresh(run_dir, replace):
    """Before any work: a fresh run may use `run_dir` only when it is missing or empty, or when
    told to replace it; its parent must be writable."""
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not replace:
        raise RunDirError(f"run directory {run_dir} is not empty; continue that run with "
                          f"--resume {run_dir}, start it over with --replace, or choose "
                          f"another --work-dir")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    writable_dir(os.path.dirname(os.path.abspath(run_dir)), "work directory", create=False)


def empty(run_dir):
    """Remove everything in `run_dir` (the caller holds its lock)."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def write_run_config(cfg, run_dir, run_id):
    save_config(cfg, os.path.join(run_dir, CONFIG_FILE), run_id=run_id)


def read_run_config(run_dir, overrides=(), allowed=SAFE_ON_RESUME):
    """(cfg, record) of the run in `run_dir`, read as data. Overrides of keys not in `allowed`
    (None: any key) are refused; the saved keys must still have the fingerprint recorded with
    them."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} holds no run ({CONFIG_FILE} is missing)")
    refused = [item.split("=", 1)[0].strip() for item in overrides
               if allowed is not None and item.split("=", 1)[0].strip() not in allowed]
    if refused:
        raise RunDirError(f"--cfg-options {', '.join(refused)} cannot change on resume (it would "
                          f"change what the run computes); only {', '.join(SAFE_ON_RESUME)} can")
    saved, record = load_saved_config(path)
    if record.get("fingerprint") != config_fingerprint(saved) or not record.get("run_id"):
        raise RunDirError(f"{path} was edited after the run wrote it (its fingerprint does not "
                          f"match its keys)")
    cfg = load_saved_config(path, overrides)[0] if overrides else saved
    return cfg, record


def read_log(path, run_id):
    """The log records of the run `run_id`. A torn last line (a write cut off by a kill) is
    dropped; any other unreadable line, or a line of another run, is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if not any(rest.strip() for rest in lines[number:]):
                break                      # the last line, torn by a kill
            raise RunDirError(f"{path}: line {number} is not JSON") from None
        if record.get("run_id") != run_id:
            raise RunDirError(f"{path}: line {number} belongs to another run "
                              f"({record.get('run_id')!r}, this run is {run_id!r})")
        records.append(record)
    return records


def rewrite_log(path, records):
    atomic_write_text(path, "".join(json_text(r, indent=None) + "\n" for r in records))


def finished_results(run_dir, record):
    """The results of the finished run of config `record` in `run_dir`, or None while it is
    unfinished."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    results = read_json(path, "results file")
    if results.get("run_id") != record["run_id"]:
        raise RunDirError(f"{path} belongs to another run ({results.get('run_id')!r})")
    return results

