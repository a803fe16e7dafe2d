"""Training runs, one or several at once on one device, each in its own run directory
(docs/method.md §10, §13).

A run is set up (artifacts, resident features, model, optimizer, evaluation sets), fitted epoch
by epoch (`fit`), then its selected model is tested and reported. `train_runs` trains a list of
runs together: each keeps its own directory, lock, logs and checkpoints and, on CUDA, its own
stream; the runs step in turn, one step each per round, so the GPU overlaps their small kernels,
and runs of one data set share one resident copy of its features. Nothing random is shared
between runs (optim.engine) and each run's work stays on its stream, so a run trained among
others computes what it computes alone.

Run directory: config.json (the resolved config as data, its fingerprint, the run id and the
sha256 of every input), log.jsonl (one line per epoch), run.log (the messages), last.pth (every
`train.checkpoint_seconds` of wall time, every `train.checkpoint_every` epochs if set, at the
end and when stopped by a signal; written in the background from a host copy), best.pth (the
selected model) and results.json (its test mAP@R, the selection rule, the artifacts, what ran).
"""
import contextlib
import errno
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset.preprocessing import TRAINING_ARTIFACTS, load_artifacts, preprocessed
from dataset.protocol import retrieval_sets, train_set, validation_sets
from inference.retrieval import RetrievalSet
from Loss.losses import LabelTable, S5VHLoss
from model.s5vh import build_model
from optim.distributed import (ShardError, agree, any_process, lost_process,
                               mean_over_processes)
from optim.engine import (TrainStep, draw_step_inputs, step_examples, train_one_epoch,
                          training_loss)
from optim.optimizer import build_optimizer, cosine_lr, load_optimizer_state, set_epoch_lr
from optim.run_dir import (CONFIG_FILE, RunDirError, RunLog, check_fresh, check_run_inputs,
                           empty, finished_results, input_digests, new_run_id, read_log,
                           read_run_config, rewrite_log, write_run_config)
from utils.checkpoint import (RESUME_SPEC, CheckpointError, CheckpointWriter, host_copy,
                              load_checkpoint, load_weights, model_meta)
from utils.config import config_fingerprint, plain_config, same_experiment
from utils.device import resolve_device, return_freed_host_memory
from utils.errors import Interrupted, UserError
from utils.fileio import (SPACE_MARGIN, dir_lock, file_identity, json_text,
                          remove_stale_temporaries, size_text, write_json)
from utils.log import get_logger, log_to_file
from utils.seed import seed_everything
from utils.signals import deferred_stop

logger = get_logger(__name__)

SELECT_METRIC = 5          # model selection by mAP@5, as the authors' release
RESIDENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What torch.save adds to a tensor's bytes (its zip record and pickled entry: about 300) and to
# a file, rounded up
CHECKPOINT_BYTES_PER_TENSOR = 512
CHECKPOINT_BYTES_PER_FILE = 4096
# GPU memory asked for beyond the measured need of the runs, for fragmentation and the graphs'
# static inputs
MEMORY_MARGIN = 1.25
# Evaluation videos that are not training rows stay in memory beside the training features
# (float32, as reading them gives, one copy for all runs) up to this size: reading them from
# their file at every evaluation holds up every run trained in the same process.
RESIDENT_EVAL_BYTES = 2 * 2 ** 30


class NonFiniteLossError(UserError):
    """The training loss became NaN or Inf."""


@dataclass
class Job:
    """One run to train: a fresh run of `cfg` in `run_dir` (`replace`: empty a run's directory
    first), or, with `record` (its saved config.json), the resume of the run saved there."""
    cfg: object
    run_dir: str
    record: Optional[dict] = None
    replace: bool = False


@dataclass
class Run:
    """Everything one training run holds; built by `setup_run`."""
    cfg: object
    run_dir: str
    device: torch.device
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    label_table: LabelTable
    step: TrainStep
    test_set: RetrievalSet
    select_set: Optional[RetrievalSet]
    monitor_set: Optional[RetrievalSet]
    num_videos: int
    run_id: str
    fingerprint: str               # of the config the run was started with
    artifacts: dict
    log: RunLog
    stream: Optional[torch.cuda.Stream] = None
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"score": None, "epoch": None})
    best_weights: Optional[dict] = None          # host copy of the selected model, when seen
    best_on_disk: Optional[int] = None           # epoch of the model in best.pth
    pending: list = field(default_factory=list)  # epochs whose losses are still on their way
    last_save: float = 0.0
    saved_epoch: Optional[int] = None            # epoch of the last last.pth submitted
    epochs_done: int = 0
    concurrent_runs: int = 1                     # runs this process steps beside it, itself too
    captured: bool = False                       # its CUDA graphs are captured (or it has none)
    timing: dict = field(default_factory=dict)   # seconds of the set-up's phases, first epoch
    prefix: str = ""                             # console prefix when several runs train
    shard: object = None                         # optim.distributed.Shard, several processes

    @property
    def writes(self):
        """This process writes the run directory, evaluates and selects (the first of several
        processes, or the only one)."""
        return self.shard is None or self.shard.writes

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def runtime(self):
        """What ran: device, mixer implementation, dtype, CUDA graphs, model parameters."""
        cuda = self.device.type == "cuda"
        return {"device": str(self.device), "mixer": self.model.describe_mixer(),
                "dtype": "bfloat16 autocast" if cuda and self.cfg.train.amp else "float32",
                "cuda_graphs": bool(self.step.use_graphs),
                "compiled": bool(self.cfg.train.compile),
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def on_stream(self):
        """The run's device and stream current (CUDA), nothing else on a CPU."""
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def say(self, text):
        """A message to the console and to the run's run.log (by the writing process)."""
        if self.writes:
            logger.info(self.prefix + text)
            self.log.message(text)


def _resident_features(videos, cfg, device, shared, dtype):
    """The (n, M, D) features of `videos` on `device` in `dtype`, one copy per file version,
    rows and dtype for all the runs that share `shared` (a file changed since is read again)."""
    key = (os.path.realpath(videos.path), tuple(file_identity(videos.path)), videos.key,
           videos.rows.tobytes(), dtype, str(device))
    if key not in shared:
        shared[key] = videos.load_resident(cfg, device, dtype, cfg.preprocess.chunk_videos)
    return shared[key]


def _retrieval_set(name, database, queries, train, cfg, device, shared):
    """RetrievalSet of a protocol whose videos are encoded from memory: the training rows from
    the resident training features `train` (VideoSet, tensor), the other videos from a float32
    copy of their own when it takes at most RESIDENT_EVAL_BYTES."""
    resident = [train]
    for videos in (database, queries):
        inside = set(train[0].rows.tolist()) if videos.path == train[0].path and \
            videos.key == train[0].key else set()
        size = len(videos) * cfg.max_frames * cfg.feature_size * 4
        if not inside.issuperset(videos.rows.tolist()) and size <= RESIDENT_EVAL_BYTES:
            resident.append((videos, _resident_features(videos, cfg, device, shared,
                                                        torch.float32)))
    return RetrievalSet(name, database, queries, resident)


def setup_run(cfg, run_dir, run_id, fingerprint, shared=None, shard=None, device=None):
    """Preprocessing artifacts, resident features, model, optimizer and evaluation sets of a run
    of `cfg` in `run_dir` (which the caller owns). `shared`: resident features of other runs;
    `shard`: this process's place when several train the run (optim.distributed); `device`: the
    GPU a group of runs placed it on (default: the config's device)."""
    t = cfg.train
    device = shard.device if shard is not None else device or resolve_device(t.device)
    if device.type == "cpu":
        return_freed_host_memory()
    seed_everything(cfg.seed)
    clock = _Clock()
    with preprocessed(cfg) as status:       # read the files while no one can replace them
        videos = train_set(cfg)
        pseudo_labels, centers, digests = load_artifacts(cfg, len(videos))
    clock.lap("artifacts")
    shared = {} if shared is None else shared
    features = _resident_features(videos, cfg, device, shared,
                                  RESIDENT_DTYPES[t.resident_dtype])
    clock.lap("features")
    model = build_model(cfg, device)
    criterion = S5VHLoss(centers, t).to(device)
    # several processes: DDP averages the gradients (no CUDA graphs: they would capture its
    # collectives)
    graphs = t.cuda_graphs and device.type == "cuda" and shard is None
    train_model = None
    if shard is not None:
        train_model = torch.nn.parallel.DistributedDataParallel(     # buffers are constants
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    optimizer = build_optimizer(cfg, model, criterion, graphs)
    label_table = LabelTable(pseudo_labels, len(centers), device)
    step_criterion = criterion
    if t.compile:       # Inductor fuses the step's small kernels; one compilation per shape
        # Inductor's deterministic mode: no choice of a kernel's reduction blocks by timing it,
        # which can differ from one process to the next and with it the rounding
        options = {"deterministic": True}
        train_model = torch.compile(model if train_model is None else train_model,
                                    dynamic=False, options=options)
        step_criterion = torch.compile(criterion, dynamic=False, options=options)
    step = TrainStep(model, step_criterion, optimizer, features, label_table, t.batch_size,
                     t.amp, graphs, shard, train_model)
    sets = {"test": _retrieval_set("test", *retrieval_sets(cfg), (videos, features), cfg,
                                   device, shared)}
    if "val" in (t.select, t.monitor):
        sets["val"] = _retrieval_set("val", *validation_sets(cfg, t.val_fraction, cfg.seed),
                                     (videos, features), cfg, device, shared)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    clock.lap("model and evaluation sets")
    writes = shard is None or shard.writes
    return Run(cfg, run_dir, device, model, criterion, optimizer, label_table, step,
               sets["test"], sets.get(t.select), sets.get(t.monitor), len(videos), run_id,
               fingerprint, {**status, **digests}, RunLog(run_dir, writes), stream,
               last_save=time.monotonic(), captured=not step.use_graphs, timing=clock.laps,
               shard=shard)


class _Clock:
    """Seconds of the phases of a set-up, for the run's log."""

    def __init__(self):
        self.laps, self._last = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def resume(run, state, records):
    """Restore the state of checkpoint `state` (None: start again from epoch 0); log records
    after its epoch are dropped (those epochs are trained again)."""
    if state is not None:
        trained_with = state.get("artifacts", {})
        changed = [name for name in TRAINING_ARTIFACTS
                   if name in trained_with and trained_with[name] != run.artifacts[name]]
        if changed:
            raise RunDirError(f"{run.run_dir}: the run was trained with other preprocessing "
                              f"artifacts than these ({', '.join(changed)} differ), so it "
                              f"cannot continue; train a new run")
        path = run.path("last.pth")
        load_weights(run.model, state["model"], path)
        load_weights(run.criterion, state["criterion"], path)
        load_optimizer_state(run.optimizer, state["optimizer"], path)
        try:
            run.label_table.load_state_dict(state["label_table"])
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        run.start_epoch, run.best = state["epoch"], state["best"]
    run.epochs_done = run.start_epoch
    if run.writes:
        rewrite_log(run.path("log.jsonl"), [r for r in records if r["epoch"] <= run.start_epoch])
    run.say(f"resumed {run.run_dir} after epoch {run.start_epoch}")


# ---- one epoch's bookkeeping ---------------------------------------------------------------

# what an epoch's log line gets from the device: the mean losses, and how far the label table
# has moved from the k-means labels (share of changed argmax, mean entropy; docs/method.md §11)
EPOCH_STATS = ("loss", "rec", "con", "ca", "label_changed", "label_entropy")


def _stats_to_host(run, means):
    """Start copying an epoch's mean losses (4,) and label-table drift to the host; (tensor,
    event or None)."""
    stats = torch.cat([means, run.label_table.drift()])
    if run.shard is not None:
        mean_over_processes(stats)          # each process holds its share of the batch's losses
    if run.device.type != "cuda":
        return stats, None
    host = torch.empty(len(EPOCH_STATS), pin_memory=True)
    host.copy_(stats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _arrived(run, record, losses, block):
    """The epoch's statistics (EPOCH_STATS) once they are on the host (None while they are on
    their way, unless `block`); a non-finite loss stops the run before anything else is done
    with it."""
    host, event = losses
    if event is not None:
        if not block and not event.query():
            return None
        event.synchronize()
    values = host.tolist()
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(
            f"{run.run_dir}: non-finite loss in epoch {record['epoch']} (loss/rec/con/ca = "
            f"{values[:4]}); lower train.lr or check the features")
    return values


def _flush(run, block):
    """Write the log lines of the epochs whose losses have arrived (all of them with `block`),
    in order."""
    t = run.cfg.train
    while run.pending:
        record, losses = run.pending[0]
        values = _arrived(run, record, losses, block)
        if values is None:
            return
        run.pending.pop(0)
        record.update(zip(EPOCH_STATS, values))
        run.log.record(record)
        done = record["epoch"]
        if done % t.log_every == 0 or done == t.num_epochs or done == run.start_epoch + 1 or \
                any(key.endswith("_mAP") for key in record):
            run.say(_progress_line(record))


def _evaluate(run, done, record):
    """mAP of the selection set (keeping the best model) and of the monitored set, each once."""
    evaluated = {}
    for retrieval in (run.select_set, run.monitor_set):
        if retrieval is not None and retrieval.name not in evaluated:
            evaluated[retrieval.name] = retrieval.evaluate(run.model, run.cfg, run.device)
            record[f"{retrieval.name}_mAP"] = evaluated[retrieval.name]["mAP"]
    if run.select_set is not None:
        score = evaluated[run.select_set.name]["mAP"][SELECT_METRIC]
        if run.best["score"] is None or score > run.best["score"]:
            run.best = {"score": score, "epoch": done}
            run.best_weights = host_copy(_weights(run, done))


def _save(run, done, writer):
    """last.pth (and best.pth when the selected model changed) from host copies, in the
    background; best.pth is submitted first, so a last.pth on disk always names a best.pth that
    is on disk too."""
    if run.cfg.train.select == "last" and done == run.cfg.train.num_epochs:
        run.best_weights = host_copy(_weights(run, done))
    if run.best_weights is not None and run.best_weights["epoch"] != run.best_on_disk:
        writer.submit(run.path("best.pth"), run.best_weights)
        run.best_on_disk = run.best_weights["epoch"]
    writer.submit(run.path("last.pth"), host_copy({
        **_weights(run, done), "optimizer": run.optimizer.state_dict(),
        "label_table": run.label_table.state_dict(), "best": run.best}))
    run.last_save, run.saved_epoch = time.monotonic(), done


def end_epoch(run, epoch, means, began, writer, stopping):
    """After epoch `epoch` (0-based): evaluate when due, log, save when due (`stopping`: a signal
    came, save now). The log line of an epoch is written once its losses have reached the host,
    before its checkpoint. Only the writing process evaluates and saves."""
    t, done = run.cfg.train, epoch + 1
    record = {"run_id": run.run_id, "epoch": done, "lr": cosine_lr(run.cfg, epoch),
              "train_seconds": round(time.perf_counter() - began, 4),
              "concurrent_runs": run.concurrent_runs}
    if epoch == run.start_epoch:            # compilation and graph capture happen here
        run.timing["first epoch"] = record["train_seconds"]
    losses = _stats_to_host(run, means)
    evaluate = run.writes and (run.select_set or run.monitor_set) and (
        done % t.eval_every == 0 or done == t.num_epochs)
    save = run.writes and (done == t.num_epochs or stopping
                           or t.checkpoint_every and done % t.checkpoint_every == 0
                           or time.monotonic() - run.last_save >= t.checkpoint_seconds)
    if evaluate or save:                    # never evaluate or save after a non-finite loss
        _flush(run, block=True)
        _arrived(run, record, losses, block=True)
    if evaluate:
        _evaluate(run, done, record)
    run.pending.append((record, losses))
    _flush(run, block=save)
    if save:
        _save(run, done, writer)


def fit(run, writer, stop):
    """Train the run from its start epoch to its last; a generator that yields after every step.
    Returns True when the run reached its last epoch, False when `stop` ended it early (after
    the epoch in progress, with a checkpoint)."""
    cfg = run.cfg
    if run.step.use_graphs:
        seconds, began = 0.0, time.perf_counter()
        for _ in run.step.capture_graphs(step_examples(cfg, len(run.step.features),
                                                       run.model.depth, run.device,
                                                       run.start_epoch)):
            seconds += time.perf_counter() - began
            yield                           # other runs step between the eager steps and captures
            began = time.perf_counter()
        run.timing["graph capture"] = round(seconds, 3)
        run.captured = True
    for epoch in range(run.start_epoch, cfg.train.num_epochs):
        set_epoch_lr(run.optimizer, cosine_lr(cfg, epoch))
        began = time.perf_counter()
        means = yield from train_one_epoch(run.step, epoch, cfg)
        stopping = stop.requested if run.shard is None else any_process(stop.requested,
                                                                        run.device)
        end_epoch(run, epoch, means, began, writer, stopping)
        run.epochs_done = epoch + 1
        if stopping or stop.requested:      # it may have come after end_epoch decided to save
            if run.writes and run.saved_epoch != epoch + 1:
                _flush(run, block=True)
                _save(run, epoch + 1, writer)
            return False
    return True


def select_and_test(run, writer):
    """Load the selected model (the last epoch for select='last') and score it on the test set."""
    t = run.cfg.train
    if t.select == "last":
        run.best = {"score": None, "epoch": t.num_epochs}
    else:
        selected = run.best_weights
        if selected is None:                # chosen before a resume: read it back
            writer.wait()
            selected = load_checkpoint(run.path("best.pth"), run.cfg, run_id=run.run_id,
                                       fingerprint=run.fingerprint)
            if selected["epoch"] != run.best["epoch"]:
                raise CheckpointError(f"{run.path('best.pth')} holds epoch {selected['epoch']}, "
                                      f"but last.pth selected epoch {run.best['epoch']}")
        load_weights(run.model, selected["model"], run.path("best.pth"))
    return run.test_set.evaluate(run.model, run.cfg, run.device)


def report(run, result, writer):
    """results.json of the run, written by `writer` after the run's checkpoints (a results.json
    on disk says they are there too); returns its contents."""
    cfg = run.cfg
    results = {"selection": cfg.train.select, "selected_epoch": run.best["epoch"],
               "selection_score_mAP@5": run.best["score"], "nbits": cfg.nbits,
               "test_mAP": result["mAP"], "test_precision": result["precision"],
               "epochs": cfg.train.num_epochs, "runtime": run.runtime(),
               "run_id": run.run_id, "config_fingerprint": run.fingerprint,
               "artifacts": run.artifacts, "timing": run.timing}
    writer.submit(run.path("results.json"), results, write_json)
    return results


def _finish(run, writer):
    """Select, test and report a run whose last epoch is done (the other processes of a run
    report nothing). Nothing waits for the writes: the other runs keep training meanwhile."""
    if not run.writes:
        return None
    with run.on_stream():
        result = select_and_test(run, writer)
    results = report(run, result, writer)
    run.say(f"finished: test mAP@{SELECT_METRIC} {result['mAP'][SELECT_METRIC]:.4f} "
            f"(selection: {run.cfg.train.select}, epoch {run.best['epoch']})")
    return results


# ---- several runs at once -------------------------------------------------------------------

def _step_memory(run):
    """Bytes one training step of `run` needs beyond its parameters (activations, gradients),
    measured with a forward and backward pass that changes nothing (no optimizer step, no
    label update), plus the optimizer's two moments."""
    device = run.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    generator = torch.Generator(device=device).manual_seed(0)
    index = torch.arange(min(run.cfg.train.batch_size, run.num_videos), device=device)
    inputs = draw_step_inputs(index, run.cfg.max_frames, run.cfg.train.mask_ratio,
                              run.model.depth, generator)
    loss, _ = training_loss(run.model, run.criterion, run.step.features[index].float(), inputs,
                            run.label_table, None, run.step.amp)
    loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)          # the runs' streams may reuse this memory next
    peak = torch.cuda.max_memory_allocated(device) - before
    moments = 2 * sum(p.numel() * p.element_size() for p in run.model.parameters())
    return peak + moments


def check_memory(runs):
    """Before training: stop with one line when the runs' steps (and their CUDA graphs) will not
    fit in the GPU memory that is free; one dry step is measured per distinct model and batch."""
    for device in sorted({run.device for run in runs if run.device.type == "cuda"}, key=str):
        _check_device_memory(device, [run for run in runs if run.device == device])


def _check_device_memory(device, cuda):
    measured, need = {}, 0
    for run in cuda:
        c = run.cfg
        key = json_text([plain_config(c)["model"], c.nbits, c.train.batch_size, c.train.amp,
                         c.feature_size, c.max_frames], indent=None)
        if key not in measured:
            with torch.cuda.device(device):       # the Triton scan launches on the current one
                measured[key] = _step_memory(run)
        # the graph pools of the full and the last batch, and the eager steps before capture
        need += measured[key] * (3 if run.step.use_graphs else 1)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need * MEMORY_MARGIN > free:
        per_run = need / len(cuda)
        fits = max(1, int(free / MEMORY_MARGIN // per_run))
        raise UserError(f"the {len(cuda)} runs on {device} need about "
                        f"{need * MEMORY_MARGIN / 2 ** 30:.1f} GiB of GPU memory and "
                        f"{free / 2 ** 30:.1f} GiB are free; train at most {fits} at a time "
                        f"(--concurrent {fits})")


def _checkpoint_bytes(run):
    """Upper estimates of the sizes of `run`'s best.pth (model and loss weights) and last.pth
    (those, AdamW's two moments and the label table), from the tensors they hold."""
    def size(tensors):
        return sum(t.numel() * t.element_size() + CHECKPOINT_BYTES_PER_TENSOR for t in tensors)
    best = size([*run.model.state_dict().values(), *run.criterion.state_dict().values()])
    best += len(json_text(plain_config(run.cfg))) + CHECKPOINT_BYTES_PER_FILE
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    last = best + 2 * size(params) + size(run.label_table.state_dict().values())
    return best, last


def check_disk(runs):
    """Before training: stop with one line when a file system lacks the room the runs'
    checkpoints will take. A run holds best.pth and last.pth, and for a moment the next
    last.pth beside the one it replaces; a resumed run's files are already there."""
    need = {}
    for run in runs:
        if not run.writes:
            continue
        best, last = _checkpoint_bytes(run)
        there = sum(os.path.getsize(run.path(name)) for name in ("best.pth", "last.pth")
                    if os.path.isfile(run.path(name)))
        device = os.stat(run.run_dir).st_dev
        folders, total = need.get(device, ([], 0))
        need[device] = (folders + [run.run_dir], total + max(0, best + 2 * last - there))
    for folders, total in need.values():
        free = shutil.disk_usage(folders[0]).free
        if total + SPACE_MARGIN > free:
            where = folders[0] if len(folders) == 1 else os.path.dirname(folders[0])
            raise UserError(f"cannot write the checkpoints of {len(folders)} run"
                            f"{'s' if len(folders) != 1 else ''} in {where}: "
                            f"{os.strerror(errno.ENOSPC)} (they need about "
                            f"{size_text(total)}, and {size_text(SPACE_MARGIN)} to spare; "
                            f"{size_text(free)} are free)")


def _lockstep(runs, writer, stop, bar):
    """Step every run in turn, each on its own stream, until each has finished or stopped;
    returns the results of the finished ones by run directory. Runs that use CUDA graphs join
    one at a time: a run captures its graphs between the steps of those already training, whose
    work keeps the GPU busy while the CPU captures. After a signal no run joins."""
    waiting, active, results = list(runs), {}, {}
    while waiting or active:
        while waiting and not stop.requested and all(run.captured for run, _ in active.values()):
            run = waiting.pop(0)
            active[run.run_dir] = (run, fit(run, writer, stop))
        if stop.requested:
            waiting.clear()
        for run_dir, (run, steps) in list(active.items()):
            run.concurrent_runs = len(active)       # its epochs' seconds are shared with them
            with run.on_stream():
                try:
                    next(steps)
                    continue
                except StopIteration as end:
                    reached_the_end = end.value
            del active[run_dir]
            if reached_the_end:
                results[run_dir] = _finish(run, writer)
        if bar is not None:
            bar.update(sum(run.epochs_done for run in runs) - bar.n)
    return results


@dataclass
class _Opened:
    """A job whose run directory this process now owns."""
    job: Job
    run_id: str
    fingerprint: str
    state: Optional[dict] = None            # last.pth of a resumed run
    records: list = field(default_factory=list)
    created: list = field(default_factory=list)   # folders a fresh run made (removed on failure)
    results: Optional[dict] = None          # a resumed run that had already finished


def _parents(path):
    """`path` and the folders above it that do not exist yet, outermost first."""
    missing, current = [], os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    return missing[::-1]


def _open(job, stack, writes=True):
    """Take ownership of the job's run directory (locked until `stack` closes) and check what it
    holds, before any work. A process that does not write (not the first of a run's several)
    only reads what a resume needs."""
    cfg, run_dir = job.cfg, job.run_dir
    if not writes:
        opened = _Opened(job, *(("", "") if job.record is None
                                else (job.record["run_id"], job.record["fingerprint"])))
        last = os.path.join(run_dir, "last.pth")
        if job.record is not None and os.path.lexists(last):
            opened.state = load_checkpoint(last, cfg, run_id=opened.run_id,
                                           fingerprint=opened.fingerprint, spec=RESUME_SPEC,
                                           max_epoch=cfg.train.num_epochs)
            opened.results = finished_results(run_dir, job.record)
        return opened
    if job.record is None:
        created = _parents(run_dir)
        check_fresh(run_dir, job.replace)
        os.makedirs(run_dir, exist_ok=True)
        stack.enter_context(dir_lock(run_dir, "run directory"))
        empty(run_dir)
        run_id = new_run_id()
        write_run_config(cfg, run_dir, run_id, input_digests(cfg))
        return _Opened(job, run_id, config_fingerprint(cfg), created=created)
    record = job.record
    stack.enter_context(dir_lock(run_dir, "run directory"))
    opened = _Opened(job, record["run_id"], record["fingerprint"])
    opened.results = finished_results(run_dir, record)
    if opened.results is not None:
        return opened
    check_run_inputs(cfg, record)
    last = os.path.join(run_dir, "last.pth")
    if os.path.lexists(last):
        opened.state = load_checkpoint(last, cfg, run_id=record["run_id"],
                                       fingerprint=record["fingerprint"], spec=RESUME_SPEC,
                                       max_epoch=cfg.train.num_epochs)
    opened.records = read_log(os.path.join(run_dir, "log.jsonl"), record["run_id"])
    removed = remove_stale_temporaries(run_dir)
    if removed:
        logger.info(f"{run_dir}: removed leftovers of an interrupted write: {', '.join(removed)}")
    return opened


def _discard(opened):
    """Remove what a fresh run wrote when it failed before training."""
    run_dir = opened.job.run_dir
    if os.path.isdir(run_dir):
        empty(run_dir)
    for folder in reversed(opened.created):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def place_runs(jobs):
    """The device of each job: runs that train on CUDA go round-robin over every visible GPU
    (a run's numbers do not depend on which one), the others where their config says."""
    devices = [resolve_device(job.cfg.train.device) for job in jobs]
    gpus = torch.cuda.device_count() if all(d.type == "cuda" for d in devices) else 0
    if gpus < 2:
        return devices
    return [torch.device("cuda", i % gpus) for i in range(len(jobs))]


def _set_up(opened, shared, several, shard=None, device=None):
    job = opened.job
    log = log_to_file(os.path.join(job.run_dir, "run.log")) if shard is None or shard.writes \
        else contextlib.nullcontext()
    with log:
        run = setup_run(job.cfg, job.run_dir, opened.run_id, opened.fingerprint, shared, shard,
                        device)
    if several:
        run.prefix = f"[{os.path.basename(os.path.normpath(job.run_dir))}] "
    if job.record is not None:
        resume(run, opened.state, opened.records)
    if run.stream is not None:      # the set-up's work (a resume's copies too) comes first
        run.stream.wait_stream(torch.cuda.current_stream(run.device))
    return run


def _resume_command(runs):
    """runs: Runs or Jobs."""
    return "python train.py --resume " + " ".join(run.run_dir for run in runs)


def _train_group(jobs, writer, progress, several, shared, shard=None):
    """Open, set up and train `jobs` together; {run_dir: results}. `shared`: the resident
    features of earlier groups, which this one uses too. With `shard` (one job, several
    processes) every process does its part, and they stop together when one fails."""
    results = {}
    writes = shard is None or shard.writes
    with contextlib.ExitStack() as stack:
        opened = []
        runs = []
        try:
            failure = None
            try:
                for job in jobs:
                    opened.append(_open(job, stack, writes))
            except UserError as err:
                failure = err
            if shard is not None:
                agree(shard, failure)
            if failure is not None:
                raise failure
            placed = dict(zip((o.job.run_dir for o in opened), place_runs(jobs)))
            # runs of one seed after another: the clustering of a seed is then made once
            for item in sorted(opened, key=lambda o: (o.job.cfg.paths.artifact_dir,
                                                      o.job.cfg.seed, o.job.cfg.nbits)):
                if item.results is not None:
                    logger.info(f"{item.job.run_dir}: the run is already finished; its "
                                f"results follow")
                    results[item.job.run_dir] = item.results
                else:
                    runs.append(_set_up(item, shared, several, shard,
                                        None if shard else placed[item.job.run_dir]))
            check_memory(runs)
            check_disk(runs)
        except BaseException:
            for item in opened:
                if item.job.record is None and writes:
                    _discard(item)
            raise
        for run in runs:
            runtime = run.runtime()
            run.say("set-up: " + ", ".join(f"{k} {v:.2f}s" for k, v in run.timing.items()))
            run.say(f"training {run.num_videos} videos on {run.device}, "
                    f"{runtime['parameters']:,} parameters, epochs {run.start_epoch + 1}.."
                    f"{run.cfg.train.num_epochs}, select={run.cfg.train.select}; mixer "
                    f"{runtime['mixer']}, {runtime['dtype']}, CUDA graphs "
                    f"{'on' if runtime['cuda_graphs'] else 'off'}"
                    + (", torch.compile on" if runtime["compiled"] else ""))
        total = sum(run.cfg.train.num_epochs for run in runs)
        bar = tqdm(total=total, initial=sum(run.epochs_done for run in runs), unit="epoch",
                   desc=f"{len(runs)} run{'s' if len(runs) != 1 else ''}", leave=False,
                   disable=not progress or not runs, dynamic_ncols=True)
        try:
            with deferred_stop() as stop:
                results.update(_lockstep(runs, writer, stop, bar))
            writer.wait()
        finally:
            bar.close()
            for run in runs:
                run.log.close()
        if stop.requested:
            stopped = [run for run in runs if run.run_dir not in results]
            raise Interrupted(stop.signal, f"interrupted by {stop.signal}: each run that had "
                                           f"started saved its last.pth after its current "
                                           f"epoch; continue with: {_resume_command(stopped)}")
    return results


def train_runs(jobs, progress=True, concurrent=None, shard=None, shared=None):
    """Train `jobs` (a list of Job), `concurrent` at a time (default: all together); returns
    their results in the same order. Every run directory is opened and checked before any
    run is set up. With `shard`, this process is one of several that train one job together
    (optim.distributed); only the first returns its results, the others None. `shared`: a
    dict of resident features kept from earlier calls (and for later ones), else one for this
    call's groups."""
    if shard is not None and len(jobs) != 1:
        raise ShardError(f"several processes train one run together; {len(jobs)} runs were "
                         f"asked for (give one code length and one seed)")
    concurrent = concurrent or len(jobs)
    results = {}
    shared = {} if shared is None else shared      # resident features, loaded once
    writer = CheckpointWriter()
    try:
        for start in range(0, len(jobs), concurrent):
            group = jobs[start:start + concurrent]
            results.update(_train_group(group, writer, progress, len(jobs) > 1, shared, shard))
    except (dist.DistError, RuntimeError) as err:
        if shard is None or not lost_process(err):
            raise
        raise ShardError(f"another process of this run stopped or does not answer "
                         f"({type(err).__name__}); continue with: "
                         f"{_resume_command([job for job in jobs])}") from None
    finally:
        writer.close()
    return [results.get(job.run_dir) for job in jobs]


def start_run(cfg, run_dir=None, replace=False, progress=True):
    """A fresh run of `cfg` in `run_dir` (default cfg.paths.run_dir); its results dict."""
    return train_runs([Job(cfg, run_dir or cfg.paths.run_dir, replace=replace)], progress)[0]


def resume_run(run_dir, overrides=(), progress=True):
    """Continue the run saved in `run_dir` from its last.pth (from the start when it stopped
    before its first save); a finished run is not trained again: its results are returned."""
    cfg, record = read_run_config(run_dir, overrides)
    return train_runs([Job(cfg, run_dir, record)], progress)[0]


def plan_run(cfg, run_dir):
    """The Job that gives the results of a run of `cfg` in `run_dir`, for tools that own their
    run directories: a run of the same experiment on the same inputs is reused (resumed, or
    reported when finished), anything else in the directory replaced by a fresh run."""
    if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        saved, record = read_run_config(run_dir)
        if same_experiment(saved, cfg):
            try:
                check_run_inputs(cfg, record)
                return Job(saved, run_dir, record)
            except RunDirError as err:
                logger.info(f"{run_dir}: training again, {err}")
        else:
            logger.info(f"{run_dir}: replacing a run of another config")
    return Job(cfg, run_dir, replace=True)


def _weights(run, epoch):
    return {"model": run.model.state_dict(), "criterion": run.criterion.state_dict(),
            "epoch": epoch, "meta": model_meta(run.cfg), "run_id": run.run_id,
            "config_fingerprint": run.fingerprint, "artifacts": run.artifacts,
            "config": json_text(plain_config(run.cfg))}


def _progress_line(record):
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f} (rec {record['rec']:.4f} "
            f"con {record['con']:.4f} ca {record['ca']:.4f}) lr {record['lr']:.2e} "
            f"{record['train_seconds']:.2f}s")
    for key in ("val_mAP", "test_mAP"):
        if key in record:
            text += f" | {key[:-4]} mAP@5 {record[key][SELECT_METRIC]:.4f}"
    return text
