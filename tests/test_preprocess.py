import hashlib
import math
import os

import numpy as np
import pytest

import preprocess as preprocess_script
from dataset.hash_centers import (center_quality, hamming_matrix, initial_centers, min_distance,
                                  optimize_centers, refine_center)
from dataset.io import DataError, read_matrix, write_features, write_labels
from dataset.preprocessing import load_artifacts, preprocessed
from tests.conftest import tiny_config
from utils.errors import UserError


def ensure_preprocessed(cfg, force=False):
    with preprocessed(cfg, force) as status:
        return status


@pytest.mark.parametrize("nclusters, expected", [(100, (4, 10, 24)), (101, (4, 10, 24)),
                                                 (450, (4, 9, 22))])
def test_min_distance_table(nclusters, expected):
    assert tuple(min_distance(b, nclusters) for b in (16, 32, 64)) == expected


def test_min_distance_of_long_codes_is_exact():
    """2^B overflows a float beyond B = 1023; the bound is computed in integers."""
    # K = 2: the balls must cover half the cube, which takes radius B/2 + 1 (the middle layer
    # is split between the two)
    assert min_distance(4096, 2) == 2049 and min_distance(16, 2) == 9
    d = min_distance(2048, 100)
    covered = [sum(math.comb(2048, j) for j in range(r)) for r in (d - 1, d)]
    assert covered[0] * 100 < 2 ** 2048 <= covered[1] * 100


def test_hadamard_initialisation():
    centers = initial_centers(40, 16, seed=0)
    assert centers.shape == (40, 16) and set(np.unique(centers)) == {-1.0, 1.0}
    dist = hamming_matrix(centers[:32])
    off = dist[~np.eye(32, dtype=bool)]
    assert set(np.unique(off)) == {8.0, 16.0}                        # orthogonal or antipodal
    extra = centers[32:]
    assert (extra.sum(1) == 0).all()                                 # balanced random rows
    assert np.array_equal(initial_centers(40, 16, seed=0), centers)  # seeded
    with pytest.raises(ValueError, match="power of two.*center_init='random'"):
        initial_centers(10, 24)
    rand = initial_centers(10, 24, method="random")
    assert (rand.sum(1) == 0).all() and hamming_matrix(rand)[~np.eye(10, dtype=bool)].min() > 6


@pytest.mark.parametrize("nclusters, nbits", [(8, 16), (20, 16), (30, 32)])
def test_optimised_centers_keep_the_distance_constraint(nclusters, nbits):
    rng = np.random.default_rng(nclusters)
    semantic = rng.standard_normal((nclusters, 24))
    semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
    centers, report = optimize_centers(semantic, nbits, seed=0, sweeps=4)
    dmin = min_distance(nbits, nclusters)
    assert set(np.unique(centers)) == {-1.0, 1.0}
    assert hamming_matrix(centers)[~np.eye(nclusters, dtype=bool)].min() >= dmin
    assert report["result"]["all_pairs_at_least_required"]
    assert report["result"]["semantic_correlation"] > report["init"]["semantic_correlation"]
    again, _ = optimize_centers(semantic, nbits, seed=0, sweeps=4)
    assert np.array_equal(again, centers)


def test_refine_center_follows_semantic_targets():
    """With one feasible region, the ADMM result is at least dmin away and ranks like s."""
    others = initial_centers(8, 16, seed=0)[1:]
    targets = np.linspace(-16, 16, 7)
    center = refine_center(initial_centers(8, 16)[0], others, targets, dmin=4)
    inner = others @ center
    assert ((16 - inner) / 2).min() >= 4
    assert np.corrcoef(inner, targets)[0, 1] > 0.5


def test_quality_report_fields():
    centers = initial_centers(8, 16)
    q = center_quality(centers, np.eye(8), 4)
    assert q["min_hamming"] == 8 and q["all_pairs_at_least_required"]
    assert set(q) == {"min_hamming", "mean_hamming", "required_min_distance",
                      "all_pairs_at_least_required", "semantic_correlation", "sweep_objective"}


INPUT_FILES = ["demo_test_feats.h5", "demo_test_labels.mat", "demo_train_feats.h5",
               "demo_train_labels.mat"]


def _clustered_data(tmp_path, n=120, classes=6, frames=25, dim=512):
    root = tmp_path / "demo"
    rng = np.random.default_rng(0)
    labels = rng.integers(classes, size=n)
    protos = rng.random((classes, dim)) * 3
    feats = protos[labels][:, None, :] + rng.random((n, frames, dim))
    write_features(str(root / "demo_train_feats.h5"), feats.astype(np.float16))
    write_labels(str(root / "demo_train_labels.mat"), np.eye(classes)[labels])
    write_features(str(root / "demo_test_feats.h5"), feats[:10].astype(np.float16))
    write_labels(str(root / "demo_test_labels.mat"), np.eye(classes)[labels[:10]])
    return feats


def test_preprocess_artifacts_are_consistent(tmp_path):
    _clustered_data(tmp_path)
    cfg = tiny_config(tmp_path, "nbits=16", "preprocess.nclusters=6",
                      "preprocess.latent_dim_pca=32", "preprocess.chunk_videos=7")
    assert preprocess_script.main(["--config", cfg_path(), "--cfg-options",
                                   *cfg_items(tmp_path)]) == {"clusters": "computed",
                                                              "centers": "computed"}
    p = cfg.paths
    latent = read_matrix(p.latent_feats, "feats", shape=(120, 32))
    anchors = read_matrix(p.anchors, "feats", shape=(6, 32))
    nearest = read_matrix(p.nearest, "pos", shape=(120, 3))
    semantic = read_matrix(p.semantic, "matrix", shape=(6, 32))
    centers = read_matrix(p.hash_center, "matrix", shape=(6, 16))
    dist = ((latent[:, None, :] - anchors[None]) ** 2).sum(-1)
    assert np.array_equal(nearest, np.argsort(dist, axis=1, kind="stable")[:, :3])
    assert np.allclose(semantic, anchors / np.linalg.norm(anchors, axis=1, keepdims=True), atol=1e-6)
    # hash center k is optimised from semantic center k, the cluster of pseudo-label k
    expected, _ = optimize_centers(semantic.astype(np.float64), 16, seed=cfg.seed)
    assert np.array_equal(centers, expected)
    labels, loaded, digests = load_artifacts(cfg, 120)
    assert np.array_equal(labels, nearest[:, 0]) and np.array_equal(loaded, centers)
    assert digests == {name: hashlib.sha256(open(p[name], "rb").read()).hexdigest()
                       for name in ("nearest", "hash_center")}
    assert os.path.isfile(p.center_report)
    assert ensure_preprocessed(cfg) == {"clusters": "reused", "centers": "reused"}
    # another code length only needs new centers, from the same semantic centers
    cfg32 = tiny_config(tmp_path, "nbits=32", "preprocess.nclusters=6",
                        "preprocess.latent_dim_pca=32", "preprocess.chunk_videos=7")
    assert ensure_preprocessed(cfg32) == {"clusters": "reused", "centers": "computed"}
    assert read_matrix(cfg32.paths.hash_center, "matrix").shape == (6, 32)
    assert np.array_equal(read_matrix(p.semantic, "matrix"), semantic)


def cfg_path():
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "S5VH", "demo.py")


def cfg_items(tmp_path):
    return [f"data_root={str(tmp_path)!r}", "nbits=16", "preprocess.nclusters=6",
            "preprocess.latent_dim_pca=32", "preprocess.chunk_videos=7"]


@pytest.mark.parametrize("overrides, message", [
    (["preprocess.nclusters=500"], "nclusters=500 is larger than the number of training videos"),
    (["preprocess.latent_dim_pca=200"], r"latent_dim_pca=200 must be at most .* min\(120, 512\)"),
    (["nbits=24"], "power of two"),
])
def test_preprocess_errors_leave_no_artifacts(tmp_path, overrides, message):
    _clustered_data(tmp_path)
    items = [f"data_root={str(tmp_path)!r}", "preprocess.nclusters=6",
             "preprocess.latent_dim_pca=32", *overrides]
    with pytest.raises(UserError, match=message):
        preprocess_script.main(["--config", cfg_path(), "--cfg-options", *items])
    assert sorted(os.listdir(tmp_path / "demo")) == INPUT_FILES


def test_nan_features_stop_preprocessing(tmp_path):
    feats = _clustered_data(tmp_path)
    feats[5, 3, 7] = np.nan
    write_features(str(tmp_path / "demo" / "demo_train_feats.h5"), feats.astype(np.float32))
    with pytest.raises(DataError, match=r"1 NaN/Inf values in 1 videos \(first at row 5\)"):
        preprocess_script.main(["--config", cfg_path(), "--cfg-options", *cfg_items(tmp_path)])
    assert sorted(os.listdir(tmp_path / "demo")) == INPUT_FILES


PROVENANCE_ITEMS = ["nbits=16", "preprocess.nclusters=6", "preprocess.latent_dim_pca=32"]


def _preprocessed(tmp_path, *extra):
    cfg = tiny_config(tmp_path, *PROVENANCE_ITEMS, *extra)
    return cfg, ensure_preprocessed(cfg)


@pytest.mark.parametrize("change, reason, clusters, centers", [
    (["seed=2"], "seed", "computed", "computed"),
    (["preprocess.latent_dim_pca=16"], "latent_dim_pca", "computed", "computed"),
    # the nearest-cluster table changes, the semantic centers do not: the centers are kept
    (["preprocess.nearest_clusters=2"], "nearest_clusters", "computed", "reused"),
    (["preprocess.center_init='random'"], "center_init", "reused", "computed"),
    (["preprocess.center_alpha=0.5"], "center_alpha", "reused", "computed"),
    (["preprocess.center_sweeps=0"], "center_sweeps", "reused", "computed"),
])
def test_a_changed_config_value_recomputes_what_depends_on_it(tmp_path, caplog, change, reason,
                                                              clusters, centers):
    _clustered_data(tmp_path)
    _preprocessed(tmp_path)
    centers_before = read_matrix(tiny_config(tmp_path, *PROVENANCE_ITEMS).paths.hash_center,
                                 "matrix")
    caplog.clear()
    cfg, status = _preprocessed(tmp_path, *change)
    assert status == {"clusters": clusters, "centers": centers}
    assert reason in caplog.text and "recomputing, made from other inputs" in caplog.text
    if reason == "center_sweeps":       # no refinement: the initialisation itself
        from dataset.hash_centers import initial_centers
        assert np.array_equal(read_matrix(cfg.paths.hash_center, "matrix"),
                              initial_centers(6, 16, seed=1))
        assert not np.array_equal(read_matrix(cfg.paths.hash_center, "matrix"), centers_before)
    assert _preprocessed(tmp_path, *change)[1] == {"clusters": "reused", "centers": "reused"}


def test_replaced_features_of_the_same_size_are_noticed(tmp_path, caplog):
    feats = _clustered_data(tmp_path)
    cfg, _ = _preprocessed(tmp_path)
    before = read_matrix(cfg.paths.latent_feats, "feats")
    write_features(str(tmp_path / "demo" / "demo_train_feats.h5"),
                   (feats[::-1] * 1.5).astype(np.float16))
    cfg, status = _preprocessed(tmp_path)
    assert status == {"clusters": "computed", "centers": "computed"}
    assert "train_features changed" in caplog.text
    assert not np.allclose(read_matrix(cfg.paths.latent_feats, "feats"), before)


def test_a_change_to_any_one_video_is_noticed(tmp_path, caplog):
    """The record holds the sha256 of every byte of the features, not of a sample of videos."""
    feats = _clustered_data(tmp_path)
    _preprocessed(tmp_path)
    for row in (1, 57, 118):
        changed = feats.copy()
        changed[row, 3, 5] += 0.5
        write_features(str(tmp_path / "demo" / "demo_train_feats.h5"), changed.astype(np.float16))
        caplog.clear()
        assert _preprocessed(tmp_path)[1]["clusters"] == "computed", row
        assert "train_features changed" in caplog.text
        feats = changed


@pytest.mark.parametrize("make, message", [
    (lambda f: f * 0, "all are identical after mean pooling"),
    (lambda f: np.full_like(f, 0.5), "all are identical after mean pooling"),
    (lambda f: f[np.arange(len(f)) % 4], "only 4 are distinct after mean pooling"),
])
def test_degenerate_features_stop_with_one_line(tmp_path, make, message):
    feats = _clustered_data(tmp_path)
    write_features(str(tmp_path / "demo" / "demo_train_feats.h5"), make(feats).astype(np.float16))
    with pytest.raises(DataError, match=f"demo_train_feats.h5 \\['feats'\\]: degenerate features: "
                                        f"of the 120 training videos {message}"):
        preprocess_script.main(["--config", cfg_path(), "--cfg-options", *cfg_items(tmp_path)])
    assert sorted(os.listdir(tmp_path / "demo")) == INPUT_FILES


def test_a_mixed_set_never_passes(tmp_path, caplog):
    _clustered_data(tmp_path)
    cfg, _ = _preprocessed(tmp_path)
    centers = read_matrix(cfg.paths.hash_center, "matrix")
    from dataset.io import write_matrix
    write_matrix(cfg.paths.hash_center, "matrix", -centers)    # new centers beside old records
    assert _preprocessed(tmp_path)[1]["centers"] == "computed"
    assert "hash_center_16.h5 is not the file the record names" in caplog.text
    assert np.array_equal(read_matrix(cfg.paths.hash_center, "matrix"), centers)


def test_files_without_a_record_need_the_release_switch(tmp_path, caplog):
    _clustered_data(tmp_path)
    cfg, _ = _preprocessed(tmp_path)
    os.remove(cfg.paths.cluster_record)
    os.remove(cfg.paths.center_record)
    with pytest.raises(DataError, match="carry no provenance record .* "
                                        "preprocess.release_artifacts=True"):
        _preprocessed(tmp_path)
    cfg, status = _preprocessed(tmp_path, "preprocess.release_artifacts=True")
    assert status == {"clusters": "unrecorded", "centers": "unrecorded"}
    assert "without a provenance record (preprocess.release_artifacts=True)" in caplog.text


def test_preprocessing_is_deterministic(tmp_path):
    _clustered_data(tmp_path)

    def inputs():
        return {name: (tmp_path / "demo" / name).read_bytes() for name in INPUT_FILES}

    before = inputs()
    first, _ = _preprocessed(tmp_path, f"preprocess.artifact_dir={str(tmp_path / 'a')!r}")
    second, _ = _preprocessed(tmp_path, f"preprocess.artifact_dir={str(tmp_path / 'b')!r}")
    for name, key in (("latent_feats", "feats"), ("anchors", "feats"), ("nearest", "pos"),
                      ("semantic", "matrix"), ("hash_center", "matrix")):
        a, b = read_matrix(first.paths[name], key), read_matrix(second.paths[name], key)
        assert a.tobytes() == b.tobytes(), name
    assert sorted(os.listdir(tmp_path / "demo")) == INPUT_FILES    # artifacts went elsewhere
    assert inputs() == before                                          # inputs untouched
