"""Preprocess a dataset: mean pooling, PCA, k-means pseudo-labels and semantic centers, and
hash centers optimised from them. Artifact sets whose provenance record matches are kept.

    python preprocess.py --config configs/S5VH/ucf.py [--force] [--cfg-options nbits=16]
"""
import argparse

from dataset.demo import ensure_demo_data
from dataset.preprocessing import ensure_preprocessed
from dataset.protocol import check_inputs
from utils.cli import run_cli
from utils.config import build_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true",
                        help="recompute every artifact even when its record matches")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args.config, args.cfg_options)
    ensure_demo_data(cfg)
    check_inputs(cfg)
    return ensure_preprocessed(cfg, force=args.force)


if __name__ == "__main__":
    run_cli(main)
