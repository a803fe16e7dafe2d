"""Scoring a saved S5VH model and the classical baselines on a protocol; the mAP@R table."""
import numpy as np
import torch

from dataset.protocol import retrieval_sets, train_set
from inference.baselines import baseline_codes
from inference.encode import NonFiniteCodes
from inference.retrieval import RetrievalSet, score_codes
from model.s5vh import build_model
from utils.checkpoint import load_checkpoint, load_weights
from utils.fileio import atomic_path


def mean_pooled_sets(cfg):
    """Mean-pooled (N, D) features of the training set, database and queries (read-only arrays,
    each read once per process: VideoSet.mean_pooled)."""
    chunk = cfg.preprocess.chunk_videos
    train = train_set(cfg)
    database, queries = retrieval_sets(cfg)
    return (train.mean_pooled(cfg, chunk), (database.mean_pooled(cfg, chunk), database.labels),
            (queries.mean_pooled(cfg, chunk), queries.labels))


def evaluate_baselines(cfg, methods, bits):
    """Rows {'method', 'nbits', 'mAP': {R: v}, 'precision': {R: v}} per method and code length."""
    train, (db_feats, db_labels), (query_feats, query_labels) = mean_pooled_sets(cfg)
    rows = []
    for method in methods:
        for nbits in bits:
            db_codes, query_codes = baseline_codes(method, nbits, train, db_feats, query_feats,
                                                   seed=cfg.seed)
            result = score_codes(db_codes, query_codes, db_labels, query_labels, cfg)
            rows.append({"method": method, "nbits": nbits, **result})
    return rows


def load_model(cfg, checkpoint, device, run_id=None):
    """The S5VH model of `cfg` with the weights of `checkpoint` (made for that model, finite, and
    by the run `run_id` when given)."""
    state = load_checkpoint(checkpoint, cfg, run_id=run_id)
    model = build_model(cfg, device)
    load_weights(model, state["model"], checkpoint)
    return model


def evaluate_checkpoint(cfg, checkpoint, device, run_id=None):
    """Score an S5VH checkpoint made for `cfg` (by the run `run_id` when given) on the test
    protocol.

    Returns (result {'mAP', 'precision'}, database codes (N, B), query codes (Q, B)) with the
    codes as int8 numpy arrays.
    """
    model = load_model(cfg, checkpoint, device, run_id)
    retrieval = RetrievalSet("test", *retrieval_sets(cfg))
    try:
        db_codes, query_codes = retrieval.codes(model, cfg, device)
    except NonFiniteCodes as err:
        raise NonFiniteCodes(f"{checkpoint}: {err}") from None
    result = score_codes(db_codes, query_codes, retrieval.database.labels,
                         retrieval.queries.labels, cfg, device=device)
    return result, _int8(db_codes), _int8(query_codes)


def _int8(codes):
    return codes.to(torch.int8).cpu().numpy()


def save_codes(path, db_codes, query_codes):
    """±1 codes as int8 arrays `database` (N, B) and `queries` (Q, B) in one .npz, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, database=db_codes, queries=query_codes)


def format_table(rows, topk):
    """Plain-text mAP@R table, one row per (method, nbits)."""
    width = max([13] + [len(row["method"]) + 1 for row in rows])
    header = f"{'method':<{width}}{'bits':>5}" + "".join(f"{'mAP@' + str(k):>9}" for k in topk)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = "".join(f"{row['mAP'][k]:>9.4f}" for k in topk)
        lines.append(f"{row['method']:<{width}}{row['nbits']:>5}{values}")
    return "\n".join(lines)
