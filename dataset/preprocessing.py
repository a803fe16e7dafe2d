"""Preprocessing (docs/method.md §5): mean pooling, PCA, one k-means for pseudo-labels and semantic centers,
and hash centers optimised from those semantic centers.

Label k, semantic center k and hash center k always refer to the same cluster. Everything is
computed before anything is written, and each artifact is written atomically, so a failure
leaves no partial set behind.
"""
import json
import os
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from dataset.io import DataError, read_matrix, write_matrix
from dataset.protocol import train_set
from dataset.hash_centers import optimize_centers
from utils.fileio import atomic_write_text
from utils.log import get_logger

logger = get_logger(__name__)

CLUSTER_ARTIFACTS = ("latent_feats", "anchors", "nearest", "semantic")


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
    start = time.perf_counter()
    pca = PCA(n_components=latent_dim, svd_solver="randomized" if latent_dim < min(n, dim) // 2
              else "full", random_state=seed)
    latent = pca.fit_transform(pooled).astype(np.float32)
    logger.info(f"PCA to {latent_dim} dims: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    kmeans = KMeans(n_clusters=nclusters, n_init=n_init, random_state=seed).fit(latent)
    logger.info(f"k-means with K={nclusters} ({n_init} init): {time.perf_counter() - start:.1f}s")
    centroids = kmeans.cluster_centers_.astype(np.float32)
    # squared distances to every centroid without an (N, K, p) temporary
    dist = (latent ** 2).sum(1, keepdims=True) - 2 * latent @ centroids.T + (centroids ** 2).sum(1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :nearest]
    return latent, centroids, order.astype(np.int64)


def normalize_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _hash_centers(cfg, semantic):
    p = cfg.preprocess
    start = time.perf_counter()
    centers, report = optimize_centers(semantic.astype(np.float64), cfg.nbits, seed=cfg.seed,
                                       init=p.center_init, mu=p.center_alpha, rho=p.center_rho,
                                       rho_growth=p.center_rho_growth, rho_max=p.center_rho_max,
                                       max_iter=p.center_max_iter, sweeps=p.center_sweeps)
    report["seconds"] = round(time.perf_counter() - start, 3)
    for stage in ("init", "result"):
        q = report[stage]
        logger.info(f"hash centers ({stage}): min/mean Hamming {q['min_hamming']:.0f}/"
            f"{q['mean_hamming']:.2f} (need >= {q['required_min_distance']}: "
            f"{q['all_pairs_at_least_required']}), semantic correlation "
            f"{q['semantic_correlation']:.3f}, objective {q['sweep_objective']:.3f}")
    return centers.astype(np.float32), report


def run_preprocess(cfg, centers_only=False):
    """Write every artifact of docs/method.md §3 for `cfg` (or only the hash centers for its nbits,
    from an existing semantic.h5). Returns the hash-center quality report."""
    paths, p = cfg.paths, cfg.preprocess
    outputs = {}
    if centers_only:
        semantic = read_matrix(paths.semantic, "matrix", shape=(p.nclusters, None))
    else:
        start = time.perf_counter()
        videos = train_set(cfg)
        logger.info(f"mean-pooling {len(videos)} training videos from {videos.path}")
        pooled = videos.mean_pooled(cfg, p.chunk_videos)
        logger.info(f"mean pooling: {time.perf_counter() - start:.1f}s")
        latent, centroids, nearest = cluster_features(pooled, p.latent_dim_pca, p.nclusters,
                                                      p.nearest_clusters, cfg.seed,
                                                      p.kmeans_n_init)
        del pooled
        semantic = normalize_rows(centroids)
        outputs.update(latent_feats=("feats", latent), anchors=("feats", centroids),
                       nearest=("pos", nearest), semantic=("matrix", semantic))
        sizes = np.bincount(nearest[:, 0], minlength=p.nclusters)
        logger.info(f"clusters: sizes {sizes.min()}..{sizes.max()}")
    centers, report = _hash_centers(cfg, semantic)
    outputs["hash_center"] = ("matrix", centers)
    for name, (key, value) in outputs.items():
        write_matrix(paths[name], key, value)
    atomic_write_text(paths.center_report, json.dumps(report, indent=2) + "\n")
    logger.info(f"wrote {', '.join(os.path.basename(paths[n]) for n in outputs)} to {paths.feature_dir}")
    return report


def missing_artifacts(cfg):
    return [name for name in CLUSTER_ARTIFACTS + ("hash_center",)
            if not os.path.isfile(cfg.paths[name])]


def ensure_preprocessed(cfg):
    """Run the preprocessing that is missing; True when anything was computed."""
    missing = missing_artifacts(cfg)
    if not missing:
        return False
    centers_only = missing == ["hash_center"]
    logger.info(f"preprocessing artifacts missing ({', '.join(missing)}): running "
        f"{'hash-center optimisation' if centers_only else 'preprocessing'} first")
    run_preprocess(cfg, centers_only=centers_only)
    return True


def load_artifacts(cfg, num_videos):
    """(pseudo_labels (N,), hash_centers (K, B)) for training, checked against the config."""
    p = cfg.preprocess
    nearest = read_matrix(cfg.paths.nearest, "pos", shape=(num_videos, None))
    centers = read_matrix(cfg.paths.hash_center, "matrix", shape=(p.nclusters, cfg.nbits),
                          dtype=np.float32)
    if not np.isin(centers, (-1.0, 1.0)).all():
        raise DataError(f"{cfg.paths.hash_center} ['matrix']: hash centers must be ±1")
    labels = nearest[:, 0].astype(np.int64)
    if labels.min() < 0 or labels.max() >= p.nclusters:
        raise DataError(f"{cfg.paths.nearest} ['pos']: cluster ids outside 0..{p.nclusters - 1}")
    return labels, centers
