"""Score hash codes by Hamming ranking: mAP@R of an S5VH run or of classical baselines.

With --run, the run's selected model (best.pth) encodes the database and the queries of the
run's own protocol; the run must still see the input files it was trained on (their sha256 is in
its config.json). The table is printed and, when the run is scored as it was trained, eval.json
and codes.npz (int8 ±1 codes of database and queries) are written into the run directory; with
--out, into that folder instead. With --method lsh/itq, the baselines are fitted on the
mean-pooled training features and scored on the same protocol.

examples:
  python eval.py --run work_dirs/demo_64bits                      # the run's selected model
  python eval.py --config configs/S5VH/demo.py --method lsh itq   # baselines only
  python eval.py --config B.py --checkpoint A/best.pth --out transfer/   # A's model on B's data
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import os

from dataset.demo import ensure_demo_data
from dataset.protocol import check_inputs
from inference.evaluate import evaluate_baselines, evaluate_checkpoint, format_table, save_codes
from optim.run_dir import CONFIG_FILE, check_outside_runs, check_run_inputs, read_run_config
from utils.cli import command_parser, run_cli
from utils.config import build_config, check_code_lengths
from utils.device import resolve_device
from utils.errors import UserError
from utils.fileio import (dir_lock, ensure_space, json_text, remove_stale_temporaries, writable_dir,
                          write_json)

OUTPUTS = ("eval.json", "codes.npz")


def parse_args(argv=None):
    parser = command_parser("python eval.py", __doc__)
    parser.add_argument("--config", help="config file of the data to score on (baselines, or a "
                                         "--checkpoint on another data set)")
    parser.add_argument("--run", help="a run directory written by train.py (its saved config and "
                                      "selected model)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to score instead of RUN/best.pth")
    parser.add_argument("--method", nargs="+", default=["s5vh"], choices=["s5vh", "lsh", "itq"],
                        help="what to score (default: s5vh)")
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help="code lengths of the baselines (default: 16 32 64)")
    parser.add_argument("--out", default=None,
                        help="folder for eval.json and codes.npz (default: RUN, when the run is "
                             "scored as it was trained; otherwise nothing is written)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. nbits=32 data_root=/data (with --run, "
                             "the result is no longer the run's own: give --out)")
    return parser.parse_args(argv)


def resolve(args):
    """(cfg, checkpoint or None, the run id it must carry or None, output folder or None),
    checked before any work."""
    if "s5vh" in args.method and not (args.run or args.checkpoint):
        raise UserError("scoring s5vh needs --run (or --checkpoint with --config)")
    if bool(args.config) == bool(args.run):
        raise UserError("give --config or --run (not both)")
    if args.bits is not None:
        check_code_lengths(args.bits)
    if args.out and os.path.isfile(os.path.join(args.out, CONFIG_FILE)) and not (
            args.run and os.path.realpath(args.out) == os.path.realpath(args.run)
            and args.checkpoint is None and not args.cfg_options):
        # another run's directory, or this run's own scored differently: its files are the run's
        raise UserError(f"--out {args.out} is a run directory, and what is scored here is not "
                        f"that run as it was trained; give another folder")
    if args.out and not os.path.isfile(os.path.join(args.out, CONFIG_FILE)):
        check_outside_runs(args.out, "--out folder", folder=True)
    if args.run:
        # the run's config is data: reading it executes nothing from the run directory
        cfg, record = read_run_config(args.run, args.cfg_options, allowed=None)
        checkpoint = args.checkpoint or os.path.join(args.run, "best.pth")
        # the run's own model on its own inputs: results may go beside it
        own = args.checkpoint is None and not args.cfg_options
        if own:
            check_run_inputs(cfg, record)
        return (cfg, checkpoint, record["run_id"] if args.checkpoint is None else None,
                args.out or (args.run if own else None))
    cfg = build_config(args.config, args.cfg_options)
    return cfg, args.checkpoint if "s5vh" in args.method else None, None, args.out


def main(argv=None):
    args = parse_args(argv)
    cfg, checkpoint, run_id, out_dir = resolve(args)
    ensure_demo_data(cfg)
    baselines = [m for m in args.method if m != "s5vh"]
    bits = args.bits or [16, 32, 64]
    check_inputs(cfg, baseline_bits=bits if "itq" in baselines else ())
    if not out_dir:
        return score(cfg, checkpoint, run_id, baselines, bits)[0]
    writable_dir(out_dir, "output folder", create=False)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        with dir_lock(out_dir, "output folder"):   # a run that is training holds its directory
            rows, codes = score(cfg, checkpoint, run_id, baselines, bits)
            remove_stale_temporaries(out_dir, names=OUTPUTS)
            record = {"config": args.run or os.path.abspath(args.config),
                      "checkpoint": checkpoint, "cfg_options": args.cfg_options, "results": rows}
            # room for both files first: a full disk must not leave new codes beside old scores
            ensure_space(os.path.join(out_dir, "eval.json"), len(json_text(record)) + sum(
                c.nbytes for c in codes or ()))
            if codes is not None:
                save_codes(os.path.join(out_dir, "codes.npz"), *codes)
            write_json(os.path.join(out_dir, "eval.json"), record)
    except BaseException:
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return rows


def score(cfg, checkpoint, run_id, baselines, bits):
    """Print the table of the checkpoint and the baselines; (rows, codes or None)."""
    rows, codes = [], None
    if checkpoint is not None:
        result, db_codes, query_codes = evaluate_checkpoint(
            cfg, checkpoint, resolve_device(cfg.train.device), run_id)
        rows.append({"method": "s5vh", "nbits": cfg.nbits, **result})
        codes = (db_codes, query_codes)
    if baselines:
        rows += evaluate_baselines(cfg, baselines, bits)
    print(format_table(rows, cfg.eval.topk))
    return rows, codes


if __name__ == "__main__":
    run_cli(main)
