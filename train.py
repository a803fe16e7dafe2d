"""Train S5VH models and print their test mAP@R table.

For each code length in --bits and each seed in --seeds, one run: preprocessing (mean pooling,
PCA, k-means pseudo-labels and hash centers; reused when its provenance record matches), then
self-supervised training, model selection (train.select) and the test mAP@R of the selected
model. The runs train together in one process, taking turns on the device and sharing one copy
of the features in memory (--concurrent K: K at a time). Each run writes its own directory,
<work_dir>/<dataset>_<B>bits[_seed<S>]: config.json, log.jsonl, run.log, last.pth, best.pth and
results.json (README, "Training, evaluation, preprocessing").

examples:
  python train.py --config configs/S5VH/demo.py --bits 16 32 64 --compare lsh itq
  python train.py --config configs/S5VH/ucf.py --bits 64 --seeds 1 2 3
  python train.py --resume work_dirs/ucf_64bits          # continue stopped runs exactly

Ctrl-C (or SIGTERM) finishes the epoch in progress, saves every run and prints the --resume
command; a second Ctrl-C stops at once (each run then continues from its last save).

One run over several processes (data parallel; NCCL between GPUs, gloo on CPUs), the global
batch split between them and the result that of one process within float rounding:
  torchrun --nproc-per-node 2 train.py --config configs/S5VH/fcv.py
"""
import time

STARTED = time.perf_counter()       # before the imports below: start-up counts them

if __name__ == "__main__":      # a signal during the imports below is one line too
    from utils.cli import started
    started()

from dataset.demo import ensure_demo_data
from dataset.protocol import check_inputs
from inference.evaluate import evaluate_baselines, format_table
from optim.distributed import check_batch, from_environment
from optim.distributed import close as close_process_group
from optim.run_dir import check_fresh, check_run_inputs, read_run_config
from optim.runner import Job, train_runs
from utils.cli import command_parser, run_cli
from utils.config import MAX_BITS, build_config, check_distinct
from utils.device import resolve_device
from utils.errors import UserError
from utils.log import get_logger

logger = get_logger("train")


def parse_args(argv=None):
    parser = command_parser("python train.py", __doc__)
    parser.add_argument("--config", help="config file of the data set, e.g. configs/S5VH/ucf.py")
    parser.add_argument("--resume", nargs="+", metavar="RUN_DIR",
                        help="continue these runs from their last checkpoints (a finished run "
                             "prints its results); they train together")
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help=f"code lengths, one run each (1..{MAX_BITS}; default: the config's "
                             f"nbits)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds, one run per code length and seed (default: the config's "
                             "seed); with several, run directories end in _seed<S>")
    parser.add_argument("--concurrent", type=int, default=None, metavar="K",
                        help="train at most K runs at a time (default: all together)")
    parser.add_argument("--compare", nargs="+", default=[], choices=["lsh", "itq"],
                        help="also score these baselines on the same protocol, in the same table")
    parser.add_argument("--work-dir", default=None,
                        help="parent of the run directories (default: the config's work_dir)")
    parser.add_argument("--replace", action="store_true",
                        help="empty the run directories first when they hold runs (only runs of "
                             "this project; anything else stops)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. train.num_epochs=10 data_root=/data "
                             "(on --resume only the keys that cannot change the result)")
    return parser.parse_args(argv)


def jobs_to_do(args):
    """The runs the arguments ask for, as optim.runner Jobs."""
    if bool(args.config) == bool(args.resume):
        raise UserError("give either --config or --resume")
    if args.concurrent is not None and args.concurrent < 1:
        raise UserError(f"--concurrent must be at least 1, got {args.concurrent}")
    if args.resume:
        if args.bits or args.seeds or args.work_dir or args.replace:
            raise UserError("--resume continues runs as they were started: --bits, --seeds, "
                            "--work-dir and --replace cannot be used with it")
        check_distinct(args.resume, "--resume")
        jobs = []
        for run_dir in args.resume:
            cfg, record = read_run_config(run_dir, args.cfg_options)
            jobs.append(Job(cfg, run_dir, record))
        return jobs
    options = list(args.cfg_options)
    if args.work_dir:
        options.append(f"work_dir={args.work_dir!r}")
    base = build_config(args.config, options)
    bits = args.bits or [base.nbits]
    seeds = args.seeds or [base.seed]
    check_distinct(bits, "--bits")
    check_distinct(seeds, "--seeds")
    jobs = []
    for nbits in bits:
        for seed in seeds:
            cfg = build_config(args.config, options + [f"nbits={nbits}", f"seed={seed}"])
            run_dir = cfg.paths.run_dir + (f"_seed{seed}" if len(seeds) > 1 else "")
            jobs.append(Job(cfg, run_dir, replace=args.replace))
    return jobs


def main(argv=None):
    args = parse_args(argv)
    jobs = jobs_to_do(args)
    t = jobs[0].cfg.train
    shard = from_environment(resolve_device(t.device), t.process_timeout)
    try:
        return _train(args, jobs, shard)
    finally:
        close_process_group()


def _train(args, jobs, shard):
    bits = sorted({job.cfg.nbits for job in jobs})
    checks_began = time.perf_counter()
    for job in jobs:                            # every check before any work
        if shard is not None:
            check_batch(shard, job.cfg.train.batch_size)
            if job.cfg.train.trainable_centers:
                raise UserError("train.trainable_centers cannot be trained by several "
                                "processes (its classifier lives outside the model DDP wraps)")
        ensure_demo_data(job.cfg)               # written atomically: processes may race
        check_inputs(job.cfg, baseline_bits=bits if "itq" in args.compare else ())
        if job.record is None:
            if shard is None or shard.writes:
                check_fresh(job.run_dir, job.replace)
        else:
            check_run_inputs(job.cfg, job.record)
    if shard is None or shard.writes:
        logger.info(f"start-up: imports {checks_began - STARTED:.2f}s, input checks "
                    f"{time.perf_counter() - checks_began:.2f}s")
    results = train_runs(jobs, progress=not args.no_progress, concurrent=args.concurrent,
                         shard=shard)
    if shard is not None and not shard.writes:
        return None
    several_seeds = len({job.cfg.seed for job in jobs}) > 1
    rows = []
    for job, result in zip(jobs, results):
        method = f"s5vh ({result['selection']})" + (f" s{job.cfg.seed}" if several_seeds else "")
        rows.append({"method": method, "nbits": job.cfg.nbits,
                     "mAP": {int(k): v for k, v in result["test_mAP"].items()}})
    cfg = jobs[0].cfg
    if args.compare:
        rows += evaluate_baselines(cfg, args.compare, bits)
    rows.sort(key=lambda r: (r["nbits"], r["method"]))
    print(f"\nTest mAP@R on {cfg.dataset} ({cfg.data.protocol} protocol):")
    print(format_table(rows, cfg.eval.topk))
    return rows


if __name__ == "__main__":
    run_cli(main)
