"""A small synthetic data set in the UCF layout, deterministic from a seed.

Classes come in pairs that share their appearance and differ only in temporal order: a video of
class (g, forward) walks through the group's states s_g1 -> s_g2 -> s_g3, one of class
(g, backward) through s_g3 -> s_g2 -> s_g1. Both spend about a third of the video in each state,
so their mean-pooled features match in expectation: mean pooling separates the groups, and only a
model of the frame order separates the two classes of a group. Per-video nuisance (a background
of its own, segment lengths, gain, noise) keeps the task from being trivial. Features
are ReLU-like: non-negative and sparse.
"""
import argparse
import os

import numpy as np

from dataset.io import write_features_streamed, write_labels
from utils.log import get_logger

logger = get_logger(__name__)

STATES_PER_GROUP = 3


def _sparse_prototypes(rng, count, dim, active):
    protos = np.zeros((count, dim), dtype=np.float32)
    for row in protos:
        idx = rng.choice(dim, size=active, replace=False)
        row[idx] = rng.uniform(0.5, 1.5, size=active)
    return protos


def _videos(rng, labels, states, frames, noise):
    """(n, frames, dim) features for class ids `labels`."""
    n, dim = len(labels), states.shape[-1]
    group, backward = labels // 2, labels % 2 == 1
    # segment boundaries: each of the 3 states gets a random share of the frames (20%-47%)
    shares = rng.dirichlet(np.full(STATES_PER_GROUP, 8.0), size=n)
    bounds = np.cumsum(shares, axis=1) * frames                            # (n, 3)
    t = np.arange(frames) + 0.5
    state_of_frame = (t[None, :, None] > bounds[:, None, :-1]).sum(-1)     # (n, frames)
    state_of_frame = np.where(backward[:, None], STATES_PER_GROUP - 1 - state_of_frame,
                              state_of_frame)
    content = states[group[:, None], state_of_frame]                       # (n, frames, dim)
    background = _sparse_prototypes(rng, n, dim, active=dim // 10)        # (n, dim)
    gain = rng.uniform(0.7, 1.3, size=(n, 1, 1))
    x = gain * content + 0.2 * background[:, None, :]
    x = x + noise * rng.standard_normal((n, frames, dim))
    x = np.maximum(x - 0.3, 0.0)                                           # ReLU with a threshold
    return x.astype(np.float32)


# Videos generated and written at a time, so a set of any size is made in bounded memory.
CHUNK_VIDEOS = 256


def make_demo(out_dir, seed=0, num_classes=20, db_per_class=75, query_per_class=25,
              frames=25, dim=512, noise=0.35, prefix="demo_", dtype=np.float32):
    """Write `{prefix}train_feats.h5`/`labels.mat` (database) and `{prefix}test_*` (queries),
    features in `dtype`, streamed CHUNK_VIDEOS videos at a time."""
    if num_classes % 2:
        raise ValueError("num_classes must be even (classes come in forward/backward pairs)")
    rng = np.random.default_rng(seed)
    groups = num_classes // 2
    states = _sparse_prototypes(rng, groups * STATES_PER_GROUP, dim, active=dim // 12)
    states = states.reshape(groups, STATES_PER_GROUP, dim)
    for split, per_class in (("train", db_per_class), ("test", query_per_class)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        blocks = (_videos(rng, labels[i:i + CHUNK_VIDEOS], states, frames, noise).astype(dtype)
                  for i in range(0, len(labels), CHUNK_VIDEOS))
        write_features_streamed(os.path.join(out_dir, f"{prefix}{split}_feats.h5"),
                                (len(labels), frames, dim), blocks, dtype=dtype)
        onehot = np.eye(num_classes, dtype=np.uint8)[labels]
        write_labels(os.path.join(out_dir, f"{prefix}{split}_labels.mat"), onehot)


def ensure_demo_data(cfg):
    """Create the demo files on first use (configs whose dataset is 'demo')."""
    paths = cfg.paths
    needed = [paths.train_feats, paths.train_labels, paths.query_feats, paths.query_labels]
    if cfg.dataset != "demo" or all(os.path.isfile(p) for p in needed):
        return False
    logger.info(f"Writing the demo data set to {paths.feature_dir} (first use) ...")
    make_demo(paths.feature_dir, seed=0, frames=cfg.max_frames, dim=cfg.feature_size)
    return True


def main(argv=None):
    """Write a synthetic data set of any size, e.g. one the size and layout of UCF101 for an
    end-to-end speed run:
        python -m dataset.demo --out data/ucf --prefix ucf_ --classes 100 --db-per-class 95 \\
            --query-per-class 38 --dim 4096
    """
    parser = argparse.ArgumentParser(description="Write the synthetic demo data set.")
    parser.add_argument("--out", required=True, help="folder for the four files")
    parser.add_argument("--prefix", default="demo_", help="file-name prefix, e.g. ucf_")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--db-per-class", type=int, default=75)
    parser.add_argument("--query-per-class", type=int, default=25)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="feature dtype on disk (float16 halves the files)")
    args = parser.parse_args(argv)
    make_demo(args.out, seed=args.seed, num_classes=args.classes, db_per_class=args.db_per_class,
              query_per_class=args.query_per_class, frames=args.frames, dim=args.dim,
              prefix=args.prefix, dtype=np.dtype(args.dtype))


if __name__ == "__main__":
    main()
