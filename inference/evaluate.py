"""Scoring codes per protocol, and the mAP@K tables eval.py and train.py print."""
import json

import numpy as np

from dataset.protocol import retrieval_sets, train_set
from inference.baselines import baseline_codes
from inference.metrics import retrieval_metrics
from utils.fileio import atomic_path, atomic_write_text


def score_codes(db_codes, query_codes, db_labels, query_labels, cfg, device=None):
    """{'mAP': {K: v}, 'precision': {K: v}} for the configured K list."""
    return retrieval_metrics(query_codes, db_codes, query_labels, db_labels,
                             topk=tuple(cfg.eval.topk), chunk=cfg.eval.query_chunk,
                             device=device)


def mean_pooled_sets(cfg):
    """Mean-pooled (N, D) features of the training set, database and queries (shared reads)."""
    chunk = cfg.preprocess.chunk_videos
    train = train_set(cfg)
    database, queries = retrieval_sets(cfg)
    cache = {}

    def pooled(videos):
        key = (videos.path, videos.rows.tobytes())
        if key not in cache:
            cache[key] = videos.mean_pooled(cfg, chunk)
        return cache[key]

    return pooled(train), (pooled(database), database.labels), (pooled(queries), queries.labels)


def evaluate_baselines(cfg, methods, bits):
    """Rows {'method', 'nbits', 'mAP': {K: v}} for every method and code length."""
    train, (db_feats, db_labels), (query_feats, query_labels) = mean_pooled_sets(cfg)
    rows = []
    for method in methods:
        for nbits in bits:
            db_codes, query_codes = baseline_codes(method, nbits, train, db_feats, query_feats,
                                                   seed=cfg.seed)
            result = score_codes(db_codes, query_codes, db_labels, query_labels, cfg)
            rows.append({"method": method, "nbits": nbits, **result})
    return rows


def evaluate_checkpoint(cfg, checkpoint, device=None):
    """Load an S5VH checkpoint made for `cfg` and score it on the test protocol.

    Returns (result {'mAP', 'precision'}, database codes (N, B), query codes (Q, B)).
    """
    import torch

    from model.s5vh import build_model
    from optim.runner import RetrievalSet, resolve_device
    from utils.checkpoint import load_checkpoint

    device = device or resolve_device(cfg.train.device)
    state = load_checkpoint(checkpoint, cfg)
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    retrieval = RetrievalSet("test", *retrieval_sets(cfg))
    db_codes, query_codes = retrieval.codes(model, cfg, device)
    result = score_codes(db_codes, query_codes, retrieval.database.labels,
                         retrieval.queries.labels, cfg, device=device)
    to_int8 = lambda codes: codes.to(torch.int8).cpu().numpy()  # noqa: E731
    return result, to_int8(db_codes), to_int8(query_codes)


def save_codes(path, db_codes, query_codes):
    """±1 codes as int8 arrays `database` (N, B) and `queries` (Q, B) in one .npz, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, database=db_codes, queries=query_codes)


def format_table(rows, topk):
    """Plain-text mAP@K table, one row per (method, nbits)."""
    header = f"{'method':<13}{'bits':>5}" + "".join(f"{'mAP@' + str(k):>9}" for k in topk)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = "".join(f"{row['mAP'][k]:>9.4f}" for k in topk)
        lines.append(f"{row['method']:<13}{row['nbits']:>5}{values}")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path, payload):
    atomic_write_text(path, json.dumps(_jsonable(payload), indent=2) + "\n")
