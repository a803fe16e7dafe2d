"""Preprocess the same features with the same config and seed twice, into two fresh artifact
folders, and compare every artifact bit for bit.

    python -m tools.determinism --config configs/S5VH/ucf_dev.py --bits 16 64 --out det.json
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import argparse
import os
import tempfile

from threadpoolctl import threadpool_info

from dataset.demo import ensure_demo_data
from dataset.io import read_matrix
from dataset.preprocessing import ensure_preprocessed
from dataset.protocol import check_inputs
from utils.cli import run_cli
from utils.config import build_config
from utils.fileio import write_json

ARRAYS = (("latent_feats", "feats"), ("anchors", "feats"), ("nearest", "pos"),
          ("semantic", "matrix"), ("hash_center", "matrix"))


def preprocess_twice(config, bits, options):
    """{nbits: {artifact: True when both copies are identical}}."""
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for nbits in bits:
            copies = []
            for attempt in ("first", "second"):
                cfg = build_config(config, [*options, f"nbits={nbits}",
                                            f"preprocess.artifact_dir="
                                            f"{os.path.join(scratch, attempt)!r}"])
                ensure_demo_data(cfg)
                check_inputs(cfg)
                ensure_preprocessed(cfg, force=True)
                copies.append({name: read_matrix(cfg.paths[name], key) for name, key in ARRAYS})
            report[nbits] = {name: copies[0][name].tobytes() == copies[1][name].tobytes()
                             for name, _ in ARRAYS}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    report = preprocess_twice(args.config, args.bits, args.cfg_options)
    threads = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    for nbits, same in report.items():
        print(f"{nbits} bits: " + ", ".join(f"{name} {'identical' if ok else 'DIFFERENT'}"
                                            for name, ok in same.items()))
    print(f"thread pools: {threads}, CPU cores: {os.cpu_count()}")
    if args.out:
        write_json(args.out, {"config": args.config, "cpu_cores": os.cpu_count(),
                              "thread_pools": threads, "identical": report})
    return report


if __name__ == "__main__":
    run_cli(main)
