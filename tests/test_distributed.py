"""One run trained by two processes (torchrun, gloo, on the CPU) against the same run trained by
one: the same global batches, so the same losses epoch by epoch and the same weights within
float rounding (the gradients are summed in another order); only the first process writes."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEMO_CONFIG, ROOT
from tests.test_training import TINY, make_tiny_demo
from utils.checkpoint import load_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(processes, argv, env_extra=None):
    """train.py under torchrun with `processes` processes, started in the background."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "train.py", *argv]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(child):
    """The finished child as subprocess.run returns it."""
    stdout, stderr = child.communicate(timeout=600)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def torchrun(processes, argv, env_extra=None):
    return finish(start_torchrun(processes, argv, env_extra))


def options(root, work, *extra):
    return ["--config", DEMO_CONFIG, "--no-progress", "--cfg-options",
            f"data_root={str(root)!r}", f"work_dir={str(root / work)!r}", *TINY,
            "train.num_epochs=3", "train.select='val'", "train.eval_every=1",
            "train.batch_size=20", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_tiny_demo(str(root))
    started = [start_torchrun(1, options(root, "one")), start_torchrun(2, options(root, "two"))]
    one, two = (finish(child) for child in started)        # at once: each waits on its start
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return root, two


def test_two_processes_train_what_one_trains(runs):
    root, _ = runs
    logs = [[json.loads(line) for line in open(root / work / "demo_16bits" / "log.jsonl")]
            for work in ("one", "two")]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):               # 48 videos in batches of 20: the last splits 4 + 4
        for key in ("loss", "rec", "con", "ca", "label_changed", "label_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
        for k, v in a["val_mAP"].items():
            assert b["val_mAP"][k] == pytest.approx(v, abs=1e-6)
    a, b = (load_checkpoint(str(root / work / "demo_16bits" / "last.pth"))
            for work in ("one", "two"))
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5), key
    assert torch.allclose(a["label_table"]["table"], b["label_table"]["table"], atol=1e-5)


def test_only_the_first_process_writes_and_prints(runs):
    root, two = runs
    assert sorted(os.listdir(root / "two" / "demo_16bits")) == [
        "best.pth", "config.json", "last.pth", "log.jsonl", "results.json", "run.log"]
    assert two.stdout.count("Test mAP@R on demo") == 1
    assert two.stdout.count("training 48 videos") == 1


def test_a_batch_that_does_not_split_is_one_line(tmp_path):
    make_tiny_demo(str(tmp_path))
    child = torchrun(2, options(tmp_path, "odd", "train.batch_size=15"))
    errors = [line for line in child.stderr.splitlines() if line.startswith("error: ")]
    assert child.returncode != 0 and errors
    assert all(line == "error: train.batch_size=15 does not split over 2 processes; choose a "
                       "multiple of 2" for line in errors)
    assert not (tmp_path / "odd").exists()


KILL_RANK_1_AFTER_EPOCH_1 = """
import os, runpy, signal, sys
import optim.runner as target
original = target.end_epoch
def patched(run, epoch, *args):
    original(run, epoch, *args)
    if epoch == 0 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
target.end_epoch = patched
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_process_that_dies_stops_the_others_and_the_run_resumes(runs, tmp_path):
    root, _ = runs
    wrapper = tmp_path / "killing.py"
    wrapper.write_text(KILL_RANK_1_AFTER_EPOCH_1)
    argv = options(root, "killed", "train.process_timeout=10")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                            str(wrapper), *argv], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    errors = [line for line in child.stderr.splitlines() if line.startswith("error: ")]
    assert child.returncode != 0 and len(errors) == 1, child.stderr[-2000:]
    assert "another process of this run stopped or does not answer" in errors[0]
    run_dir = root / "killed" / "demo_16bits"
    assert f"--resume {run_dir}" in errors[0]
    assert load_checkpoint(str(run_dir / "last.pth"))["epoch"] == 1
    resumed = torchrun(2, ["--resume", str(run_dir), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(str(root / "two" / "demo_16bits" / "last.pth"))
    b = load_checkpoint(str(run_dir / "last.pth"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_runs_go_round_robin_over_the_visible_gpus(monkeypatch, tmp_path):
    from optim import runner
    from tests.test_training import tiny_run_config
    cfg = tiny_run_config(tmp_path, "train.device='cuda'")
    jobs = [runner.Job(cfg, str(tmp_path / str(i))) for i in range(5)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [str(d) for d in runner.place_runs(jobs)] == ["cuda:0", "cuda:1", "cuda:0",
                                                         "cuda:1", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert {str(d) for d in runner.place_runs(jobs)} == {"cuda"}
    cpu = [runner.Job(tiny_run_config(tmp_path), str(tmp_path / "cpu"))]
    assert [str(d) for d in runner.place_runs(cpu)] == ["cpu"]
