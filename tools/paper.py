"""The paper's tables and figures, one command each, on any data set with a config.

    python -m tools.paper main --config configs/S5VH/ucf.py --bits 16 32 64 --seeds 1 2 3
    python -m tools.paper ablation --config configs/S5VH/ucf.py
    python -m tools.paper backbones --config configs/S5VH/ucf.py
    python -m tools.paper transfer --source configs/S5VH/ucf.py --target configs/S5VH/hmdb.py
    python -m tools.paper convergence --config configs/S5VH/ucf.py --eval-every 10
    python -m tools.paper curves --config configs/S5VH/ucf.py
    python -m tools.paper tsne --config configs/S5VH/ucf.py
    python -m tools.paper together main ablation convergence --config configs/S5VH/ucf.py

Each writes EXPERIMENT.json, EXPERIMENT.md and, for a figure, EXPERIMENT.png into --out (default
work_dirs/paper/<dataset>), and keeps its training runs under --out/runs/. A finished run whose
config is unchanged is reused, never retrained, so a second call (or `curves` and `tsne` after
`main`) costs only the evaluation. Every table and figure names the data set, the code length and
the selection rule. Runs of variants that change preprocessing write their hash centers under
their own file names, so each regenerates only what it changes.
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import argparse
import collections
import io
import itertools
import os
import statistics
import time

import numpy as np

from dataset.demo import ensure_demo_data
from dataset.protocol import check_inputs
from inference.baselines import baseline_codes
from inference.evaluate import evaluate_baselines, evaluate_checkpoint, mean_pooled_sets
from inference.metrics import precision_recall_by_radius, retrieval_metrics
from optim.run_dir import CONFIG_FILE, check_outside_runs, read_log, read_run_config
from optim.runner import plan_run, train_runs
from utils.cli import CommandParser, run_cli
from utils.config import (build_config, check_code_lengths, check_distinct, config_fingerprint,
                          same_experiment)
from utils.device import resolve_device
from utils.errors import UserError
from utils.fileio import (atomic_path, atomic_write_text, ensure_space, file_identity, json_text,
                          write_bytes)
from utils.log import get_logger

logger = get_logger("tools.paper")

# Published test mAP@R of S5VH (the authors' reported numbers; R = 60 was not reported).
PUBLISHED = {
    "act": {16: (.180, .097, .060, .034, .029), 32: (.250, .146, .087, .049, .040),
            64: (.266, .152, .095, .053, .043)},
    "fcv": {16: (.346, .246, .214, .184, .173), 32: (.482, .329, .285, .246, .231),
            64: (.520, .369, .325, .284, .269)},
    "ucf": {16: (.471, .420, .375, .308, .269), 32: (.534, .457, .406, .330, .291),
            64: (.578, .507, .458, .380, .338)},
    "hmdb": {16: (.190, .128, .095, .065, .057), 32: (.244, .175, .139, .092, .078),
             64: (.256, .189, .150, .103, .088)},
}
PUBLISHED_TOPK = (5, 20, 40, 80, 100)


def _centers_named(tag):
    """Overrides that give a variant's hash centers file names of their own."""
    return [f"preprocess.artifacts.hash_center='hash_center_{{nbits}}_{tag}.h5'",
            f"preprocess.artifacts.center_report='hash_center_{{nbits}}_{tag}_report.json'",
            f"preprocess.artifacts.center_record='hash_center_{{nbits}}_{tag}_record.json'"]


# (name, what it changes, overrides)
ABLATIONS = [
    ("full", "S5VH as configured", []),
    ("no_ca", "without the center-alignment loss L_CA", ["train.a_cluster=0.0"]),
    ("no_smoothing", "without label smoothing (beta = 0)", ["train.smoothing_beta=0.0"]),
    ("no_contrastive", "without the contrastive loss", ["train.alpha=0.0"]),
    ("no_reconstruction", "without the reconstruction loss", ["train.a_rec=0.0"]),
    ("centers_init_only", "hash centers from the initialisation (no semantic refinement)",
     ["preprocess.center_sweeps=0", *_centers_named("init")]),
    ("random_centers", "random balanced ±1 hash centers",
     ["preprocess.center_init='random'", "preprocess.center_sweeps=0",
      *_centers_named("random")]),
    ("release_classifier", "the release's trainable bias-free classifier instead of the centers",
     ["train.trainable_centers=True"]),
    ("shared_mixer", "one mixer for both scan directions (the release)",
     ["model.share_directions=True"]),
    ("unidirectional", "forward scans only", ["model.bidirectional=False"]),
]
BACKBONES = ("mamba", "lstm", "attention", "retention", "rwkv")
TSNE_CLASSES = 10
# the experiments `together` can train at once (transfer reads two data sets); of them, those
# that time each run train their runs first, one at a time, in the same process
TOGETHER = ("main", "ablation", "convergence", "sweep", "curves", "tsne", "backbones")
TIMED_ALONE = ("backbones",)


class Experiment:
    """Configs, runs and outputs of one experiment on one data set."""

    def __init__(self, name, config, options, out, concurrent=None, progress=True):
        self.name, self.config, self.options = name, config, list(options)
        base = self.cfg()
        self.dataset, self.select = base.dataset, base.train.select
        self.out = out or os.path.join("work_dirs", "paper", self.dataset)
        self.device = resolve_device(base.train.device)
        self.concurrent, self.progress = concurrent, progress
        self.shared = None      # resident features kept across its trainings (run_together)
        self.codes = {}         # _codes by checkpoint and config, shared by run_together
        self.figure = None      # {file name: PNG bytes} of add_figure, until write

    def cfg(self, *overrides, config=None):
        return build_config(config or self.config, [*self.options, *overrides])

    def check(self, cfg, baseline_bits=()):
        ensure_demo_data(cfg)
        check_inputs(cfg, baseline_bits)

    def train(self, runs, concurrent=None):
        """Results of the runs {name: cfg}, trained together (`concurrent` at a time, default
        the experiment's); a finished run of the same config on the same inputs is reused."""
        for name in runs:
            logger.info(f"== {self.name}: {name} -> {self.run_dir(name)}")
        jobs = [plan_run(cfg, self.run_dir(name)) for name, cfg in runs.items()]
        results = train_runs(jobs, self.progress, concurrent or self.concurrent,
                             shared=self.shared)
        return dict(zip(runs, results))

    def run_dir(self, name):
        return os.path.join(self.out, "runs", name)

    def title(self, nbits, what=""):
        return f"{what}{self.dataset}, {nbits} bits, selection: {self.select}"

    def write(self, payload, table):
        """The experiment's outputs: NAME.json, NAME.md and the figure of `add_figure`. The room
        for all of them is checked first, so a full disk leaves the earlier set as it was."""
        os.makedirs(self.out, exist_ok=True)
        texts = {f"{self.name}.json": json_text(payload) + "\n", f"{self.name}.md": table + "\n"}
        figure = self.figure or {}
        ensure_space(os.path.join(self.out, f"{self.name}.json"),
                     sum(len(t.encode()) for t in texts.values()) + sum(map(len, figure.values())))
        for name, data in figure.items():
            write_bytes(os.path.join(self.out, name), data)
        for name, text in texts.items():
            atomic_write_text(os.path.join(self.out, name), text)
        self.figure = None
        print(table)

    def add_figure(self, fig):
        """Render the figure, which `write` writes beside the tables; returns its file name
        (relative to the output)."""
        import matplotlib.pyplot as plt
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        plt.close(fig)
        name = f"{self.name}.png"
        self.figure = {name: buffer.getvalue()}
        return name


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(mean, std):
    return f"{mean:.4f} ± {std:.4f}"


def s5vh_run_name(nbits, seed):
    return f"s5vh_{nbits}bits_seed{seed}"


def main_runs(exp, bits, seeds):
    """The main table's runs {name: cfg}, one per code length and seed; inputs checked."""
    for nbits in bits:
        exp.check(exp.cfg(f"nbits={nbits}"), baseline_bits=bits)
    return {s5vh_run_name(nbits, seed): exp.cfg(f"nbits={nbits}", f"seed={seed}")
            for nbits in bits for seed in seeds}


def run_main(exp, bits, seeds):
    """mAP@R of S5VH (mean ± std over seeds) beside ITQ and LSH, and the published numbers."""
    topk = tuple(exp.cfg().eval.topk)
    results = exp.train(main_runs(exp, bits, seeds))
    scores = {}                        # (method, nbits) -> [per-seed {R: mAP}]
    for nbits in bits:
        for seed in seeds:
            scores.setdefault(("s5vh", nbits), []).append(
                results[s5vh_run_name(nbits, seed)]["test_mAP"])
    for seed in seeds:
        for row in evaluate_baselines(exp.cfg(f"seed={seed}"), ["itq", "lsh"], bits):
            scores.setdefault((row["method"], row["nbits"]), []).append(row["mAP"])
    rows, table = [], []
    for nbits in bits:
        for method in ("s5vh", "itq", "lsh"):
            per_seed = scores[(method, nbits)]
            stats = {k: _mean_std([s[k] for s in per_seed]) for k in topk}
            rows.append({"method": method, "nbits": nbits, "per_seed": per_seed,
                         "mean": {k: m for k, (m, _) in stats.items()},
                         "std": {k: s for k, (_, s) in stats.items()}})
            label = f"S5VH ({exp.select})" if method == "s5vh" else method.upper()
            table.append([label, nbits] + [_pm(*stats[k]) for k in topk])
        published = PUBLISHED.get(exp.dataset, {}).get(nbits)
        if published:
            values = dict(zip(PUBLISHED_TOPK, published))
            table.append(["S5VH, published", nbits] + [f"{values[k]:.3f}" if k in values else "–"
                                                       for k in topk])
    header = ["method", "bits"] + [f"mAP@{k}" for k in topk]
    text = (f"Test mAP@R on {exp.dataset}, mean ± std over seeds {list(seeds)}, "
            f"selection: {exp.select}\n\n" + markdown(header, table))
    exp.write({"dataset": exp.dataset, "selection": exp.select, "seeds": list(seeds),
               "bits": list(bits), "rows": rows,
               "published": {str(b): dict(zip(PUBLISHED_TOPK, v))
                             for b, v in PUBLISHED.get(exp.dataset, {}).items()}}, text)
    return rows


def _variant_run_name(exp, name, cfg, configured, nbits, seed, timed=False):
    """The run of variant `name` (config `cfg`): the main table's when `cfg` is S5VH's as
    configured (`configured`), unless the variant's epochs are timed (`timed`) and that run
    trained beside others."""
    main = s5vh_run_name(nbits, seed)
    if config_fingerprint(cfg) == config_fingerprint(configured) and \
            not (timed and _trained_beside_others(exp.run_dir(main), cfg)):
        return main
    return f"{name}_{nbits}bits_seed{seed}"


def _trained_beside_others(run_dir, cfg):
    """Whether the run of `cfg` that `run_dir` holds (if any) stepped beside other runs in
    some epoch, so that its epochs' seconds are not its own."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        return False
    saved, record = read_run_config(run_dir)
    if not same_experiment(saved, cfg):      # it would be replaced by a fresh run
        return False
    return any(r.get("concurrent_runs") != 1
               for r in read_log(os.path.join(run_dir, "log.jsonl"), record["run_id"]))


def _variant_plan(exp, variants, nbits, seeds, timed=False):
    """{(variant, seed): (run name, cfg)}; inputs checked."""
    exp.check(exp.cfg(f"nbits={nbits}"))
    configured = {seed: exp.cfg(f"nbits={nbits}", f"seed={seed}") for seed in seeds}
    plan = {}
    for name, _, overrides in variants:
        for seed in seeds:
            cfg = exp.cfg(f"nbits={nbits}", f"seed={seed}", *overrides)
            plan[name, seed] = (_variant_run_name(exp, name, cfg, configured[seed], nbits,
                                                  seed, timed), cfg)
    return plan


def variant_runs(exp, variants, nbits, seeds):
    """The runs {name: cfg} of every variant on every seed; inputs checked."""
    return dict(_variant_plan(exp, variants, nbits, seeds).values())


def _variant_table(exp, variants, nbits, seeds, extra=None, timed=False):
    """Train every variant on every seed (one at a time when `timed`); rows with per-seed and
    mean mAP@R."""
    topk = tuple(exp.cfg().eval.topk)
    plan = _variant_plan(exp, variants, nbits, seeds, timed)
    trained = exp.train(dict(plan.values()), concurrent=1 if timed else None)
    names = {key: run for key, (run, _) in plan.items()}
    rows = []
    for name, description, overrides in variants:
        results = [trained[names[name, seed]] for seed in seeds]
        per_seed = [r["test_mAP"] for r in results]
        row = {"variant": name, "description": description, "overrides": overrides,
               "per_seed": per_seed,
               "mean": {k: statistics.mean(s[k] for s in per_seed) for k in topk}}
        if extra:
            row.update(extra([exp.run_dir(names[name, seed]) for seed in seeds], results))
        rows.append(row)
    return rows, topk


def run_ablation(exp, nbits, seeds):
    rows, topk = _variant_table(exp, ABLATIONS, nbits, seeds)
    full, first, last = rows[0]["mean"], topk[0], topk[-1]
    table = [[r["variant"], r["description"]] + [f"{r['mean'][k]:.4f}" for k in topk]
             + [f"{r['mean'][k] - full[k]:+.4f}" for k in (first, last)] for r in rows]
    header = (["variant", "what changes"] + [f"mAP@{k}" for k in topk]
              + [f"Δ mAP@{first} vs full", f"Δ mAP@{last} vs full"])
    text = (f"Ablation: {exp.title(nbits, 'test mAP@R, ')}, mean over seeds {list(seeds)}\n\n"
            + markdown(header, table))
    exp.write({"dataset": exp.dataset, "nbits": nbits, "selection": exp.select,
               "seeds": list(seeds), "rows": rows}, text)
    return rows


def _epoch_seconds(run_dir):
    """Mean training seconds per epoch, the first (compilation, graph capture) left out."""
    run_id = read_run_config(run_dir)[1]["run_id"]
    times = [r["train_seconds"] for r in read_log(os.path.join(run_dir, "log.jsonl"), run_id)]
    return statistics.mean(times[1:] if len(times) > 1 else times)


def run_backbones(exp, nbits, seeds):
    variants = [(mixer, f"{mixer} mixers in the same layer", [f"model.mixer='{mixer}'"])
                for mixer in BACKBONES]

    def extra(run_dirs, results):
        return {"seconds_per_epoch": statistics.mean(_epoch_seconds(d) for d in run_dirs),
                "parameters": results[0]["runtime"]["parameters"],
                "implementation": results[0]["runtime"]["mixer"]}

    # one at a time: the seconds per epoch must not include other runs' share of the GPU (the
    # configured backbone's runs are the main table's, trained here first or, if trained
    # beside others already, again under the backbone's name)
    rows, topk = _variant_table(exp, variants, nbits, seeds, extra, timed=True)
    table = [[r["variant"], r["implementation"], f"{r['parameters']:,}",
              f"{r['seconds_per_epoch']:.3f}"] + [f"{r['mean'][k]:.4f}" for k in topk]
             for r in rows]
    header = ["backbone", "implementation", "parameters", "s / epoch"] + [f"mAP@{k}" for k in topk]
    text = (f"Backbones: {exp.title(nbits, 'test mAP@R, ')}, mean over seeds {list(seeds)}, "
            f"device {exp.device}\n\n" + markdown(header, table))
    exp.write({"dataset": exp.dataset, "nbits": nbits, "selection": exp.select,
               "seeds": list(seeds), "device": str(exp.device), "rows": rows}, text)
    return rows


def run_transfer(exp, source, target, nbits, seed):
    """Train on the source data set and evaluate on the target's protocol, beside training on the
    target; codes and results stay under the experiment's output."""
    source_cfg = exp.cfg(f"nbits={nbits}", f"seed={seed}", config=source)
    target_cfg = exp.cfg(f"nbits={nbits}", f"seed={seed}", config=target)
    for key in ("max_frames", "feature_size"):
        if source_cfg[key] != target_cfg[key]:
            raise UserError(f"transfer needs the same frame features: {key} is "
                            f"{source_cfg[key]} on {source_cfg.dataset} and {target_cfg[key]} "
                            f"on {target_cfg.dataset}")
    for cfg in (source_cfg, target_cfg):
        exp.check(cfg)
    a, b = source_cfg.dataset, target_cfg.dataset
    on_target = exp.train({f"train_{a}_{nbits}bits_seed{seed}": source_cfg,
                           f"train_{b}_{nbits}bits_seed{seed}": target_cfg}
                          )[f"train_{b}_{nbits}bits_seed{seed}"]
    # the source's model on the target's data and protocol
    cross_cfg = exp.cfg(f"nbits={nbits}", f"seed={seed}", f"model={dict(source_cfg.model)!r}",
                        config=target)
    checkpoint = os.path.join(exp.run_dir(f"train_{a}_{nbits}bits_seed{seed}"), "best.pth")
    result, db_codes, query_codes = evaluate_checkpoint(cross_cfg, checkpoint, exp.device)
    codes_name = f"codes_{a}_to_{b}_{nbits}bits.npz"
    with atomic_path(os.path.join(exp.out, codes_name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, database=db_codes, queries=query_codes)
    topk = tuple(target_cfg.eval.topk)
    rows = [{"train": a, "evaluate": b, "mAP": result["mAP"]},
            {"train": b, "evaluate": b, "mAP": on_target["test_mAP"]}]
    table = [[f"{r['train']} → {r['evaluate']}"] + [f"{r['mAP'][k]:.4f}" for k in topk]
             for r in rows]
    text = (f"Transfer: {a} → {b}, {nbits} bits, seed {seed}, selection: {exp.select} "
            f"(on the training set's own protocol)\n\n"
            + markdown(["train → evaluate"] + [f"mAP@{k}" for k in topk], table))
    exp.write({"source": a, "target": b, "nbits": nbits, "seed": seed, "rows": rows,
               "codes": codes_name}, text)
    return rows


CONVERGENCE_K = (5, 20, 100)


CONVERGENCE_VARIANTS = (("with_ca", "with L_CA", []),
                        ("without_ca", "without L_CA", ["train.a_cluster=0.0"]))


def convergence_runs(exp, nbits, seeds, eval_every):
    """The runs {name: cfg} with and without L_CA, monitoring test mAP; inputs checked."""
    exp.check(exp.cfg(f"nbits={nbits}"))
    monitor = ["train.monitor='test'", f"train.eval_every={eval_every}"]
    return {f"convergence_{name}_{nbits}bits_seed{seed}":
            exp.cfg(f"nbits={nbits}", f"seed={seed}", *monitor, *overrides)
            for name, _, overrides in CONVERGENCE_VARIANTS for seed in seeds}


def run_convergence(exp, nbits, seeds, eval_every):
    """Test mAP@5/20/100 against epoch with and without L_CA (monitoring, not selection)."""
    trained = exp.train(convergence_runs(exp, nbits, seeds, eval_every))
    curves = {}
    for name, label, _ in CONVERGENCE_VARIANTS:
        per_seed = []
        for seed in seeds:
            run_name = f"convergence_{name}_{nbits}bits_seed{seed}"
            records = read_log(os.path.join(exp.run_dir(run_name), "log.jsonl"),
                               trained[run_name]["run_id"])
            per_seed.append({r["epoch"]: {int(k): v for k, v in r["test_mAP"].items()}
                             for r in records if "test_mAP" in r})
        epochs = sorted(per_seed[0])
        curves[name] = {"label": label, "epochs": epochs,
                        "mAP": {k: [statistics.mean(s[e][k] for s in per_seed) for e in epochs]
                                for k in CONVERGENCE_K}}
    figure = exp.add_figure(convergence_figure(
        curves, f"Convergence: {exp.title(nbits)}, {_seeds_text(seeds)}; a point is the test "
                f"mAP of the model at that epoch (monitored every {eval_every} epochs, not "
                f"selected)"))
    rows = [[c["label"], e] + [f"{c['mAP'][k][i]:.4f}" for k in CONVERGENCE_K]
            for c in curves.values() for i, e in enumerate(c["epochs"])]
    text = (f"Convergence: {exp.title(nbits)}, test mAP@R every {eval_every} epochs\n\n"
            + markdown(["run", "epoch"] + [f"mAP@{k}" for k in CONVERGENCE_K], rows))
    exp.write({"dataset": exp.dataset, "nbits": nbits, "seeds": list(seeds),
               "eval_every": eval_every, "curves": curves, "figure": figure}, text)
    return curves


# The grid of `sweep` when --grid is not given (docs/method.md §11).
SWEEP_GRID = {"train.a_cluster": [0.1, 0.3, 1.0, 3.0], "train.smoothing_beta": [0.0, 0.01]}
SWEEP_K = (5, 20, 100)


def parse_grid(items):
    """['train.a_cluster=0.1,1', ...] -> {'train.a_cluster': [0.1, 1], ...} (Python literals)."""
    import ast
    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise UserError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        values = []
        for part in text.split(","):
            try:
                values.append(ast.literal_eval(part.strip()))
            except (ValueError, SyntaxError):
                values.append(part.strip())
        check_distinct(values, f"--grid {key}")
        grid[key.strip()] = values
    return grid


def _grid_point_name(point, base, nbits, seed):
    """A run's name: the values that differ from the config's own ('default' when none do)."""
    changed = [f"{key.split('.')[-1]}{value}" for key, value in point.items()
               if _get_key(base, key) != value]
    return f"sweep_{nbits}bits_{'_'.join(changed) or 'default'}_seed{seed}"


def _get_key(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _mean_std_at(curves, epoch, k):
    return _mean_std([c[epoch][k] for c in curves])


def _grid_points(grid):
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def sweep_runs(exp, nbits, seeds, grid, eval_every):
    """The runs {name: cfg} of every grid point and seed, monitoring validation mAP; inputs
    and the grid's keys checked."""
    base = exp.cfg(f"nbits={nbits}")
    exp.check(base)
    for key in grid:                         # an unknown key fails here, before any training
        try:
            _get_key(base, key)
        except KeyError:
            raise UserError(f"--grid {key}: not a config key") from None
    monitor = ["train.monitor='val'", f"train.eval_every={eval_every}"]
    return {_grid_point_name(point, base, nbits, seed):
            exp.cfg(f"nbits={nbits}", f"seed={seed}", *monitor,
                    *[f"{key}={value!r}" for key, value in point.items()])
            for point in _grid_points(grid) for seed in seeds}


def run_sweep(exp, nbits, seeds, grid, eval_every):
    """A grid of config values x seeds, monitored on the validation split: which setting keeps
    the deep ranks (mAP@20/100) without giving up the first (mAP@5)."""
    base = exp.cfg(f"nbits={nbits}")
    trained = exp.train(sweep_runs(exp, nbits, seeds, grid, eval_every))
    points = _grid_points(grid)
    rows = []
    for point in points:
        names = [_grid_point_name(point, base, nbits, seed) for seed in seeds]
        logs = [read_log(os.path.join(exp.run_dir(n), "log.jsonl"), trained[n]["run_id"])
                for n in names]
        curves = [{r["epoch"]: {int(k): v for k, v in r["val_mAP"].items()}
                   for r in log if "val_mAP" in r} for log in logs]
        selected = [trained[n]["selected_epoch"] for n in names]
        last = max(curves[0])
        row = {"point": point, "runs": names, "selected_epochs": selected,
               "val_selected": {k: _mean_std([c[e][k] for c, e in zip(curves, selected)])
                                for k in SWEEP_K},
               "val_last": {k: _mean_std_at(curves, last, k) for k in SWEEP_K},
               "test_selected": {k: _mean_std([trained[n]["test_mAP"][k] for n in names])
                                 for k in SWEEP_K},
               "epochs": sorted(curves[0]),
               "val_curve": {k: [statistics.mean(c[e][k] for c in curves)
                                 for e in sorted(curves[0])] for k in SWEEP_K},
               "label_changed": [statistics.mean(r["label_changed"] for r in rows_at)
                                 for rows_at in zip(*logs)],
               "label_entropy": [statistics.mean(r["label_entropy"] for r in rows_at)
                                 for rows_at in zip(*logs)]}
        # the choice is made on validation only: the mean of val mAP@5, @20 and @100
        row["val_score"] = statistics.mean(row["val_selected"][k][0] for k in SWEEP_K)
        rows.append(row)
    default = next((r for r in rows if all(_get_key(base, k) == v
                                           for k, v in r["point"].items())), None)
    chosen = max(rows, key=lambda r: r["val_score"])
    figure = exp.add_figure(sweep_figure(
        grid, rows, default, chosen, f"Sweep on {exp.dataset}, {nbits} bits, selection: "
                                     f"{exp.select}, {_seeds_text(seeds)}; a point is the mean "
                                     f"over seeds (bars: std)"))
    header = (list(grid) + [f"val mAP@{k} (selected)" for k in SWEEP_K]
              + [f"val mAP@{k} (epoch {rows[0]['epochs'][-1]})" for k in SWEEP_K]
              + [f"test mAP@{k} (selected)" for k in SWEEP_K] + ["val score"])
    table = [[*r["point"].values()] + [_pm(*r["val_selected"][k]) for k in SWEEP_K]
             + [_pm(*r["val_last"][k]) for k in SWEEP_K]
             + [_pm(*r["test_selected"][k]) for k in SWEEP_K]
             + [f"{r['val_score']:.4f}" + (" (chosen)" if r is chosen else "")
                + (" (default)" if r is default else "")] for r in rows]
    text = (f"Sweep: {exp.title(nbits)}, mean ± std over seeds {list(seeds)}, validation "
            f"monitored every {eval_every} epochs; chosen by the mean of val mAP@5/20/100 at "
            f"the selected epoch (figure: {figure})\n\n" + markdown(header, table))
    exp.write({"dataset": exp.dataset, "nbits": nbits, "seeds": list(seeds),
               "selection": exp.select, "grid": grid, "eval_every": eval_every,
               "rows": rows, "default": default and default["point"], "chosen": chosen["point"],
               "figure": figure}, text)
    return rows


def sweep_figure(grid, rows, default, chosen, title):
    """Top: val mAP@5 and @100 (selected epoch) against each key, one line per setting of the
    other keys. Bottom: val mAP over epochs and the label table's drift, default and chosen."""
    plt = _pyplot()
    keys = list(grid)
    fig, axes = plt.subplots(2, max(2, len(keys)), figsize=(5.2 * max(2, len(keys)), 8.4),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        for setting in sorted({tuple(r["point"][k] for k in others) for r in rows}):
            line = [r for r in rows if tuple(r["point"][k] for k in others) == setting]
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, setting))
            for k, style in ((100, "o-"), (5, "s--")):
                ax.errorbar([r["point"][key] for r in line],
                            [r["val_selected"][k][0] for r in line],
                            yerr=[r["val_selected"][k][1] for r in line], fmt=style,
                            markersize=4, capsize=2, label=f"mAP@{k}" + (f", {label}" if label
                                                                          else ""))
        numeric = all(isinstance(v, (int, float)) and v > 0 for v in grid[key])
        if numeric:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("val mAP@R at the selected epoch")
        ax.set_title(f"against {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    curve_ax, drift_ax = axes[1][0], axes[1][1]
    for row, name in ((default, "default"), (chosen, "chosen")):
        if row is None:
            continue
        where = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["point"].items())
        for k, style in ((100, "-"), (20, ":"), (5, "--")):
            curve_ax.plot(row["epochs"], row["val_curve"][k], style,
                          label=f"{name} ({where}) mAP@{k}")
        epochs = list(range(1, len(row["label_changed"]) + 1))
        drift_ax.plot(epochs, row["label_changed"], "-", label=f"{name}: share of changed labels")
        drift_ax.plot(epochs, row["label_entropy"], "--", label=f"{name}: mean entropy (nats)")
    curve_ax.set_xlabel("epoch")
    curve_ax.set_ylabel("val mAP@R (mean over seeds)")
    curve_ax.set_title("validation mAP over training")
    drift_ax.set_xlabel("epoch")
    drift_ax.set_ylabel("label table against the k-means labels")
    drift_ax.set_title("label-table drift")
    for ax in (curve_ax, drift_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1][2:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _seeds_text(seeds):
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {list(seeds)}"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def convergence_figure(curves, title):
    """One panel per R of CONVERGENCE_K: test mAP@R against epoch for each curve
    {'label', 'epochs', 'mAP': {R: [...]}}."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CONVERGENCE_K), figsize=(13, 4))
    for ax, k in zip(axes, CONVERGENCE_K):
        for curve in curves.values():
            ax.plot(curve["epochs"], curve["mAP"][k], "o-", markersize=3, label=curve["label"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test mAP@{k}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(curves, title):
    """mAP@N against N, and precision against recall of Hamming balls of radius 0..B, for each
    method's curves {'N', 'mAP', 'precision', 'recall'}."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for method, curve in curves.items():
        left.plot(curve["N"], curve["mAP"], "o-", markersize=3, label=method)
        right.plot(curve["recall"], curve["precision"], "o-", markersize=3, label=method)
    left.set_xlabel("N (videos retrieved)")
    left.set_ylabel("test mAP@N")
    left.set_title("mAP@N (a point: mAP over the queries at N)")
    right.set_xlabel("recall (Hamming ball of radius 0..B around each query)")
    right.set_ylabel("precision")
    right.set_title("precision-recall (a point: one radius)")
    right.annotate("radius B retrieves the whole database:\nrecall 1, precision = the share "
                   "of relevant videos", xy=(1.0, min(c["precision"][-1] for c in curves.values())),
                   xytext=(0.35, 0.15), textcoords="axes fraction", fontsize=7,
                   arrowprops={"arrowstyle": "->", "lw": 0.7})
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def tsne_figure(points, classes, title):
    """One panel per method: the t-SNE position of every query's code, coloured by class, the
    marker's area growing with the number of queries whose codes are identical."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(5.5 * len(points), 5.2), squeeze=False)
    classes = np.asarray(classes)
    shown = sorted(set(classes.tolist()))
    for ax, (method, (embedded, codes)) in zip(axes[0], points.items()):
        embedded, codes = np.asarray(embedded), np.asarray(codes)
        keys = [bytes(code) for code in (codes > 0).astype(np.uint8)]
        count_of = collections.Counter(keys)
        multiplicity = np.array([count_of[key] for key in keys])
        for c in shown:
            rows = classes == c
            ax.scatter(*embedded[rows].T, s=8 * multiplicity[rows], alpha=0.6,
                       label=f"class {c}")
        ax.set_title(f"{method}: {len(count_of)} distinct codes of {len(codes)} queries")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(fontsize=7, markerscale=1, loc="best", title="query class",
                  title_fontsize=7)
    fig.suptitle(title + "\na point is a query's code; its area grows with the number of "
                         "queries that share that code exactly", fontsize=10)
    fig.tight_layout()
    return fig


def _codes(exp, nbits, seed):
    """Query/database codes and labels of S5VH (the main run), ITQ and LSH on the test protocol
    (made once for the curves and the t-SNE of one checkpoint and config)."""
    exp.train(main_runs(exp, [nbits], [seed]))
    cfg = exp.cfg(f"nbits={nbits}", f"seed={seed}")
    checkpoint = os.path.join(exp.run_dir(s5vh_run_name(nbits, seed)), "best.pth")
    key = (os.path.realpath(checkpoint), tuple(file_identity(checkpoint)),
           config_fingerprint(cfg))
    if key not in exp.codes:
        exp.codes[key] = _made_codes(exp, cfg, checkpoint, nbits, seed)
    return exp.codes[key]


def _made_codes(exp, cfg, checkpoint, nbits, seed):
    _, db_codes, query_codes = evaluate_checkpoint(cfg, checkpoint, exp.device)
    train, (db_feats, db_labels), (query_feats, query_labels) = mean_pooled_sets(cfg)
    codes = {"S5VH": (db_codes.astype(np.float32), query_codes.astype(np.float32))}
    for method in ("itq", "lsh"):
        db, query = baseline_codes(method, nbits, train, db_feats, query_feats, seed=seed)
        codes[method.upper()] = (db.numpy(), query.numpy())
    return codes, db_labels, query_labels


def run_curves(exp, nbits, seed, top_n):
    """mAP@N for N in `top_n` and precision-recall by Hamming radius (Figures 3 and 4)."""
    codes, db_labels, query_labels = _codes(exp, nbits, seed)
    curves = {}
    for method, (db, query) in codes.items():
        maps = retrieval_metrics(query, db, query_labels, db_labels, topk=tuple(top_n))["mAP"]
        pr = precision_recall_by_radius(query, db, query_labels, db_labels)
        curves[method] = {"N": list(top_n), "mAP": [maps[n] for n in top_n], **pr}
    figure = exp.add_figure(curves_figure(curves, f"Test retrieval: {exp.title(nbits)}, "
                                                   f"seed {seed}, {len(query_labels)} queries"))
    marks = [n for n in top_n if n in (5, 20, 40, 60, 80, 100)] or list(top_n)[:6]
    rows = [[m] + [f"{c['mAP'][c['N'].index(n)]:.4f}" for n in marks] for m, c in curves.items()]
    text = (f"mAP@N and precision-recall: {exp.title(nbits)}, seed {seed} (figure: {figure})\n\n"
            + markdown(["method"] + [f"mAP@{n}" for n in marks], rows))
    exp.write({"dataset": exp.dataset, "nbits": nbits, "seed": seed, "selection": exp.select,
               "curves": curves, "figure": figure}, text)
    return curves


def run_tsne(exp, nbits, seed):
    """t-SNE of the query codes of the first classes, S5VH beside ITQ (Figure 5)."""
    from sklearn.manifold import TSNE
    codes, _, query_labels = _codes(exp, nbits, seed)
    classes = query_labels.argmax(1)
    keep = classes < TSNE_CLASSES
    shown = sorted(set(classes[keep].tolist()))
    points = {}
    for method in ("S5VH", "ITQ"):
        query = codes[method][1][keep]
        embedded = TSNE(n_components=2, perplexity=min(30.0, len(query) - 1.0), init="pca",
                        random_state=seed).fit_transform(query.astype(np.float32))
        points[method] = (embedded.tolist(), query.tolist())
    figure = exp.add_figure(tsne_figure(
        points, classes[keep], f"t-SNE of the query codes of classes {shown[0]}..{shown[-1]}: "
                               f"{exp.title(nbits)}, seed {seed}"))
    text = (f"t-SNE of {int(keep.sum())} query codes ({len(shown)} classes): "
            f"{exp.title(nbits)}, seed {seed}; figure: {figure}")
    embedded = {method: positions for method, (positions, _) in points.items()}
    exp.write({"dataset": exp.dataset, "nbits": nbits, "seed": seed, "selection": exp.select,
               "classes": classes[keep].tolist(), "points": embedded, "figure": figure}, text)
    return embedded


# experiment -> (one-line summary, what it trains and writes)
EXPERIMENTS = {
    "main": ("main table: S5VH beside ITQ and LSH, mean ± std over seeds",
             "Trains one S5VH run per code length and seed (default 16 32 64 bits x seeds 1 2 3: "
             "9 runs, trained together), fits ITQ and LSH per seed, and writes main.json and "
             "main.md: test mAP@R (mean ± std) beside the published numbers."),
    "ablation": ("ablation of the losses, centers and scan directions",
                 f"Trains {len(ABLATIONS)} variants (" + ", ".join(n for n, _, _ in ABLATIONS)
                 + ") per seed at one code length (default: the config's nbits, seed 1: "
                 f"{len(ABLATIONS)} runs, trained together) and writes ablation.json and "
                 "ablation.md: mAP@R and the change against 'full'."),
    "backbones": ("backbone comparison: mAP, seconds per epoch, parameters",
                  f"Trains the S5VH layer with each mixer ({', '.join(BACKBONES)}) per seed at "
                  f"one code length ({len(BACKBONES)} runs with seed 1, trained one at a time so "
                  "that the seconds per epoch are each run's own; the configured mixer's run is "
                  "the main table's, unless that one trained beside other runs) and writes "
                  "backbones.json and backbones.md."),
    "transfer": ("a model trained on one data set, evaluated on another",
                 "Trains one run on --source and one on --target (same frame features), scores "
                 "the source's model on the target's protocol, and writes transfer.json, "
                 "transfer.md and the codes (codes_<source>_to_<target>_<B>bits.npz)."),
    "convergence": ("Figure 1(b): test mAP@5/20/100 against epoch, with and without L_CA",
                    "Trains two runs per seed (with and without the center-alignment loss), "
                    "monitoring test mAP every --eval-every epochs without selecting by it, and "
                    "writes convergence.json, convergence.md and convergence.png."),
    "sweep": ("a grid of config values x seeds, monitored on validation (deep ranks)",
              "Trains one run per grid point and seed (default --grid "
              + " ".join(f"{k}={','.join(map(str, v))}" for k, v in SWEEP_GRID.items())
              + " with seeds 1 2 3: 24 runs, trained together), each monitoring validation "
              "mAP every --eval-every epochs and logging the label table's drift, and writes "
              "sweep.json, sweep.md and sweep.png: mAP@5/20/100 at the selected and the last "
              "epoch and on the test queries, and the point with the best mean of validation "
              "mAP@5/20/100 (never chosen by test)."),
    "curves": ("Figures 3 and 4: mAP@N and precision-recall by Hamming radius",
               "Uses the main table's run of the code length and seed (trained if missing: 1 "
               "run), fits ITQ and LSH, and writes curves.json, curves.md and curves.png."),
    "tsne": ("Figure 5: t-SNE of the query codes, S5VH beside ITQ",
             "Uses the main table's run of the code length and seed (trained if missing: 1 run) "
             f"and writes tsne.json, tsne.md and tsne.png (queries of the first {TSNE_CLASSES} "
             "classes)."),
    "together": ("several experiments at once: their runs trained together in one process",
                 "Trains the runs of every experiment named (any of "
                 + ", ".join(TOGETHER) + ") together in one process, a run two of them share "
                 "once, then writes each experiment's outputs as its own command would. Runs "
                 "in one process overlap their kernels on the GPU, where separate processes "
                 "take turns. `backbones`, which times each of its runs, trains them first, "
                 "one at a time, and writes its outputs before the others train."),
}


def parse_args(argv=None):
    parser = CommandParser(
        prog="python -m tools.paper", description=__doc__.split("\n\n", 1)[0],
        epilog="experiments:\n" + "\n".join(f"  {name:<12} {summary}"
                                             for name, (summary, _) in EXPERIMENTS.items())
        + "\n\n" + __doc__.split("\n\n", 1)[1].strip()
        + "\n\npython -m tools.paper EXPERIMENT --help describes one experiment.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bits", type=int, nargs="+", default=None,
                        help="code lengths (main: default 16 32 64; the others use the first, "
                             "default the config's nbits)")
    common.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (main, sweep: default 1 2 3; curves, tsne, transfer use the "
                             "first; the others: default 1)")
    common.add_argument("--out", default=None,
                        help="output folder for the tables, figures and runs/ (default "
                             "work_dirs/paper/<dataset>)")
    common.add_argument("--concurrent", type=int, default=None, metavar="K",
                        help="train at most K runs at a time (default: all together)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys of every run, e.g. train.num_epochs=100")
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, (summary, details) in EXPERIMENTS.items():
        one = sub.add_parser(name, parents=[common], help=summary, description=f"{summary}.\n\n"
                             + details + " Finished runs of the same config and inputs under "
                             "--out/runs/ are reused, never trained again.",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             prog=f"python -m tools.paper {name}")
        if name == "together":
            one.add_argument("experiments", nargs="+", choices=TOGETHER, metavar="EXPERIMENT",
                             help="the experiments to run (" + ", ".join(TOGETHER) + ")")
        if name == "transfer":
            one.add_argument("--source", required=True, help="config of the data set trained on")
            one.add_argument("--target", required=True,
                             help="config of the data set evaluated on")
        else:
            one.add_argument("--config", required=True,
                             help="config of the data set, e.g. configs/S5VH/ucf.py")
        if name in ("convergence", "sweep", "together"):
            one.add_argument("--eval-every", type=int, default=10,
                             help="epochs between the monitored evaluations (default 10)")
        if name in ("sweep", "together"):
            one.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2",
                             help="the config keys and values to cross (default "
                                  + " ".join(f"{k}={','.join(map(str, v))}"
                                             for k, v in SWEEP_GRID.items()) + ")")
        if name in ("curves", "together"):
            one.add_argument("--top-n", type=int, nargs=3, default=[5, 100, 5],
                             metavar=("FIRST", "LAST", "STEP"),
                             help="the N of mAP@N (default 5 100 5)")
    return parser.parse_args(argv)


def _settings(name, args, exp):
    """(bits, seeds) of experiment `name`: the arguments, or the experiment's defaults."""
    bits = args.bits or ([16, 32, 64] if name == "main" else [exp.cfg().nbits])
    seeds = args.seeds or ([1, 2, 3] if name in ("main", "sweep") else [1])
    return bits, seeds


def planned_runs(name, exp, args):
    """The runs {name: cfg} experiment `name` trains, its inputs checked."""
    bits, seeds = _settings(name, args, exp)
    if name == "main":
        return main_runs(exp, bits, seeds)
    if name == "ablation":
        return variant_runs(exp, ABLATIONS, bits[0], seeds)
    if name == "convergence":
        return convergence_runs(exp, bits[0], seeds, args.eval_every)
    if name == "sweep":
        return sweep_runs(exp, bits[0], seeds, _grid(args), args.eval_every)
    return main_runs(exp, bits[:1], seeds[:1])       # curves, tsne: the main table's run


def _grid(args):
    return parse_grid(args.grid) if args.grid else SWEEP_GRID


def run_experiment(name, exp, args):
    """Train what experiment `name` needs (finished runs are reused) and write its outputs."""
    bits, seeds = _settings(name, args, exp)
    if name == "main":
        return run_main(exp, bits, seeds)
    if name == "ablation":
        return run_ablation(exp, bits[0], seeds)
    if name == "backbones":
        return run_backbones(exp, bits[0], seeds)
    if name == "transfer":
        return run_transfer(exp, args.source, args.target, bits[0], seeds[0])
    if name == "convergence":
        return run_convergence(exp, bits[0], seeds, args.eval_every)
    if name == "sweep":
        return run_sweep(exp, bits[0], seeds, _grid(args), args.eval_every)
    if name == "curves":
        first, last, step = args.top_n
        return run_curves(exp, bits[0], seeds[0], range(first, last + 1, step))
    return run_tsne(exp, bits[0], seeds[0])


def run_together(names, args):
    """The runs of the experiments `names` that time each run (TIMED_ALONE) one at a time, each
    such experiment's outputs, then every other run in one group and each other experiment's
    outputs; all in this process, which starts, imports and reads the features once.
    {experiment: what it returns}."""
    experiments = {name: Experiment(name, args.config, args.cfg_options, args.out,
                                    args.concurrent, not args.no_progress) for name in names}
    shared, codes = {}, {}  # the features are read and moved to the device once
    for exp in experiments.values():
        exp.shared, exp.codes = shared, codes
    outputs = {}
    for name in [name for name in names if name in TIMED_ALONE]:
        began = time.perf_counter()
        outputs[name] = run_experiment(name, experiments.pop(name), args)
        logger.info(f"{name}: trained and written in {time.perf_counter() - began:.1f}s")
    if not experiments:
        return outputs
    runs = {}
    for name, exp in experiments.items():
        for run, cfg in planned_runs(name, exp, args).items():
            if run in runs and config_fingerprint(runs[run]) != config_fingerprint(cfg):
                raise UserError(f"two experiments train a run named {run} with different "
                                f"configs")
            runs[run] = cfg
    began = time.perf_counter()
    next(iter(experiments.values())).train(runs)
    logger.info(f"{len(runs)} runs trained together in {time.perf_counter() - began:.1f}s "
                f"(a run finished before is reported, not trained again)")
    for name, exp in experiments.items():     # the runs are trained: what remains is the reports
        began = time.perf_counter()
        outputs[name] = run_experiment(name, exp, args)
        logger.info(f"{name}: outputs written in {time.perf_counter() - began:.1f}s")
    return outputs


def main(argv=None):
    args = parse_args(argv)
    if getattr(args, "eval_every", 1) < 1:
        raise UserError(f"--eval-every must be at least 1, got {args.eval_every}")
    first, last, step = getattr(args, "top_n", (1, 1, 1))
    if first < 1 or last < first or step < 1:
        raise UserError("--top-n FIRST LAST STEP must be increasing and at least 1, got "
                        f"{first} {last} {step}")
    if args.concurrent is not None and args.concurrent < 1:
        raise UserError(f"--concurrent must be at least 1, got {args.concurrent}")
    for option, values in (("--bits", args.bits), ("--seeds", args.seeds)):
        if values is not None:
            check_distinct(values, option)
    if args.bits:
        check_code_lengths(args.bits)
    # the tables and figures go into --out, the runs into --out/runs/
    check_outside_runs(args.out or "work_dirs", "--out folder", folder=True)
    if args.experiment == "together":
        return run_together(list(dict.fromkeys(args.experiments)), args)
    transfer = args.experiment == "transfer"
    exp = Experiment(args.experiment, args.target if transfer else args.config,
                     args.cfg_options, args.out, args.concurrent, not args.no_progress)
    return run_experiment(args.experiment, exp, args)


if __name__ == "__main__":
    run_cli(main)
