"""tools.paper: every experiment end to end on a tiny data set, with outputs of the promised
structure and sane values; monitoring without selection; the ablation switches."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dataset.hash_centers import initial_centers
from dataset.io import read_matrix
from optim.runner import start_run
from tests.conftest import DEMO_CONFIG
from tests.test_training import TINY, make_tiny_demo, tiny_run_config
from tools import paper
from utils.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("paper")
    make_tiny_demo(str(path))
    return path


def call(root, experiment, *extra):
    options = [f"data_root={str(root)!r}", *TINY, "train.num_epochs=2"]
    return paper.main([experiment, "--config", DEMO_CONFIG, "--out", str(root / "out"),
                       *extra, "--cfg-options", *options])


def output(root, name):
    return json.loads((root / "out" / f"{name}.json").read_text())


def test_monitoring_logs_map_without_changing_the_selection(tmp_path):
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=3", "train.monitor='test'",
                          "train.eval_every=1")
    results = start_run(cfg, str(tmp_path / "run"), progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [sorted(r["test_mAP"]) for r in log] == [sorted(map(str, cfg.eval.topk))] * 3
    assert results["selection"] == "last" and results["selected_epoch"] == 3
    assert results["test_mAP"][5] == pytest.approx(log[-1]["test_mAP"]["5"])
    cfg = tiny_run_config(tmp_path, "train.num_epochs=2", "train.monitor='val'",
                          "train.select='test'", "train.eval_every=2")
    start_run(cfg, str(tmp_path / "both"), progress=False)
    last = [json.loads(line) for line in open(tmp_path / "both" / "log.jsonl")][-1]
    assert {"val_mAP", "test_mAP"} <= set(last)


def test_main_table_and_reuse_of_finished_runs(root, caplog):
    rows = call(root, "main", "--bits", "16", "--seeds", "1", "2")
    assert [(r["method"], r["nbits"]) for r in rows] == [("s5vh", 16), ("itq", 16), ("lsh", 16)]
    for row in rows:
        assert len(row["per_seed"]) == 2
        assert all(0 <= v <= 1 for v in row["mean"].values())
        values = [s[20] for s in row["per_seed"]]
        assert row["mean"][20] == pytest.approx(np.mean(values))
        assert row["std"][20] == pytest.approx(np.std(values, ddof=1))
    table = (root / "out" / "main.md").read_text()
    assert "selection: last" in table and "S5VH (last)" in table and "± " in table
    saved = output(root, "main")
    assert saved["seeds"] == [1, 2] and saved["published"] == {}   # demo: no published numbers
    run_ids = [json.loads((root / "out" / "runs" / f"s5vh_16bits_seed{s}" / "results.json")
                          .read_text())["run_id"] for s in (1, 2)]
    caplog.clear()
    again = call(root, "main", "--bits", "16", "--seeds", "1", "2")
    assert "the run is already finished" in caplog.text and "epoch 1:" not in caplog.text
    assert [r["mean"] for r in again] == [r["mean"] for r in rows]
    assert run_ids == [json.loads((root / "out" / "runs" / f"s5vh_16bits_seed{s}" /
                                   "results.json").read_text())["run_id"] for s in (1, 2)]


def test_published_numbers_sit_beside_a_paper_data_set(root, tmp_path):
    """On a data set named as one of the paper's, the main table shows the authors' numbers
    in a row of their own beside the measured ones (R = 60 was not published)."""
    shutil.copytree(root / "demo", tmp_path / "ucf")
    paper.main(["main", "--config", DEMO_CONFIG, "--out", str(tmp_path / "out"), "--bits", "16",
                "--seeds", "1", "--no-progress", "--cfg-options", f"data_root={str(tmp_path)!r}",
                *TINY, "train.num_epochs=1", "dataset='ucf'"])
    lines = (tmp_path / "out" / "main.md").read_text().splitlines()
    published = [line for line in lines if "S5VH, published" in line]
    assert published == ["| S5VH, published | 16 | 0.471 | 0.420 | 0.375 | – | 0.308 | 0.269 |"]
    assert lines.index(published[0]) == len(lines) - 1          # after the measured rows
    saved = output(tmp_path, "main")
    assert saved["published"]["16"] == {"5": .471, "20": .420, "40": .375, "80": .308,
                                        "100": .269}


def test_ablation_variants_change_what_they_claim(root):
    rows = call(root, "ablation", "--bits", "16")
    assert [r["variant"] for r in rows] == [name for name, _, _ in paper.ABLATIONS]
    assert all(0 <= v <= 1 for r in rows for v in r["mean"].values())
    runs = root / "out" / "runs"

    def run_dir(variant):      # the full model is the main table's run
        return runs / ("s5vh_16bits_seed1" if variant == "full" else f"{variant}_16bits_seed1")

    def checkpoint(variant):
        return load_checkpoint(str(run_dir(variant) / "last.pth"))

    def log(variant):
        return [json.loads(line) for line in open(run_dir(variant) / "log.jsonl")]

    full = checkpoint("full")
    assert not any("classifier" in k for k in full["criterion"])
    # without L_CA / the contrastive loss / reconstruction: the total loss lacks that term
    for variant, kept in (("no_ca", ("rec", "con")), ("no_contrastive", ("rec", "ca")),
                          ("no_reconstruction", ("con", "ca"))):
        weights = {"rec": 1.0, "con": 1.0, "ca": 0.1}
        for record in log(variant):
            assert record["loss"] == pytest.approx(sum(weights[k] * record[k] for k in kept),
                                                   rel=1e-5)
    # without smoothing the label table stays one-hot; with it, it moves after warm-up
    assert torch.equal(checkpoint("no_smoothing")["label_table"]["table"].max(1).values,
                       torch.ones(48))
    assert (full["label_table"]["table"].max(1).values < 1).any()
    # hash centers: the initialisation, and random balanced rows, each in files of their own
    demo = root / "demo"
    init = read_matrix(str(demo / "hash_center_16_init.h5"), "matrix")
    assert np.array_equal(init, initial_centers(4, 16, seed=1))
    random = read_matrix(str(demo / "hash_center_16_random.h5"), "matrix")
    assert (random.sum(1) == 0).all() and np.array_equal(
        random, initial_centers(4, 16, seed=1, method="random"))
    assert not np.array_equal(read_matrix(str(demo / "hash_center_16.h5"), "matrix"), init)
    # the release's classifier: a bias-free Linear(B -> K) that is trained
    classifier = checkpoint("release_classifier")["criterion"]
    assert list(classifier) == ["center_logits.centers", "center_logits.classifier.weight"]
    assert classifier["center_logits.classifier.weight"].shape == (4, 16)
    # one mixer for both directions; forward scans only
    for variant in ("shared_mixer", "unidirectional"):
        keys = checkpoint(variant)["model"]
        assert not any("mixer_backward" in k for k in keys), variant
    assert any("norm_backward" in k for k in checkpoint("shared_mixer")["model"])
    assert not any("norm_backward" in k for k in checkpoint("unidirectional")["model"])
    assert any("mixer_backward" in k for k in full["model"])
    table = (root / "out" / "ablation.md").read_text()
    assert "Δ mAP@5 vs full" in table and "16 bits, selection: last" in table


def test_backbones_table(root):
    rows = call(root, "backbones", "--bits", "16")
    assert [r["variant"] for r in rows] == list(paper.BACKBONES)
    assert all(r["parameters"] > 0 and r["seconds_per_epoch"] > 0 for r in rows)
    assert len({r["parameters"] for r in rows}) == len(rows)   # really different mixers
    assert rows[0]["implementation"] == "mamba (plain-PyTorch selective scan)"


def test_transfer_writes_under_the_experiment_output(root, tmp_path):
    other = tmp_path / "data"
    make_tiny_demo(str(other), seed=7)
    shutil.copytree(other / "demo", root / "demo2")
    target = tmp_path / "demo2.py"
    target.write_text(f"_base_ = {DEMO_CONFIG!r}\ndataset = 'demo2'\n")
    options = [f"data_root={str(root)!r}", *TINY, "train.num_epochs=2"]
    rows = paper.main(["transfer", "--source", DEMO_CONFIG, "--target", str(target),
                       "--out", str(root / "transfer"), "--cfg-options", *options])
    assert [(r["train"], r["evaluate"]) for r in rows] == [("demo", "demo2"), ("demo2", "demo2")]
    assert all(0 <= v <= 1 for r in rows for v in r["mAP"].values())
    codes = np.load(root / "transfer" / "codes_demo_to_demo2_16bits.npz")
    assert codes["database"].shape == (48, 16) and codes["queries"].shape == (16, 16)
    source_run = root / "transfer" / "runs" / "train_demo_16bits_seed1"
    assert sorted(os.listdir(source_run)) == ["best.pth", "config.json", "last.pth",
                                              "log.jsonl", "results.json", "run.log"]


def test_convergence_curves(root):
    curves = call(root, "convergence", "--bits", "16", "--eval-every", "1")
    assert set(curves) == {"with_ca", "without_ca"}
    for curve in curves.values():
        assert curve["epochs"] == [1, 2]
        assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in curve["mAP"].values())
    assert (root / "out" / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_and_tsne_reuse_the_main_run(root):
    call(root, "main", "--bits", "16", "--seeds", "1")
    curves = call(root, "curves", "--bits", "16", "--top-n", "5", "40", "5")
    assert set(curves) == {"S5VH", "ITQ", "LSH"}
    for curve in curves.values():
        assert curve["N"] == list(range(5, 41, 5)) and len(curve["mAP"]) == 8
        assert all(0 <= v <= 1 for v in curve["mAP"])
        recall = curve["recall"]
        assert len(recall) == 17 and all(a <= b + 1e-12 for a, b in zip(recall, recall[1:]))
        assert recall[-1] == pytest.approx(1.0)
    assert (root / "out" / "curves.png").exists()
    points = call(root, "tsne", "--bits", "16")
    saved = output(root, "tsne")
    assert set(points) == {"S5VH", "ITQ"}
    assert len(points["S5VH"]) == len(saved["classes"]) == 16       # one point per query
    assert all(len(p) == 2 for p in points["ITQ"])
    assert (root / "out" / "tsne.png").exists()


def test_sweep_crosses_the_grid_and_chooses_by_validation(root):
    rows = call(root, "sweep", "--bits", "16", "--seeds", "1", "2", "--eval-every", "1",
                "--grid", "train.a_cluster=0.1,1.0", "train.negatives=all,other_clusters")
    assert [tuple(r["point"].values()) for r in rows] == [
        (0.1, "all"), (0.1, "other_clusters"), (1.0, "all"), (1.0, "other_clusters")]
    saved = output(root, "sweep")
    assert saved["default"] == {"train.a_cluster": 0.1, "train.negatives": "all"}
    best = max(rows, key=lambda r: r["val_score"])
    assert saved["chosen"] == best["point"]
    for row in rows:
        assert len(row["runs"]) == 2 and row["epochs"] == [1, 2]
        assert row["val_score"] == pytest.approx(np.mean([row["val_selected"][k][0]
                                                          for k in (5, 20, 100)]))
        assert len(row["label_changed"]) == 2 and 0 <= min(row["label_changed"]) <= 1
    # each run trained what its name says
    run = root / "out" / "runs" / "sweep_16bits_a_cluster1.0_negativesother_clusters_seed2"
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["train"]["a_cluster"] == 1.0 and config["train"]["negatives"] == \
        "other_clusters" and config["seed"] == 2 and config["train"]["monitor"] == "val"
    assert (root / "out" / "sweep.png").exists() and "(chosen)" in (root / "out" /
                                                                      "sweep.md").read_text()
    # a second call reports the finished runs (read back from results.json) as the first did
    again = call(root, "sweep", "--bits", "16", "--seeds", "1", "2", "--eval-every", "1",
                 "--grid", "train.a_cluster=0.1,1.0", "train.negatives=all,other_clusters")
    assert [r["test_selected"] for r in again] == [r["test_selected"] for r in rows]


def test_together_trains_every_run_in_one_group_and_writes_what_each_command_would(
        root, caplog):
    """`together` sets every run up before any trains (one group, one process), trains a run two
    experiments share once, and writes the outputs the separate commands write."""
    caplog.clear()
    together = paper.main(["together", "main", "ablation", "convergence", "--config",
                           DEMO_CONFIG, "--out", str(root / "together"), "--bits", "16",
                           "--seeds", "1", "--eval-every", "1", "--cfg-options",
                           f"data_root={str(root)!r}", *TINY, "train.num_epochs=2"])
    text = caplog.text
    assert text.rindex("set-up:") < text.index("epoch 1:")
    runs = sorted(os.listdir(root / "together" / "runs"))
    assert len(runs) == len(paper.ABLATIONS) + 2 and "full_16bits_seed1" not in runs
    separate = {name: call(root, name, "--bits", "16", "--seeds", "1",
                           *(["--eval-every", "1"] if name == "convergence" else []))
                for name in ("main", "ablation", "convergence")}
    assert [r["per_seed"] for r in together["main"]] == [r["per_seed"] for r in separate["main"]]
    assert [r["per_seed"] for r in together["ablation"]] == \
        [r["per_seed"] for r in separate["ablation"]]
    assert together["convergence"] == separate["convergence"]
    for name in ("main", "ablation", "convergence"):
        assert (root / "together" / f"{name}.md").read_text().split("\n", 1)[1] == \
            (root / "out" / f"{name}.md").read_text().split("\n", 1)[1]


def test_together_trains_the_timed_experiments_first_one_run_at_a_time(root, caplog):
    """`together backbones main`: the backbones' runs train one at a time, each finished before
    the next is set up; the configured backbone's run is the main table's, which `main` then
    reports without training it again. Where that run trained beside others, `backbones`
    trains the backbone alone under its own name. The tables are equal but for the seconds per
    epoch."""
    caplog.clear()
    together = paper.main(["together", "backbones", "main", "--config", DEMO_CONFIG, "--out",
                           str(root / "timed"), "--bits", "16", "--seeds", "1",
                           "--cfg-options", f"data_root={str(root)!r}", *TINY,
                           "train.num_epochs=2"])
    lines = [line for line in caplog.text.splitlines() if "set-up:" in line or "finished:" in line]
    names = ["s5vh_16bits_seed1"] + [f"{mixer}_16bits_seed1" for mixer in paper.BACKBONES[1:]]
    # a run trained by itself has no name before its lines: the main table's one
    order = [(next((n for n in names[1:] if n in line), names[0]), "set-up:" in line)
             for line in lines]
    assert order == [(name, first) for name in names for first in (True, False)]
    assert "s5vh_16bits_seed1: the run is already finished" in caplog.text
    timed = root / "timed" / "runs"
    assert sorted(os.listdir(timed)) == sorted(names)
    log = [json.loads(line) for line in open(timed / "s5vh_16bits_seed1" / "log.jsonl")]
    assert [r["concurrent_runs"] for r in log] == [1, 1]
    call(root, "main", "--bits", "16", "--seeds", "1", "2")     # seeds 1 and 2 together
    separate = call(root, "backbones", "--bits", "16")
    log = [json.loads(line) for line in open(root / "out" / "runs" / "s5vh_16bits_seed1" /
                                             "log.jsonl")]
    assert {r["concurrent_runs"] for r in log} == {2}
    assert (root / "out" / "runs" / "mamba_16bits_seed1" / "results.json").exists()
    strip = [{k: v for k, v in row.items() if k != "seconds_per_epoch"} for row in separate]
    assert [{k: v for k, v in row.items() if k != "seconds_per_epoch"}
            for row in together["backbones"]] == strip
    assert (root / "timed" / "main.md").exists() and (root / "timed" / "backbones.md").exists()
