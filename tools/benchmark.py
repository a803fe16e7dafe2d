"""Speed benchmark on the GPU present; prints every figure and writes JSON (and a figure).

    python -m tools.benchmark --parts train            # the training step, plain to optimised
    python -m tools.benchmark --parts runs             # runs end to end, one and nine at a time
    python -m tools.benchmark --parts eval frames      # evaluation; encoder time vs frames
    python -m tools.benchmark --parts profile          # the kernels of one optimised step

train: videos/s of the plain step and of each optimisation added in turn, on resident synthetic
  features of UCF101's size (9,537 x 25 x 4096), `small`, 64 bits, batch 128, in both phases
  (warm-up; smoothing, when the pseudo-label pass runs), with the ratio to the plain step
  measured in the same run. The plain step is composed here from library parts: features on the
  host, the two views one after the other, AdamW without the fused kernel, mamba_ssm's scan.
runs: whole runs. A synthetic data set of UCF101's size is written once to --data; one run
  alone, then nine (16/32/64 bits x seeds 1-3) trained together, each for --epochs epochs with
  the warm-up scaled as in 350 (50 of 350): wall time from the call to the results, the training
  steps' share (steps x the step time measured by `train` in the same run), aggregate videos/s,
  peak GPU memory, and each set-up phase. 350-epoch figures are extrapolated from these (the
  set-up once, the epochs linearly). With --ucf-dev CONFIG, one full 350-epoch run of it too.
routes: the two routes for several runs on one GPU, step for step: R runs' captured steps on R
  streams in turn (the route train.py takes), against one model with an R times larger batch,
  the most that stacking R same-shaped models into one batched model could reach.
eval: encode + rank + mAP@100 for the UCF protocol and FCVID all-vs-all, features in memory.
frames: encoder inference time and peak memory against the frame count M for the Mamba encoder
  and Transformer encoders of the same width and depth (the paper's Figure 1(a)).
"""
import contextlib
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from inference.encode import autocast, encode
from inference.metrics import retrieval_metrics
from Loss.losses import LabelTable, S5VHLoss
from model.mamba import MambaMixer, causal_conv1d_silu_ref
from model.s5vh import BidirectionalLayer, build_model, gather_frames
from optim.engine import TrainStep, draw_step_inputs, epoch_generator, full_view_logits
from optim.optimizer import build_optimizer
from optim.runner import Job, train_runs
from utils.cli import command_line, command_parser
from utils.config import build_config
from utils.fileio import write_json

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
UCF_CONFIG = os.path.join(CONFIGS, "S5VH", "ucf.py")


DEVICE = "cuda"


def ucf_config(*overrides):
    return build_config(UCF_CONFIG, ["nbits=64", *overrides])


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def new_stream():
    return torch.cuda.Stream() if DEVICE == "cuda" else None


def on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if DEVICE == "cuda" else None


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---- the training step, plain to optimised --------------------------------------------------

@dataclass
class StepOptions:
    """What a training step does; the plain step has every flag off."""
    library_step: bool = False  # device-resident batches, both views in one pass, fused AdamW
    cuda_graph: bool = False    # the whole step replayed as one captured CUDA graph
    bf16: bool = False
    mamba_impl: str = "cuda"    # mamba_ssm's selective scan, or 'triton' (short sequences)
    triton_conv: bool = True    # with the Triton scan: the fused Triton convolution + SiLU
    first_scan: bool = False    # the Triton scan as first written: every state kept for the
    #                             backward (one segment), no loads in flight ahead (one stage)
    paired: bool = True         # with the Triton scan: both directions as one computation
    two_streams: bool = False   # the directions on two CUDA streams (when apart)
    compiled: bool = False      # model and loss through torch.compile (Inductor fuses kernels)


LADDER = [
    ("plain", StepOptions()),
    ("+ resident batches, one pass, fused AdamW", StepOptions(True)),
    ("+ CUDA graph of the step", StepOptions(True, True)),
    ("+ bf16 autocast", StepOptions(True, True, True)),
    ("+ Triton short-sequence scan", StepOptions(True, True, True, "triton", False, True,
                                                 paired=False)),
    ("+ Triton causal convolution", StepOptions(True, True, True, "triton", first_scan=True,
                                                paired=False)),
    ("+ scan: segmented backward, pipelined loads",
     StepOptions(True, True, True, "triton", paired=False)),
    ("+ directions paired: one batched chain (the default)",
     StepOptions(True, True, True, "triton")),
    ("directions apart on two streams", StepOptions(True, True, True, "triton", paired=False,
                                                    two_streams=True)),
    ("default in float32 (no bf16)", StepOptions(True, True, False, "triton")),
    ("default + torch.compile of model and loss", StepOptions(True, True, True, "triton",
                                                              compiled=True)),
]
DEFAULT_RUNG = "+ directions paired: one batched chain (the default)"


class PlainStep:
    """The step a plain implementation takes: the batch copied from the host, one view after
    the other through the model, AdamW's per-parameter loop, a loss read back every step."""

    def __init__(self, model, criterion, features, label_table, cfg):
        self.model, self.criterion, self.label_table = model, criterion, label_table
        self.features, self.device = features, label_table.table.device
        params = list(model.parameters()) + list(criterion.parameters())
        t = cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay, foreach=False)

    def __call__(self, inputs, smoothing_beta):
        host_index = inputs.index.cpu()
        x = self.features[host_index].to(self.device)
        b = len(host_index)
        views = [self.model(x, inputs.visible[rows], inputs.masked[rows],
                            inputs.path_noise[:, rows])
                 for rows in (slice(0, b), slice(b, None))]
        outputs = {key: torch.cat([v[key] for v in views]) for key in views[0]}
        targets = gather_frames(torch.cat([x, x]), inputs.masked)
        soft = self.label_table[inputs.index] if smoothing_beta is None else \
            self.label_table.update(inputs.index,
                                    full_view_logits(self.model, self.criterion, x),
                                    smoothing_beta)
        loss, parts = self.criterion(outputs, targets, soft)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        loss.item()
        return loss.detach(), parts


def _synthetic(videos, cfg, gen, nbits=64):
    features = torch.rand(videos, cfg.max_frames, cfg.feature_size, device=DEVICE, generator=gen)
    centers = (torch.randint(0, 2, (cfg.preprocess.nclusters, nbits), generator=gen,
                             device=DEVICE) * 2 - 1).float().cpu().numpy()
    labels = torch.randint(0, len(centers), (videos,), device=DEVICE, generator=gen)
    return features, centers, labels


def make_step(opts, features, centers, labels, batch=128, nbits=64):
    """A training step of the options on these features; (step, model)."""
    cfg = ucf_config(f"nbits={nbits}", f"model.mamba_impl={opts.mamba_impl!r}",
                     f"model.two_streams={opts.two_streams}", f"train.batch_size={batch}")
    torch.manual_seed(0)
    model = build_model(cfg, torch.device(DEVICE))
    for mixer in (m for m in model.modules() if isinstance(m, MambaMixer)):
        if not opts.triton_conv:                 # the Triton scan beside PyTorch's convolution
            mixer.conv = causal_conv1d_silu_ref
        if opts.first_scan:
            from model.scan_triton import selective_scan_triton
            mixer.scan = functools.partial(selective_scan_triton, segment=cfg.max_frames,
                                           stages=1)
    if not opts.paired:           # the directions one after the other, as other mixers run
        for layer in (m for m in model.modules() if isinstance(m, BidirectionalLayer)):
            layer.paired = False
    criterion = S5VHLoss(centers, cfg.train).to(DEVICE)
    table = LabelTable(labels, len(centers), DEVICE)
    if not opts.library_step:
        return PlainStep(model, criterion, features.cpu(), table, cfg), model
    optimizer = build_optimizer(cfg, model, criterion, graphs=opts.cuda_graph)
    if opts.compiled:       # the compiled modules share the parameters the optimizer holds
        step_model, criterion = torch.compile(model), torch.compile(criterion)
    else:
        step_model = model
    return TrainStep(step_model, criterion, optimizer, features, table, batch, amp=opts.bf16,
                     cuda_graphs=opts.cuda_graph), model


def _rates(steps, models, features, phase_steps, batch, warmup_steps=5):
    """Aggregate videos/s of `steps` (each on its own stream, taking turns) per phase."""
    cfg = ucf_config()
    streams = [new_stream() for _ in steps]
    phases = (("warm_up", None), ("smoothing", cfg.train.smoothing_beta))
    for step, model, stream in zip(steps, models, streams):
        if getattr(step, "use_graphs", False):         # the library step with CUDA graphs
            with on(stream):
                gen = epoch_generator(0, 0, DEVICE)
                index = torch.arange(batch, device=DEVICE)
                examples = [(draw_step_inputs(index, cfg.max_frames, cfg.train.mask_ratio,
                                              model.depth, gen), beta) for _, beta in phases]
                for _ in step.capture_graphs(examples):
                    pass
    rates = {}
    for phase, beta in phases:
        gens = [epoch_generator(i, 0, DEVICE) for i in range(len(steps))]
        for i in range(warmup_steps + phase_steps):
            if i == warmup_steps:
                synchronize()
                start = time.perf_counter()
            for step, model, gen, stream in zip(steps, models, gens, streams):
                with on(stream):
                    index = torch.randint(0, len(features), (batch,), device=DEVICE,
                                          generator=gen)
                    inputs = draw_step_inputs(index, cfg.max_frames, cfg.train.mask_ratio,
                                              model.depth, gen)
                    step(inputs, beta)
        synchronize()
        rates[phase] = len(steps) * batch * phase_steps / (time.perf_counter() - start)
    return rates


def bench_training(videos, steps, rungs=None):
    """The ladder's rungs (all, or the names in `rungs`; the plain one is always measured)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    features, centers, labels = _synthetic(videos, ucf_config(), gen)
    rows = []
    for name, opts in LADDER:
        if rungs is not None and name != "plain" and name not in rungs:
            continue
        step, model = make_step(opts, features, centers, labels)
        rates = _rates([step], [model], features, steps, 128)
        rows.append({"step": name, **opts.__dict__,
                     "videos_per_s": {p: round(r, 1) for p, r in rates.items()}})
        print(json.dumps(rows[-1]), flush=True)
        del step, model
    base = rows[0]["videos_per_s"]
    for row in rows:
        row["ratio_to_plain"] = {p: round(row["videos_per_s"][p] / base[p], 2) for p in base}
    return rows


def bench_routes(videos, steps, count):
    """`count` runs' captured steps on their own streams, against one model of count x batch."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    features, centers, labels = _synthetic(videos, ucf_config(), gen)
    cuda = DEVICE == "cuda"
    opts = StepOptions(True, cuda, True, "triton" if cuda else "plain")
    out = {}
    for name, runs, batch in (("one run, batch 128", 1, 128),
                              (f"{count} runs on {count} streams, batch 128 each", count, 128),
                              (f"one run, batch {count} x 128 (ceiling of stacking)", 1,
                               count * 128)):
        reset_peak()
        made = [make_step(opts, features, centers, labels, batch) for _ in range(runs)]
        rates = _rates([s for s, _ in made], [m for _, m in made], features, steps, batch)
        out[name] = {"videos_per_s": {p: round(r, 1) for p, r in rates.items()},
                     "peak_gib": peak_gib()}
        print(json.dumps({name: out[name]}), flush=True)
        del made
    return out


# ---- whole runs -----------------------------------------------------------------------------

UCF_SIZE = dict(classes=101, db_per_class=95, query_per_class=38, frames=25, dim=4096)


def synthetic_ucf(data_root):
    """A synthetic data set of UCF101's size in data_root/ucf (written once)."""
    from dataset.demo import make_demo
    folder = os.path.join(data_root, "ucf")
    if not os.path.isfile(os.path.join(folder, "ucf_test_labels.mat")):
        start = time.perf_counter()
        make_demo(folder, seed=0, num_classes=UCF_SIZE["classes"] - 1,
                  db_per_class=UCF_SIZE["db_per_class"],
                  query_per_class=UCF_SIZE["query_per_class"], frames=UCF_SIZE["frames"],
                  dim=UCF_SIZE["dim"], prefix="ucf_", dtype=np.float16)
        print(f"wrote the synthetic UCF-size set in {time.perf_counter() - start:.1f}s",
              flush=True)
    return folder


def _run_figures(results, run_dirs, wall, videos, epochs, step_rates, warm_up):
    """Wall time, the steps' share of it, and the 350-epoch extrapolation of a group of runs:
    set-up, first epoch (compilation, capture) and the rest after the last epoch once, the
    steady epochs (the median of the first run's logged epochs) scaled to 350."""
    steps_s = sum(videos / step_rates["warm_up" if e < warm_up else "smoothing"]
                  for e in range(epochs)) * len(results)
    setup = sum(sum(v for k, v in r["timing"].items() if k != "first epoch") for r in results)
    log = [json.loads(line) for line in open(os.path.join(run_dirs[0], "log.jsonl"))]
    seconds = [r["train_seconds"] for r in log]
    steady = statistics.median(seconds[1:-1] or seconds)
    rest = wall - setup - sum(seconds)
    out = {"runs": len(results), "epochs": epochs, "wall_s": round(wall, 2),
           "setup_s": round(setup, 2), "first_epoch_s": round(seconds[0], 2),
           "steady_epoch_s": round(steady, 4), "after_last_epoch_s": round(rest, 2),
           "steps_s": round(steps_s, 2), "wall_over_steps": round(wall / steps_s, 3),
           "aggregate_videos_per_s": round(len(results) * videos * epochs / wall, 1),
           "timing": [r["timing"] for r in results]}
    scale = 350 / epochs
    wall_350 = setup + seconds[0] + steady * 349 + rest
    out["estimated_350_epochs"] = {"wall_s": round(wall_350, 1),
                                   "steps_s": round(steps_s * scale, 1),
                                   "wall_over_steps": round(wall_350 / (steps_s * scale), 3)}
    return out


def bench_runs(data_root, work_dir, epochs, step_rates, ucf_dev=None, synthetic=True,
               options=()):
    """Whole runs: on the synthetic UCF-size set one alone, then nine together (`synthetic`);
    one full run of the `ucf_dev` config. `options`: --cfg-options of every run."""
    report = {}
    if synthetic:
        report.update(_synthetic_runs(data_root, work_dir, epochs, step_rates, options))
    if ucf_dev:
        cfg = build_config(ucf_dev, ["train.num_epochs=350", *options])
        start = time.perf_counter()
        run_dir = os.path.join(work_dir, "ucf_dev")
        results = train_runs([Job(cfg, run_dir, replace=True)], progress=False)
        wall = time.perf_counter() - start
        report["ucf_dev"] = _run_figures(results, [run_dir], wall, len(_train_rows(cfg)), 350,
                                         step_rates, cfg.train.warm_up_epoch)
        print(json.dumps({"ucf_dev": report["ucf_dev"]}), flush=True)
    return report


def _synthetic_runs(data_root, work_dir, epochs, step_rates, options):
    synthetic_ucf(data_root)
    warm_up = max(1, round(epochs * 50 / 350))
    base = [f"data_root={data_root!r}", f"train.num_epochs={epochs}",
            f"train.warm_up_epoch={warm_up}", *options]
    report = {}
    for name, grid in (("one run", [(64, 1)]),
                       ("nine runs", [(b, s) for b in (16, 32, 64) for s in (1, 2, 3)])):
        jobs = [Job(build_config(UCF_CONFIG, [*base, f"nbits={b}", f"seed={s}"]),
                    os.path.join(work_dir, name.replace(" ", "_"), f"{b}bits_seed{s}"),
                    replace=True) for b, s in grid]
        reset_peak()
        start = time.perf_counter()
        results = train_runs(jobs, progress=False)
        wall = time.perf_counter() - start
        videos = len(_train_rows(jobs[0].cfg))
        report[name] = _run_figures(results, [job.run_dir for job in jobs], wall, videos,
                                    epochs, step_rates, warm_up)
        report[name]["peak_gib"] = peak_gib()
        print(json.dumps({name: report[name]}), flush=True)
    one, nine = report["one run"], report["nine runs"]
    report["nine_over_one_throughput"] = round(nine["aggregate_videos_per_s"]
                                               / one["aggregate_videos_per_s"], 2)
    return report


def _train_rows(cfg):
    from dataset.protocol import train_set
    return train_set(cfg).rows


# ---- evaluation, frames, profile ------------------------------------------------------------

def bench_eval(repeats=3):
    cfg = ucf_config("eval.query_chunk=4096", "eval.batch_size=2048")
    model = build_model(cfg, torch.device("cuda")).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n_db, n_query, classes, all_vs_all in (("ucf", 9537, 3783, 101, False),
                                                      ("fcvid", 45600, 45600, 239, True)):
        db_feats = torch.rand(n_db, 25, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
        q_feats = db_feats if all_vs_all else torch.rand(n_query, 25, 4096, device="cuda",
                                                         generator=gen, dtype=torch.bfloat16)
        db_labels = torch.nn.functional.one_hot(
            torch.randint(0, classes, (n_db,), device="cuda", generator=gen), classes)
        q_labels = db_labels if all_vs_all else torch.nn.functional.one_hot(
            torch.randint(0, classes, (n_query,), device="cuda", generator=gen), classes)
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            with autocast("cuda", True):
                db_codes = encode(model, db_feats, "cuda", cfg.eval.batch_size)
                q_codes = db_codes if all_vs_all else encode(model, q_feats, "cuda",
                                                             cfg.eval.batch_size)
            encoded = time.perf_counter()
            result = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, topk=(100,),
                                       chunk=cfg.eval.query_chunk, device="cuda")
            synchronize()
            times.append((encoded - start, time.perf_counter() - start))
        encode_s, total_s = min(times, key=lambda t: t[1])
        rows.append({"protocol": name, "database": n_db, "queries": n_query,
                     "encode_s": round(encode_s, 3), "total_s": round(total_s, 3),
                     "mAP@100": round(result["mAP"][100], 4)})
        print(json.dumps(rows[-1]), flush=True)
        del db_feats, q_feats
    return rows


ENCODERS = (("mamba", ["model.mixer='mamba'", "model.mamba_impl='cuda'"]),
            ("transformer (fused sdpa)", ["model.mixer='attention'", "model.attention_impl='sdpa'"]),
            ("transformer (explicit)", ["model.mixer='attention'", "model.attention_impl='explicit'"]))


def bench_frames(frame_counts, batch, repeats=3):
    rows = []
    for name, overrides in ENCODERS:
        for frames in frame_counts:
            cfg = ucf_config(f"max_frames={frames}", *overrides)
            torch.manual_seed(0)
            model = build_model(cfg, torch.device("cuda")).eval()
            row = {"encoder": name, "frames": frames, "batch": batch}
            try:
                x = torch.rand(batch, frames, cfg.feature_size, device="cuda",
                               dtype=torch.bfloat16)
                synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    with autocast("cuda", True):
                        encode(model, x, "cuda", batch)
                    synchronize()
                    times.append(time.perf_counter() - start)
                row["ms"] = round(1000 * min(times[1:]), 3)
                row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
            except torch.OutOfMemoryError:
                row["ms"] = row["peak_mib"] = None
                row["oom"] = True
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            x = None
            torch.cuda.empty_cache()
    return rows


def profile_step(steps=5, paired=True):
    """Top CUDA kernels of the eager default step (bf16, Triton scan), or with the directions
    apart (paired=False)."""
    from torch.profiler import ProfilerActivity, profile
    gen = torch.Generator(device="cuda").manual_seed(0)
    features, centers, labels = _synthetic(1024, ucf_config(), gen)
    step, model = make_step(StepOptions(True, False, True, "triton", paired=paired),
                            features, centers, labels)
    cfg = ucf_config()

    def run(count):
        for _ in range(count):
            index = torch.randint(0, 1024, (128,), device="cuda", generator=gen)
            step(draw_step_inputs(index, cfg.max_frames, cfg.train.mask_ratio, model.depth, gen),
                 None)
        synchronize()

    run(3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(steps)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(table)
    return table


def frames_figure(report):
    """Inference time and peak memory against M, one line per encoder; where an encoder ran out
    of memory its last point is crossed and the legend says at which M."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report.get("frames", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, _ in ENCODERS:
        pts = [r for r in rows if r["encoder"] == name and r.get("ms") is not None]
        failed = [r for r in rows if r["encoder"] == name and r.get("oom")]
        for ax, key in zip(axes, ("ms", "peak_mib")):
            if not pts:
                continue
            line, = ax.plot([r["frames"] for r in pts], [r[key] for r in pts], "o-", label=name)
            if failed:       # where the explicit attention ran out of memory, say so
                ax.plot(pts[-1]["frames"], pts[-1][key], "x", color=line.get_color(),
                        markersize=12, label=f"{name}: out of GPU memory at M = "
                                             f"{failed[0]['frames']:,}")
    for ax, label in zip(axes, ("inference time per batch (ms)", "peak GPU memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames per video (M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    batch = rows[0]["batch"] if rows else "?"
    fig.suptitle(f"Encoder inference (small: d=256, 6 layers, 64 bits, batch {batch} videos, "
                 f"bf16) on {report['device']}; a point is the best of 3 timed batches",
                 fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = command_parser("python -m tools.benchmark", __doc__)
    parser.add_argument("--parts", nargs="+", default=["train", "runs", "eval", "frames"],
                        choices=["train", "routes", "runs", "eval", "frames", "profile"])
    parser.add_argument("--rungs", nargs="+", default=None, metavar="NAME",
                        help="train: only these rungs of the ladder (and the plain step)")
    parser.add_argument("--no-synthetic", action="store_true",
                        help="runs: skip the synthetic UCF-size runs (with --ucf-dev)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="runs: override keys of every run (e.g. train.amp=False)")
    parser.add_argument("--videos", type=int, default=9537,
                        help="videos of the synthetic resident set for train and routes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    parser.add_argument("--epochs", type=int, default=21,
                        help="runs: epochs of each run (the warm-up scaled as 50 of 350)")
    parser.add_argument("--routes", type=int, default=9,
                        help="runs: how many runs the two routes are measured with")
    parser.add_argument("--data", default=os.path.join("work_dirs", "bench_data"),
                        help="runs: data_root of the synthetic UCF-size set (written once)")
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "bench_runs"))
    parser.add_argument("--ucf-dev", default=None, metavar="CONFIG",
                        help="runs: also one full 350-epoch run of this config")
    parser.add_argument("--frames", type=int, nargs="+",
                        default=[25, 100, 400, 1600, 6400, 25600, 102400])
    parser.add_argument("--frames-batch", type=int, default=4)
    parser.add_argument("--out", default=os.path.join("tools", "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark measures GPU speed; no CUDA device is available")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": command_line("python -m tools.benchmark", argv)}
    if "train" in args.parts or "runs" in args.parts:
        report["train"] = bench_training(args.videos, args.steps, args.rungs)
    if "routes" in args.parts:
        report["routes"] = bench_routes(args.videos, args.steps, args.routes)
    if "runs" in args.parts:
        # the step time the runs are compared with: the rung their config trains with
        rates = next(r["videos_per_s"] for r in report["train"] if r["step"] == DEFAULT_RUNG)
        report["runs"] = bench_runs(args.data, args.work_dir, args.epochs, rates, args.ucf_dev,
                                    not args.no_synthetic, args.cfg_options)
    if "eval" in args.parts:
        report["eval"] = bench_eval()
    if "frames" in args.parts:
        report["frames"] = bench_frames(args.frames, args.frames_batch)
        frames_figure(report).savefig(os.path.join(args.out, "encoder_vs_frames.png"), dpi=120)
    if "profile" in args.parts:
        report["profile"] = {"directions paired": profile_step(),
                             "directions apart": profile_step(paired=False)}
    name = "benchmark_" + "_".join(args.parts) + ("_ucf_dev" if args.ucf_dev else "") + ".json"
    write_json(os.path.join(args.out, name), report)
    return report


if __name__ == "__main__":
    main()
