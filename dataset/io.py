"""Readers and writers for the published feature and label files (docs/method.md §3).

Features: HDF5, key `feats`, (N, M, D), any float dtype; read in row chunks and cast to float32,
so a file larger than memory is never loaded whole. Labels: MATLAB .mat (v5 through scipy.io, v7.3
through h5py), (N, C) one-hot or multi-hot. Every check raises `DataError` naming the file and key.
"""
import io
import os
import warnings

import h5py
import numpy as np
import scipy.io
import torch

from utils.errors import UserError
from utils.fileio import atomic_path, check_file, ensure_space, write_bytes
from utils.memo import ArrayCache


class DataError(UserError):
    """A feature, label or artifact file that cannot be used as it is."""


# Most rows a feature file is read in at once when a list of rows is asked for (a bound on the
# rows read beside them, up to a storage chunk's rows for each wanted one)
SPAN_ROWS = 256
# A feature file whose contents take at most this many bytes as stored is decompressed once per
# process and file version and its rows come from that copy: a fresh run reads its training file
# up to four times (the value check, the mean pooling, the resident training and evaluation
# copies), and each read of ucf_dev's 158 MB file took 1.3-1.8 s on the H200 host.
DECODED_CACHE_BYTES = 2 ** 29
_decoded = ArrayCache(DECODED_CACHE_BYTES)   # (real path, identity, key) -> array as stored


class FeatureFile:
    """Lazy (N, M, D) view of an HDF5 feature file; rows come out as float32 numpy arrays."""

    def __init__(self, path, key="feats", frames=None, feature_size=None):
        check_file(path, "feature")
        self.path, self.key = path, key
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:
            raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
        if key not in self._file:
            keys = list(self._file.keys())
            self.close()
            raise DataError(f"{path}: no dataset '{key}' (keys present: {keys})")
        self._data = self._file[key]
        shape = self._data.shape
        problem = None
        if len(shape) != 3:
            problem = f"expected rank 3 (N, M, D), got shape {shape}"
        elif not np.issubdtype(self._data.dtype, np.floating):
            problem = f"expected a float dtype, got {self._data.dtype}"
        elif frames is not None and shape[1] != frames:
            problem = f"expected {frames} frames per video (max_frames), got {shape[1]}"
        elif feature_size is not None and shape[2] != feature_size:
            problem = f"expected feature size {feature_size} (feature_size), got {shape[2]}"
        elif shape[0] == 0:
            problem = "holds no videos"
        if problem:
            self.close()
            raise DataError(f"{path} ['{key}']: {problem}")
        self.shape = tuple(shape)
        # the version of the file this handle reads, whatever replaces the path later
        st = os.fstat(self._file.id.get_vfd_handle())
        self._version = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino,
                         st.st_dev, key)

    def __len__(self):
        return self.shape[0]

    def read(self, rows=None, dtype=np.float32):
        """(n, M, D) in `dtype` (None: as stored) for a slice or sorted/unsorted index array
        (None: all rows)."""
        stored = self._decoded()
        if stored is not None:
            out = stored[slice(None) if rows is None else rows]     # may be a read-only view
        elif rows is None:
            out = self._data[()]
        elif isinstance(rows, slice):
            out = self._data[rows]
        else:
            unique, inverse = np.unique(np.asarray(rows), return_inverse=True)
            out = self._read_sorted(unique)[inverse]
        if dtype is None or out.dtype == dtype:
            return out if out.flags.writeable else out.copy()      # the caller's own
        if out.dtype == np.float16 and dtype == np.float32:
            # exact either way; torch's conversion is several times faster than numpy's, and
            # only reads `out`
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                return torch.from_numpy(out).float().numpy()
        return out.astype(dtype)

    def _decoded(self):
        """The whole dataset as stored, decompressed once per process and file version, when
        it takes at most DECODED_CACHE_BYTES (else None); the least recently used go first."""
        if np.prod(self.shape) * self._data.dtype.itemsize > DECODED_CACHE_BYTES:
            return None
        stored = _decoded.get(self._version)
        return stored if stored is not None else _decoded.put(self._version, self._data[()])

    def _read_sorted(self, rows):
        """Rows `rows` (sorted, unique) as stored. Each storage chunk holding one of them is read
        once: runs of consecutive such chunks, up to SPAN_ROWS rows (or one chunk), are read as
        slices. (h5py's selection of a list of rows decompresses a chunk again for every row
        taken from it: reading 80% of a compressed file that way took 4x reading all of it.)"""
        per_chunk = self._data.chunks[0] if self._data.chunks else 1
        chunk_of = rows // per_chunk
        # a new slice where the next wanted row's chunk does not follow, or the slice is full
        breaks = [0]
        for i in range(1, len(rows)):
            gap = chunk_of[i] > chunk_of[i - 1] + 1
            full = chunk_of[i] > chunk_of[i - 1] and \
                (chunk_of[i] + 1 - chunk_of[breaks[-1]]) * per_chunk > SPAN_ROWS
            if gap or full:
                breaks.append(i)
        out = np.empty((len(rows),) + self.shape[1:], dtype=self._data.dtype)
        for begin, end in zip(breaks, breaks[1:] + [len(rows)]):
            if begin == end:
                continue
            first = int(chunk_of[begin]) * per_chunk
            last = min(int(chunk_of[end - 1] + 1) * per_chunk, len(self))
            out[begin:end] = self._data[first:last][rows[begin:end] - first]
        return out

    def iter_chunks(self, chunk, rows=None, dtype=np.float32):
        """Yield (row_indices, (n, M, D) in `dtype`, None: as stored) over all rows (or `rows`),
        `chunk` at a time."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), chunk):
            idx = rows[start:start + chunk]
            contiguous = len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1)
            where = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
            yield idx, self.read(where, dtype)

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Largest magnitude accepted in a feature: CNN features are far below it, and PCA's sums of
# squares over thousands of dimensions stay finite in float32 under it.
MAX_ABS_FEATURE = 1e6


def check_finite(block, path, key="feats", offset=0):
    """Raise when `block` holds NaN/Inf or values beyond ±MAX_ABS_FEATURE, with their count and
    the first video row. `block` may be of any float dtype."""
    bad = ~np.isfinite(block)
    what = "NaN/Inf values"
    if not bad.any() and float(np.finfo(block.dtype).max) > MAX_ABS_FEATURE:   # not float16
        bad = np.abs(block) > MAX_ABS_FEATURE
        what = f"values beyond ±{MAX_ABS_FEATURE:g}"
    if bad.any():
        videos = np.nonzero(bad.reshape(len(block), -1).any(axis=1))[0]
        raise DataError(f"{path} ['{key}']: {int(bad.sum())} {what} in "
                        f"{len(videos)} videos (first at row {offset + int(videos[0])})")


def read_features(path, key="feats", frames=None, feature_size=None, rows=None, chunk=1024):
    """Load (n, M, D) float32 features, validated and checked for NaN/Inf."""
    with FeatureFile(path, key, frames, feature_size) as feats:
        rows = np.arange(len(feats)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows),) + feats.shape[1:], dtype=np.float32)
        done = 0
        for idx, block in feats.iter_chunks(chunk, rows):
            check_finite(block, path, key, offset=int(idx[0]))
            out[done:done + len(block)] = block
            done += len(block)
    return out


def read_labels(path, key="labels", expected_rows=None):
    """(N, C) float32 label matrix; rows must be non-empty (each video has a class)."""
    check_file(path, "label")
    if h5py.is_hdf5(path):  # MATLAB v7.3 files are HDF5; MATLAB stores matrices transposed
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(f"{path}: no variable '{key}' (variables present: {list(f)})")
            labels = np.asarray(f[key]).T
    else:
        try:
            contents = scipy.io.loadmat(path)
        except Exception as err:   # scipy raises several unrelated types for a corrupt file
            raise DataError(f"{path}: not a readable .mat file ({type(err).__name__}: "
                            f"{err})") from None
        if key not in contents:
            present = [k for k in contents if not k.startswith("__")]
            raise DataError(f"{path}: no variable '{key}' (variables present: {present})")
        labels = np.asarray(contents[key])
    if labels.ndim != 2:
        raise DataError(f"{path} ['{key}']: expected (N, C) labels, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool):
        raise DataError(f"{path} ['{key}']: expected numeric 0/1 labels, got dtype {labels.dtype}")
    labels = labels.astype(np.float32)
    not_binary = np.nonzero(~np.isin(labels, (0.0, 1.0)))
    if len(not_binary[0]):
        row, col = int(not_binary[0][0]), int(not_binary[1][0])
        raise DataError(f"{path} ['{key}']: labels must be 0 or 1 (one-hot or multi-hot); "
                        f"{len(not_binary[0])} entries are not, the first {labels[row, col]:g} "
                        f"at row {row}, column {col}")
    if expected_rows is not None and labels.shape[0] != expected_rows:
        raise DataError(f"{path} ['{key}']: {labels.shape[0]} label rows, but the features "
                        f"have {expected_rows} videos")
    empty = np.nonzero(~(labels > 0).any(axis=1))[0]
    if len(empty):
        raise DataError(f"{path} ['{key}']: {len(empty)} empty label rows "
                        f"(first at row {int(empty[0])}); every video needs a class")
    return labels


def _write_hdf5(path, datasets):
    """{key: array} as one HDF5 file, built in memory and written atomically, so a full disk is
    an error of our own write (one line) rather than of the HDF5 library."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    write_bytes(path, buffer.getvalue())


def write_features(path, feats, key="feats"):
    """Write an (N, M, D) array atomically."""
    _write_hdf5(path, {key: feats})


def write_features_streamed(path, shape, blocks, key="feats", dtype=np.float32):
    """Write (N, M, D) features from an iterable of (n, M, D) row blocks, atomically. The space
    the file needs is checked before anything is written."""
    ensure_space(path, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_dataset(key, shape=shape, dtype=dtype, chunks=(1,) + tuple(shape[1:]))
        done = 0
        for block in blocks:
            data[done:done + len(block)] = block
            done += len(block)
        if done != shape[0]:
            raise DataError(f"{path}: wrote {done} of {shape[0]} videos")


def write_matrix(path, key, matrix):
    """An HDF5 file with one dataset (an artifact of preprocess.py), written atomically."""
    _write_hdf5(path, {key: matrix})


def read_matrix(path, key, shape=None, dtype=None):
    """Read one dataset of an artifact file, checking its shape (None in `shape` = any)."""
    check_file(path, "artifact")
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(f"{path}: no dataset '{key}' (keys present: {list(f)})")
            value = f[key][()]
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    if shape is not None and (len(value.shape) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, value.shape))):
        raise DataError(f"{path} ['{key}']: expected shape {shape}, got {value.shape}")
    return value if dtype is None else value.astype(dtype)


def write_labels(path, labels, key="labels"):
    """Write an (N, C) label matrix as a MATLAB v5 .mat file, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            scipy.io.savemat(f, {key: np.asarray(labels)})
