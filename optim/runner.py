"""A training run in one run directory: set up, resume, fit epoch by epoch, select, report.

Run directory (docs/method.md §10): config.json (the resolved config as data, its fingerprint and
the run id), log.jsonl (one line per epoch), run.log (the messages), last.pth (every
`train.checkpoint_every` epochs and at the end), best.pth (the selected model), results.json (its
test mAP@R, the selection rule, the artifacts and what ran). `start_run` and `resume_run` own the
directory for the run's whole life; each step is a function of a `Run`.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from dataset.preprocessing import ensure_preprocessed, load_artifacts
from dataset.protocol import retrieval_sets, train_set, validation_sets
from dataset.provenance import file_sha256
from inference.retrieval import RetrievalSet
from Loss.losses import LabelTable, S5VHLoss
from model.s5vh import build_model
from optim.engine import TrainStep, train_one_epoch
from optim.optimizer import build_optimizer
from optim.run_dir import (CONFIG_FILE, RunDirError, check_fresh, empty, finished_results,
                           new_run_id, read_log, read_run_config, rewrite_log, write_run_config)
from utils.checkpoint import load_checkpoint, model_meta, save_checkpoint
from utils.config import config_fingerprint, plain_config
from utils.device import resolve_device
from utils.fileio import append_line, dir_lock, json_text, remove_stale_temporaries, write_json
from utils.log import get_logger, log_to_file
from utils.seed import rng_state, seed_everything, set_rng_state

logger = get_logger(__name__)

SELECT_METRIC = 5          # model selection by mAP@5, as the authors' release
RESIDENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    """Everything one training run holds; built by `setup_run`."""
    cfg: object
    run_dir: str
    device: torch.device
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    label_table: LabelTable
    step: TrainStep
    test_set: RetrievalSet
    select_set: Optional[RetrievalSet]
    monitor_set: Optional[RetrievalSet]
    num_videos: int
    run_id: str
    fingerprint: str               # of the config the run was started with
    artifacts: dict
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"score": None, "epoch": None})

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def runtime(self):
        """What ran: device, mixer implementation, dtype, CUDA graphs, model parameters."""
        cuda = self.device.type == "cuda"
        return {"device": str(self.device), "mixer": self.model.describe_mixer(),
                "dtype": "bfloat16 autocast" if cuda and self.cfg.train.amp else "float32",
                "cuda_graphs": bool(self.step.use_graphs),
                "parameters": sum(p.numel() for p in self.model.parameters())}


def setup_run(cfg, run_dir, run_id, fingerprint):
    """Preprocessing artifacts, resident features, model, optimizer and evaluation sets of a run
    of `cfg` in `run_dir` (which the caller owns)."""
    t = cfg.train
    device = resolve_device(t.device)
    seed_everything(cfg.seed)
    artifacts = ensure_preprocessed(cfg)
    artifacts["hash_center_sha256"] = file_sha256(cfg.paths.hash_center)
    videos = train_set(cfg)
    features = videos.load_resident(cfg, device, RESIDENT_DTYPES[t.resident_dtype],
                                    cfg.preprocess.chunk_videos)                # (N, M, D)
    pseudo_labels, centers = load_artifacts(cfg, len(videos))
    model = build_model(cfg, device)
    criterion = S5VHLoss(centers, t).to(device)
    graphs = t.cuda_graphs and device.type == "cuda"
    optimizer, scheduler = build_optimizer(cfg, model, criterion, graphs)
    label_table = LabelTable(pseudo_labels, len(centers), device)
    step = TrainStep(model, criterion, optimizer, features, label_table, t.batch_size, t.amp,
                     graphs)
    sets = {"test": RetrievalSet("test", *retrieval_sets(cfg), videos, features)}
    if "val" in (t.select, t.monitor):
        sets["val"] = RetrievalSet("val", *validation_sets(cfg, t.val_fraction, cfg.seed), videos,
                                   features)
    return Run(cfg, run_dir, device, model, criterion, optimizer, scheduler, label_table, step,
               sets["test"], sets.get(t.select), sets.get(t.monitor), len(videos), run_id,
               fingerprint, artifacts)


def resume(run, state, records):
    """Restore the state of checkpoint `state`; log records after its epoch are dropped (those
    epochs are trained again)."""
    run.model.load_state_dict(state["model"])
    run.criterion.load_state_dict(state["criterion"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.label_table.load_state_dict(state["label_table"])
    set_rng_state(state["rng"])
    run.start_epoch, run.best = state["epoch"], state["best"]
    rewrite_log(run.path("log.jsonl"), [r for r in records if r["epoch"] <= run.start_epoch])
    logger.info(f"resumed {run.run_dir} after epoch {run.start_epoch}")


def fit_epoch(run, epoch, progress=True):
    """Train epoch `epoch` (0-based), evaluate it if due, log it, save checkpoints; its record.

    The log line is written before last.pth, so a kill between the two leaves a line the resume
    drops, never a checkpoint without its line."""
    t = run.cfg.train
    began = time.perf_counter()
    lr = float(run.optimizer.param_groups[0]["lr"])
    stats = train_one_epoch(run.step, epoch, run.cfg, progress)
    run.scheduler.step()
    done = epoch + 1
    record = {"run_id": run.run_id, "epoch": done, "lr": lr, **stats,
              "train_seconds": round(time.perf_counter() - began, 3)}
    if done % t.eval_every == 0 or done == t.num_epochs:
        _evaluate(run, done, record)
    record["seconds"] = round(time.perf_counter() - began, 3)
    append_line(run.path("log.jsonl"), json_text(record, indent=None))
    if done % t.checkpoint_every == 0 or done == t.num_epochs:
        save_checkpoint(run.path("last.pth"), {
            **_weights(run, done), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "label_table": run.label_table.state_dict(),
            "rng": rng_state(), "best": run.best})
    logger.info(_progress_line(record))
    return record


def _evaluate(run, done, record):
    """mAP of the selection set (keeping best.pth) and of the monitored set, each once."""
    evaluated = {}
    for retrieval in (run.select_set, run.monitor_set):
        if retrieval is not None and retrieval.name not in evaluated:
            evaluated[retrieval.name] = retrieval.evaluate(run.model, run.cfg, run.device)
            record[f"{retrieval.name}_mAP"] = evaluated[retrieval.name]["mAP"]
    if run.select_set is not None:
        _keep_if_best(run, done, evaluated[run.select_set.name])


def _keep_if_best(run, done, result):
    score = result["mAP"][SELECT_METRIC]
    if run.best["score"] is None or score > run.best["score"]:
        run.best = {"score": score, "epoch": done}
        save_checkpoint(run.path("best.pth"), _weights(run, done))


def select_and_test(run):
    """Load the selected model (the last epoch for select='last') and score it on the test set."""
    t = run.cfg.train
    if t.select == "last":
        run.best = {"score": None, "epoch": t.num_epochs}
        save_checkpoint(run.path("best.pth"), _weights(run, t.num_epochs))
    else:
        run.model.load_state_dict(load_checkpoint(run.path("best.pth"), run.cfg)["model"])
    return run.test_set.evaluate(run.model, run.cfg, run.device)


def report(run, result):
    """results.json of the run; returns its contents."""
    cfg = run.cfg
    results = {"selection": cfg.train.select, "selected_epoch": run.best["epoch"],
               "selection_score_mAP@5": run.best["score"], "nbits": cfg.nbits,
               "test_mAP": result["mAP"], "test_precision": result["precision"],
               "epochs": cfg.train.num_epochs, "runtime": run.runtime(),
               "run_id": run.run_id, "config_fingerprint": run.fingerprint,
               "artifacts": run.artifacts}
    write_json(run.path("results.json"), results)
    return results


def _train(run, progress):
    runtime = run.runtime()
    logger.info(f"training {run.num_videos} videos on {run.device}, "
                f"{runtime['parameters']:,} parameters, "
                f"{run.cfg.train.num_epochs} epochs, select={run.cfg.train.select}")
    logger.info(f"mixer {runtime['mixer']}, {runtime['dtype']}, CUDA graphs "
                f"{'on' if runtime['cuda_graphs'] else 'off'}")
    for epoch in range(run.start_epoch, run.cfg.train.num_epochs):
        fit_epoch(run, epoch, progress)
    return report(run, select_and_test(run))


def start_run(cfg, run_dir=None, replace=False, progress=True):
    """A fresh run of `cfg` in `run_dir` (default cfg.paths.run_dir), which must be missing or
    empty unless `replace` (then it is emptied first). Returns the results dict.

    A run that fails before its first epoch removes its run directory again."""
    run_dir = run_dir or cfg.paths.run_dir
    # the folders this run creates, outermost first: removed again if it fails before training
    created = [folder for folder in reversed([run_dir, *_parents(run_dir)])
               if not os.path.isdir(folder)]
    check_fresh(run_dir, replace)
    os.makedirs(run_dir, exist_ok=True)
    with dir_lock(run_dir, "run directory"):
        empty(run_dir)
        run_id, started = new_run_id(), False
        try:
            write_run_config(cfg, run_dir, run_id)
            with log_to_file(os.path.join(run_dir, "run.log")):
                run = setup_run(cfg, run_dir, run_id, config_fingerprint(cfg))
                started = True
                return _train(run, progress)
        except BaseException:
            if not started:
                empty(run_dir)
                for folder in reversed(created or [run_dir]):
                    if not os.listdir(folder):
                        os.rmdir(folder)
            raise


def _parents(path):
    """The parent folders of `path`, innermost first."""
    parents, current = [], os.path.dirname(os.path.abspath(path))
    while current != os.path.dirname(current):
        parents.append(current)
        current = os.path.dirname(current)
    return parents


def resume_run(cfg, record, run_dir, progress=True):
    """Continue the run of config `cfg` (saved as `record` in `run_dir`) from last.pth, after
    checking that checkpoint, config and log belong together. A finished run is not trained
    again: its results are returned as they are."""
    with dir_lock(run_dir, "run directory"):
        results = finished_results(run_dir, record)
        if results is not None:
            logger.info(f"{run_dir}: the run is already finished; its results follow")
            return results
        last = os.path.join(run_dir, "last.pth")
        if not os.path.isfile(last):
            raise RunDirError(f"{run_dir}: nothing to resume (no last.pth: the run stopped before "
                              f"its first checkpoint); start it over with --replace")
        state = load_checkpoint(last, cfg, run_id=record["run_id"],
                                fingerprint=record["fingerprint"])
        records = read_log(os.path.join(run_dir, "log.jsonl"), record["run_id"])
        removed = remove_stale_temporaries(run_dir)
        with log_to_file(os.path.join(run_dir, "run.log")):
            if removed:
                logger.info(f"removed leftovers of an interrupted write: {', '.join(removed)}")
            run = setup_run(cfg, run_dir, record["run_id"], record["fingerprint"])
            resume(run, state, records)
            return _train(run, progress)


def ensure_run(cfg, run_dir, progress=False):
    """The results of a run of `cfg` in `run_dir`, for tools that own their run directories: a
    finished run of the same config is reused, an unfinished one resumed, and anything else in
    the directory (another config) replaced by a fresh run."""
    if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        saved, record = read_run_config(run_dir)
        if record["fingerprint"] == config_fingerprint(cfg):
            if finished_results(run_dir, record) is not None or os.path.isfile(
                    os.path.join(run_dir, "last.pth")):
                return resume_run(saved, record, run_dir, progress)
        logger.info(f"{run_dir}: replacing a run of another config, or one stopped before its "
                    f"first checkpoint")
    return start_run(cfg, run_dir, replace=True, progress=progress)


def _weights(run, epoch):
    return {"model": run.model.state_dict(), "criterion": run.criterion.state_dict(),
            "epoch": epoch, "meta": model_meta(run.cfg), "run_id": run.run_id,
            "config_fingerprint": run.fingerprint, "config": json_text(plain_config(run.cfg))}


def _progress_line(record):
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f} (rec {record['rec']:.4f} "
            f"con {record['con']:.4f} ca {record['ca']:.4f}) lr {record['lr']:.2e} "
            f"{record['train_seconds']:.1f}s")
    for key in ("val_mAP", "test_mAP"):
        if key in record:
            text += f" | {key[:-4]} mAP@5 {record[key][SELECT_METRIC]:.4f}"
    return text
