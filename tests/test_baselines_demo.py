import numpy as np
import pytest
import torch

import eval as eval_script
from dataset.demo import make_demo
from dataset.io import read_features, read_labels
from inference.baselines import ITQ, LSH, baseline_codes
from inference.metrics import retrieval_metrics
from tests.conftest import DEMO_CONFIG


def clustered(rng, n, dim=32, classes=4):
    labels = rng.integers(classes, size=n)
    centres = rng.normal(size=(classes, dim)) * 3
    return centres[labels] + rng.normal(size=(n, dim)), np.eye(classes)[labels]


def test_itq_rotation_is_orthogonal_and_reduces_quantisation_error(rng):
    x, _ = clustered(rng, 300)
    short = ITQ(8, iterations=0).fit(x)
    full = ITQ(8, iterations=50).fit(x)
    assert torch.allclose(full.rotation @ full.rotation.T, torch.eye(8, dtype=torch.float64),
                          atol=1e-10)

    def quant_error(model):
        v = (torch.as_tensor(x) - model.mean) @ model.pca @ model.rotation
        return float(((torch.sign(v) - v) ** 2).sum())

    assert quant_error(full) < quant_error(short)


@pytest.mark.parametrize("method", ["lsh", "itq"])
def test_baselines_are_deterministic_and_beat_chance(rng, method):
    x, labels = clustered(rng, 400)
    db, q = baseline_codes(method, 16, x, x[:300], x[300:], seed=5)
    again, _ = baseline_codes(method, 16, x, x[:300], x[300:], seed=5)
    assert torch.equal(db, again) and set(db.unique().tolist()) == {-1.0, 1.0}
    score = retrieval_metrics(q, db, labels[300:], labels[:300], topk=(20,))["mAP"][20]
    assert score > 0.6                       # 4 balanced classes: chance is about 0.25


def test_itq_decomposes_one_training_set_once_and_gives_what_a_fresh_fit_gives(rng):
    from unittest import mock

    from inference import baselines
    x, _ = clustered(rng, 120)
    other, _ = clustered(rng, 120)
    fresh = {}
    for bits, seed in ((8, 1), (16, 2)):
        baselines._last_axes.clear()
        fresh[bits] = ITQ(bits, seed).fit(x)
    calls = []
    eigh = torch.linalg.eigh

    def counted(matrix):
        calls.append(matrix.shape)
        return eigh(matrix)

    baselines._last_axes.clear()
    with mock.patch.object(torch.linalg, "eigh", counted):
        fits = {bits: ITQ(bits, seed).fit(x) for bits, seed in ((8, 1), (16, 2))}
        assert len(calls) == 1
        ITQ(8, 1).fit(other)                 # other features: decomposed anew
        assert len(calls) == 2
    for bits, fit in fits.items():
        assert torch.equal(fit.pca, fresh[bits].pca)
        assert torch.equal(fit.rotation, fresh[bits].rotation)


def test_itq_needs_enough_dimensions(rng):
    with pytest.raises(ValueError, match="ITQ with 64 bits needs"):
        ITQ(64).fit(rng.normal(size=(100, 32)))


def test_lsh_seed_changes_codes(rng):
    x, _ = clustered(rng, 50)
    assert not torch.equal(LSH(16, 0).fit(x).encode(x), LSH(16, 1).fit(x).encode(x))


def test_demo_is_deterministic_sparse_and_temporal(tmp_path):
    make_demo(str(tmp_path / "a"), seed=3, db_per_class=10, query_per_class=4)
    make_demo(str(tmp_path / "b"), seed=3, db_per_class=10, query_per_class=4)
    a = read_features(str(tmp_path / "a" / "demo_train_feats.h5"))
    b = read_features(str(tmp_path / "b" / "demo_train_feats.h5"))
    labels = read_labels(str(tmp_path / "a" / "demo_train_labels.mat")).argmax(1)
    assert a.shape == (200, 25, 512) and np.array_equal(a, b)
    assert a.min() >= 0 and (a == 0).mean() > 0.5                       # ReLU-like and sparse
    # the two classes of a pair have close mean-pooled features but reversed dynamics
    pooled = a.mean(1)
    fwd, bwd, other = pooled[labels == 0].mean(0), pooled[labels == 1].mean(0), pooled[labels == 2].mean(0)
    assert np.linalg.norm(fwd - bwd) < 0.5 * np.linalg.norm(fwd - other)
    first, last = a[labels == 0, :5].mean((0, 1)), a[labels == 0, -5:].mean((0, 1))
    first_b, last_b = a[labels == 1, :5].mean((0, 1)), a[labels == 1, -5:].mean((0, 1))
    assert np.linalg.norm(first - last_b) < 0.5 * np.linalg.norm(first - first_b)
    assert np.linalg.norm(last - first_b) < 0.5 * np.linalg.norm(last - last_b)


def test_eval_script_scores_baselines_on_created_demo(tmp_path, capsys, caplog):
    rows = eval_script.main(["--config", DEMO_CONFIG, "--method", "lsh", "itq",
                             "--bits", "16", "--out", str(tmp_path / "r.json"),
                             "--cfg-options", f"data_root={str(tmp_path)!r}"])
    printed = capsys.readouterr().out
    assert "Writing the demo data set" in caplog.text and "mAP@100" in printed
    assert [(r["method"], r["nbits"]) for r in rows] == [("lsh", 16), ("itq", 16)]
    assert all(0.1 < r["mAP"][5] <= 1 for r in rows)
    assert (tmp_path / "r.json").exists()
