"""A training run in one run directory: set up, resume, fit epoch by epoch, select, report.

Run directory: config.py (resolved), log.jsonl (one line per epoch), run.log (the messages),
last.pth (every `train.checkpoint_every` epochs and at the end), best.pth (the selected model),
results.json (its test mAP@R, the selection rule and what ran). `run_training` strings the steps
together; each step is a function of a `Run`, so a caller can stop after any epoch and resume.
"""
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from dataset.demo import ensure_demo_data
from dataset.preprocessing import ensure_preprocessed, load_artifacts
from dataset.protocol import retrieval_sets, train_set, validation_sets
from inference.retrieval import RetrievalSet
from Loss.losses import LabelTable, S5VHLoss
from model.s5vh import build_model
from optim.engine import TrainStep, train_one_epoch
from optim.optimizer import build_optimizer
from utils.checkpoint import load_checkpoint, model_meta, save_checkpoint
from utils.config import config_text, dump_config
from utils.device import resolve_device
from utils.fileio import atomic_write_text, write_json
from utils.log import get_logger, log_to_file
from utils.seed import rng_state, seed_everything, set_rng_state

logger = get_logger(__name__)

SELECT_RULES = ("last", "val", "test")
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
    num_videos: int
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"score": None, "epoch": None})

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def runtime(self):
        """What ran: device, mixer implementation, dtype and CUDA graphs."""
        cuda = self.device.type == "cuda"
        return {"device": str(self.device), "mixer": self.model.describe_mixer(),
                "dtype": "bfloat16 autocast" if cuda and self.cfg.train.amp else "float32",
                "cuda_graphs": bool(self.step.use_graphs)}


def setup_run(cfg, run_dir=None):
    """Inputs, preprocessing, model, optimizer and evaluation sets of a run of `cfg`."""
    t = cfg.train
    if t.select not in SELECT_RULES:
        raise ValueError(f"train.select must be one of {SELECT_RULES}, got '{t.select}'")
    if t.checkpoint_every < 1:
        raise ValueError(f"train.checkpoint_every must be at least 1, got {t.checkpoint_every}")
    if t.resident_dtype not in RESIDENT_DTYPES:
        raise ValueError(f"train.resident_dtype must be one of {sorted(RESIDENT_DTYPES)}, "
                         f"got '{t.resident_dtype}'")
    run_dir = run_dir or cfg.paths.run_dir
    os.makedirs(run_dir, exist_ok=True)
    device = resolve_device(t.device)
    seed_everything(cfg.seed)
    ensure_demo_data(cfg)
    ensure_preprocessed(cfg)
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
    test_set = RetrievalSet("test", *retrieval_sets(cfg), videos, features)
    select_set = None
    if t.select == "val":
        select_set = RetrievalSet("val", *validation_sets(cfg, t.val_fraction, cfg.seed), videos,
                                  features)
    elif t.select == "test":
        select_set = test_set
    return Run(cfg, run_dir, device, model, criterion, optimizer, scheduler, label_table, step,
               test_set, select_set, len(videos))


def start_fresh(run):
    """A new run: an empty log and the resolved config in the run directory."""
    if os.path.exists(run.path("log.jsonl")):
        os.remove(run.path("log.jsonl"))
    dump_config(run.cfg, run.path("config.py"))


def resume(run):
    """Restore the state of last.pth; log lines of epochs after it are dropped (retrained)."""
    state = load_checkpoint(run.path("last.pth"), run.cfg)
    run.model.load_state_dict(state["model"])
    run.criterion.load_state_dict(state["criterion"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.label_table.load_state_dict(state["label_table"])
    set_rng_state(state["rng"])
    run.start_epoch, run.best = state["epoch"], state["best"]
    _truncate_log(run.path("log.jsonl"), run.start_epoch)
    logger.info(f"resumed {run.run_dir} after epoch {run.start_epoch}")


def fit_epoch(run, epoch, progress=True):
    """Train epoch `epoch` (0-based), evaluate it if due, save checkpoints, log; its record."""
    t = run.cfg.train
    began = time.perf_counter()
    lr = float(run.optimizer.param_groups[0]["lr"])
    stats = train_one_epoch(run.step, epoch, run.cfg, progress)
    run.scheduler.step()
    done = epoch + 1
    record = {"epoch": done, "lr": lr, **stats,
              "train_seconds": round(time.perf_counter() - began, 3)}
    if run.select_set is not None and (done % t.eval_every == 0 or done == t.num_epochs):
        _evaluate_for_selection(run, done, record)
    record["seconds"] = round(time.perf_counter() - began, 3)
    if done % t.checkpoint_every == 0 or done == t.num_epochs:
        save_checkpoint(run.path("last.pth"), {
            **_weights(run, done), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "label_table": run.label_table.state_dict(),
            "rng": rng_state(), "best": run.best})
    with open(run.path("log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info(_progress_line(record))
    return record


def _evaluate_for_selection(run, done, record):
    result = run.select_set.evaluate(run.model, run.cfg, run.device)
    record[f"{run.select_set.name}_mAP"] = result["mAP"]
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
    results = {"selection": run.cfg.train.select, "selected_epoch": run.best["epoch"],
               "selection_score_mAP@5": run.best["score"], "nbits": run.cfg.nbits,
               "test_mAP": result["mAP"], "test_precision": result["precision"],
               "epochs": run.cfg.train.num_epochs, "runtime": run.runtime()}
    write_json(run.path("results.json"), results)
    return results


def run_training(cfg, run_dir=None, resume_run=False, progress=True):
    """Train `cfg` into `run_dir` (default cfg.paths.run_dir), or continue it from last.pth with
    `resume_run`; returns the results dict."""
    run = setup_run(cfg, run_dir)
    with log_to_file(run.path("run.log")):
        if resume_run:
            resume(run)
        else:
            start_fresh(run)
        logger.info(f"training {run.num_videos} videos on {run.device}, "
                    f"{sum(p.numel() for p in run.model.parameters()):,} parameters, "
                    f"{cfg.train.num_epochs} epochs, select={cfg.train.select}")
        runtime = run.runtime()
        logger.info(f"mixer {runtime['mixer']}, {runtime['dtype']}, CUDA graphs "
                    f"{'on' if runtime['cuda_graphs'] else 'off'}")
        for epoch in range(run.start_epoch, cfg.train.num_epochs):
            fit_epoch(run, epoch, progress)
        return report(run, select_and_test(run))


def _truncate_log(path, epoch):
    """Keep the log lines of epochs up to `epoch`."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["epoch"] <= epoch]
        atomic_write_text(path, "".join(lines))


def _weights(run, epoch):
    return {"model": run.model.state_dict(), "criterion": run.criterion.state_dict(),
            "epoch": epoch, "meta": model_meta(run.cfg), "config": config_text(run.cfg)}


def _progress_line(record):
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f} (rec {record['rec']:.4f} "
            f"con {record['con']:.4f} ca {record['ca']:.4f}) lr {record['lr']:.2e} "
            f"{record['train_seconds']:.1f}s")
    for key in ("val_mAP", "test_mAP"):
        if key in record:
            text += f" | {key[:-4]} mAP@5 {record[key][SELECT_METRIC]:.4f}"
    return text
