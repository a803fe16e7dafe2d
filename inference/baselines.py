"""Classical unsupervised hashing baselines on mean-pooled features: LSH and PCA-ITQ."""
import hashlib

import numpy as np
import torch

from utils.hashing import binarize

ITQ_ITERATIONS = 50


def _float64(feats):
    """(N, D) features as float64 of their own (arrays may be shared and read-only)."""
    if torch.is_tensor(feats):
        return feats.double()
    return torch.from_numpy(np.array(feats, dtype=np.float64))


# the last features' principal axes: ITQ of several seeds and code lengths on one training set
# decomposes its (D, D) covariance once (seconds per decomposition at D = 4096)
_last_axes = {}


def _principal_axes(feats):
    """(mean (D,), eigenvalues (D,), eigenvectors (D, D)) of the covariance of float64 features
    (N, D); the same for the same content, so the last one's are kept."""
    key = hashlib.sha256(feats.contiguous().numpy().tobytes()).hexdigest()
    if key not in _last_axes:
        mean = feats.mean(0)
        centred = feats - mean
        eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / len(centred))
        _last_axes.clear()
        _last_axes[key] = (mean, eigvals, eigvecs)
    return _last_axes[key]


class LSH:
    """Random Gaussian hyperplanes through the training mean."""

    def __init__(self, nbits, seed=0):
        self.nbits, self.seed = nbits, seed

    def fit(self, feats):
        """feats: (N, D) mean-pooled training features."""
        feats = _float64(feats)
        gen = torch.Generator().manual_seed(self.seed)
        self.mean = feats.mean(0)
        self.projection = torch.randn(feats.shape[1], self.nbits, generator=gen,
                                      dtype=torch.float64)
        return self

    def encode(self, feats):
        """(n, D) -> (n, B) ±1 codes."""
        feats = _float64(feats)
        return binarize((feats - self.mean) @ self.projection).float()


class ITQ:
    """PCA to B dimensions, then the rotation that minimises quantisation error (Gong et al.)."""

    def __init__(self, nbits, seed=0, iterations=ITQ_ITERATIONS):
        self.nbits, self.seed, self.iterations = nbits, seed, iterations

    def fit(self, feats):
        """feats: (N, D) mean-pooled training features; needs N, D >= B."""
        feats = _float64(feats)
        if min(feats.shape) < self.nbits:
            raise ValueError(f"ITQ with {self.nbits} bits needs at least {self.nbits} videos "
                             f"and feature dimensions, got {tuple(feats.shape)}")
        self.mean, eigvals, eigvecs = _principal_axes(feats)
        centred = feats - self.mean
        self.pca = eigvecs[:, torch.argsort(eigvals, descending=True)[:self.nbits]]   # (D, B)
        projected = centred @ self.pca                                               # (N, B)
        gen = torch.Generator().manual_seed(self.seed)
        rotation, _ = torch.linalg.qr(torch.randn(self.nbits, self.nbits, generator=gen,
                                                  dtype=torch.float64))
        for _ in range(self.iterations):
            codes = binarize(projected @ rotation)
            # orthogonal Procrustes: argmax_R tr(R^T V^T B) = U W^T for V^T B = U S W^T
            u, _, wt = torch.linalg.svd(projected.T @ codes)
            rotation = u @ wt
        self.rotation = rotation
        return self

    def encode(self, feats):
        feats = _float64(feats)
        return binarize((feats - self.mean) @ self.pca @ self.rotation).float()


BASELINES = {"lsh": LSH, "itq": ITQ}


def baseline_codes(method, nbits, train_feats, db_feats, query_feats, seed=0):
    """Fit `method` on (N, D) training means; return (database, query) ±1 codes."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline '{method}'; choose one of {sorted(BASELINES)}")
    model = BASELINES[method](nbits, seed).fit(train_feats)
    return model.encode(db_feats), model.encode(query_feats)
