"""Which videos are trained on, searched and used as queries, per dataset protocol
(docs/method.md §3). Shapes: N videos, M frames, D feature size, C classes."""
import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dataset.io import DataError, FeatureFile, check_finite, read_features, read_labels
from utils.config import PROTOCOL_FILES
from utils.content_hash import cached_fact, file_sha256
from utils.memo import ArrayCache

PROTOCOLS = ("train_as_database", "separate", "all_vs_all", "holdout")
# Mean-pooled sets a process keeps, by the content of their file, up to this many bytes: the
# clustering of every seed and the baselines of every seed and code length pool the same videos
POOLED_CACHE_BYTES = 2 ** 30
_pooled = ArrayCache(POOLED_CACHE_BYTES)


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

    def iter_blocks(self, cfg, chunk=1024, dtype=np.float32):
        """Yield (n, M, D) blocks (in `dtype`, None: as stored) of this set's videos in order,
        `chunk` at a time, from a file validated against the config and whose every value was
        checked (once per file version: `_scan`)."""
        _scan(self.path, self.key, cfg)
        with FeatureFile(self.path, self.key, cfg.max_frames, cfg.feature_size) as feats:
            for _, block in feats.iter_chunks(chunk, self.rows, dtype):
                yield block

    def _fill(self, out, blocks, convert):
        done = 0
        for block in blocks:
            out[done:done + len(block)] = convert(block)
            done += len(block)
        return out

    def load_resident(self, cfg, device, dtype=torch.float32, chunk=1024):
        """(n, M, D) tensor on `device` in `dtype`, filled chunk by chunk (host memory stays
        at one chunk, whatever the set's size); blocks travel as stored and are converted there."""
        out = torch.empty((len(self), cfg.max_frames, cfg.feature_size), dtype=dtype,
                          device=device)
        return self._fill(out, self.iter_blocks(cfg, chunk, dtype=None),
                          lambda block: torch.from_numpy(block).to(device).to(dtype))

    def mean_pooled(self, cfg, chunk=1024):
        """(n, D) float32 frame means, streamed `chunk` videos at a time; a read-only array,
        kept for the next call on a file of the same content (POOLED_CACHE_BYTES)."""
        key = (file_sha256(self.path), self.key, self.rows.tobytes(), cfg.max_frames,
               cfg.feature_size)
        pooled = _pooled.get(key)
        if pooled is not None:
            return pooled
        out = np.empty((len(self), cfg.feature_size), dtype=np.float32)
        self._fill(out, self.iter_blocks(cfg, chunk), lambda block: block.mean(axis=1))
        return _pooled.put(key, out)


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


def _scan(path, key, cfg):
    """Every value of a feature file, read once per file identity (utils.content_hash): raises on
    NaN/Inf or absurd magnitudes; returns {'duplicates': {row: earlier row}} for the videos whose
    mean-pooled features repeat an earlier video's exactly."""
    def compute():
        first_of, duplicates = {}, {}
        with FeatureFile(path, key, cfg.max_frames, cfg.feature_size) as feats:
            # values as stored (float32 conversion only for the means): half the memory
            # traffic of a float16 file
            for idx, block in feats.iter_chunks(cfg.preprocess.chunk_videos, dtype=None):
                check_finite(block, path, key, offset=int(idx[0]))
                for row, pooled in zip(idx.tolist(), block.mean(axis=1, dtype=np.float32)):
                    digest = hashlib.blake2b(pooled.tobytes(), digest_size=16).digest()
                    first = first_of.setdefault(digest, row)
                    if first != row:
                        duplicates[str(row)] = first
        return {"duplicates": duplicates}
    return cached_fact(path, f"scan:{key}", compute)


def _check_distinct(videos, facts, nclusters):
    """k-means needs at least K distinct training videos (after mean pooling)."""
    duplicates = facts["duplicates"]
    distinct = len({duplicates.get(str(row), row) for row in videos.rows.tolist()})
    if distinct < nclusters:
        what = "all are identical" if distinct == 1 else f"only {distinct} are distinct"
        raise DataError(f"{videos.path} ['{videos.key}']: degenerate features: of the "
                        f"{len(videos)} training videos {what} after mean pooling (all-zero or "
                        f"constant features?), fewer than preprocess.nclusters={nclusters}")


def input_files(cfg):
    """{role: path} of every input file the config's protocol reads."""
    p, data = cfg.paths, cfg.data
    roles = {"train_feats": p.train_feats}
    needed = PROTOCOL_FILES[data.protocol]
    if "val" in (cfg.train.select, cfg.train.monitor) and p.train_labels:
        needed += ("train_labels",)
    roles.update({role: p[role] for role in needed})
    return roles


def check_inputs(cfg, baseline_bits=()):
    """Every input of cfg's protocol, before any work: the files, their shapes and labels, every
    feature value (finite, of sane magnitude; read once per file version), enough distinct
    training videos, and the config values that depend on the data (clusters, PCA size,
    validation split, baseline code lengths). Raises DataError."""
    train = train_set(cfg)
    database, queries = retrieval_sets(cfg)
    if "val" in (cfg.train.select, cfg.train.monitor):
        validation_sets(cfg, cfg.train.val_fraction, cfg.seed)
    facts = {}
    for videos in (train, database, queries):
        if videos.path not in facts:
            facts[videos.path] = _scan(videos.path, videos.key, cfg)
    p, n = cfg.preprocess, len(train)
    if p.nclusters > n:
        raise DataError(f"preprocess.nclusters={p.nclusters} is larger than the number of "
                        f"training videos ({n})")
    _check_distinct(train, facts[train.path], p.nclusters)
    if p.latent_dim_pca > min(n, cfg.feature_size):
        raise DataError(f"preprocess.latent_dim_pca={p.latent_dim_pca} must be at most "
                        f"min(videos, feature size) = min({n}, {cfg.feature_size})")
    for nbits in baseline_bits:
        if nbits > min(n, cfg.feature_size):
            raise DataError(f"ITQ with {nbits} bits needs at least {nbits} training videos and "
                            f"feature dimensions, the data have {n} and {cfg.feature_size}")
    return train, database, queries
