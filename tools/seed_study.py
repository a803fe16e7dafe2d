"""Train one config under several settings on the same seeds; compare test mAP with seed spread.

    python -m tools.seed_study --config configs/S5VH/ucf_dev.py --seeds 1 2 3 \\
        --variant float32 train.amp=False --variant bf16 train.amp=True \\
        --cfg-options nbits=64 --work-dir work_dirs/seed_study --out seed_study.json

Every variant is trained once per seed (same data, same pseudo-labels, same batch order and
masks for a given seed); a finished run of the same config in the work directory is reused. Printed per variant: mAP@K per seed, mean and standard deviation over
seeds; per variant after the first: the paired difference to the first variant, seed by seed.
A difference within the seeds' spread is run-to-run noise.
"""
import argparse
import os
import statistics

from optim.runner import plan_run, train_runs
from utils.config import build_config
from utils.fileio import write_json

REPORTED_K = (5, 20, 100)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar="NAME KEY=VALUE", help="a name and the --cfg-options it sets")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", default="work_dirs/seed_study")
    parser.add_argument("--out", default=None, help="JSON report")
    return parser.parse_args(argv)


def run_study(config, seeds, variants, options, work_dir, log=print):
    """{variant: {seed: {K: test mAP@K}}} for variants [(name, [KEY=VALUE, ...]), ...]."""
    keys = [(name, seed) for name, _ in variants for seed in seeds]
    jobs = [plan_run(build_config(config, [*options, *overrides, f"seed={seed}"]),
                     os.path.join(work_dir, f"{name}_seed{seed}"))
            for name, overrides in variants for seed in seeds]
    results = {name: {} for name, _ in variants}
    for (name, seed), outcome in zip(keys, train_runs(jobs, progress=False)):
        results[name][seed] = {k: float(outcome["test_mAP"][k]) for k in REPORTED_K}
        log(f"{name}, seed {seed}: test mAP@5/20/100 "
            + " / ".join(f"{v:.4f}" for v in results[name][seed].values()))
    return results


def summarize(results):
    """Mean and standard deviation per variant and K; paired differences to the first variant."""
    names = list(results)
    summary = {}
    for name in names:
        per_k = {}
        for k in REPORTED_K:
            values = [results[name][seed][k] for seed in results[name]]
            per_k[k] = {"mean": statistics.mean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            if name != names[0]:
                diffs = [results[name][s][k] - results[names[0]][s][k] for s in results[name]]
                per_k[k]["paired_diff_mean"] = statistics.mean(diffs)
        summary[name] = per_k
    return summary


def main(argv=None):
    args = parse_args(argv)
    variants = [(v[0], v[1:]) for v in args.variant]
    results = run_study(args.config, args.seeds, variants, args.cfg_options, args.work_dir)
    summary = summarize(results)
    print(f"\n{'variant':<12}" + "".join(f"{'mAP@' + str(k) + ' mean±std':>22}" for k in REPORTED_K)
          + "   paired diff vs " + variants[0][0])
    for name, per_k in summary.items():
        line = f"{name:<12}" + "".join(f"{per_k[k]['mean']:>14.4f} ± {per_k[k]['std']:.4f}"
                                       for k in REPORTED_K)
        if "paired_diff_mean" in per_k[REPORTED_K[0]]:
            line += "   " + " / ".join(f"{per_k[k]['paired_diff_mean']:+.4f}" for k in REPORTED_K)
        print(line)
    if args.out:
        write_json(args.out, {"config": args.config, "seeds": args.seeds,
                              "variants": dict(variants), "options": args.cfg_options,
                              "results": results, "summary": summary})
    return results, summary


if __name__ == "__main__":
    main()
