"""Run directories: owned by one run, whose files belong together (docs/method.md §10).

A fresh run starts only in a missing or empty directory, or in one that holds a run of this
project and nothing else (which `--replace` empties; a directory with any other file is never
touched). It holds a lock on the directory for its whole life and saves its resolved config as
data (`config.json`: the keys, their fingerprint, a run id, and the sha256 of every input file).
Every log line and checkpoint carries the run id and fingerprint, so a resume can check that
checkpoint, config, log and inputs belong together.
"""
import json
import os
import time
import uuid

from dataset.protocol import input_files
from utils.config import NON_RESULT_KEYS, load_saved_config, save_config
from utils.content_hash import file_sha256
from utils.errors import UserError
from utils.fileio import (TMP_SUFFIX, atomic_write_text, json_text, read_json, write_error,
                          writable_dir)
from utils.log import get_logger
from utils.schema import StructureError, check_structure

logger = get_logger(__name__)

CONFIG_FILE = "config.json"
# every file a run (or eval.py scoring it) writes into its directory
RUN_FILES = (CONFIG_FILE, "log.jsonl", "run.log", "last.pth", "best.pth", "results.json",
             "eval.json", "codes.npz")
# keys a resume may change: the ones that cannot change the result (utils.config)
SAFE_ON_RESUME = NON_RESULT_KEYS
RECORD_SPEC = {"config": dict, "fingerprint": str, "run_id": str}
LOG_SPEC = {"run_id": str, "epoch": int}
RESULTS_SPEC = {"run_id": str, "config_fingerprint": str, "selection": str, "nbits": int,
                "epochs": int, "selected_epoch": int, "selection_score_mAP@5": (float, type(None)),
                "test_mAP": dict, "runtime": dict}


class RunDirError(UserError):
    """A run directory that cannot be used as asked."""


def new_run_id():
    return uuid.uuid4().hex[:12]


def _is_run_file(name):
    """A file a run writes, or the temporary of one (a write cut off by a kill)."""
    if name in RUN_FILES:
        return True
    return name.endswith(TMP_SUFFIX) and any(name.startswith(f".{n}.") for n in RUN_FILES)


def _foreign(run_dir):
    """Entries of `run_dir` that are not a run's own: other names, folders, links, and a
    config.json that is not a saved run config."""
    foreign = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if not _is_run_file(name) or os.path.islink(path) or not os.path.isfile(path):
            foreign.append(name)
    if CONFIG_FILE not in foreign and os.path.isfile(os.path.join(run_dir, CONFIG_FILE)) \
            and not is_run_directory(run_dir):
        foreign.append(CONFIG_FILE)
    return foreign


def is_run_directory(folder):
    """A folder whose config.json is a saved run config: a run directory of this project."""
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        check_structure(read_json(config, "saved run config"), RECORD_SPEC, config)
    except UserError:
        return False
    return True


def enclosing_run_directory(folder):
    """The run directory that is `folder` or holds it at any depth, or None."""
    folder = os.path.abspath(folder)
    while True:
        if is_run_directory(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_outside_runs(path, what, folder=False):
    """Stop with one line when the file or run directory `path` that a command would write
    (with `folder`: a folder it would write files into) lies in a run directory, at any depth:
    a run directory holds its run's files only (anything else there would also stop a later
    `--replace` of the run)."""
    holder = enclosing_run_directory(path if folder else os.path.dirname(os.path.abspath(path)))
    if holder is not None:
        raise UserError(f"{what} {path} lies in the run directory {holder}, which holds its "
                        f"run's files only; give another folder")


def check_fresh(run_dir, replace):
    """Before any work: a fresh run may use `run_dir` only when it is missing or empty, or, when
    told to replace it, when it holds a run of this project and nothing else; its parent must be
    writable."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not replace:
            raise RunDirError(f"run directory {run_dir} is not empty; continue that run with "
                              f"--resume {run_dir}, start it over with --replace, or choose "
                              f"another --work-dir")
        foreign = _foreign(run_dir)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                              else "")
            raise RunDirError(f"run directory {run_dir} holds files that are not a run of this "
                              f"project ({shown}); --replace empties only a run's own directory, "
                              f"so nothing was touched: choose another --work-dir")
    check_outside_runs(run_dir, "run directory")
    writable_dir(os.path.dirname(os.path.abspath(run_dir)), "work directory", create=False)


def empty(run_dir):
    """Remove a run's files from `run_dir` (the caller holds its lock and has checked with
    `check_fresh` that nothing else is there)."""
    for name in os.listdir(run_dir):
        if _is_run_file(name):
            os.remove(os.path.join(run_dir, name))


def input_digests(cfg):
    """{role: {'path', 'sha256'}} of every input file of the config's protocol."""
    return {role: {"path": path, "sha256": file_sha256(path)}
            for role, path in input_files(cfg).items()}


def write_run_config(cfg, run_dir, run_id, inputs):
    save_config(cfg, os.path.join(run_dir, CONFIG_FILE), run_id=run_id, inputs=inputs)


def read_run_config(run_dir, overrides=(), allowed=SAFE_ON_RESUME):
    """(cfg, record) of the run in `run_dir`, read as data. Overrides of keys not in `allowed`
    (None: any key) are refused; the saved keys must still have the fingerprint recorded with
    them. Keys the record predates take their defaults, and this says so in one line."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise RunDirError(f"run directory not found: {run_dir}")
    if not os.path.lexists(path):
        raise RunDirError(f"{run_dir} holds no run ({CONFIG_FILE} is missing)")
    refused = [item.split("=", 1)[0].strip() for item in overrides
               if allowed is not None and item.split("=", 1)[0].strip() not in allowed]
    if refused:
        raise RunDirError(f"--cfg-options {', '.join(refused)} cannot change on resume (it would "
                          f"change what the run computes); only {', '.join(SAFE_ON_RESUME)} can")
    cfg, record, missing = load_saved_config(path, overrides)
    check_structure(record, RECORD_SPEC, path)
    if record.get("inputs") is not None:
        check_structure(record["inputs"], dict, path, "inputs")
        for role, digest in record["inputs"].items():
            check_structure(digest, {"path": str, "sha256": str}, path, f"inputs.{role}")
    if missing:
        logger.info(f"{path} was saved before the keys {', '.join(missing)} existed; they take "
                    f"their defaults, which compute what the run computed then")
    return cfg, record


def check_run_inputs(cfg, record):
    """Every input file the run recorded when it started must still have the same content (its
    path may have moved with data_root). Runs saved before inputs were recorded are said to be
    unchecked, in one line."""
    recorded = record.get("inputs")
    if recorded is None:
        logger.info(f"the run {record['run_id']} recorded no input digests (an older version "
                    f"wrote it); its inputs are not checked")
        return
    current = input_files(cfg)
    for role, want in recorded.items():         # their structure: read_run_config
        path = current.get(role, want["path"])
        if file_sha256(path) != want["sha256"]:
            raise RunDirError(f"{path} is not the file this run started with (its content "
                              f"changed); a run is bound to its inputs: restore the file, or "
                              f"train a new run")


def read_log(path, run_id):
    """The log records of the run `run_id`. A torn last line (a write cut off by a kill) is
    dropped; any other unreadable line, or a line of another run, is an error."""
    if not os.path.lexists(path):
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
        try:
            check_structure(record, LOG_SPEC, f"{path}: line {number}")
        except StructureError as err:
            raise RunDirError(str(err)) from None
        if record["run_id"] != run_id:
            raise RunDirError(f"{path}: line {number} belongs to another run "
                              f"({record['run_id']!r}, this run is {run_id!r})")
        records.append(record)
    return records


def rewrite_log(path, records):
    atomic_write_text(path, "".join(json_text(r, indent=None) + "\n" for r in records))


class RunLog:
    """A run's `log.jsonl` (one JSON line per epoch) and `run.log` (its messages with a time),
    kept open for the run's life; a full disk is a UserError naming the file."""

    def __init__(self, run_dir, enabled=True):
        self.paths = {name: os.path.join(run_dir, name) for name in ("log.jsonl", "run.log")}
        self.files, self.enabled = {}, enabled

    def _write(self, name, text):
        if not self.enabled:                # the processes of a run but its first write nothing
            return
        try:
            if name not in self.files:
                self.files[name] = open(self.paths[name], "a")
            self.files[name].write(text + "\n")
            self.files[name].flush()
        except OSError as err:
            raise write_error(self.paths[name], err) from None

    def record(self, record):
        self._write("log.jsonl", json_text(record, indent=None))

    def message(self, text):
        self._write("run.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")

    def close(self):
        for handle in self.files.values():
            handle.close()
        self.files = {}


def finished_results(run_dir, record):
    """The results of the finished run of config `record` in `run_dir`, or None while it is
    unfinished."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.lexists(path):
        return None
    results = check_structure(read_json(path, "results file"), RESULTS_SPEC, path)
    if results["run_id"] != record["run_id"]:
        raise RunDirError(f"{path} belongs to another run ({results['run_id']!r})")
    # what the tables take from it must be what the run's config says it trained
    config = record["config"]
    for key, saved in (("config_fingerprint", record["fingerprint"]),
                       ("nbits", config.get("nbits")),
                       ("selection", config.get("train", {}).get("select")),
                       ("epochs", config.get("train", {}).get("num_epochs"))):
        if results[key] != saved:
            raise RunDirError(f"{path} ['{key}'] is {results[key]!r}, but the run's "
                              f"{CONFIG_FILE} says {saved!r}")
    if not 1 <= results["selected_epoch"] <= results["epochs"]:
        raise RunDirError(f"{path} ['selected_epoch']: expected an epoch in 1..{results['epochs']}"
                          f", got {results['selected_epoch']}")
    # as a run that finishes now reports them: the cut-offs R as integers (JSON keeps strings)
    for key in ("test_mAP", "test_precision"):
        if key in results:
            if not results[key] or not all(isinstance(r, str) and r.isdigit() and int(r) >= 1
                                           for r in results[key]):
                raise RunDirError(f"{path} ['{key}']: expected cut-offs R as keys, got "
                                  f"{sorted(results[key])!r}")
            if not all(type(v) in (int, float) and 0 <= v <= 1 for v in results[key].values()):
                raise RunDirError(f"{path} ['{key}']: expected a number in [0, 1] for every "
                                  f"cut-off, got {list(results[key].values())!r}")
            results[key] = {int(r): value for r, value in results[key].items()}
    return results
