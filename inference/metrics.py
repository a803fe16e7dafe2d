"""Hamming ranking and retrieval metrics (docs/method.md §7), vectorised and chunked over queries.

Codes are (Q, B) query and (N, B) database matrices with entries in {-1, +1}; labels are (Q, C)
and (N, C) one-hot or multi-hot, and a database item is relevant to a query when they share a
class. The database is ranked by ascending Hamming distance, ties broken by database index.

mAP@R follows every SSVH code base: AP@R(q) = (1/R) sum_{i<=R} rel(i) * P@i, dividing by R.
Memory stays bounded by `chunk` x N whatever the number of queries, on CPU or CUDA.
"""
import torch

DEFAULT_TOPK = (5, 20, 40, 60, 80, 100)


def _as_codes(codes, device):
    codes = torch.as_tensor(codes, device=device)
    if codes.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        codes = codes.float()
    return codes


def hamming_distance(query_codes, db_codes):
    """(Q, B) x (N, B) ±1 codes -> (Q, N) Hamming distances, exact small integers in float."""
    nbits = query_codes.shape[1]
    inner = query_codes.float() @ db_codes.float().T
    return (nbits - inner) * 0.5


class Relevance:
    """Relevance between query and database rows, from one-hot/multi-hot labels.

    One-hot labels are compared as class ids (cheap at FCVID scale); multi-hot ones by dot > 0.
    """

    def __init__(self, query_labels, db_labels, device):
        query_labels = torch.as_tensor(query_labels, device=device).float()
        db_labels = torch.as_tensor(db_labels, device=device).float()
        if query_labels.shape[1] != db_labels.shape[1]:
            raise ValueError(f"query labels have {query_labels.shape[1]} columns, "
                             f"database labels {db_labels.shape[1]}")
        self.one_hot = bool(((query_labels > 0).sum(1) == 1).all()
                            and ((db_labels > 0).sum(1) == 1).all())
        if self.one_hot:
            self.query, self.db = query_labels.argmax(1), db_labels.argmax(1)
        else:
            self.query, self.db = (query_labels > 0).float(), (db_labels > 0).float()

    def of_ranked(self, rows, ranked):
        """Queries `rows` (slice), (Qc, k) database indices -> (Qc, k) float relevance."""
        if self.one_hot:
            return (self.db[ranked] == self.query[rows, None]).float()
        return (torch.einsum("qc,qkc->qk", self.query[rows], self.db[ranked]) > 0).float()

    def of_all(self, rows):
        """Queries `rows` (slice) -> (Qc, N) relevance against the whole database."""
        if self.one_hot:
            return (self.query[rows, None] == self.db[None, :]).float()
        return (self.query[rows] @ self.db.T > 0).float()


def rank_topk(query_codes, db_codes, k):
    """(Q, B), (N, B) -> (Q, k) database indices of the k nearest, ties by database index."""
    n = db_codes.shape[0]
    k = min(k, n)
    dist = hamming_distance(query_codes, db_codes)
    # One sortable key per item: distance major, index minor; exact while it fits the mantissa.
    key_dtype = torch.float32 if (query_codes.shape[1] + 1) * n < 2 ** 24 else torch.float64
    index = torch.arange(n, device=dist.device, dtype=key_dtype)
    keys = dist.to(key_dtype) * n + index
    return torch.topk(keys, k, dim=1, largest=False, sorted=True).indices


@torch.no_grad()
def retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=DEFAULT_TOPK,
                      chunk=1024, device=None):
    """mAP@R and precision@R for every cut-off R in `topk`.

    Returns {'mAP': {R: float}, 'precision': {R: float}}.
    """
    device = device or torch.as_tensor(query_codes).device
    query_codes, db_codes = _as_codes(query_codes, device), _as_codes(db_codes, device)
    relevance = Relevance(query_labels, db_labels, device)
    num_queries, kmax = query_codes.shape[0], max(topk)
    ap_sums = torch.zeros(len(topk), dtype=torch.float64, device=device)
    hit_sums = torch.zeros(len(topk), dtype=torch.float64, device=device)
    ranks = torch.arange(1, kmax + 1, device=device, dtype=torch.float32)
    cut = torch.tensor([min(k, db_codes.shape[0]) - 1 for k in topk], device=device)
    for start in range(0, num_queries, chunk):
        rows = slice(start, min(start + chunk, num_queries))
        ranked = rank_topk(query_codes[rows], db_codes, kmax)                 # (Qc, k)
        rel = relevance.of_ranked(rows, ranked)                              # (Qc, k)
        hits = rel.cumsum(1)                                                 # relevant in top r
        ap_terms = (rel * hits / ranks[:rel.shape[1]]).cumsum(1)             # sum rel(r) P@r
        ap_sums += ap_terms[:, cut].sum(0).double()
        hit_sums += hits[:, cut].sum(0).double()
    ks = torch.tensor(topk, dtype=torch.float64, device=device)
    maps = (ap_sums / ks / num_queries).tolist()
    precisions = (hit_sums / ks / num_queries).tolist()
    return {"mAP": dict(zip(topk, maps)), "precision": dict(zip(topk, precisions))}


@torch.no_grad()
def precision_recall_by_radius(query_codes, db_codes, query_labels, db_labels, chunk=1024,
                               device=None):
    """Precision and recall of Hamming-ball retrieval for radius 0..B.

    Precision at radius r averages over the queries that retrieve at least one item within r;
    recall averages over the queries that have at least one relevant item.
    Returns {'radius': [...], 'precision': [...], 'recall': [...]} (lists of B + 1 floats).
    """
    device = device or torch.as_tensor(query_codes).device
    query_codes, db_codes = _as_codes(query_codes, device), _as_codes(db_codes, device)
    relevance = Relevance(query_labels, db_labels, device)
    nbits, num_queries = query_codes.shape[1], query_codes.shape[0]
    prec_sum = torch.zeros(nbits + 1, dtype=torch.float64, device=device)
    prec_count = torch.zeros_like(prec_sum)
    rec_sum = torch.zeros_like(prec_sum)
    rec_count = 0
    for start in range(0, num_queries, chunk):
        rows = slice(start, min(start + chunk, num_queries))
        dist = hamming_distance(query_codes[rows], db_codes).round().long()   # (Qc, N)
        rel = relevance.of_all(rows)                                          # (Qc, N)
        retrieved = torch.zeros(dist.shape[0], nbits + 1, device=device)
        retrieved.scatter_add_(1, dist, torch.ones_like(rel))
        relevant_retrieved = torch.zeros_like(retrieved).scatter_add_(1, dist, rel)
        retrieved, relevant_retrieved = retrieved.cumsum(1), relevant_retrieved.cumsum(1)
        some = retrieved > 0
        prec_sum += torch.where(some, relevant_retrieved / retrieved.clamp(min=1), 0).sum(0).double()
        prec_count += some.sum(0).double()
        total_relevant = rel.sum(1, keepdim=True)
        has_relevant = total_relevant[:, 0] > 0
        rec_sum += (relevant_retrieved[has_relevant] / total_relevant[has_relevant]).sum(0).double()
        rec_count += int(has_relevant.sum())
    precision = torch.where(prec_count > 0, prec_sum / prec_count.clamp(min=1), 0)
    recall = rec_sum / max(rec_count, 1)
    return {"radius": list(range(nbits + 1)), "precision": precision.tolist(),
            "recall": recall.tolist()}
