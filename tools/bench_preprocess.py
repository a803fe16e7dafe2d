"""Preprocessing benchmarks: hash-center optimisation speed/quality, and the whole preprocess of a
synthetic FCVID-size feature file (time and peak memory of `preprocess.py` in a child process).

    python -m tools.bench_preprocess centers                      # K=101/B=64, K=450/B=16,32,64
    python -m tools.bench_preprocess fcv --root /scratch/synth    # writes ~18.7 GB once
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from dataset.io import write_features_streamed
from dataset.hash_centers import optimize_centers

FCV_SHAPE = (45585, 25, 4096)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_centers(cases, seed=0):
    rows = []
    for nclusters, nbits in cases:
        rng = np.random.default_rng(seed)
        semantic = rng.standard_normal((nclusters, 512))
        semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
        start = time.perf_counter()
        _, report = optimize_centers(semantic, nbits, seed=seed)
        seconds = time.perf_counter() - start
        init, result = report["init"], report["result"]
        rows.append({"K": nclusters, "B": nbits, "seconds": round(seconds, 2),
                     "sweeps": len(report["sweep_objectives"]),
                     "d*": result["required_min_distance"],
                     "min_hamming": [init["min_hamming"], result["min_hamming"]],
                     "mean_hamming": [round(init["mean_hamming"], 2), round(result["mean_hamming"], 2)],
                     "semantic_corr": [round(init["semantic_correlation"], 3),
                                       round(result["semantic_correlation"], 3)]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def synthetic_blocks(shape, classes=239, chunk=512, seed=0):
    """ReLU-like clustered features: a class prototype per video plus per-frame noise."""
    rng = np.random.default_rng(seed)
    prototypes = np.maximum(rng.standard_normal((classes, shape[2])), 0).astype(np.float32)
    for start in range(0, shape[0], chunk):
        n = min(chunk, shape[0] - start)
        labels = rng.integers(classes, size=n)
        noise = rng.standard_normal((n, shape[1], shape[2]), dtype=np.float32)
        yield np.maximum(prototypes[labels][:, None, :] + noise, 0)


def bench_fcv(root, videos):
    shape = (videos,) + FCV_SHAPE[1:]
    feats = os.path.join(root, "fcv", "fcv_train_feats.h5")
    if not os.path.isfile(feats):
        start = time.perf_counter()
        write_features_streamed(feats, shape, synthetic_blocks(shape))
        print(f"wrote {feats} ({os.path.getsize(feats) / 2 ** 30:.1f} GiB) in "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    command = [sys.executable, os.path.join(REPO, "preprocess.py"), "--config",
               os.path.join(REPO, "configs", "S5VH", "fcv.py"), "--cfg-options",
               f"data_root={root!r}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    report = {"videos": videos, "file_gib": round(os.path.getsize(feats) / 2 ** 30, 2),
              "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2)}
    print(json.dumps(report))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["centers", "fcv"])
    parser.add_argument("--root", default="/tmp/s5vh_synthetic_fcv")
    parser.add_argument("--videos", type=int, default=FCV_SHAPE[0])
    args = parser.parse_args(argv)
    if args.part == "centers":
        return bench_centers([(101, 64), (450, 16), (450, 32), (450, 64)])
    return bench_fcv(args.root, args.videos)


if __name__ == "__main__":
    main()
