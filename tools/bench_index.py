"""Search at scale: 1,000,000 database codes of 64 bits, 10,000 queries.

    python -m tools.bench_index                        # CPU (FAISS) and, with CUDA, the GPU
    python -m tools.bench_index --database 200000 --parts gpu

Synthetic codes with the structure of real ones: 1,000 random centres, every code a centre with
each bit flipped with probability 0.15 (queries drawn the same way). Measured: build time and
memory of the exact FAISS index (IndexBinaryFlat) and of IndexBinaryIVF (trained on 256,000
codes, 1,024 lists), queries per second for the top 100 (FAISS on all CPU cores; on the GPU, this
repository's chunked Hamming ranking in PyTorch, inference.metrics.rank_topk: no FAISS GPU wheel
exists for CUDA 13), and IVF's recall@100 against the exact top 100 at several nprobe (a result
counts when it is no farther than the exact 100th neighbour, so ties do not count as misses). The
exact CPU and GPU rankings are compared on the first queries.
"""
import json
import os
import time

import numpy as np
import torch

from inference.index import CodeIndex, import_faiss, pack_codes
from inference.metrics import rank_topk
from utils.cli import command_line, command_parser
from utils.fileio import write_json


IVF_LISTS, IVF_TRAIN = 1024, 256_000


def synthetic_codes(count, nbits, seed, centres=1000, flip=0.15):
    rng = np.random.default_rng(seed)
    centre_codes = rng.random((centres, nbits)) < 0.5
    own = rng.integers(0, centres, count)
    bits = centre_codes[own] ^ (rng.random((count, nbits)) < flip)
    return np.where(bits, 1.0, -1.0).astype(np.float32)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_cpu(db, queries, k, nprobes):
    faiss = import_faiss()
    names = [""] * len(db)
    out = {"threads": faiss.omp_get_max_threads()}
    flat, seconds = _timed(lambda: CodeIndex.build(db, names, "bench", "bench"))
    (distances, exact), search_s = _timed(lambda: flat.search(queries, k))
    out["flat"] = {"build_s": round(seconds, 2), "bytes": int(len(db) * db.shape[1] // 8),
                   "queries_per_s": round(len(queries) / search_s, 1)}
    print(json.dumps({"flat": out["flat"]}), flush=True)
    faiss_ivf = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(db.shape[1]), db.shape[1], IVF_LISTS)
    packed = pack_codes(db)
    _, train_s = _timed(lambda: faiss_ivf.train(packed[:IVF_TRAIN]))
    _, add_s = _timed(lambda: faiss_ivf.add(packed))
    out["ivf"] = {"nlist": IVF_LISTS, "trained_on": min(IVF_TRAIN, len(db)), "train_s": round(train_s, 2), "add_s": round(add_s, 2),
                  "bytes": int(len(db) * (db.shape[1] // 8 + 8)), "nprobe": {}}
    ivf = CodeIndex(faiss_ivf, names, {"kind": "ivf", "nbits": db.shape[1]})
    kth = distances[:, -1:]
    for nprobe in nprobes:
        (found_d, found), seconds = _timed(lambda: ivf.search(queries, k, nprobe))
        # a result counts when it is as near as the exact 100th: ties make the set ambiguous
        recall = float(((found_d <= kth) & (found >= 0)).mean())
        out["ivf"]["nprobe"][nprobe] = {"queries_per_s": round(len(queries) / seconds, 1),
                                        "recall_at_100": round(float(recall), 4)}
        print(json.dumps({"ivf nprobe": nprobe, **out["ivf"]["nprobe"][nprobe]}), flush=True)
    return out, exact


def bench_gpu(db, queries, k, chunk, exact=None):
    device = torch.device("cuda")
    db_t = torch.from_numpy(db).to(device, torch.float16)    # ±1 and sums to 64: exact
    q_t = torch.from_numpy(queries).to(device, torch.float16)

    def search():
        ranked = [rank_topk(q_t[i:i + chunk], db_t, k) for i in range(0, len(q_t), chunk)]
        torch.cuda.synchronize()
        return torch.cat(ranked)

    search()                                                  # warm-up
    ranked, seconds = _timed(search)
    out = {"device": torch.cuda.get_device_name(), "query_chunk": chunk,
           "bytes_on_gpu": int(db_t.numel() * db_t.element_size()),
           "queries_per_s": round(len(queries) / seconds, 1)}
    if exact is not None:
        out["same_ranking_as_faiss_flat"] = bool(
            np.array_equal(ranked[:100].cpu().numpy(), exact[:100]))
    print(json.dumps({"gpu": out}), flush=True)
    return out


def main(argv=None):
    parser = command_parser("python -m tools.bench_index", __doc__)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--gpu-chunk", type=int, default=256, help="queries ranked at a time")
    parser.add_argument("--parts", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--out", default=os.path.join("tools", "results", "bench_index.json"))
    args = parser.parse_args(argv)
    db = synthetic_codes(args.database, args.bits, seed=0)
    queries = synthetic_codes(args.queries, args.bits, seed=1)
    report = {"command": command_line("python -m tools.bench_index", argv),
              "database": args.database, "queries": args.queries, "bits": args.bits,
              "k": args.k}
    exact = None
    if "cpu" in args.parts:
        report["cpu"], exact = bench_cpu(db, queries, args.k, args.nprobe)
    if "gpu" in args.parts and torch.cuda.is_available():
        report["gpu"] = bench_gpu(db, queries, args.k, args.gpu_chunk, exact)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
