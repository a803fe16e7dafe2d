"""Train S5VH: preprocessing when its artifacts are missing or stale, training, evaluation, model
selection.

    python train.py --config configs/S5VH/demo.py --bits 16 32 64 --compare lsh itq
    python train.py --resume work_dirs/ucf_64bits
"""
import argparse

from dataset.demo import ensure_demo_data
from dataset.protocol import check_inputs
from inference.evaluate import evaluate_baselines, format_table
from optim.run_dir import check_fresh, read_run_config
from optim.runner import resume_run, start_run
from utils.cli import run_cli
from utils.config import build_config
from utils.errors import UserError
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
    parser.add_argument("--replace", action="store_true",
                        help="empty a non-empty run directory and start the run there again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. train.num_epochs=10 nbits=32 (on "
                             "--resume only the keys that do not change the result)")
    return parser.parse_args(argv)


def runs_to_do(args):
    """[(cfg, saved record or None, run_dir)] for the runs the arguments ask for."""
    if bool(args.config) == bool(args.resume):
        raise UserError("give either --config or --resume")
    if args.resume:
        if args.bits or args.work_dir or args.replace:
            raise UserError("--resume continues a run as it was started: --bits, --work-dir "
                            "and --replace cannot be used with it")
        cfg, record = read_run_config(args.resume, args.cfg_options)
        return [(cfg, record, args.resume)]
    options = list(args.cfg_options)
    if args.work_dir:
        options.append(f"work_dir={args.work_dir!r}")
    bits = args.bits or [build_config(args.config, options).nbits]
    configs = [build_config(args.config, options + [f"nbits={nbits}"]) for nbits in bits]
    return [(cfg, None, cfg.paths.run_dir) for cfg in configs]


def main(argv=None):
    args = parse_args(argv)
    runs = runs_to_do(args)
    bits = [cfg.nbits for cfg, _, _ in runs]
    for cfg, record, run_dir in runs:          # every check before any work
        ensure_demo_data(cfg)
        check_inputs(cfg, baseline_bits=bits if "itq" in args.compare else ())
        if record is None:
            check_fresh(run_dir, args.replace)
    rows = []
    for cfg, record, run_dir in runs:
        logger.info(f"== S5VH {cfg.dataset}, {cfg.nbits} bits -> {run_dir}")
        if record is None:
            results = start_run(cfg, run_dir, args.replace, progress=not args.no_progress)
        else:
            results = resume_run(cfg, record, run_dir, progress=not args.no_progress)
        rows.append({"method": f"s5vh ({results['selection']})", "nbits": cfg.nbits,
                     "mAP": {int(k): v for k, v in results["test_mAP"].items()}})
    if args.compare:
        rows += evaluate_baselines(cfg, args.compare, bits)
    rows.sort(key=lambda r: (r["nbits"], r["method"]))
    print(f"\nTest mAP@K on {cfg.dataset} ({cfg.data.protocol} protocol):")
    print(format_table(rows, cfg.eval.topk))
    return rows


if __name__ == "__main__":
    run_cli(main)
