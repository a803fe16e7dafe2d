"""Several GPUs, measured (docs/method.md §14): one run on 1 and N GPUs, a table of runs on 1 and
N GPUs, and the losses of one run trained by N processes against one; prints every figure and
writes JSON.

    python -m tools.bench_distributed --gpus 2 --epochs 10 --out tools/results/ddp_h200

Every run is started as a user starts it (`python train.py`, `torchrun --nproc-per-node N
train.py`) on the synthetic UCF-size set of tools.benchmark, CUDA_VISIBLE_DEVICES choosing the
GPUs; wall time is the command's, start-up and evaluation included (the preprocessing artifacts
are made once beforehand and timed apart).

one run: 64 bits, --epochs epochs, warm-up scaled as 50 of 350; one process on one GPU with the
  default step (CUDA graphs), one process with eager steps (what every DDP process runs), and N
  processes. Steady seconds per epoch from the run's log; 350 epochs extrapolated from the wall
  time outside the epochs plus 350 steady epochs.
equality: float32 (train.amp=False), eager, --equal-epochs epochs: the largest difference
  over the epochs (absolute, and relative to the largest value) of each logged loss and of the
  label-table drift between N processes and one, and the test mAP of both.
table: 16/32/64 bits x seeds 1-3 in one `train.py` on 1 GPU and on N GPUs (round-robin): wall
  time, whether every run's test mAP is the same wherever it ran, and (with `one`) the nine
  runs together on one GPU against nine times the one run alone.
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import json
import os
import socket
import statistics
import subprocess
import sys
import time

from optim.run_dir import read_log
from tools.benchmark import synthetic_ucf
from utils.cli import command_parser, run_cli
from utils.errors import UserError
from utils.fileio import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UCF_CONFIG = os.path.join("configs", "S5VH", "ucf.py")
LOSS_KEYS = ("loss", "rec", "con", "ca", "label_changed", "label_entropy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, gpus, processes, argv):
    """Run `script` on the first `gpus` GPUs with `processes` processes (torchrun when more
    than one); its wall seconds. Stops with the command's output when it fails."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))),
           "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run",
                   f"--nproc-per-node={processes}", "--master-addr=127.0.0.1",
                   f"--master-port={free_port()}", script, *argv]
    else:
        command = [sys.executable, script, *argv]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise UserError(f"{' '.join(command)} failed ({done.returncode}):\n"
                        f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return wall


def only_run(work):
    """The one run directory under `work`."""
    names = os.listdir(work)
    if len(names) != 1:
        raise UserError(f"{work}: expected one run directory, found {names}")
    return os.path.join(work, names[0])


def read_results(run_dir):
    return read_json(os.path.join(run_dir, "results.json"), "run results")


def run_log(run_dir):
    """The finished run's log records (checked, as resume reads them)."""
    return read_log(os.path.join(run_dir, "log.jsonl"), read_results(run_dir)["run_id"])


def common_options(data_root, work_dir, epochs, *extra):
    return ["--config", UCF_CONFIG, "--no-progress", "--cfg-options",
            f"data_root={data_root!r}", f"work_dir={work_dir!r}", f"train.num_epochs={epochs}",
            f"train.warm_up_epoch={max(1, round(epochs * 50 / 350))}", *extra]


def one_run(name, processes, data_root, work_dir, epochs, *extra):
    """Wall time, steady epoch and the 350-epoch estimate of one 64-bit run trained by
    `processes` processes, one GPU each."""
    work = os.path.join(work_dir, name)
    wall = launch("train.py", processes, processes,
                  common_options(data_root, work, epochs, "nbits=64", *extra) + ["--replace"])
    run_dir = only_run(work)
    log = run_log(run_dir)
    seconds = [r["train_seconds"] for r in log]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    outside = wall - sum(seconds)
    figures = {"processes": processes, "epochs": epochs, "wall_s": round(wall, 2),
               "steady_epoch_s": round(steady, 4), "outside_epochs_s": round(outside, 2),
               "estimated_350_epochs_s": round(outside + seconds[0] + 349 * steady, 1),
               "test_mAP": read_results(run_dir)["test_mAP"]}
    print(json.dumps({name: figures}), flush=True)
    return figures


def equality(processes, data_root, work_dir, epochs):
    """Losses of one float32 run trained by `processes` processes against one process."""
    extra = ("nbits=64", "train.amp=False", "train.cuda_graphs=False")
    logs, maps = [], []
    for count in (1, processes):
        work = os.path.join(work_dir, f"equality_{count}")
        launch("train.py", count, count, common_options(data_root, work, epochs, *extra)
               + ["--replace"])
        logs.append(run_log(only_run(work)))
        maps.append(read_results(only_run(work))["test_mAP"])
    one, many = logs
    worst = {}
    for key in LOSS_KEYS:
        difference = max(abs(b[key] - a[key]) for a, b in zip(one, many))
        scale = max(abs(a[key]) for a in one)
        worst[key] = {"absolute": difference, "relative": difference / scale if scale else None}
    figures = {"processes": processes, "epochs": epochs, "dtype": "float32",
               "largest_difference": worst,
               "per_epoch": [{key: [a[key], b[key]] for key in LOSS_KEYS} for a, b in
                             zip(one, many)],
               "test_mAP": {"one": maps[0], str(processes): maps[1]}}
    print(json.dumps({"equality": {k: v for k, v in figures.items() if k != "per_epoch"}}),
          flush=True)
    return figures


def table(gpus, data_root, work_dir, epochs):
    """Nine runs (16/32/64 bits x seeds 1-3) in one train.py on 1 GPU and on `gpus`."""
    figures, maps = {}, {}
    for count in (1, gpus):
        work = os.path.join(work_dir, f"table_{count}gpu")
        wall = launch("train.py", count, 1, common_options(data_root, work, epochs)
                      + ["--bits", "16", "32", "64", "--seeds", "1", "2", "3", "--replace"])
        maps[count] = {name: read_results(os.path.join(work, name))["test_mAP"]
                       for name in sorted(os.listdir(work))}
        figures[f"{count}_gpu"] = {"wall_s": round(wall, 2), "runs": len(maps[count])}
        print(json.dumps({f"table on {count} GPU": figures[f"{count}_gpu"]}), flush=True)
    figures["speedup"] = round(figures["1_gpu"]["wall_s"] / figures[f"{gpus}_gpu"]["wall_s"], 2)
    figures["same_test_mAP_wherever_run"] = maps[1] == maps[gpus]
    figures["test_mAP"] = maps[gpus]
    print(json.dumps({"table": {k: figures[k] for k in ("speedup",
                                                        "same_test_mAP_wherever_run")}}),
          flush=True)
    return figures


def main(argv=None):
    parser = command_parser("python -m tools.bench_distributed", __doc__)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (and DDP processes) to use")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each timed run")
    parser.add_argument("--equal-epochs", type=int, default=3,
                        help="epochs of the float32 equality runs")
    parser.add_argument("--parts", nargs="+", default=["one", "table", "equality"],
                        choices=["one", "table", "equality"])
    parser.add_argument("--data", default=os.path.join("work_dirs", "bench_data"))
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "bench_distributed"))
    parser.add_argument("--out", default=os.path.join("tools", "results"))
    args = parser.parse_args(argv)
    import torch
    if torch.cuda.device_count() < args.gpus:
        raise UserError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs are visible")
    data_root = os.path.dirname(synthetic_ucf(os.path.abspath(args.data)))
    work_dir = os.path.abspath(args.work_dir)
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": args.gpus,
              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    for bits in (16, 32, 64):                  # the artifacts once, outside every timed run
        start = time.perf_counter()
        launch("preprocess.py", 1, 1, ["--config", UCF_CONFIG, "--cfg-options",
                                       f"data_root={data_root!r}", f"nbits={bits}"])
        report[f"preprocess_{bits}bits_s"] = round(time.perf_counter() - start, 2)
    if "one" in args.parts:
        one = {}
        for label, name, processes, extra in (
                ("1 GPU, CUDA graphs (default)", "one_gpu", 1, ()),
                ("1 GPU, eager steps", "one_gpu_eager", 1, ("train.cuda_graphs=False",)),
                (f"{args.gpus} GPUs, DDP", f"ddp_{args.gpus}", args.gpus, ())):
            one[label] = one_run(name, processes, data_root, work_dir, args.epochs, *extra)
        ddp = one[f"{args.gpus} GPUs, DDP"]["steady_epoch_s"]
        one["ddp_speedup_over_eager_1gpu"] = round(
            one["1 GPU, eager steps"]["steady_epoch_s"] / ddp, 2)
        one["ddp_efficiency_over_eager_1gpu"] = round(one["ddp_speedup_over_eager_1gpu"]
                                                      / args.gpus, 2)
        one["ddp_speedup_over_default_1gpu"] = round(
            one["1 GPU, CUDA graphs (default)"]["steady_epoch_s"] / ddp, 2)
        report["one_run"] = one
        print(json.dumps({k: v for k, v in one.items() if k.startswith("ddp")}), flush=True)
    if "table" in args.parts:
        report["table"] = table(args.gpus, data_root, work_dir, args.epochs)
        if "one_run" in report:           # nine runs in one process against nine one by one
            alone = 9 * report["one_run"]["1 GPU, CUDA graphs (default)"]["wall_s"]
            report["table"]["nine_alone_over_together_1gpu"] = round(
                alone / report["table"]["1_gpu"]["wall_s"], 2)
    if "equality" in args.parts:
        report["equality"] = equality(args.gpus, data_root, work_dir, args.equal_epochs)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"bench_distributed_{args.gpus}gpu.json"), report)


if __name__ == "__main__":
    run_cli(main)
