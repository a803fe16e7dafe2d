"""Evaluate hash codes by Hamming ranking: mAP@K for S5VH checkpoints or classical baselines.

    python eval.py --config configs/S5VH/demo.py --method itq lsh
"""
import argparse
import os

from dataset.demo import ensure_demo_data
from inference.evaluate import evaluate_baselines, format_table, write_json
from utils.config import build_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, e.g. configs/S5VH/ucf.py")
    parser.add_argument("--method", nargs="+", default=["s5vh"],
                        choices=["s5vh", "lsh", "itq"], help="what to score")
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help="code lengths for the baselines (default: 16 32 64)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. nbits=32 train.lr=1e-3")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args.config, args.cfg_options)
    ensure_demo_data(cfg)
    baselines = [m for m in args.method if m != "s5vh"]
    rows = evaluate_baselines(cfg, baselines, args.bits or [16, 32, 64]) if baselines else []
    print(format_table(rows, cfg.eval.topk))
    if args.out:
        write_json(args.out, {"config": os.path.abspath(args.config), "results": rows})
    return rows


if __name__ == "__main__":
    main()
