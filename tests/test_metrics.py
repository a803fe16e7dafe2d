import numpy as np
import pytest
import torch

from inference.metrics import precision_recall_by_radius, rank_topk, retrieval_metrics

TOPK = (1, 5, 20, 40, 60, 80, 100)


def loop_reference(q_codes, db_codes, q_labels, db_labels, topk):
    """Per query: stable sort by Hamming distance, then AP@K = sum rel(r) P@r / K."""
    maps, precs = {k: [] for k in topk}, {k: [] for k in topk}
    for q in range(len(q_codes)):
        dist = [int(np.sum(q_codes[q] != db_codes[j])) for j in range(len(db_codes))]
        order = sorted(range(len(db_codes)), key=lambda j: (dist[j], j))
        for k in topk:
            hits, ap = 0, 0.0
            for r, j in enumerate(order[:k], start=1):
                rel = float(np.dot(q_labels[q], db_labels[j]) > 0)
                hits += rel
                ap += rel * hits / r
            maps[k].append(ap / k)
            precs[k].append(hits / k)
    return {k: np.mean(v) for k, v in maps.items()}, {k: np.mean(v) for k, v in precs.items()}


def random_case(rng, nq, ndb, nbits, classes, multi_hot):
    # few bits -> many tied distances
    q = rng.choice([-1.0, 1.0], size=(nq, nbits))
    db = rng.choice([-1.0, 1.0], size=(ndb, nbits))
    if multi_hot:
        ql = (rng.random((nq, classes)) < 0.25).astype(np.float32)
        dl = (rng.random((ndb, classes)) < 0.25).astype(np.float32)
        ql[ql.sum(1) == 0, 0] = 1
        dl[dl.sum(1) == 0, 1] = 1
    else:
        ql = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=nq)]
        dl = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=ndb)]
    return q, db, ql, dl


@pytest.mark.parametrize("nbits, multi_hot, chunk", [(4, False, 7), (8, True, 5), (16, False, 64),
                                                     (6, True, 1000)])
def test_map_matches_loop_reference(rng, nbits, multi_hot, chunk):
    q, db, ql, dl = random_case(rng, 23, 150, nbits, 5, multi_hot)
    got = retrieval_metrics(torch.tensor(q), torch.tensor(db), ql, dl, topk=TOPK, chunk=chunk)
    ref_map, ref_prec = loop_reference(q, db, ql, dl, TOPK)
    for k in TOPK:
        assert got["mAP"][k] == pytest.approx(ref_map[k], abs=1e-6)
        assert got["precision"][k] == pytest.approx(ref_prec[k], abs=1e-6)


def test_divisor_is_k_even_when_database_is_small(rng):
    q, db, ql, dl = random_case(rng, 4, 10, 4, 2, False)
    got = retrieval_metrics(torch.tensor(q), torch.tensor(db), ql, dl, topk=(5, 20))
    ref, _ = loop_reference(q, db, ql, dl, (5, 20))
    assert got["mAP"][20] == pytest.approx(ref[20], abs=1e-7)
    all_relevant = retrieval_metrics(torch.tensor(q), torch.tensor(db), np.ones((4, 1)),
                                     np.ones((10, 1)), topk=(5, 20))
    assert all_relevant["mAP"][5] == pytest.approx(1.0) and all_relevant["mAP"][20] == 0.5


def test_ties_are_broken_by_database_index():
    db = torch.tensor([[1.0, 1], [-1, -1], [1, 1], [1, -1], [1, 1]])
    ranked = rank_topk(torch.tensor([[1.0, 1]]), db, 5)
    assert ranked.tolist() == [[0, 2, 4, 3, 1]]


def test_perfect_and_worst_codes():
    labels = np.eye(2)[[0, 0, 1, 1]]
    codes = torch.tensor([[1.0, 1], [1, 1], [-1, -1], [-1, -1]])
    res = retrieval_metrics(codes, codes, labels, labels, topk=(2,))
    assert res["mAP"][2] == pytest.approx(1.0)
    res = retrieval_metrics(codes, -codes, labels, labels, topk=(2,))
    assert res["mAP"][2] == 0.0


def pr_loop(q, db, ql, dl):
    nbits = q.shape[1]
    prec, precn, rec, recn = np.zeros(nbits + 1), np.zeros(nbits + 1), np.zeros(nbits + 1), 0
    for i in range(len(q)):
        dist = (q[i] != db).sum(1)
        rel = (dl @ ql[i]) > 0
        if rel.sum():
            recn += 1
        for r in range(nbits + 1):
            ret = dist <= r
            if ret.sum():
                prec[r] += (rel & ret).sum() / ret.sum()
                precn[r] += 1
            if rel.sum():
                rec[r] += (rel & ret).sum() / rel.sum()
    return np.where(precn > 0, prec / np.maximum(precn, 1), 0), rec / max(recn, 1)


@pytest.mark.parametrize("multi_hot", [False, True])
def test_precision_recall_by_radius_matches_loop(rng, multi_hot):
    q, db, ql, dl = random_case(rng, 17, 60, 8, 4, multi_hot)
    got = precision_recall_by_radius(torch.tensor(q), torch.tensor(db), ql, dl, chunk=5)
    ref_p, ref_r = pr_loop(q, db, ql, dl)
    assert np.allclose(got["precision"], ref_p, atol=1e-6)
    assert np.allclose(got["recall"], ref_r, atol=1e-6)
    assert got["recall"][-1] == pytest.approx(1.0)
