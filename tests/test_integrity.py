"""Integrity: bad input stops before any work with one line and exit code 2; run directories
belong to one run; kills leave nothing that a rerun or resume cannot repair; same inputs, config
and seed give the same result (docs/method.md §10)."""
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import eval as eval_script
import preprocess as preprocess_script
import train as train_script
from tests.conftest import DEMO_CONFIG, ROOT
from tests.test_training import TINY, make_tiny_demo
from utils.checkpoint import load_checkpoint
from utils.cli import run_cli
from utils.fileio import atomic_path, dir_lock, write_json


def options(root, *extra):
    return ["--cfg-options", f"data_root={str(root)!r}", f"work_dir={str(root / 'runs')!r}",
            *TINY, "train.num_epochs=2", *extra]


def run_script(script, argv, capsys):
    """(exit code, stderr) of an entry point called as its command line calls it."""
    capsys.readouterr()
    try:
        run_cli(lambda: script.main(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def listing(root):
    """Every file and folder under `root` (to see what a failed command left behind)."""
    return sorted(os.path.relpath(os.path.join(d, name), root)
                  for d, folders, files in os.walk(root) for name in folders + files)


@pytest.fixture
def data(tmp_path):
    make_tiny_demo(str(tmp_path))
    return tmp_path


def _rewrite(path, change):
    with h5py.File(path, "r") as f:
        feats = f["feats"][()]
    change(feats)
    os.remove(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("feats", data=feats)


def _nan_queries(root):
    _rewrite(root / "demo" / "demo_test_feats.h5", lambda x: x.__setitem__((3, 2, 1), np.nan))


def _huge_training_values(root):
    _rewrite(root / "demo" / "demo_train_feats.h5", lambda x: x.__setitem__((5, 0, 0), 3e30))


def _empty_labels(root):
    (root / "demo" / "demo_train_labels.mat").write_bytes(b"")


def _broken_config(root):
    (root / "broken.py").write_text(f"_base_ = {DEMO_CONFIG!r}\nnbits = (\n")


# (name, how to break the inputs, extra --cfg-options, config file, what the message must say)
BAD_INPUTS = [
    ("nbits=0", None, ["nbits=0"], None, "config key 'nbits' must be >= 1 and <= 4096, got 0"),
    ("nbits=-8", None, ["nbits=-8"], None, "config key 'nbits' must be >= 1 and <= 4096, got -8"),
    ("mask_ratio=1.0", None, ["train.mask_ratio=1.0"], None, "'train.mask_ratio' must be > 0"),
    ("mask_ratio=0", None, ["train.mask_ratio=0"], None, "'train.mask_ratio' must be > 0"),
    ("batch_size=0", None, ["train.batch_size=0"], None, "'train.batch_size' must be >= 2"),
    ("batch_size=1", None, ["train.batch_size=1"], None, "'train.batch_size' must be >= 2"),
    ("num_epochs=0", None, ["train.num_epochs=0"], None, "'train.num_epochs' must be >= 1"),
    ("topk with 0", None, ["eval.topk=(0, 5)"], None, "'eval.topk' must be a non-empty list"),
    ("mixer=gru", None, ["model.mixer='gru'"], None, "'model.mixer' must be one of"),
    ("resident_dtype", None, ["train.resident_dtype='int8'"], None,
     "'train.resident_dtype' must be one of"),
    ("variant=huge", None, ["model.variant='huge'"], None, "'model.variant' must be one of"),
    ("select=' val'", None, ["train.select=' val'"], None, "'train.select' must be one of"),
    ("val_fraction=0", None, ["train.val_fraction=0"], None, "'train.val_fraction' must be > 0"),
    ("unknown key", None, ["train.learning_rate=1"], None, "unknown config key 'train.learning_rate'"),
    ("syntax error", _broken_config, [], "broken.py", "broken.py (line 2): the config file does not run"),
    ("missing config", None, [], "nope.py", "config file not found"),
    ("0-byte .mat", _empty_labels, [], None, "demo_train_labels.mat: not a readable .mat file"),
    ("NaN in queries", _nan_queries, [], None,
     "demo_test_feats.h5 ['feats']: 1 NaN/Inf values in 1 videos (first at row 3)"),
    ("huge values", _huge_training_values, [], None,
     "demo_train_feats.h5 ['feats']: 1 values beyond ±1e+06 in 1 videos (first at row 5)"),
    ("wrong frame count", None, ["max_frames=9"], None, "expected 9 frames per video (max_frames)"),
    ("too many clusters", None, ["preprocess.nclusters=100"], None,
     "preprocess.nclusters=100 is larger than the number of training videos (48)"),
    ("missing file", None, ["data.query_feats='gone.h5'"], None, "feature file not found"),
    ("work dir under a file", None, ["work_dir='/etc/hostname/runs'"], None,
     "the work directory /etc/hostname/runs is not writable"),
    ("artifact dir under a file", None, ["preprocess.artifact_dir='/etc/hostname/a'"], None,
     "the artifact directory /etc/hostname/a is not writable"),
]


@pytest.mark.parametrize("name, breaks, extra, config, message", BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_stops_before_any_work(data, capsys, name, breaks, extra, config, message):
    if breaks:
        breaks(data)
    before = listing(data)
    config_path = str(data / config) if config else DEMO_CONFIG
    code, err = run_script(train_script, ["--config", config_path, "--no-progress",
                                          *options(data, *extra)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert listing(data) == before                  # no run directory, artifact or temporary


def test_read_only_directories_stop_before_any_work(data, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    os.chmod(data / "demo", 0o555)
    try:
        code, err = run_script(train_script, ["--config", DEMO_CONFIG, *options(data)], capsys)
    finally:
        os.chmod(data / "demo", 0o755)
    assert code == 2 and "artifact directory" in err and "not writable" in err


def test_a_read_only_data_directory_is_used_when_nothing_must_be_written(data, capsys,
                                                                        tmp_path_factory):
    items = [f"data_root={str(data)!r}", *TINY]
    preprocess_script.main(["--config", DEMO_CONFIG, "--cfg-options", *items])
    view = tmp_path_factory.mktemp("read_only")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(data), str(view)],
                      capture_output=True).returncode or os.access(view, os.W_OK) and \
            subprocess.run(["touch", str(view / "probe")], capture_output=True).returncode == 0:
        subprocess.run(["umount", str(view)], capture_output=True)
        pytest.skip("cannot make a read-only view of a directory here")
    try:
        argv = ["--config", DEMO_CONFIG, "--cfg-options", f"data_root={str(view)!r}", *TINY]
        assert preprocess_script.main(argv) == {"clusters": "reused", "centers": "reused"}
        code, err = run_script(preprocess_script, argv + ["seed=2"], capsys)
    finally:
        subprocess.run(["umount", str(view)])
    assert code == 2 and err == (f"error: the artifact directory {view / 'demo'} is not "
                                 f"writable: Read-only file system\n")


@contextlib.contextmanager
def small_file_system(path, size):
    """Mount a tmpfs of `size` (e.g. "64k") at `path` for the block; skip where mounting fails."""
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


def test_a_full_disk_is_one_line(data, capsys, tmp_path_factory):
    with small_file_system(tmp_path_factory.mktemp("small"), "200k") as small:
        code, err = run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                              *options(data, f"work_dir={str(small)!r}")], capsys)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err


def test_a_full_disk_leaves_no_scores_of_eval(data, capsys, tmp_path_factory):
    run_dir = _finished(data, capsys)
    with small_file_system(tmp_path_factory.mktemp("small"), "200k") as small:
        code, err = run_script(eval_script, ["--run", str(run_dir), "--out",
                                             str(small / "scores")], capsys)
        left = listing(small)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert left == []          # neither codes.npz nor eval.json, nor the folder made for them


def test_runs_whose_checkpoints_will_not_fit_stop_before_training(data, capsys,
                                                                   tmp_path_factory):
    argv = ["--config", DEMO_CONFIG, "--no-progress", "--bits", "16", "32"]
    with small_file_system(tmp_path_factory.mktemp("small"), "1m") as small:
        code, err = run_script(train_script, [*argv, *options(data, f"work_dir={str(small)!r}")],
                               capsys)
        left = listing(small)
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot write the checkpoints of 2 runs in {small}: No space left" in err
    assert left == []                                   # the fresh runs' folders are gone
    # the figure is an upper estimate of the most the two runs hold at once: best.pth, last.pth
    # and the next last.pth before it replaces the old one
    estimate = float(err.split("they need about ")[1].split(" MiB")[0]) * 2 ** 20
    assert run_script(train_script, [*argv, *options(data)], capsys)[0] == 0
    held = sum(os.path.getsize(data / "runs" / f"demo_{bits}bits" / "best.pth")
               + 2 * os.path.getsize(data / "runs" / f"demo_{bits}bits" / "last.pth")
               for bits in (16, 32))
    assert held <= estimate < 1.5 * held + 0.1 * 2 ** 20, (held, estimate)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, np.random.default_rng(0).bytes(4000),
                                     b"PK\x03\x04" + np.random.default_rng(1).bytes(4000),
                                     "truncated"],
                         ids=["empty", "zeros", "random", "zip-header", "truncated"])
def test_corrupt_checkpoints_are_one_line_naming_the_file(data, capsys, content):
    code, _ = run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                        *options(data)], capsys)
    run_dir = data / "runs" / "demo_16bits"
    best = run_dir / "best.pth"
    best.write_bytes(best.read_bytes()[:2000] if content == "truncated" else content)
    code, err = run_script(eval_script, ["--run", str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and str(best) in err
    assert "not a readable checkpoint" in err and "weights_only" not in err


def test_run_directories_belong_to_one_run(data, capsys):
    argv = ["--config", DEMO_CONFIG, "--no-progress", *options(data)]
    assert run_script(train_script, argv, capsys)[0] == 0
    run_dir = data / "runs" / "demo_16bits"
    first = json.loads((run_dir / "results.json").read_text())
    # a second fresh run into the finished directory stops, and changes nothing
    snapshot = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)}
    code, err = run_script(train_script, argv, capsys)
    assert code == 2 and f"run directory {run_dir} is not empty" in err
    assert {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)} == snapshot
    # resuming it says it is finished and prints its table; unsafe overrides are refused
    rows = train_script.main(["--resume", str(run_dir)])
    assert rows[0]["mAP"][5] == pytest.approx(first["test_mAP"]["5"])
    code, err = run_script(train_script, ["--resume", str(run_dir), "--cfg-options",
                                          "train.lr=0.1"], capsys)
    assert code == 2 and "train.lr cannot change on resume" in err
    code, err = run_script(train_script, ["--resume", str(run_dir), "--bits", "32"], capsys)
    assert code == 2 and "--bits" in err
    # --replace starts from an empty directory
    assert run_script(train_script, argv + ["--replace"], capsys)[0] == 0
    second = json.loads((run_dir / "results.json").read_text())
    assert second["run_id"] != first["run_id"] and second["test_mAP"] == first["test_mAP"]
    assert {json.loads(line)["run_id"] for line in open(run_dir / "log.jsonl")} == \
        {second["run_id"]}


def test_a_checkpoint_of_another_run_is_refused(data, capsys):
    from tests.test_training import interrupted_run, tiny_run_config
    cfg = tiny_run_config(data, "train.num_epochs=3")
    interrupted_run(cfg, str(data / "a"), 2)
    interrupted_run(cfg, str(data / "b"), 3)
    shutil.copy(data / "a" / "last.pth", data / "b" / "best.pth")    # same config, other run
    code, err = run_script(eval_script, ["--run", str(data / "b")], capsys)
    assert code == 2 and f"{data / 'b' / 'best.pth'} belongs to another run" in err
    shutil.copy(data / "b" / "last.pth", data / "a" / "last.pth")
    code, err = run_script(train_script, ["--resume", str(data / "a")], capsys)
    assert code == 2 and f"{data / 'a' / 'last.pth'} belongs to another run" in err


def test_a_second_run_into_a_locked_directory_stops(data, capsys):
    run_dir = data / "runs" / "demo_16bits"
    run_dir.mkdir(parents=True)
    with dir_lock(str(run_dir), "run directory"):
        code, err = run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                              *options(data), "--replace"], capsys)
    assert code == 2 and err == f"error: the run directory {run_dir} is in use by another " \
                                "process\n"


def test_the_run_directory_config_is_never_executed(data, capsys):
    assert run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                     *options(data)], capsys)[0] == 0
    run_dir = data / "runs" / "demo_16bits"
    marker = data / "executed"
    (run_dir / "config.py").write_text(f"open({str(marker)!r}, 'w')\n")   # never read
    config = run_dir / "config.json"
    record = json.loads(config.read_text())
    record["config"]["dataset"] = f"__import__('os').system('touch {marker}')"
    config.write_text(json.dumps(record))
    for script, argv in ((eval_script, ["--run", str(run_dir)]),
                         (train_script, ["--resume", str(run_dir)])):
        code, err = run_script(script, argv, capsys)
        assert code == 2 and "was edited after the run wrote it" in err
    config.write_text(config.read_text() + "\nimport os\n")
    code, err = run_script(eval_script, ["--run", str(run_dir)], capsys)
    assert code == 2 and "config.json: not a readable saved run config" in err
    assert not marker.exists()


def test_a_torn_last_log_line_is_dropped_and_a_broken_one_stops(data, capsys):
    from optim.run_dir import read_run_config
    from tests.test_training import interrupted_run, tiny_run_config
    cfg = tiny_run_config(data, "train.num_epochs=3")
    run_dir = data / "cut"
    interrupted_run(cfg, str(run_dir), 2)
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("{not json\n" + "\n".join(lines) + "\n")
    code, err = run_script(train_script, ["--resume", str(run_dir)], capsys)
    assert code == 2 and "log.jsonl: line 1 is not JSON" in err
    other = json.loads(lines[0])
    other["run_id"] = "someone-else"
    log.write_text(json.dumps(other) + "\n" + lines[1] + "\n")
    code, err = run_script(train_script, ["--resume", str(run_dir)], capsys)
    assert code == 2 and "line 1 belongs to another run ('someone-else'" in err
    log.write_text("\n".join(lines) + "\n" + lines[1][:17])          # a write cut off by a kill
    assert train_script.main(["--resume", str(run_dir), "--no-progress"])
    assert [json.loads(line)["epoch"] for line in open(log)] == [1, 2, 3]
    assert read_run_config(str(run_dir))[1]["run_id"] == json.loads(lines[0])["run_id"]


def test_written_files_follow_the_umask_and_json_is_strict(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(str(tmp_path / "r.json"), {"a": float("inf"), "b": np.float32(0.5), 3: [1]})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": 0.5, "3": [1]}
    with pytest.raises(RuntimeError), atomic_path(str(tmp_path / "x.bin")) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def _start_killed(code_before, argv):
    """Start an entry point in a child process that patches the library as `code_before` says."""
    program = (f"import os, signal, sys, runpy\n{code_before}\n"
               f"sys.argv = {argv!r}\nrunpy.run_path({argv[0]!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed(code_before, argv):
    """`_start_killed`, waited for: the finished process (returncode -9 when it was killed)."""
    child = _start_killed(code_before, argv)
    stdout, stderr = child.communicate(timeout=600)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


KILL_ON_THIRD_ARTIFACT = """
import dataset.preprocessing as target
original, calls = target.write_matrix, [0]
def patched(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
target.write_matrix = patched
"""


def test_preprocess_killed_while_replacing_a_set_reruns_to_the_uninterrupted_result(data):
    from dataset.io import read_matrix
    from tests.conftest import tiny_config
    items = [f"data_root={str(data)!r}", *TINY]
    assert preprocess_script.main(["--config", DEMO_CONFIG, "--cfg-options", *items])
    # seed 2 replaces the seed-1 set; killed after two of its four clustering files
    child = _killed(KILL_ON_THIRD_ARTIFACT, ["preprocess.py", "--config", DEMO_CONFIG, "--cfg-options",
                            *items, "seed=2"])
    assert child.returncode == -signal.SIGKILL, child.stderr
    # neither config accepts the mixed set; seed 1's clustering comes out as before, so its
    # recorded centers fit it again
    for seed, centers in ((1, "reused"), (2, "computed")):
        cfg = tiny_config(data, *TINY, f"seed={seed}")
        assert preprocess_script.main(["--config", DEMO_CONFIG, "--cfg-options", *items,
                                       f"seed={seed}"]) == {"clusters": "computed",
                                                            "centers": centers}
    reference = tiny_config(data, *TINY, "seed=2", f"preprocess.artifact_dir={str(data / 'ref')!r}")
    preprocess_script.main(["--config", DEMO_CONFIG, "--cfg-options", *items, "seed=2",
                            f"preprocess.artifact_dir={str(data / 'ref')!r}"])
    for name, key in (("nearest", "pos"), ("semantic", "matrix"), ("hash_center", "matrix")):
        assert np.array_equal(read_matrix(cfg.paths[name], key),
                              read_matrix(reference.paths[name], key)), name
    assert not [f for f in os.listdir(data / "demo") if f.endswith(".tmp")]


KILL_ON_THIRD_CHECKPOINT = """
original, saves = os.replace, [0]
def patched(src, dst):
    if str(dst).endswith("last.pth"):
        saves[0] += 1
        if saves[0] == 3:                 # the temporary is written, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    return original(src, dst)
os.replace = patched
"""


def test_training_killed_while_writing_a_checkpoint_resumes_to_the_uninterrupted_weights(data):
    argv = ["--config", DEMO_CONFIG, "--no-progress", *options(data, "train.num_epochs=4")]
    train_script.main(argv)
    shutil.move(str(data / "runs" / "demo_16bits"), str(data / "full"))
    child = _killed(KILL_ON_THIRD_CHECKPOINT, ["train.py", *argv])
    assert child.returncode == -signal.SIGKILL, child.stderr
    cut = data / "runs" / "demo_16bits"
    assert [f for f in os.listdir(cut) if f.startswith(".last.pth.") and f.endswith(".tmp")]
    assert load_checkpoint(str(cut / "last.pth"))["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in open(cut / "log.jsonl")] == [1, 2, 3]
    train_script.main(["--resume", str(cut), "--no-progress"])
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp")]
    a = load_checkpoint(str(data / "full" / "last.pth"))
    b = load_checkpoint(str(cut / "last.pth"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["label_table"]["table"], b["label_table"]["table"])
    assert [json.loads(line)["epoch"] for line in open(cut / "log.jsonl")] == [1, 2, 3, 4]


def test_same_inputs_config_and_seed_give_the_same_weights_on_cpu(data):
    from tests.test_training import tiny_run_config
    from optim.runner import start_run
    cfg = tiny_run_config(data, "train.num_epochs=3")
    first = start_run(cfg, str(data / "a"), progress=False)
    second = start_run(cfg, str(data / "b"), progress=False)
    assert first["test_mAP"] == second["test_mAP"]
    a, b = (load_checkpoint(str(data / name / "last.pth")) for name in ("a", "b"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["label_table"]["table"], b["label_table"]["table"])


# ---- second pass: silent wrong numbers, lost files, own files of the wrong shape ------------

def _finished(data, capsys, *extra):
    """A finished tiny run (2 epochs) in data/runs/demo_16bits."""
    argv = ["--config", DEMO_CONFIG, "--no-progress", *options(data, *extra)]
    assert run_script(train_script, argv, capsys)[0] == 0
    return data / "runs" / "demo_16bits"


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _cut(data, name="cut", epochs=3, after=1):
    """A run of `epochs` epochs that died after epoch `after` (saved every epoch)."""
    from tests.test_training import interrupted_run, tiny_run_config
    cfg = tiny_run_config(data, f"train.num_epochs={epochs}")
    interrupted_run(cfg, str(data / name), after)
    return data / name


def _rewrite_record(path, change):
    """Edit a saved config.json and stamp the fingerprint again, as a determined user could."""
    from utils.config import config_fingerprint
    record = json.loads(path.read_text())
    change(record)
    record["fingerprint"] = config_fingerprint(record["config"])
    path.write_text(json.dumps(record))


def test_a_run_is_bound_to_the_inputs_it_started_with(data, capsys):
    cut = _cut(data)
    before = _snapshot(cut)
    _rewrite(data / "demo" / "demo_train_feats.h5", lambda x: x.__setitem__((30, 1, 2), 0.25))
    code, err = run_script(train_script, ["--resume", str(cut)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "demo_train_feats.h5 is not the file this run started with" in err
    assert _snapshot(cut) == before                       # not touched, not retrained
    # eval.py --run of a finished run whose query labels changed
    run_dir = _finished(data, capsys)
    labels = data / "demo" / "demo_test_labels.mat"
    from dataset.io import read_labels, write_labels
    changed = read_labels(str(labels))[::-1]
    write_labels(str(labels), changed)
    code, err = run_script(eval_script, ["--run", str(run_dir)], capsys)
    assert code == 2 and "demo_test_labels.mat is not the file this run started with" in err
    assert not (run_dir / "eval.json").exists()


def test_an_unchanged_input_is_hashed_once_and_a_changed_one_again(tmp_path, monkeypatch):
    from utils import content_hash
    reads = []
    real = content_hash.sha256_of
    monkeypatch.setattr(content_hash, "sha256_of", lambda path: reads.append(path) or real(path))
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    first = content_hash.file_sha256(str(path))
    assert content_hash.file_sha256(str(path)) == first and len(reads) == 1
    path.write_bytes(b"b" * 1000)                          # same size, new content
    os.utime(path, ns=(1, 1))                              # an identity nothing else has
    assert content_hash.file_sha256(str(path)) != first and len(reads) == 2


def test_non_finite_weights_are_never_scored_or_resumed(data, capsys):
    run_dir = _finished(data, capsys)
    best = run_dir / "best.pth"
    payload = torch.load(best, weights_only=True)
    key = next(iter(payload["model"]))
    payload["model"][key][0, 0] = float("nan")
    torch.save(payload, best)
    code, err = run_script(eval_script, ["--run", str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{best}: 1 non-finite values (NaN/Inf) in its weights, first in '{key}'" in err
    assert not (run_dir / "eval.json").exists() and not (run_dir / "codes.npz").exists()
    cut = _cut(data)
    last = torch.load(cut / "last.pth", weights_only=True)
    last["model"][key].fill_(float("inf"))
    torch.save(last, cut / "last.pth")
    code, err = run_script(train_script, ["--resume", str(cut)], capsys)
    assert code == 2 and "non-finite values (NaN/Inf) in its weights" in err


@pytest.mark.parametrize("foreign", ["notes.txt", "config.json", "sub/"])
def test_replace_empties_only_a_run_of_this_project(data, capsys, foreign):
    run_dir = data / "runs" / "demo_16bits"
    run_dir.mkdir(parents=True)
    if foreign.endswith("/"):
        (run_dir / foreign).mkdir()
    else:
        (run_dir / foreign).write_text('{"mine": 1}')
    before = listing(data)
    code, err = run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                          *options(data), "--replace"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"holds files that are not a run of this project ({foreign.rstrip('/')})" in err
    assert listing(data) == before
    # a finished run with one foreign file beside it is not emptied either
    shutil.rmtree(run_dir)
    finished = _finished(data, capsys)
    (finished / "my_plot.png").write_bytes(b"png")
    code, err = run_script(train_script, ["--config", DEMO_CONFIG, "--no-progress",
                                          *options(data), "--replace"], capsys)
    assert code == 2 and "(my_plot.png)" in err and (finished / "my_plot.png").exists()


def test_saved_config_values_cannot_name_files_elsewhere(data, capsys):
    cut = _cut(data)
    victim = data / "victim.h5"
    victim.write_bytes(b"precious")
    _rewrite_record(cut / "config.json", lambda r: r["config"]["preprocess"]["artifacts"]
                    .__setitem__("semantic", "../victim.h5"))
    for script, argv in ((train_script, ["--resume", str(cut)]),
                         (eval_script, ["--run", str(cut)])):
        code, err = run_script(script, argv, capsys)
        assert code == 2 and "'preprocess.artifacts.semantic' must be a plain file name" in err
    assert victim.read_bytes() == b"precious"


def test_a_run_saved_before_a_key_existed_evaluates_and_resumes(data, capsys, caplog):
    def predate(record):
        del record["config"]["train"]["checkpoint_seconds"]
        del record["inputs"]                              # older runs recorded none

    run_dir = _finished(data, capsys)
    _rewrite_record(run_dir / "config.json", predate)
    with caplog.at_level("INFO", logger="s5vh"):
        rows = eval_script.main(["--run", str(run_dir)])
    assert rows[0]["mAP"][5] == pytest.approx(
        json.loads((run_dir / "results.json").read_text())["test_mAP"]["5"])
    assert "was saved before the keys train.checkpoint_seconds existed" in caplog.text
    cut = _cut(data)
    _rewrite_record(cut / "config.json", predate)
    assert train_script.main(["--resume", str(cut), "--no-progress"])
    assert [json.loads(line)["epoch"] for line in open(cut / "log.jsonl")] == [1, 2, 3]


def test_tools_reuse_a_run_when_only_non_result_keys_change(data):
    from optim.runner import plan_run
    from tests.test_training import tiny_run_config
    cut = _cut(data)
    job = plan_run(tiny_run_config(data, "train.num_epochs=3", "train.log_every=7",
                                   "eval.query_chunk=3"), str(cut))
    assert job.record is not None and not job.replace          # resumed, not replaced
    job = plan_run(tiny_run_config(data, "train.num_epochs=3", "train.lr=1e-3"), str(cut))
    assert job.record is None and job.replace


def test_a_full_disk_while_preprocessing_is_one_line(data, capsys, tmp_path_factory):
    with small_file_system(tmp_path_factory.mktemp("small_artifacts"), "64k") as small:
        code, err = run_script(preprocess_script, ["--config", DEMO_CONFIG, "--cfg-options",
                                                   f"data_root={str(data)!r}", *TINY,
                                                   f"preprocess.artifact_dir={str(small)!r}"],
                               capsys)
        left = os.listdir(small)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert left == []


@pytest.mark.parametrize("script, argv, message", [
    (eval_script, ["--method", "lsh", "--bits", "0"], "--bits must be between 1 and 4096, got 0"),
    (eval_script, ["--method", "lsh", "--bits", "-8"], "--bits must be between 1 and 4096, got -8"),
    (eval_script, ["--method", "itq", "--bits", "16", "16"], "--bits lists 16 more than once"),
    (train_script, ["--bits", "16", "16"], "--bits lists 16 more than once"),
    (train_script, ["--seeds", "1", "2", "1"], "--seeds lists 1 more than once"),
    (train_script, ["--bits", "100000"], "config key 'nbits' must be >= 1 and <= 4096"),
])
def test_command_line_lists_are_checked_before_any_work(data, capsys, script, argv, message):
    before = listing(data)
    code, err = run_script(script, ["--config", DEMO_CONFIG, *argv, *options(data)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert listing(data) == before


def _results(run_dir, **changes):
    """Write a results.json of the run in `run_dir` as a finished run writes it, with `changes`."""
    record = json.loads((run_dir / "config.json").read_text())
    train = record["config"]["train"]
    results = {"run_id": record["run_id"], "config_fingerprint": record["fingerprint"],
               "selection": train["select"], "nbits": record["config"]["nbits"],
               "epochs": train["num_epochs"], "selected_epoch": train["num_epochs"],
               "selection_score_mAP@5": None, "test_mAP": {"5": 0.5}, "runtime": {}}
    (run_dir / "results.json").write_text(json.dumps({**results, **changes}))


def _damage(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("name, damage, message", [
    ("record not an object", lambda run, demo: (demo / "preprocess_record.json").write_text("[]"),
     "preprocess_record.json: its contents must be an object, got list"),
    ("record field", lambda run, demo: (demo / "preprocess_record.json").write_text(
        '{"complete": "yes", "inputs": {}, "files": {}}'),
     "preprocess_record.json: 'complete' must be bool, got str"),
    ("results.json", lambda run, demo: (run / "results.json").write_text('{"run_id": 3}'),
     "results.json: 'run_id' must be str, got int"),
    ("results.json cut-offs", lambda run, demo: _results(run, test_mAP={"five": 0.5}),
     "results.json ['test_mAP']: expected cut-offs R as keys, got ['five']"),
    ("results.json values", lambda run, demo: _results(run, test_mAP={"5": "high"}),
     "results.json ['test_mAP']: expected a number in [0, 1] for every cut-off, got ['high']"),
    ("log line", lambda run, demo: (run / "log.jsonl").write_text(
        (run / "log.jsonl").read_text().replace('"epoch": 1,', '"epoch": "1",', 1)),
     "log.jsonl: line 1: 'epoch' must be int, got str"),
    ("checkpoint part missing", lambda run, demo: _damage(run / "last.pth",
                                                          lambda p: p.pop("optimizer")),
     "last.pth: 'optimizer' is missing"),
    ("checkpoint part of the wrong type", lambda run, demo: _damage(
        run / "last.pth", lambda p: p.__setitem__("label_table", {"table": [1, 2]})),
     "last.pth: 'label_table.table' must be Tensor, got list"),
    ("checkpoint epoch beyond the schedule", lambda run, demo: _damage(
        run / "last.pth", lambda p: p.__setitem__("epoch", 99)),
     "last.pth: epoch 99 lies outside this run's schedule of 3 epochs"),
    ("checkpoint of another model size", lambda run, demo: _damage(
        run / "last.pth", lambda p: p["model"].__setitem__(
            "encoder.embed.weight", torch.zeros(32, 16))),
     "last.pth: its weights do not fit the model (Error(s) in loading state_dict"),
])
def test_own_files_of_the_wrong_shape_are_one_line(data, capsys, name, damage, message):
    cut = _cut(data)
    if "results" in name:
        (cut / "results.json").write_text("{}")
    damage(cut, data / "demo")
    code, err = run_script(train_script, ["--resume", str(cut)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_run_records_that_disagree_with_the_run_are_one_line(data, capsys):
    cut = _cut(data)
    config = (cut / "config.json").read_text()
    for damage, message in (
            (lambda: _results(cut, test_mAP={"5": 1.5}),
             "results.json ['test_mAP']: expected a number in [0, 1] for every cut-off, got [1.5]"),
            (lambda: _results(cut, nbits=64),
             "results.json ['nbits'] is 64, but the run's config.json says 16"),
            (lambda: _results(cut, selection="test"),
             "results.json ['selection'] is 'test', but the run's config.json says 'last'"),
            (lambda: _results(cut, selected_epoch=4),
             "results.json ['selected_epoch']: expected an epoch in 1..3, got 4"),
            (lambda: _results(cut, config_fingerprint="0" * 16),
             "results.json ['config_fingerprint'] is '0000000000000000', but the run's "
             "config.json"),
            (lambda: (cut / "config.json").write_text(json.dumps(
                {**json.loads(config), "inputs": "none"})),
             "config.json: 'inputs' must be dict, got str"),
            (lambda: (cut / "config.json").write_text(json.dumps(
                {**json.loads(config), "inputs": {"train_feats": {}}})),
             "config.json: 'inputs.train_feats.path' is missing")):
        (cut / "results.json").unlink(missing_ok=True)
        (cut / "config.json").write_text(config)
        damage()
        code, err = run_script(train_script, ["--resume", str(cut)], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


KILL_WITH_SIGNAL_AFTER_EPOCH_2 = """
import optim.runner as target
original = target.end_epoch
def patched(run, epoch, *args):
    original(run, epoch, *args)
    if epoch == 1:
        os.kill(os.getpid(), signal.{signal})
target.end_epoch = patched
"""


def test_a_signal_saves_and_gives_the_resume_command(data):
    argv = ["--config", DEMO_CONFIG, "--no-progress", *options(
        data, "train.num_epochs=4", "train.checkpoint_seconds=1000")]
    train_script.main([*argv, "--work-dir", str(data / "full")])
    signals = ("SIGINT", "SIGTERM")
    children = [_start_killed(KILL_WITH_SIGNAL_AFTER_EPOCH_2.replace("{signal}", name),
                              ["train.py", *argv, "--work-dir", str(data / name)])
                for name in signals]                    # at once: each waits on its start
    for name, child in zip(signals, children):
        _, stderr = child.communicate(timeout=600)
        run_dir = data / name / "demo_16bits"
        assert child.returncode == 2, stderr
        assert stderr.count("\n") == 1 and stderr.startswith(f"error: interrupted by {name}")
        assert f"continue with: python train.py --resume {run_dir}" in stderr
        assert load_checkpoint(str(run_dir / "last.pth"))["epoch"] == 2
        train_script.main(["--resume", str(run_dir), "--no-progress"])
        a, b = (load_checkpoint(str(d / "demo_16bits" / "last.pth"))
                for d in (data / "full", data / name))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)


def _catches(pid, signum):
    """Whether the process `pid` has a handler for `signum` (Linux: its SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_signal_during_the_imports_or_the_exit_is_one_line(data):
    argv = ["train.py", "--config", DEMO_CONFIG, "--no-progress", *options(data)]
    # once the command has ended, while the interpreter exits: after a run, and after a failure
    # (torchrun signals the processes left when one fails), which has said its one line
    at_exit = "import atexit\natexit.register(os.kill, os.getpid(), signal.SIGTERM)"
    ended = _start_killed(at_exit, argv)
    failed = _start_killed(at_exit, [*argv, "train.lr=-1"])
    # while torch and the library are imported
    child = subprocess.Popen([sys.executable, *argv, "--work-dir", str(data / "early")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while child.poll() is None and not _catches(child.pid, signal.SIGTERM):
        time.sleep(0.002)                   # its first lines install the handler
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: interrupted by SIGTERM; the command had not started")
    assert not (data / "early").exists()
    stdout, stderr = ended.communicate(timeout=600)
    assert ended.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: interrupted by SIGTERM; the command had ended")
    assert "s5vh (last)" in stdout and (data / "runs" / "demo_16bits" / "results.json").exists()
    _, stderr = failed.communicate(timeout=600)
    assert failed.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: config key 'train.lr' must be > 0")


def test_eval_clears_the_leftovers_of_a_killed_eval(data, capsys):
    run_dir = _finished(data, capsys)
    for name in (".eval.json.x1y2.tmp", ".codes.npz.ab12.tmp"):
        (run_dir / name).write_bytes(b"half")
    assert run_script(eval_script, ["--run", str(run_dir)], capsys)[0] == 0
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    assert (run_dir / "eval.json").exists()


def test_an_error_message_is_one_short_line(data, capsys):
    huge = "x" * 5_000_000
    code, err = run_script(train_script, ["--config", DEMO_CONFIG, "--cfg-options",
                                          f"train.select={huge!r}"], capsys)
    assert code == 2 and err.count("\n") == 1 and len(err) < 700


def test_eval_never_writes_into_another_runs_directory(data, capsys):
    for seed in (1, 2):
        train_script.main(["--config", DEMO_CONFIG, "--no-progress", "--work-dir",
                           str(data / f"runs{seed}"), *options(data, f"seed={seed}")])
    first, second = (data / f"runs{seed}" / "demo_16bits" for seed in (1, 2))
    before = listing(second)
    for argv in (["--run", str(first), "--out", str(second)],
                 ["--run", str(second), "--out", str(second), "--checkpoint",
                  str(first / "best.pth")]):
        code, err = run_script(eval_script, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "is a run directory" in err, err
    assert listing(second) == before
    code, _ = run_script(eval_script, ["--run", str(second), "--out", str(second)], capsys)
    assert code == 0 and "eval.json" in os.listdir(second)


def test_nothing_is_written_inside_a_run_directory(data, capsys):
    from tools import paper
    run_dir = _finished(data, capsys)
    before = listing(run_dir)
    for script, argv in (
            (train_script, ["--config", DEMO_CONFIG, "--no-progress", "--work-dir",
                            str(run_dir), *options(data)]),
            (paper, ["main", "--config", DEMO_CONFIG, "--no-progress", "--seeds", "1", "--bits",
                     "16", "--out", str(run_dir), *options(data)]),
            (paper, ["main", "--config", DEMO_CONFIG, "--no-progress", "--seeds", "1", "--bits",
                     "16", "--out", str(run_dir / "tables"), *options(data)]),
            (eval_script, ["--run", str(run_dir), "--out", str(run_dir / "scores")])):
        code, err = run_script(script, argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"lies in the run directory {run_dir}, which holds its run's files only" in err
    assert listing(run_dir) == before



def test_a_usage_error_is_one_line(capsys):
    from tools import paper, search
    for script, argv in ((train_script, ["--nope"]), (eval_script, ["--bits", "x"]),
                         (paper, ["nope"]), (paper, ["sweep", "--config"]),
                         (search, ["--index", "i.npz"])):
        code, err = run_script(script, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: python "), err
