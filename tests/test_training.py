import contextlib
import json
import math
import os
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import train as train_script
from dataset.io import write_features, write_labels
from Loss.losses import (CenterLogits, LabelTable, S5VHLoss, debiased_contrastive_loss,
                         reconstruction_loss, soft_cross_entropy)
from optim import runner
from optim.engine import make_views
from optim.runner import NonFiniteLossError, resume_run, start_run
from tests.conftest import DEMO_CONFIG, tiny_config
from utils.checkpoint import load_checkpoint
from utils.signals import StopRequest


def dcl_by_formula(z1, z2, tau, tau_plus):
    """Per-anchor loop over the 2n codes, as docs/method.md §6 states it."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n2, n = len(z), len(z1)
    losses = []
    for i in range(n2):
        p = (i + n) % n2
        pos = math.exp(float(z[i] @ z[p]) / tau)
        neg = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k not in (i, p))
        count = n2 - 2
        ng = max((neg - tau_plus * count * pos) / (1 - tau_plus), count * math.exp(-1 / tau))
        losses.append(-math.log(pos / (pos + ng)))
    return sum(losses) / n2


@pytest.mark.parametrize("tau, tau_plus", [(0.5, 0.1), (0.5, 0.05), (0.2, 0.3)])
def test_debiased_contrastive_matches_formula(rng, tau, tau_plus):
    z1, z2 = (torch.tensor(rng.normal(size=(5, 8))) for _ in range(2))
    got = debiased_contrastive_loss(z1, z2, tau, tau_plus)
    assert float(got) == pytest.approx(dcl_by_formula(z1, z2, tau, tau_plus), rel=1e-9)


def test_debiased_contrastive_clamp_is_active_for_aligned_views():
    # identical views and a large tau_plus drive the debiased negative term below its floor
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    got = debiased_contrastive_loss(z, z, 0.5, 0.9)
    pos, count = math.exp(2.0), 4
    floor = count * math.exp(-2.0)
    assert float(got) == pytest.approx(-math.log(pos / (pos + floor)), rel=1e-6)
    assert float(got) == pytest.approx(dcl_by_formula(z, z, 0.5, 0.9), rel=1e-6)


def test_reconstruction_and_center_alignment_by_formula(rng):
    pred, target = torch.tensor(rng.normal(size=(2, 3, 4))), torch.tensor(rng.normal(size=(2, 3, 4)))
    assert float(reconstruction_loss(pred, target)) == pytest.approx(
        float(((pred - target) ** 2).sum() / 24))
    centers = torch.tensor([[1.0, -1, 1, 1], [-1, -1, 1, -1], [1, 1, -1, -1]])
    code = torch.tensor([[0.5, -0.5, 1.0, 0.0]])
    logits = CenterLogits(centers, temperature=0.5)(code)
    expected = (code @ centers.T) / (4 * 0.5)
    assert torch.allclose(logits, expected)
    y = torch.tensor([[0.2, 0.7, 0.1]])
    manual = -sum(float(y[0, k]) * math.log(float(logits[0].softmax(0)[k])) for k in range(3))
    assert float(soft_cross_entropy(logits, y)) == pytest.approx(manual, rel=1e-6)


def test_total_loss_weights_and_view_averaging(rng):
    cfg = tiny_config(Path("/nonexistent"), "train.alpha=2.0", "train.a_cluster=0.5")
    centers = np.sign(rng.normal(size=(3, 6))).astype(np.float32)
    crit = S5VHLoss(centers, cfg.train)
    b = 4
    out = {"reconstruction": torch.rand(2 * b, 5, 7), "video_code": torch.rand(2 * b, 6) * 2 - 1}
    targets, soft = torch.rand(2 * b, 5, 7), torch.softmax(torch.rand(b, 3), 1)
    total, parts = crit(out, targets, soft)
    rec = F.mse_loss(out["reconstruction"][:b], targets[:b]) + F.mse_loss(out["reconstruction"][b:], targets[b:])
    logits = crit.center_logits(out["video_code"])
    ca = (soft_cross_entropy(logits[:b], soft) + soft_cross_entropy(logits[b:], soft)) / 2
    con = debiased_contrastive_loss(out["video_code"][:b], out["video_code"][b:], 0.5,
                                    cfg.train.tau_plus)
    assert torch.allclose(total, rec + 2.0 * con + 0.5 * ca)
    assert torch.allclose(parts["ca"], ca) and not list(crit.parameters())   # centers are fixed
    trainable = S5VHLoss(centers, {**cfg.train.to_dict(), "trainable_centers": True})
    # the release's classifier: bias-free Linear(B -> K), logits scaled by 1 / (B * tau_c)
    assert [p.shape for p in trainable.parameters()] == [torch.Size([3, 6])]
    weight = trainable.center_logits.classifier.weight
    code = out["video_code"]
    assert torch.allclose(trainable.center_logits(code), code @ weight.T / (6 * 0.5))
    no_rec = S5VHLoss(centers, {**cfg.train.to_dict(), "a_rec": 0.0})
    assert torch.allclose(no_rec(out, targets, soft)[0], 2.0 * con + 0.5 * ca)


def test_label_smoothing_update():
    table = LabelTable(np.array([0, 2, 1]), 3)
    assert torch.equal(table.table, torch.eye(3)[[0, 2, 1]])
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    rows = table.update(torch.tensor([1]), logits, beta=0.01)
    expected = 0.99 * torch.tensor([0.0, 0.0, 1.0]) + 0.01 * logits.softmax(1)[0]
    assert torch.allclose(rows[0], expected) and torch.allclose(table[torch.tensor([1])][0], expected)
    assert torch.equal(table.table[0], torch.tensor([1.0, 0, 0]))      # others untouched
    rows = table.update(torch.tensor([1]), logits, beta=0.01)          # compounding
    assert torch.allclose(rows[0], 0.99 * expected + 0.01 * logits.softmax(1)[0])


def test_views_partition_frames():
    gen = torch.Generator().manual_seed(0)
    visible, masked = make_views(6, 25, 0.5, gen, "cpu")
    assert visible.shape == (12, 13) and masked.shape == (12, 12)
    for row in range(12):
        frames = sorted(visible[row].tolist() + masked[row].tolist())
        assert frames == list(range(25))
        assert visible[row].tolist() == sorted(visible[row].tolist())
    # view 2 sees the last v permuted frames: the two views share 2v - M = 1 frame
    shared = [len(set(visible[i].tolist()) & set(visible[i + 6].tolist())) for i in range(6)]
    assert shared == [1] * 6
    visible, masked = make_views(3, 25, 0.75, gen, "cpu")
    assert visible.shape == (6, 7)


def make_tiny_demo(root, n_train=48, n_test=16, frames=8, dim=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, frames, dim)) * 2
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(classes, size=n)
        feats = np.maximum(protos[labels] + 0.3 * rng.normal(size=(n, frames, dim)), 0)
        write_features(os.path.join(root, "demo", f"demo_{split}_feats.h5"), feats.astype(np.float32))
        write_labels(os.path.join(root, "demo", f"demo_{split}_labels.mat"), np.eye(classes)[labels])


TINY = ["nbits=16", "max_frames=8", "feature_size=16", "preprocess.latent_dim_pca=8",
        "preprocess.nclusters=4", "model.hidden_size=16", "model.decoder_hidden_size=16",
        "train.batch_size=16", "train.warm_up_epoch=1", "eval.query_chunk=7", "train.device='cpu'",
        "train.checkpoint_seconds=0"]


def tiny_run_config(tmp_path, *extra):
    return tiny_config(tmp_path, *TINY, *extra)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run's own handles it."""


def interrupted_run(cfg, run_dir, epochs):
    """A run that dies after `epochs` epochs, its files as its checkpoint schedule left them."""
    original = runner.end_epoch

    def end_epoch(run, epoch, *args):
        original(run, epoch, *args)
        if epoch + 1 == epochs:
            raise Killed()

    with mock.patch.object(runner, "end_epoch", end_epoch), pytest.raises(Killed):
        start_run(cfg, run_dir, progress=False)


def resume(run_dir, *overrides):
    return resume_run(run_dir, overrides, progress=False)


def test_resume_gives_the_same_weights(tmp_path):
    make_tiny_demo(str(tmp_path))
    opts = ("train.num_epochs=4", "train.select='val'", "train.eval_every=1")
    cfg = tiny_run_config(tmp_path, *opts)
    full = start_run(cfg, str(tmp_path / "full"), progress=False)
    interrupted_run(cfg, str(tmp_path / "cut"), 2)
    torch.manual_seed(12345)                   # a resumed process starts from other RNG states
    resumed = resume(str(tmp_path / "cut"))
    a = load_checkpoint(str(tmp_path / "full" / "last.pth"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pth"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["label_table"]["table"], b["label_table"]["table"])
    same = ("test_mAP", "test_precision", "selected_epoch", "selection_score_mAP@5",
            "config_fingerprint")
    assert {k: full[k] for k in same} == {k: resumed[k] for k in same}
    assert full["artifacts"]["hash_center"] == resumed["artifacts"]["hash_center"]
    lines = [json.loads(l) for l in open(tmp_path / "cut" / "log.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    # the label table moved away from one-hot after warm-up, and is in the checkpoint
    assert (a["label_table"]["table"].max(1).values < 1).any()


def test_resume_from_an_older_checkpoint_retrains_the_lost_epochs(tmp_path, caplog):
    """With checkpoints every 3 epochs, a run cut after epoch 4 resumes from epoch 3: epoch 4 is
    trained again (its log line replaced) and the result equals the uninterrupted run."""
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=5", "train.checkpoint_every=3",
                          "train.checkpoint_seconds=1000")
    full = start_run(cfg, str(tmp_path / "full"), progress=False)
    interrupted_run(cfg, str(tmp_path / "cut"), 4)
    assert load_checkpoint(str(tmp_path / "cut" / "last.pth"))["epoch"] == 3
    resumed = resume(str(tmp_path / "cut"))
    assert f"resumed {tmp_path / 'cut'} after epoch 3" in caplog.text
    assert full["test_mAP"] == resumed["test_mAP"]
    a = load_checkpoint(str(tmp_path / "full" / "last.pth"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pth"))
    assert a["epoch"] == b["epoch"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = [json.loads(l) for l in open(tmp_path / "cut" / "log.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4, 5]


def test_train_and_eval_scripts_two_epochs(tmp_path, caplog):
    """Missing artifacts trigger preprocessing; eval.py reproduces the run's test score."""
    make_tiny_demo(str(tmp_path))
    opts = ["--cfg-options", f"data_root={str(tmp_path)!r}", f"work_dir={str(tmp_path / 'runs')!r}",
            *TINY, "train.num_epochs=2"]
    with caplog.at_level("INFO", logger="s5vh"):
        rows = train_script.main(["--config", DEMO_CONFIG, "--no-progress", "--compare", "itq",
                                  *opts])
    assert "clustering: computing (first use)" in caplog.text and "epoch 2:" in caplog.text
    run_dir = tmp_path / "runs" / "demo_16bits"
    assert sorted(os.listdir(run_dir)) == ["best.pth", "config.json", "last.pth", "log.jsonl",
                                           "results.json", "run.log"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["selection"] == "last" and results["selected_epoch"] == 2
    assert results["runtime"] == {"device": "cpu", "mixer": "mamba (plain-PyTorch selective scan)",
                                  "dtype": "float32", "cuda_graphs": False, "compiled": False,
                                  "parameters": 15024}
    assert "mixer mamba (plain-PyTorch selective scan), float32" in (run_dir / "run.log").read_text()
    assert [r["method"] for r in rows] == ["itq", "s5vh (last)"]
    log = [json.loads(l) for l in open(run_dir / "log.jsonl")]
    assert len(log) == 2 and all(k in log[0] for k in ("loss", "rec", "con", "ca", "lr",
                                                        "train_seconds"))
    evaluated = eval_script.main(["--run", str(run_dir)])
    assert evaluated[0]["mAP"][5] == pytest.approx(results["test_mAP"]["5"], abs=1e-9)
    codes = np.load(run_dir / "codes.npz")
    assert codes["database"].shape == (48, 16) and set(np.unique(codes["queries"])) <= {-1, 1}
    checkpoint = load_checkpoint(str(run_dir / "last.pth"))
    assert {"model", "optimizer", "epoch", "label_table", "best", "artifacts", "config", "meta",
            "run_id", "config_fingerprint"} <= set(checkpoint)
    assert checkpoint["run_id"] == results["run_id"] == log[0]["run_id"]
    assert results["artifacts"]["clusters"] == "computed"


def test_non_finite_loss_stops_the_run(tmp_path):
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=2", "train.lr=1e30", "train.log_every=1")
    with pytest.raises(NonFiniteLossError, match="non-finite loss in epoch"):
        start_run(cfg, str(tmp_path / "run"), progress=False)


def test_test_selection_keeps_the_best_epoch(tmp_path):
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=3", "train.select='test'", "train.eval_every=1")
    results = start_run(cfg, str(tmp_path / "run"), progress=False)
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    scores = [l["test_mAP"]["5"] for l in log]
    assert results["selection"] == "test"
    assert results["selected_epoch"] == 1 + int(np.argmax(scores))
    assert results["test_mAP"][5] == pytest.approx(max(scores))


def test_bf16_resident_features(tmp_path):
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=1", "train.resident_dtype='bfloat16'")
    results = start_run(cfg, str(tmp_path / "run"), progress=False)
    assert 0 < results["test_mAP"][5] <= 1
    from dataset.protocol import train_set
    stored = train_set(cfg).load_resident(cfg, "cpu", torch.bfloat16, chunk=5)
    assert stored.dtype == torch.bfloat16
    assert torch.allclose(stored.float(), torch.from_numpy(train_set(cfg).load(cfg)), rtol=1e-2)


def test_seed_study_pairs_variants_by_seed(tmp_path, capsys):
    from tools import seed_study
    make_tiny_demo(str(tmp_path))
    options = [f"data_root={str(tmp_path)!r}", *TINY, "train.num_epochs=2"]
    out = tmp_path / "study.json"
    results, summary = seed_study.main([
        "--config", DEMO_CONFIG, "--seeds", "1", "2", "--variant", "base",
        "--variant", "short_mask", "train.mask_ratio=0.25", "--cfg-options", *options,
        "--work-dir", str(tmp_path / "study"), "--out", str(out)])
    assert set(results) == {"base", "short_mask"} and set(results["base"]) == {1, 2}
    # a variant trained the same way as a seed's own run gives that run's numbers
    again = start_run(tiny_run_config(tmp_path, "train.num_epochs=2", "seed=2"),
                      str(tmp_path / "again"), progress=False)
    assert results["base"][2][5] == pytest.approx(again["test_mAP"][5], abs=1e-12)
    diffs = [results["short_mask"][s][20] - results["base"][s][20] for s in (1, 2)]
    assert summary["short_mask"][20]["paired_diff_mean"] == pytest.approx(sum(diffs) / 2)
    values = [results["base"][s][100] for s in (1, 2)]
    assert summary["base"][100]["mean"] == pytest.approx(sum(values) / 2)
    assert summary["base"][100]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "paired diff vs base" in capsys.readouterr().out
    assert json.loads(out.read_text())["variants"] == {"base": [], "short_mask": ["train.mask_ratio=0.25"]}
    # a second call reuses the finished runs, read back from their results.json, as they were
    again, _ = seed_study.main([
        "--config", DEMO_CONFIG, "--seeds", "1", "2", "--variant", "base",
        "--variant", "short_mask", "train.mask_ratio=0.25", "--cfg-options", *options,
        "--work-dir", str(tmp_path / "study"), "--out", str(tmp_path / "study2.json")])
    assert again == results


def test_other_cluster_negatives_leave_the_anchor_cluster_out(rng):
    z1, z2 = (torch.tensor(rng.normal(size=(6, 8))) for _ in range(2))
    clusters = torch.tensor([0, 1, 0, 2, 1, 0])
    got = debiased_contrastive_loss(z1, z2, 0.5, 0.1, clusters)
    # by formula: the negatives of anchor i are the codes of videos of other clusters
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    both = clusters.repeat(2).tolist()
    losses = []
    for i in range(12):
        p = (i + 6) % 12
        pos = math.exp(float(z[i] @ z[p]) / 0.5)
        others = [k for k in range(12) if both[k] != both[i]]
        neg = sum(math.exp(float(z[i] @ z[k]) / 0.5) for k in others)
        ng = max((neg - 0.1 * len(others) * pos) / 0.9, len(others) * math.exp(-2))
        losses.append(-math.log(pos / (pos + ng)))
    assert float(got) == pytest.approx(sum(losses) / 12, rel=1e-9)
    # one cluster for all: no negatives are left, the loss is zero
    assert float(debiased_contrastive_loss(z1, z2, 0.5, 0.1, torch.zeros(6))) == 0


def test_the_log_shows_how_far_the_label_table_moved(tmp_path):
    make_tiny_demo(str(tmp_path))
    start_run(tiny_run_config(tmp_path, "train.num_epochs=3"), str(tmp_path / "run"),
              progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["label_changed"] == 0 and log[0]["label_entropy"] == 0   # warm-up: one-hot
    assert log[-1]["label_entropy"] > 0 and 0 <= log[-1]["label_changed"] <= 1
    table = LabelTable(np.array([0, 1, 1]), 2)
    table.table = torch.tensor([[0.4, 0.6], [0.45, 0.55], [0.0, 1.0]])
    changed, entropy = table.drift().tolist()
    assert changed == pytest.approx(1 / 3)                # only video 0 left its cluster
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.4, 0.45)]
    assert entropy == pytest.approx(sum(h) / 3, rel=1e-6)


def test_step_examples_cover_every_step_still_ahead(tmp_path):
    """The graphs captured before training are one per (phase, batch size) of the epochs ahead:
    the sizes batch_indices cuts, warm-up only while it lasts."""
    from optim.engine import step_examples
    cfg = tiny_run_config(tmp_path, "train.num_epochs=5", "train.warm_up_epoch=2",
                          "train.batch_size=10")

    def kinds(num_videos, start_epoch=0):
        return [(beta, len(inputs.index), tuple(inputs.visible.shape))
                for inputs, beta in step_examples(cfg, num_videos, 2, "cpu", start_epoch)]
    beta = cfg.train.smoothing_beta
    assert [k[:2] for k in kinds(48)] == [(None, 10), (None, 8), (beta, 10), (beta, 8)]
    assert kinds(48)[1][2] == (16, cfg.max_frames - int(cfg.max_frames * cfg.train.mask_ratio))
    assert [k[:2] for k in kinds(41)] == [(None, 10), (beta, 10)]   # a last batch of 1: dropped
    assert [k[:2] for k in kinds(7)] == [(None, 7), (beta, 7)]
    assert [k[:2] for k in kinds(48, start_epoch=2)] == [(beta, 10), (beta, 8)]
    assert kinds(48, start_epoch=5) == []


def test_loading_an_optimizer_keeps_its_device_learning_rate_tensor(tmp_path):
    """Graph replay reads the learning rate from one tensor that set_epoch_lr refills; loading a
    checkpoint must put the saved rate into that tensor, not replace it."""
    from optim.optimizer import load_optimizer_state, set_epoch_lr
    weight = torch.nn.Parameter(torch.ones(3))
    rate = torch.tensor(5e-4)
    optimizer = torch.optim.AdamW([weight], lr=rate)
    weight.grad = torch.ones(3)
    optimizer.step()
    set_epoch_lr(optimizer, 2e-4)
    torch.save(optimizer.state_dict(), tmp_path / "opt.pth")
    set_epoch_lr(optimizer, 1e-3)
    load_optimizer_state(optimizer, torch.load(tmp_path / "opt.pth", weights_only=True),
                         str(tmp_path / "opt.pth"))
    assert optimizer.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(2e-4)
    set_epoch_lr(optimizer, 3e-4)                     # what the epoch loop does next
    assert float(rate) == pytest.approx(3e-4)


def test_evaluation_videos_are_read_once_and_scored_as_from_their_file(tmp_path):
    """The queries (not training rows) are read from their file once, at set-up, however often
    the run evaluates them; its test mAP equals that of the selected checkpoint scored straight
    from the files."""
    from dataset.protocol import VideoSet
    from inference.evaluate import evaluate_checkpoint
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path, "train.num_epochs=3", "train.monitor='test'",
                          "train.eval_every=1")
    reads = []
    original = VideoSet.iter_blocks

    def iter_blocks(videos, *args, **kwargs):
        reads.append(os.path.basename(videos.path))
        return original(videos, *args, **kwargs)

    with mock.patch.object(VideoSet, "iter_blocks", iter_blocks):
        results = start_run(cfg, str(tmp_path / "run"), progress=False)
    assert reads.count("demo_test_feats.h5") == 1
    from_file, _, _ = evaluate_checkpoint(cfg, str(tmp_path / "run" / "best.pth"), "cpu")
    assert from_file["mAP"] == results["test_mAP"]


def test_mean_pooled_sets_are_read_again_only_when_a_file_changes(tmp_path):
    from dataset import protocol
    from dataset.protocol import VideoSet
    from inference.evaluate import mean_pooled_sets
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path)
    reads = []
    original = VideoSet.iter_blocks

    def iter_blocks(videos, *args, **kwargs):
        reads.append(os.path.basename(videos.path))
        return original(videos, *args, **kwargs)

    protocol._pooled.clear()             # files of this content may have been pooled before
    with mock.patch.object(VideoSet, "iter_blocks", iter_blocks):
        first = mean_pooled_sets(cfg)
        again = mean_pooled_sets(cfg)
        assert len(reads) == 2 and again[1][0] is first[1][0]
        with pytest.raises(ValueError):          # shared arrays: nobody may change them
            first[0][0, 0] = 1.0
        make_tiny_demo(str(tmp_path), seed=3)
        changed = mean_pooled_sets(cfg)
    assert len(reads) == 4 and not np.array_equal(changed[0], first[0])
    import warnings
    from inference.evaluate import evaluate_baselines
    with warnings.catch_warnings():       # the baselines copy the shared arrays, never write
        warnings.simplefilter("error")
        rows = evaluate_baselines(cfg, ["itq", "lsh"], [8])
    assert [r["method"] for r in rows] == ["itq", "lsh"]


def test_runs_trained_one_group_after_another_load_the_features_once(tmp_path):
    from dataset.protocol import VideoSet
    make_tiny_demo(str(tmp_path))
    loads = []
    original = VideoSet.load_resident

    def load_resident(videos, *args, **kwargs):
        loads.append(os.path.basename(videos.path))
        return original(videos, *args, **kwargs)

    jobs = [runner.Job(tiny_run_config(tmp_path, "train.num_epochs=1", f"seed={seed}"),
                       str(tmp_path / f"run{seed}")) for seed in (1, 2)]
    with mock.patch.object(VideoSet, "load_resident", load_resident):
        runner.train_runs(jobs, progress=False, concurrent=1)
    assert sorted(loads) == ["demo_test_feats.h5", "demo_train_feats.h5"]


def test_resident_features_kept_across_calls_follow_their_file(tmp_path):
    """Features kept for later trainings (train_runs' `shared`) are reused while their file is
    unchanged and read again once it is replaced."""
    from dataset.protocol import train_set
    make_tiny_demo(str(tmp_path))
    cfg = tiny_run_config(tmp_path)
    shared = {}
    first = runner._resident_features(train_set(cfg), cfg, "cpu", shared, torch.float32)
    assert runner._resident_features(train_set(cfg), cfg, "cpu", shared, torch.float32) is first
    make_tiny_demo(str(tmp_path), seed=5)                   # the same files, other videos
    again = runner._resident_features(train_set(cfg), cfg, "cpu", shared, torch.float32)
    assert not torch.equal(again, first)
    assert torch.equal(again, torch.from_numpy(train_set(cfg).load(cfg)))


def _scheduled(monkeypatch, names, capture_pieces, signal_after=None):
    """The (run, event) order in which runner._lockstep steps stand-in runs of `capture_pieces`
    capture pieces each (0: no CUDA graphs) and three training steps; with `signal_after`, a
    signal comes after that many events. Returns (events, results)."""
    events, stop = [], StopRequest()

    def fit(run, writer, stop_request):
        for _ in range(capture_pieces):
            events.append((run.run_dir, "capture"))
            yield
        run.captured = True
        for _ in range(3):
            events.append((run.run_dir, "step"))
            if len(events) == signal_after:
                stop.signal = "SIGTERM"
            yield
        return True

    monkeypatch.setattr(runner, "fit", fit)
    monkeypatch.setattr(runner, "_finish", lambda run, writer: f"results of {run.run_dir}")
    runs = [types.SimpleNamespace(run_dir=name, captured=capture_pieces == 0, concurrent_runs=1,
                                  epochs_done=0, on_stream=contextlib.nullcontext)
            for name in names]
    return events, runner._lockstep(runs, None, stop, None)


def test_runs_with_cuda_graphs_join_one_at_a_time_and_capture_between_the_others_steps(
        monkeypatch):
    events, results = _scheduled(monkeypatch, "abc", capture_pieces=2)
    assert results == {name: f"results of {name}" for name in "abc"}
    for before, after in ("ab", "bc"):
        last_capture = max(i for i, e in enumerate(events) if e == (before, "capture"))
        first = min(i for i, e in enumerate(events) if e[0] == after)
        assert first > last_capture                 # it joined once the one before had captured
    captures = [i for i, e in enumerate(events) if e == ("b", "capture")]
    assert ("a", "step") in events[captures[0]:captures[-1]]     # a trained while b captured


def test_runs_without_cuda_graphs_join_together(monkeypatch):
    events, _ = _scheduled(monkeypatch, "abc", capture_pieces=0)
    assert events[:3] == [("a", "step"), ("b", "step"), ("c", "step")]


def test_no_run_joins_after_a_signal(monkeypatch):
    events, results = _scheduled(monkeypatch, "abc", capture_pieces=2, signal_after=3)
    assert {run for run, _ in events} == {"a"}
    assert list(results) == ["a"]
