"""Speed benchmark on the device present; writes JSON and a figure (matplotlib).

    python -m tools.benchmark --out bench/          # all parts
    python -m tools.benchmark --parts train --steps 20
    python -m tools.benchmark --parts frames --out bench/   # added to bench/benchmark.json

a. training: throughput of the plain step and of each optimisation added in turn, on a synthetic
   UCF-size set (9,537 x 25 x 4096), `small`, 64 bits, batch 128; both phases (warm-up, and after
   it, when the pseudo-label pass runs) and the 350-epoch schedule estimated from them;
b. evaluation: encode + rank + mAP@100 for the UCF protocol (9,537 x 3,783) and FCVID all-vs-all
   (45,600), features already in (GPU) memory;
c. encoder inference time and peak memory vs frame count M for the Mamba encoder and Transformer
   encoders of the same width and depth (fused and explicit attention): the paper's Figure 1(a).
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from inference.encode import encode
from inference.metrics import retrieval_metrics
from Loss.losses import LabelTable, S5VHLoss
from model.s5vh import build_model
from optim.engine import TrainStep, epoch_generator, make_views
from optim.optimizer import build_optimizer
from utils.config import build_config
from utils.fileio import write_json

UCF_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "S5VH", "ucf.py")


def ucf_config(*overrides):
    return build_config(UCF_CONFIG, ["nbits=64", *overrides])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepOptions:
    """What a training step does; the plain step has every flag off."""
    resident: bool = False    # features, batch order and masks on the device (no host copies)
    no_sync: bool = False     # no .item() per step
    one_pass: bool = False    # both views in one forward pass of 2b rows
    fused_adamw: bool = False
    cuda_graph: bool = False  # the whole step replayed as one captured CUDA graph (TrainStep)
    bf16: bool = False
    mamba_impl: str = "cuda"  # the selective scan: mamba_ssm's kernel, or 'triton' (short-sequence)


LADDER = [
    ("plain", StepOptions()),
    ("+ device-resident batches, no per-step sync", StepOptions(True, True)),
    ("+ both views in one pass", StepOptions(True, True, True)),
    ("+ fused AdamW", StepOptions(True, True, True, True)),
    ("+ CUDA graph of the step (optimised, float32)", StepOptions(True, True, True, True, True)),
    ("+ bf16 autocast", StepOptions(True, True, True, True, True, True)),
    ("+ Triton short-sequence scan (optimised)",
     StepOptions(True, True, True, True, True, True, "triton")),
    ("optimised in float32 (no bf16)", StepOptions(True, True, True, True, True, False, "triton")),
]


def bench_training(device, videos, steps, warmup_steps=5):
    cfg = ucf_config()
    frames, dim, batch = cfg.max_frames, cfg.feature_size, cfg.train.batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    features_device = torch.rand(videos, frames, dim, device=device, generator=gen)
    features_host = features_device.cpu()
    centers = torch.randint(0, 2, (cfg.preprocess.nclusters, 64), generator=gen,
                            device=device).float() * 2 - 1
    rows = []
    for name, opts in LADDER:
        torch.manual_seed(0)
        model = build_model(ucf_config(f"model.mamba_impl={opts.mamba_impl!r}")).to(device)
        criterion = S5VHLoss(centers.cpu().numpy(), cfg.train).to(device)
        labels = LabelTable(torch.randint(0, len(centers), (videos,)), len(centers), device)
        # the library's step with the rung's options; the plain rung has them all off
        optimizer, _ = build_optimizer(cfg, model, criterion, graphs=opts.cuda_graph,
                                       fused=opts.fused_adamw and device.type == "cuda")
        step = TrainStep(model, criterion, optimizer,
                         features_device if opts.resident else features_host, labels, batch,
                         amp=opts.bf16, cuda_graphs=opts.cuda_graph, one_pass=opts.one_pass)
        phase_rates = {}
        for phase, smoothing_beta in (("warm_up", None), ("smoothing", cfg.train.smoothing_beta)):
            gen_dev = epoch_generator(0, 0, device)
            gen_host = epoch_generator(0, 0, "cpu")
            for i in range(warmup_steps + steps):
                if i == warmup_steps:
                    synchronize(device)
                    start = time.perf_counter()
                # batch order and masks drawn where the features are kept
                gen, where = (gen_dev, device) if opts.resident else (gen_host, "cpu")
                index = torch.randint(0, videos, (batch,), device=where, generator=gen)
                visible, masked = make_views(batch, frames, cfg.train.mask_ratio, gen, where)
                loss, _ = step(index, visible, masked, smoothing_beta)
                if not opts.no_sync:
                    loss.item()
            synchronize(device)
            elapsed = time.perf_counter() - start
            phase_rates[phase] = batch * steps / elapsed
        epoch = {p: videos / r for p, r in phase_rates.items()}
        warm = cfg.train.warm_up_epoch
        schedule = warm * epoch["warm_up"] + (cfg.train.num_epochs - warm) * epoch["smoothing"]
        rows.append({"step": name, **asdict(opts),
                     "videos_per_s": {p: round(r, 1) for p, r in phase_rates.items()},
                     "epoch_s": {p: round(e, 3) for p, e in epoch.items()},
                     "schedule_350_epochs_s": round(schedule, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del model, optimizer, criterion, labels, step
    base = rows[0]["videos_per_s"]
    for row in rows:
        row["speedup_vs_plain"] = {p: round(row["videos_per_s"][p] / base[p], 2) for p in base}
    return rows


def bench_eval(device, repeats=3):
    cfg = ucf_config("eval.query_chunk=4096", "eval.batch_size=2048")
    model = build_model(cfg).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, n_db, n_query, classes, all_vs_all in (("ucf", 9537, 3783, 101, False),
                                                      ("fcvid", 45600, 45600, 239, True)):
        db_feats = torch.rand(n_db, 25, 4096, device=device, generator=gen, dtype=torch.bfloat16)
        q_feats = db_feats if all_vs_all else torch.rand(n_query, 25, 4096, device=device,
                                                         generator=gen, dtype=torch.bfloat16)
        db_labels = torch.nn.functional.one_hot(
            torch.randint(0, classes, (n_db,), device=device, generator=gen), classes)
        q_labels = db_labels if all_vs_all else torch.nn.functional.one_hot(
            torch.randint(0, classes, (n_query,), device=device, generator=gen), classes)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            db_codes = encode(model, db_feats, device, cfg.eval.batch_size, amp=True)
            q_codes = db_codes if all_vs_all else encode(model, q_feats, device,
                                                         cfg.eval.batch_size, amp=True)
            encoded = time.perf_counter()
            result = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, topk=(100,),
                                       chunk=cfg.eval.query_chunk, device=device)
            synchronize(device)
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


def bench_frames(device, frame_counts, batch, repeats=3):
    rows = []
    for name, overrides in ENCODERS:
        for frames in frame_counts:
            cfg = ucf_config(f"max_frames={frames}", *overrides)
            torch.manual_seed(0)
            model = build_model(cfg).to(device).eval()
            row = {"encoder": name, "frames": frames, "batch": batch}
            try:
                x = torch.rand(batch, frames, cfg.feature_size, device=device, dtype=torch.bfloat16)
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                times = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    encode(model, x, device, batch, amp=True)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                row["ms"] = round(1000 * min(times[1:]), 3)
                row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 1)
            except torch.OutOfMemoryError:
                row["ms"] = row["peak_mib"] = None
                row["oom"] = True
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            x = None
            torch.cuda.empty_cache()
    return rows


def profile_step(device, steps=5):
    """Top CUDA kernels of the eager optimised step (fp32), to see where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    cfg = ucf_config()
    model = build_model(cfg).to(device)
    centers = (torch.randint(0, 2, (cfg.preprocess.nclusters, 64)) * 2 - 1).float().numpy()
    criterion = S5VHLoss(centers, cfg.train).to(device)
    optimizer, _ = build_optimizer(cfg, model, criterion)
    features = torch.rand(1024, cfg.max_frames, cfg.feature_size, device=device)
    labels = LabelTable(torch.randint(0, len(centers), (1024,)), len(centers), device)
    step = TrainStep(model, criterion, optimizer, features, labels, 128)
    gen = epoch_generator(0, 0, device)

    def run(count):
        for _ in range(count):
            index = torch.randint(0, 1024, (128,), device=device, generator=gen)
            visible, masked = make_views(128, cfg.max_frames, cfg.train.mask_ratio, gen, device)
            step(index, visible, masked, cfg.train.smoothing_beta)
        synchronize(device)

    run(3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(steps)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    return table


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report.get("frames", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, _ in ENCODERS:
        pts = [r for r in rows if r["encoder"] == name and r.get("ms") is not None]
        if pts:
            axes[0].plot([r["frames"] for r in pts], [r["ms"] for r in pts], "o-", label=name)
            axes[1].plot([r["frames"] for r in pts], [r["peak_mib"] for r in pts], "o-", label=name)
    for ax, label in zip(axes, ("inference time (ms)", "peak GPU memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames per video (M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Encoder (small, d=256, 6 layers) on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["train", "eval", "frames"],
                        choices=["train", "eval", "frames", "profile"])
    parser.add_argument("--videos", type=int, default=9537)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, nargs="+",
                        default=[25, 100, 400, 1600, 6400, 25600, 102400])
    parser.add_argument("--frames-batch", type=int, default=4)
    parser.add_argument("--out", default=os.path.join("tools", "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark measures GPU speed; no CUDA device is available")
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    report_path = os.path.join(args.out, "benchmark.json")
    if os.path.exists(report_path):        # parts run separately add up to one report
        with open(report_path) as f:
            previous = json.load(f)
        if (previous.get("device"), previous.get("torch")) == (report["device"], report["torch"]):
            report = previous
    if "train" in args.parts:
        report["train"] = bench_training(device, args.videos, args.steps)
    if "eval" in args.parts:
        report["eval"] = bench_eval(device)
    if "frames" in args.parts:
        report["frames"] = bench_frames(device, args.frames, args.frames_batch)
    if "profile" in args.parts:
        report["profile"] = profile_step(device)
    write_json(report_path, report)
    if "frames" in report:
        plot(report, os.path.join(args.out, "encoder_vs_frames.png"))
    return report


if __name__ == "__main__":
    main()
