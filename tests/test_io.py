import os
import re
import warnings

import h5py
import numpy as np
import pytest
import scipy.io

from dataset.io import (DataError, FeatureFile, check_finite, read_features, read_labels,
                        read_matrix, write_features, write_labels, write_matrix)
from dataset.protocol import holdout_split, retrieval_sets, train_set
from tests.conftest import tiny_config
from utils.errors import UserError


def _feats(path, shape=(6, 4, 3), dtype=np.float32, key="feats"):
    data = np.random.default_rng(0).random(shape).astype(dtype)
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=data)
    return data


def test_any_float_dtype_reads_as_float32(tmp_path):
    data = _feats(tmp_path / "f.h5", dtype=np.float16)
    out = read_features(str(tmp_path / "f.h5"), frames=4, feature_size=3)
    assert out.dtype == np.float32 and np.array_equal(out, data.astype(np.float32))


def test_row_subsets_in_any_order_and_chunks(tmp_path):
    data = _feats(tmp_path / "f.h5", shape=(20, 2, 3))
    rows = np.array([7, 2, 2, 19, 0])
    assert np.array_equal(read_features(str(tmp_path / "f.h5"), rows=rows, chunk=2), data[rows])
    with FeatureFile(str(tmp_path / "f.h5")) as f:
        got = np.concatenate([b for _, b in f.iter_chunks(6)])
    assert np.array_equal(got, data)


@pytest.mark.parametrize("chunks", [None, (1, 2, 3), (3, 2, 3), (8, 2, 3), (32, 2, 3)])
def test_row_lists_read_each_storage_chunk_once_in_any_order(tmp_path, monkeypatch, chunks):
    data = np.random.default_rng(1).random((40, 2, 3)).astype(np.float16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("feats", data=data, chunks=chunks, compression="gzip" if chunks else None)
    monkeypatch.setattr("dataset.io.SPAN_ROWS", 6)     # spans split at this file's scale
    monkeypatch.setattr("dataset.io.DECODED_CACHE_BYTES", 0)   # a file too large to keep
    rows = np.array([39, 0, 1, 2, 5, 6, 17, 16, 30, 31, 32, 33, 34, 35, 36, 5, 38])
    with FeatureFile(str(tmp_path / "f.h5")) as f:
        stored, slices = f._data, []

        class Recorder:          # the dataset, noting which rows each read covers
            chunks, dtype = stored.chunks, stored.dtype

            def __getitem__(self, where):
                slices.append(where)
                return stored[where]
        f._data = Recorder()
        assert np.array_equal(f.read(rows, dtype=None), data[rows])
        covered = [row for where in slices for row in range(where.start, where.stop)]
        assert len(covered) == len(set(covered))                  # no row read twice
        per_chunk = chunks[0] if chunks else 1
        assert all(where.stop - where.start <= max(6, per_chunk) for where in slices)
        f._data = stored
        assert np.array_equal(f.read(rows), data[rows].astype(np.float32))
        assert f.read(np.array([], dtype=int)).shape == (0, 2, 3)
        assert np.array_equal(f.read(np.arange(40)[::-1]), data[::-1].astype(np.float32))


def test_a_small_file_is_decompressed_once_per_version(tmp_path, monkeypatch):
    """Rows of a file small enough to keep come from one decompressed copy, which a caller
    cannot change; a replaced file is read again."""
    path = str(tmp_path / "f.h5")
    data = _feats(path, shape=(10, 2, 3), dtype=np.float16)
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, where: reads.append(where) or original(self, where))
    with FeatureFile(path) as f, warnings.catch_warnings():
        warnings.simplefilter("error")                    # (torch reads the kept copy quietly)
        block = f.read(slice(2, 5), dtype=None)
        block[:] = 0                                      # the caller's own array
        assert np.array_equal(f.read(slice(2, 5), dtype=None), data[2:5])
        assert np.array_equal(f.read(np.array([9, 0, 9])), data[[9, 0, 9]].astype(np.float32))
        converted = f.read(slice(0, 10))
        converted[:] = 0
        assert np.array_equal(f.read(slice(0, 10)), data.astype(np.float32))
    assert np.array_equal(read_features(path, rows=[3, 1]), data[[3, 1]].astype(np.float32))
    assert len(reads) == 1
    replaced = tmp_path / "g.h5"
    new = _feats(replaced, shape=(10, 2, 3), dtype=np.float16) + 1
    with h5py.File(replaced, "w") as f:
        f.create_dataset("feats", data=new)
    os.replace(replaced, path)
    assert np.array_equal(read_features(path), new.astype(np.float32)) and len(reads) == 2


def test_array_cache_keeps_the_most_recently_used_within_its_bytes():
    from utils.memo import ArrayCache
    cache = ArrayCache(max_bytes=200)
    a, b, c = (np.zeros(10) for _ in range(3))             # 80 bytes each
    cache.put("a", a), cache.put("b", b)
    assert cache.get("a") is a and not a.flags.writeable
    cache.put("c", c)                                       # 240 bytes: b, least recent, goes
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    big = cache.put("big", np.zeros(100))                   # alone over the budget: kept alone
    assert cache.get("big") is big and cache.get("a") is None and cache.get("c") is None


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda p: None, {}, "feature file not found"),
    (lambda p: _feats(p, key="x"), {}, r"no dataset 'feats' \(keys present: \['x'\]\)"),
    (lambda p: _feats(p, shape=(6, 12)), {}, "expected rank 3"),
    (lambda p: _feats(p), {"frames": 25}, r"expected 25 frames per video \(max_frames\), got 4"),
    (lambda p: _feats(p), {"feature_size": 4096}, "expected feature size 4096"),
    (lambda p: _feats(p, dtype=np.int32), {}, "expected a float dtype"),
    (lambda p: p.write_text("not hdf5"), {}, "not a readable HDF5 file"),
])
def test_bad_feature_files(tmp_path, make, kwargs, message):
    path = tmp_path / "f.h5"
    make(path)
    with pytest.raises(UserError, match=message):
        read_features(str(path), **kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory, not a regular file"),
    (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    (lambda p: os.symlink(p, p), "is a symbolic link loop"),
    (lambda p: os.symlink(p.parent / "gone.h5", p), "is a symbolic link to a missing file"),
])
def test_what_stands_where_a_file_should_be_is_named(tmp_path, make, message):
    path = tmp_path / "f.h5"
    make(path)
    for read in (lambda: read_features(str(path)), lambda: read_labels(str(path)),
                 lambda: read_matrix(str(path), "matrix")):
        with pytest.raises(UserError, match=re.escape(f"{path} {message}")):
            read()                         # a FIFO is never opened: this would block


def test_labels_must_be_zero_or_one(tmp_path):
    labels = np.eye(3)[[0, 1, 2, 1]]
    labels[2, 1] = 2
    write_labels(str(tmp_path / "l.mat"), labels)
    with pytest.raises(DataError, match=r"labels must be 0 or 1 .* 1 entries are not, the first 2 "
                                        r"at row 2, column 1"):
        read_labels(str(tmp_path / "l.mat"))
    labels[2, 1] = np.nan
    write_labels(str(tmp_path / "l.mat"), labels)
    with pytest.raises(DataError, match="the first nan at row 2"):
        read_labels(str(tmp_path / "l.mat"))


def test_nan_and_inf_are_counted(tmp_path):
    data = np.ones((5, 2, 3), dtype=np.float32)
    data[1, 0, 0] = np.nan
    data[3, 1, :] = np.inf
    write_features(str(tmp_path / "f.h5"), data)
    with pytest.raises(DataError, match=r"4 NaN/Inf values in 2 videos \(first at row 1\)"):
        read_features(str(tmp_path / "f.h5"))
    # blocks are checked in the dtype they are stored in (the value check of a whole file)
    with pytest.raises(DataError, match=r"4 NaN/Inf values in 2 videos \(first at row 1\)"):
        check_finite(data.astype(np.float16), "f.h5")
    big = np.ones((3, 2, 3))
    big[2, 1, 1] = 1e39                                   # finite in float64, inf in float32
    with pytest.raises(DataError, match=r"1 values beyond ±1e\+06 in 1 videos \(first at row 2"):
        check_finite(big, "f.h5")
    check_finite(np.full((2, 2, 3), 65504, dtype=np.float16), "f.h5")   # float16's largest


def test_labels_v5_and_v73_and_errors(tmp_path):
    labels = np.eye(4, dtype=np.uint8)[[0, 1, 3, 2, 2]]
    write_labels(str(tmp_path / "l.mat"), labels)
    assert np.array_equal(read_labels(str(tmp_path / "l.mat"), expected_rows=5), labels)
    with h5py.File(tmp_path / "v73.mat", "w") as f:      # MATLAB v7.3 stores transposed
        f.create_dataset("re_label", data=labels.T)
    assert np.array_equal(read_labels(str(tmp_path / "v73.mat"), "re_label"), labels)
    with pytest.raises(DataError, match=r"no variable 'q_label' \(variables present: \['labels'\]"):
        read_labels(str(tmp_path / "l.mat"), "q_label")
    with pytest.raises(DataError, match="5 label rows, but the features have 6 videos"):
        read_labels(str(tmp_path / "l.mat"), expected_rows=6)
    labels[2] = 0
    write_labels(str(tmp_path / "empty.mat"), labels)
    with pytest.raises(DataError, match=r"1 empty label rows \(first at row 2\)"):
        read_labels(str(tmp_path / "empty.mat"))
    scipy.io.savemat(str(tmp_path / "flat.mat"), {"labels": np.zeros((2, 2, 2))})
    with pytest.raises(DataError, match="expected \\(N, C\\) labels"):
        read_labels(str(tmp_path / "flat.mat"))


def test_matrix_round_trip_and_shape_check(tmp_path):
    m = np.arange(12.0).reshape(3, 4)
    write_matrix(str(tmp_path / "m.h5"), "matrix", m)
    assert np.array_equal(read_matrix(str(tmp_path / "m.h5"), "matrix", shape=(3, None)), m)
    with pytest.raises(DataError, match=r"expected shape \(5, 4\), got \(3, 4\)"):
        read_matrix(str(tmp_path / "m.h5"), "matrix", shape=(5, 4))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_features(str(tmp_path / "f.h5"), object())
    assert list(tmp_path.iterdir()) == []


def _ucf_layout(tmp_path, n_train=30, n_test=10, frames=25, dim=512, classes=4):
    root = tmp_path / "demo"
    root.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        write_features(str(root / f"demo_{split}_feats.h5"),
                       rng.random((n, frames, dim)).astype(np.float32))
        write_labels(str(root / f"demo_{split}_labels.mat"),
                     np.eye(classes)[rng.integers(classes, size=n)])


def test_protocols(tmp_path):
    _ucf_layout(tmp_path)
    cfg = tiny_config(tmp_path)
    db, q = retrieval_sets(cfg)
    assert (len(db), len(q)) == (30, 10) and db.labels.shape == (30, 4)
    assert train_set(cfg).labels is None
    cfg = tiny_config(tmp_path, "data.protocol='all_vs_all'", "data.db_feats='demo_test_feats.h5'",
                      "data.db_labels='demo_test_labels.mat'")
    db, q = retrieval_sets(cfg)
    assert np.array_equal(db.rows, q.rows) and len(q) == 10
    cfg = tiny_config(tmp_path, "data.protocol='holdout'", "data.holdout_queries=0.2")
    db, q = retrieval_sets(cfg)
    assert (len(db), len(q)) == (24, 6) and not set(db.rows) & set(q.rows)
    assert np.array_equal(train_set(cfg).rows, db.rows)
    cfg = tiny_config(tmp_path, "max_frames=30")
    with pytest.raises(DataError, match="expected 30 frames"):
        retrieval_sets(cfg)


def test_holdout_split_is_seeded_partition():
    kept, held = holdout_split(100, 0.2, seed=3)
    assert len(held) == 20 and sorted(np.concatenate([kept, held])) == list(range(100))
    assert np.array_equal(holdout_split(100, 0.2, seed=3)[1], held)
    assert not np.array_equal(holdout_split(100, 0.2, seed=4)[1], held)
