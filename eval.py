"""Evaluate hash codes by Hamming ranking: mAP@K for an S5VH run or for classical baselines.

    python eval.py --run work_dirs/demo_64bits                     # the run's selected model
    python eval.py --config configs/S5VH/demo.py --method lsh itq  # baselines
"""
import argparse
import os

from dataset.demo import ensure_demo_data
from inference.evaluate import evaluate_baselines, evaluate_checkpoint, format_table, save_codes
from utils.cli import run_cli
from utils.config import build_config
from utils.device import resolve_device
from utils.fileio import write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default for --run: RUN/config.py)")
    parser.add_argument("--run", help="a run directory written by train.py")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to score (default: RUN/best.pth)")
    parser.add_argument("--method", nargs="+", default=["s5vh"], choices=["s5vh", "lsh", "itq"],
                        help="what to score")
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help="code lengths for the baselines (default: 16 32 64)")
    parser.add_argument("--out", default=None, help="results JSON (default: RUN/eval.json)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. nbits=32 data_root=/data")
    args = parser.parse_args(argv)
    if "s5vh" in args.method and not (args.run or args.checkpoint):
        parser.error("scoring s5vh needs --run (or --checkpoint with --config)")
    if not (args.config or args.run):
        parser.error("give --config or --run")
    return args


def main(argv=None):
    args = parse_args(argv)
    config = args.config or os.path.join(args.run, "config.py")
    cfg = build_config(config, args.cfg_options)
    ensure_demo_data(cfg)
    rows = []
    if "s5vh" in args.method:
        checkpoint = args.checkpoint or os.path.join(args.run, "best.pth")
        result, db_codes, query_codes = evaluate_checkpoint(cfg, checkpoint,
                                                            resolve_device(cfg.train.device))
        rows.append({"method": "s5vh", "nbits": cfg.nbits, **result})
        out_dir = args.run or os.path.dirname(checkpoint)
        save_codes(os.path.join(out_dir, "codes.npz"), db_codes, query_codes)
    baselines = [m for m in args.method if m != "s5vh"]
    if baselines:
        rows += evaluate_baselines(cfg, baselines, args.bits or [16, 32, 64])
    print(format_table(rows, cfg.eval.topk))
    out = args.out or (os.path.join(args.run, "eval.json") if args.run else None)
    if out:
        write_json(out, {"config": os.path.abspath(config), "results": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
