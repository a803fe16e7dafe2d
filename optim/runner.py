"""A whole training run: data, preprocessing, model, epochs, evaluation, model selection,
checkpoints and logs in one run directory; resumable at any epoch boundary.

Run directory: config.py (resolved), log.jsonl (one line per epoch), last.pth (every
`train.checkpoint_every` epochs and at the end), best.pth (the selected model), results.json (its
test mAP@K and the selection rule used).
"""
import json
import os
import time

import numpy as np
import torch

from dataset.demo import ensure_demo_data
from dataset.preprocessing import ensure_preprocessed, load_artifacts
from dataset.protocol import retrieval_sets, train_set, validation_sets
from inference.evaluate import score_codes, write_json
from Loss.losses import LabelTable, S5VHLoss
from model.s5vh import build_model
from optim.engine import TrainStep, encode_tensor, encode_videos, train_one_epoch
from utils.checkpoint import load_checkpoint, model_meta, save_checkpoint
from utils.config import config_text, dump_config
from utils.fileio import atomic_write_text
from utils.seed import rng_state, seed_everything, set_rng_state

SELECT_RULES = ("last", "val", "test")
SELECT_METRIC = 5          # model selection by mAP@5, as the authors' release
RESIDENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def build_optimizer(cfg, model, criterion, graphs=False):
    """AdamW over every trainable parameter (weight decay on all) and cosine annealing per epoch.

    On CUDA it is the fused AdamW; for CUDA-graph replay it is also capturable and its learning
    rate is a device tensor, which the scheduler updates in place between replays."""
    t = cfg.train
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    on_cuda = all(p.is_cuda for p in params)
    lr = torch.tensor(t.lr, device=params[0].device) if graphs else t.lr
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=on_cuda or None, capturable=graphs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.num_epochs,
                                                           eta_min=t.min_lr)
    return optimizer, scheduler


class RetrievalSet:
    """Database and queries of one protocol, with codes computed from a model on demand."""

    def __init__(self, name, database, queries, train_videos=None, train_features=None):
        self.name, self.database, self.queries = name, database, queries
        self._train = (train_videos, train_features)

    def _encode(self, model, videos, cfg, device):
        train_videos, train_features = self._train
        if train_videos is not None and videos.path == train_videos.path:
            # rows of the resident training tensor: no second read of the file
            position = {int(r): i for i, r in enumerate(train_videos.rows)}
            if all(int(r) in position for r in videos.rows):
                rows = torch.tensor([position[int(r)] for r in videos.rows],
                                    device=train_features.device)
                return encode_tensor(model, train_features[rows], cfg.eval.batch_size, device)
        return encode_videos(model, videos, cfg, device)

    def codes(self, model, cfg, device):
        db = self._encode(model, self.database, cfg, device)
        same = self.queries.path == self.database.path and np.array_equal(self.queries.rows,
                                                                          self.database.rows)
        return db, db if same else self._encode(model, self.queries, cfg, device)

    def evaluate(self, model, cfg, device):
        db_codes, query_codes = self.codes(model, cfg, device)
        return score_codes(db_codes, query_codes, self.database.labels, self.queries.labels, cfg,
                           device=device)


def _log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path, epoch):
    """Drop the log lines of epochs after `epoch` (trained after the checkpoint a run resumes
    from, so they are trained again)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["epoch"] <= epoch]
        atomic_write_text(path, "".join(lines))


def run_training(cfg, run_dir=None, resume=False, stop_after_epoch=None, log=print,
                 progress=True):
    """Train `cfg` into `run_dir` (default cfg.paths.run_dir); returns the results dict, or None
    when stopped early by `stop_after_epoch` (as an interrupted run would be)."""
    t = cfg.train
    if t.select not in SELECT_RULES:
        raise ValueError(f"train.select must be one of {SELECT_RULES}, got '{t.select}'")
    if t.checkpoint_every < 1:
        raise ValueError(f"train.checkpoint_every must be at least 1, got {t.checkpoint_every}")
    run_dir = run_dir or cfg.paths.run_dir
    os.makedirs(run_dir, exist_ok=True)
    last_path, best_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth")
    log_path = os.path.join(run_dir, "log.jsonl")
    device = resolve_device(t.device)
    seed_everything(cfg.seed)

    ensure_demo_data(cfg)
    ensure_preprocessed(cfg, log)
    videos = train_set(cfg)
    if t.resident_dtype not in RESIDENT_DTYPES:
        raise ValueError(f"train.resident_dtype must be one of {sorted(RESIDENT_DTYPES)}, "
                         f"got '{t.resident_dtype}'")
    features = videos.load_resident(cfg, device, RESIDENT_DTYPES[t.resident_dtype],
                                    cfg.preprocess.chunk_videos)                # (N, M, D)
    pseudo_labels, centers = load_artifacts(cfg, len(videos))
    model = build_model(cfg, device)
    criterion = S5VHLoss(centers, t).to(device)
    graphs = t.cuda_graphs and device.type == "cuda"
    optimizer, scheduler = build_optimizer(cfg, model, criterion, graphs)
    label_table = LabelTable(pseudo_labels, len(centers), device)
    test_set = RetrievalSet("test", *retrieval_sets(cfg), videos, features)
    select_set = {"val": lambda: RetrievalSet("val", *validation_sets(cfg, t.val_fraction, cfg.seed),
                                              videos, features),
                  "test": lambda: test_set, "last": lambda: None}[t.select]()

    start_epoch, best = 0, {"score": None, "epoch": None}
    if resume:
        state = load_checkpoint(last_path, cfg)
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        label_table.load_state_dict(state["label_table"])
        set_rng_state(state["rng"])
        start_epoch, best = state["epoch"], state["best"]
        _truncate_log(log_path, start_epoch)
        log(f"resumed {run_dir} after epoch {start_epoch}")
    else:
        if os.path.exists(log_path):
            os.remove(log_path)
        dump_config(cfg, os.path.join(run_dir, "config.py"))
    log(f"training {len(videos)} videos on {device}, {sum(p.numel() for p in model.parameters()):,}"
        f" parameters, {t.num_epochs} epochs, select={t.select}")

    step = TrainStep(model, criterion, optimizer, features, label_table, t.batch_size, t.amp,
                     graphs)
    for epoch in range(start_epoch, t.num_epochs):
        began = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        stats = train_one_epoch(step, epoch, cfg, progress)
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": lr, **stats,
                  "train_seconds": round(time.perf_counter() - began, 3)}
        done = epoch + 1
        if select_set is not None and (done % t.eval_every == 0 or done == t.num_epochs):
            result = select_set.evaluate(model, cfg, device)
            record[f"{select_set.name}_mAP"] = result["mAP"]
            score = result["mAP"][SELECT_METRIC]
            if best["score"] is None or score > best["score"]:
                best = {"score": score, "epoch": done}
                save_checkpoint(best_path, _weights(cfg, model, criterion, done))
        record["seconds"] = round(time.perf_counter() - began, 3)
        if done % t.checkpoint_every == 0 or done == t.num_epochs:
            save_checkpoint(last_path, {
                **_weights(cfg, model, criterion, done), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "label_table": label_table.state_dict(),
                "rng": rng_state(), "best": best})
        _log_line(log_path, record)
        log(_progress_line(record))
        if stop_after_epoch is not None and done >= stop_after_epoch and done < t.num_epochs:
            return None

    if t.select == "last":
        best = {"score": None, "epoch": t.num_epochs}
        save_checkpoint(best_path, _weights(cfg, model, criterion, t.num_epochs))
    else:
        model.load_state_dict(load_checkpoint(best_path, cfg)["model"])
    result = test_set.evaluate(model, cfg, device)
    results = {"selection": t.select, "selected_epoch": best["epoch"],
               "selection_score_mAP@5": best["score"], "nbits": cfg.nbits,
               "test_mAP": result["mAP"], "test_precision": result["precision"],
               "epochs": t.num_epochs}
    write_json(os.path.join(run_dir, "results.json"), results)
    return results


def _weights(cfg, model, criterion, epoch):
    return {"model": model.state_dict(), "criterion": criterion.state_dict(), "epoch": epoch,
            "meta": model_meta(cfg), "config": config_text(cfg)}


def _progress_line(record):
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f} (rec {record['rec']:.4f} "
            f"con {record['con']:.4f} ca {record['ca']:.4f}) lr {record['lr']:.2e} "
            f"{record['train_seconds']:.1f}s")
    for key in ("val_mAP", "test_mAP"):
        if key in record:
            text += f" | {key[:-4]} mAP@5 {record[key][SELECT_METRIC]:.4f}"
    return text
