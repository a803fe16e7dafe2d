"""Train S5VH: preprocessing when its artifacts are missing, training, evaluation, model selection.

    python train.py --config configs/S5VH/demo.py --bits 16 32 64 --compare lsh itq
    python train.py --resume work_dirs/ucf_64bits
"""
import argparse
import os

from inference.evaluate import evaluate_baselines, format_table
from optim.runner import run_training
from utils.cli import run_cli
from utils.config import build_config
from utils.log import get_logger

logger = get_logger("train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file, e.g. configs/S5VH/ucf.py")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help="train one model per code length (default: the config's nbits)")
    parser.add_argument("--compare", nargs="+", default=[], choices=["lsh", "itq"],
                        help="score these baselines on the same protocol and print one table")
    parser.add_argument("--work-dir", default=None,
                        help="parent of the run directories (default: the config's work_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. train.num_epochs=10 nbits=32")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        parser.error("give either --config or --resume")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        cfg = build_config(os.path.join(args.resume, "config.py"))
        return run_training(cfg, args.resume, resume_run=True, progress=not args.no_progress)
    options = list(args.cfg_options)
    if args.work_dir:
        options.append(f"work_dir={args.work_dir!r}")
    rows = []
    bits = args.bits or [build_config(args.config, options).nbits]
    for nbits in bits:
        cfg = build_config(args.config, options + [f"nbits={nbits}"])
        logger.info(f"== S5VH {cfg.dataset}, {nbits} bits -> {cfg.paths.run_dir}")
        results = run_training(cfg, progress=not args.no_progress)
        rows.append({"method": f"s5vh ({results['selection']})", "nbits": nbits,
                     "mAP": results["test_mAP"]})
    if args.compare:
        rows += evaluate_baselines(cfg, args.compare, bits)
    rows.sort(key=lambda r: (r["nbits"], r["method"]))
    print(f"\nTest mAP@K on {cfg.dataset} ({cfg.data.protocol} protocol):")
    print(format_table(rows, cfg.eval.topk))
    return rows


if __name__ == "__main__":
    run_cli(main)
