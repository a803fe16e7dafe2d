"""Preprocessing (docs/method.md §5): mean pooling, PCA, one k-means for pseudo-labels and
semantic centers, and hash centers optimised from those semantic centers.

Label k, semantic center k and hash center k always refer to the same cluster. The artifacts form
two sets, the clustering (latent features, centroids, nearest clusters, semantic centers) and the
hash centers of one code length, each with a provenance record (dataset/provenance.py): a set is
reused only when its record matches the current inputs and config, and recomputed otherwise.
Each set is computed before any of its files is written, and every file is written atomically.
Computation runs with one BLAS/OpenMP thread where thread count changes floating-point sums
(k-means, the center ADMM), so the same inputs, config and seed give the same artifacts.
"""
import contextlib
import hashlib
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from dataset.hash_centers import optimize_centers
from dataset.io import DataError, read_matrix, write_matrix
from dataset.protocol import train_set
from dataset.provenance import mark_incomplete, read_record, record_problem, write_record
from utils.content_hash import file_sha256
from utils.fileio import (dir_lock, ensure_space, remove_stale_temporaries, writable_dir,
                          write_json)
from utils.log import get_logger

logger = get_logger(__name__)

CLUSTER_ARTIFACTS = ("latent_feats", "anchors", "nearest", "semantic")
CENTER_ARTIFACTS = ("hash_center", "center_report")


def cluster_features(pooled, latent_dim, nclusters, nearest, seed, n_init=3):
    """(N, D) mean-pooled features -> latent (N, p), centroids (K, p), nearest (N, n) cluster ids.

    nearest[:, 0] is each video's pseudo-label, its nearest centroid.
    """
    n, dim = pooled.shape
    if nclusters > n:
        raise DataError(f"preprocess.nclusters={nclusters} is larger than the number of "
                        f"training videos ({n})")
    if latent_dim > min(n, dim):
        raise DataError(f"preprocess.latent_dim_pca={latent_dim} must be at most "
                        f"min(videos, feature size) = min({n}, {dim})")
    from sklearn.cluster import KMeans          # imported here: only a computation needs them
    from sklearn.decomposition import PCA
    start = time.perf_counter()
    pca = PCA(n_components=latent_dim, svd_solver="randomized" if latent_dim < min(n, dim) // 2
              else "full", random_state=seed)
    latent = pca.fit_transform(pooled).astype(np.float32)
    logger.info(f"PCA to {latent_dim} dims: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    with threadpool_limits(limits=1, user_api="openmp"):   # k-means' threads add in any order
        kmeans = KMeans(n_clusters=nclusters, n_init=n_init, random_state=seed).fit(latent)
    logger.info(f"k-means with K={nclusters} ({n_init} init): {time.perf_counter() - start:.1f}s")
    centroids = kmeans.cluster_centers_.astype(np.float32)
    # squared distances to every centroid without an (N, K, p) temporary
    dist = (latent ** 2).sum(1, keepdims=True) - 2 * latent @ centroids.T + (centroids ** 2).sum(1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :nearest]
    return latent, centroids, order.astype(np.int64)


def normalize_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_inputs(cfg, videos):
    """What the clustering set depends on: the training features and the clustering keys."""
    p = cfg.preprocess
    rows = hashlib.sha256(np.asarray(videos.rows, dtype=np.int64).tobytes()).hexdigest()
    return {"train_features": file_sha256(videos.path, "feature"), "feature_key": videos.key,
            "train_rows": rows, "train_videos": len(videos), "seed": cfg.seed,
            "latent_dim_pca": p.latent_dim_pca, "nclusters": p.nclusters,
            "kmeans_n_init": p.kmeans_n_init, "nearest_clusters": p.nearest_clusters}


def center_inputs(cfg):
    """What the hash centers of cfg.nbits depend on: the semantic centers and the center keys."""
    p = cfg.preprocess
    return {"semantic": file_sha256(cfg.paths.semantic, "artifact"), "nbits": cfg.nbits,
            "seed": cfg.seed,
            **{key: p[key] for key in ("center_init", "center_alpha", "center_rho",
                                       "center_rho_growth", "center_rho_max", "center_max_iter",
                                       "center_sweeps")}}


def compute_clusters(cfg, videos, inputs):
    """Mean pooling, PCA and k-means; writes the clustering set and its record."""
    p, paths = cfg.preprocess, cfg.paths
    # the set's size is known before any work: a full disk stops here, not after k-means
    ensure_space(paths.latent_feats, 4 * (len(videos) * p.latent_dim_pca + 2 * p.nclusters
                                          * p.latent_dim_pca) + 8 * len(videos) * p.nearest_clusters)
    start = time.perf_counter()
    logger.info(f"mean-pooling {len(videos)} training videos from {videos.path}")
    pooled = videos.mean_pooled(cfg, p.chunk_videos)
    logger.info(f"mean pooling: {time.perf_counter() - start:.1f}s")
    latent, centroids, nearest = cluster_features(pooled, p.latent_dim_pca, p.nclusters,
                                                  p.nearest_clusters, cfg.seed, p.kmeans_n_init)
    sizes = np.bincount(nearest[:, 0], minlength=p.nclusters)
    logger.info(f"clusters: sizes {sizes.min()}..{sizes.max()}")
    outputs = {"latent_feats": ("feats", latent), "anchors": ("feats", centroids),
               "nearest": ("pos", nearest), "semantic": ("matrix", normalize_rows(centroids))}
    mark_incomplete(paths.cluster_record, inputs)
    for name, (key, value) in outputs.items():
        write_matrix(paths[name], key, value)
    write_record(paths.cluster_record, inputs, {name: paths[name] for name in CLUSTER_ARTIFACTS})


def compute_centers(cfg, inputs):
    """Hash centers of cfg.nbits from semantic.h5; writes them, their report and the record."""
    p, paths = cfg.preprocess, cfg.paths
    semantic = read_matrix(paths.semantic, "matrix", shape=(p.nclusters, None))
    start = time.perf_counter()
    with threadpool_limits(limits=1):       # small matrices: one thread is as fast, and exact
        centers, report = optimize_centers(
            semantic.astype(np.float64), cfg.nbits, seed=cfg.seed, init=p.center_init,
            mu=p.center_alpha, rho=p.center_rho, rho_growth=p.center_rho_growth,
            rho_max=p.center_rho_max, max_iter=p.center_max_iter, sweeps=p.center_sweeps)
    logger.info(f"hash centers: {time.perf_counter() - start:.1f}s")
    for stage in ("init", "result"):
        q = report[stage]
        logger.info(f"hash centers ({stage}): min/mean Hamming {q['min_hamming']:.0f}/"
                    f"{q['mean_hamming']:.2f} (need >= {q['required_min_distance']}: "
                    f"{q['all_pairs_at_least_required']}), semantic correlation "
                    f"{q['semantic_correlation']:.3f}, objective {q['sweep_objective']:.3f}")
    mark_incomplete(paths.center_record, inputs)
    write_matrix(paths.hash_center, "matrix", centers.astype(np.float32))
    write_json(paths.center_report, report)
    write_record(paths.center_record, inputs, {name: paths[name] for name in CENTER_ARTIFACTS})
    return report


def _needs_computing(cfg, what, record_path, inputs, names):
    """True when the set must be computed (saying why), False when it is reused; a set of files
    without any record stops the run unless preprocess.release_artifacts allows it."""
    files = {name: cfg.paths[name] for name in names}
    record = read_record(record_path)
    problem = record_problem(record, inputs, files)
    if problem is None:
        return False
    present = [os.path.basename(path) for path in files.values() if os.path.isfile(path)]
    if record is None and present:
        if cfg.preprocess.release_artifacts:
            logger.info(f"{what}: using {', '.join(present)} without a provenance record "
                        f"(preprocess.release_artifacts=True)")
            return False
        raise DataError(f"{cfg.paths.artifact_dir}: {', '.join(present)} carry no provenance "
                        f"record (made elsewhere, e.g. by the authors' release); set "
                        f"preprocess.release_artifacts=True to use them as they are, or remove "
                        f"them to recompute")
    if record is not None or present:
        logger.info(f"{what}: recomputing, {problem}")
    else:
        logger.info(f"{what}: computing (first use)")
    return True


@contextlib.contextmanager
def preprocessed(cfg, force=False):
    """Make sure both artifact sets of `cfg` exist and match it, computing what is missing or
    stale (everything with `force`), and keep the artifact directory locked while the context is
    open, so the caller reads the very files that were checked (another process may replace them
    for another seed as soon as the lock is released). Yields {'clusters': ..., 'centers': ...},
    each 'reused', 'computed' or 'unrecorded' (used under preprocess.release_artifacts)."""
    paths = cfg.paths
    videos = train_set(cfg)
    if not os.path.isdir(paths.artifact_dir):
        writable_dir(paths.artifact_dir, "artifact directory")
    with dir_lock(paths.artifact_dir, "artifact directory", wait=True):
        if os.access(paths.artifact_dir, os.W_OK):
            remove_stale_temporaries(paths.artifact_dir, names=[
                os.path.basename(paths[name]) for name in CLUSTER_ARTIFACTS + CENTER_ARTIFACTS
                + ("cluster_record", "center_record")])
        status = {}
        inputs = cluster_inputs(cfg, videos)
        if force or _needs_computing(cfg, "clustering", paths.cluster_record, inputs,
                                     CLUSTER_ARTIFACTS):
            # a read-only location is refused before anything is computed, and only when
            # something has to be written there
            writable_dir(paths.artifact_dir, "artifact directory")
            compute_clusters(cfg, videos, inputs)
            status["clusters"] = "computed"
        else:
            status["clusters"] = "reused" if read_record(paths.cluster_record) else "unrecorded"
        inputs = center_inputs(cfg)
        if force or _needs_computing(cfg, f"hash centers ({cfg.nbits} bits)",
                                     paths.center_record, inputs, CENTER_ARTIFACTS):
            writable_dir(paths.artifact_dir, "artifact directory")
            compute_centers(cfg, inputs)
            status["centers"] = "computed"
        else:
            status["centers"] = "reused" if read_record(paths.center_record) else "unrecorded"
        yield status


TRAINING_ARTIFACTS = ("nearest", "hash_center")


def load_artifacts(cfg, num_videos):
    """(pseudo_labels (N,), hash_centers (K, B), {name: sha256} of the two files) for training,
    checked against the config. Call it inside `preprocessed(cfg)`."""
    p = cfg.preprocess
    nearest = read_matrix(cfg.paths.nearest, "pos", shape=(num_videos, None))
    centers = read_matrix(cfg.paths.hash_center, "matrix", shape=(p.nclusters, cfg.nbits),
                          dtype=np.float32)
    if not np.isin(centers, (-1.0, 1.0)).all():
        raise DataError(f"{cfg.paths.hash_center} ['matrix']: hash centers must be ±1")
    labels = nearest[:, 0].astype(np.int64)
    if labels.min() < 0 or labels.max() >= p.nclusters:
        raise DataError(f"{cfg.paths.nearest} ['pos']: cluster ids outside 0..{p.nclusters - 1}")
    digests = {name: file_sha256(cfg.paths[name], "artifact") for name in TRAINING_ARTIFACTS}
    return labels, centers, digests
