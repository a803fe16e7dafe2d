"""Preprocess a dataset: mean pooling, PCA, k-means pseudo-labels and semantic centers, and
hash centers optimised from them.

    python preprocess.py --config configs/S5VH/ucf.py [--centers-only] [--cfg-options nbits=16]
"""
import argparse

from dataset.demo import ensure_demo_data
from dataset.preprocessing import run_preprocess
from utils.cli import run_cli
from utils.config import build_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--centers-only", action="store_true",
                        help="only the hash centers for this nbits, from an existing semantic.h5")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args.config, args.cfg_options)
    ensure_demo_data(cfg)
    return run_preprocess(cfg, centers_only=args.centers_only)


if __name__ == "__main__":
    run_cli(main)
