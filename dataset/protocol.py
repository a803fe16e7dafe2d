"""Which videos are trained on, searched and used as queries, per dataset protocol
(docs/method.md §3). Shapes: N videos, M frames, D feature size, C classes."""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dataset.io import DataError, FeatureFile, check_finite, read_features, read_labels

PROTOCOLS = ("train_as_database", "separate", "all_vs_all", "holdout")
# feature files this process has scanned completely: (path, size, mtime) -> True
_SCANNED = {}


@dataclass
class VideoSet:
    """Rows `rows` of the feature file `path`, with their (n, C) labels when known."""
    name: str
    path: str
    key: str
    rows: np.ndarray
    labels: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.rows)

    def subset(self, name, positions):
        labels = None if self.labels is None else self.labels[positions]
        return VideoSet(name, self.path, self.key, self.rows[positions], labels)

    def load(self, cfg):
        """(n, M, D) float32 features, validated against the config."""
        return read_features(self.path, self.key, cfg.max_frames, cfg.feature_size, self.rows)

    def iter_blocks(self, cfg, chunk=1024):
        """Yield (n, M, D) float32 blocks of this set's videos in order, `chunk` at a time,
        validated against the config and checked for NaN/Inf."""
        with FeatureFile(self.path, self.key, cfg.max_frames, cfg.feature_size) as feats:
            for idx, block in feats.iter_chunks(chunk, self.rows):
                check_finite(block, self.path, self.key, offset=int(idx[0]))
                yield block

    def _fill(self, out, blocks, convert):
        done = 0
        for block in blocks:
            out[done:done + len(block)] = convert(block)
            done += len(block)
        return out

    def load_resident(self, cfg, device, dtype=torch.float32, chunk=1024):
        """(n, M, D) tensor on `device` in `dtype`, filled chunk by chunk (host memory stays
        at one chunk, whatever the set's size)."""
        out = torch.empty((len(self), cfg.max_frames, cfg.feature_size), dtype=dtype,
                          device=device)
        return self._fill(out, self.iter_blocks(cfg, chunk),
                          lambda block: torch.from_numpy(block).to(device, dtype))

    def mean_pooled(self, cfg, chunk=1024):
        """(n, D) float32 frame means, streamed `chunk` videos at a time."""
        out = np.empty((len(self), cfg.feature_size), dtype=np.float32)
        return self._fill(out, self.iter_blocks(cfg, chunk), lambda block: block.mean(axis=1))


def holdout_split(n, fraction, seed):
    """Seeded split of range(n) into (kept, held_out) sorted index arrays; every held-out set
    (holdout queries, validation queries) is made by this one function."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(fraction * n)))
    return np.sort(order[held:]), np.sort(order[:held])


def _labelled_file(cfg, name, feats_path, labels_path, label_key):
    with FeatureFile(feats_path, cfg.data.feature_key, cfg.max_frames, cfg.feature_size) as f:
        n = len(f)
    labels = read_labels(labels_path, label_key, expected_rows=n)
    return VideoSet(name, feats_path, cfg.data.feature_key, np.arange(n), labels)


def _holdout_parts(cfg):
    """(kept, held-out) VideoSets of the holdout protocol's one labelled file: the kept part is
    the training set and the database, the held-out part the queries."""
    p, data = cfg.paths, cfg.data
    full = _labelled_file(cfg, "train", p.train_feats, p.train_labels, data.train_label_key)
    kept, held = holdout_split(len(full), data.holdout_queries, data.holdout_seed)
    return full.subset("train", kept), full.subset("queries", held)


def train_set(cfg, with_labels=False):
    """The videos training (and preprocessing) reads. Labels only when asked (never in training)."""
    p, data = cfg.paths, cfg.data
    if data.protocol == "holdout":
        train, _ = _holdout_parts(cfg)
    elif with_labels:
        if not p.train_labels:
            raise DataError(f"dataset '{cfg.dataset}' has no training labels "
                            f"(data.train_labels is empty); select='val' needs them")
        train = _labelled_file(cfg, "train", p.train_feats, p.train_labels, data.train_label_key)
    else:
        with FeatureFile(p.train_feats, data.feature_key, cfg.max_frames, cfg.feature_size) as f:
            train = VideoSet("train", p.train_feats, data.feature_key, np.arange(len(f)))
    if not with_labels:
        train.labels = None
    return train


def retrieval_sets(cfg):
    """(database, queries) VideoSets with labels, per `data.protocol`."""
    p, data = cfg.paths, cfg.data
    if data.protocol == "holdout":
        train, queries = _holdout_parts(cfg)
        return train.subset("database", np.arange(len(train))), queries
    if data.protocol == "train_as_database":
        database = _labelled_file(cfg, "database", p.train_feats, p.train_labels,
                                  data.train_label_key)
    else:
        database = _labelled_file(cfg, "database", p.db_feats, p.db_labels, data.db_label_key)
    if data.protocol == "all_vs_all":
        queries = VideoSet("queries", database.path, database.key, database.rows,
                           database.labels)
    else:
        queries = _labelled_file(cfg, "queries", p.query_feats, p.query_labels,
                                 data.query_label_key)
    if queries.labels.shape[1] != database.labels.shape[1]:
        raise DataError(f"{p.query_labels or p.db_labels}: queries have "
                        f"{queries.labels.shape[1]} label columns, the database "
                        f"{database.labels.shape[1]}")
    return database, queries


def validation_sets(cfg, fraction, seed):
    """(database, queries) carved from the labelled training set, for select='val'."""
    train = train_set(cfg, with_labels=True)
    kept, held = holdout_split(len(train), fraction, seed)
    return train.subset("val_database", kept), train.subset("val_queries", held)


def _scan(videos, cfg):
    """Read every value of a set's feature file once per process (NaN/Inf, magnitude)."""
    stat = os.stat(videos.path)
    key = (os.path.abspath(videos.path), videos.key, stat.st_size, stat.st_mtime_ns)
    if key not in _SCANNED:
        with FeatureFile(videos.path, videos.key, cfg.max_frames, cfg.feature_size) as feats:
            for idx, block in feats.iter_chunks(cfg.preprocess.chunk_videos):
                check_finite(block, videos.path, videos.key, offset=int(idx[0]))
        _SCANNED[key] = True


def check_inputs(cfg, baseline_bits=()):
    """Every input of cfg's protocol, before any work: the files, their shapes and labels, every
    feature value (finite, of sane magnitude), and the config values that depend on the data
    (clusters, PCA size, validation split, baseline code lengths). Raises DataError."""
    train = train_set(cfg)
    database, queries = retrieval_sets(cfg)
    if "val" in (cfg.train.select, cfg.train.monitor):
        validation_sets(cfg, cfg.train.val_fraction, cfg.seed)
    for videos in (train, database, queries):
        _scan(videos, cfg)
    p, n = cfg.preprocess, len(train)
    if p.nclusters > n:
        raise DataError(f"preprocess.nclusters={p.nclusters} is larger than the number of "
                        f"training videos ({n})")
    if p.latent_dim_pca > min(n, cfg.feature_size):
        raise DataError(f"preprocess.latent_dim_pca={p.latent_dim_pca} must be at most "
                        f"min(videos, feature size) = min({n}, {cfg.feature_size})")
    for nbits in baseline_bits:
        if nbits > min(n, cfg.feature_size):
            raise DataError(f"ITQ with {nbits} bits needs at least {nbits} training videos and "
                            f"feature dimensions, the data have {n} and {cfg.feature_size}")
    return train, database, queries
