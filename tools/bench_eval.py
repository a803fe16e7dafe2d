"""Time and peak memory of mAP@K over random ±1 codes (the FCVID all-vs-all size by default).

    python -m tools.bench_eval --queries 45600 --database 45600 --bits 64 --device cpu
"""
import argparse
import json
import resource
import time

import torch

from inference.metrics import retrieval_metrics


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=45600)
    parser.add_argument("--database", type=int, default=45600)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--classes", type=int, default=239)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    db = torch.randint(0, 2, (args.database, args.bits), generator=gen).float() * 2 - 1
    queries = db[:args.queries] if args.queries <= args.database else \
        torch.randint(0, 2, (args.queries, args.bits), generator=gen).float() * 2 - 1
    db_labels = torch.nn.functional.one_hot(
        torch.randint(0, args.classes, (args.database,), generator=gen), args.classes)
    q_labels = db_labels[:args.queries] if args.queries <= args.database else \
        torch.nn.functional.one_hot(torch.randint(0, args.classes, (args.queries,),
                                                  generator=gen), args.classes)
    inputs_rss = peak_rss_mib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = retrieval_metrics(queries, db, q_labels, db_labels, topk=(100,), chunk=args.chunk,
                               device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report = {
        "queries": args.queries, "database": args.database, "bits": args.bits,
        "device": args.device, "threads": torch.get_num_threads(), "chunk": args.chunk,
        "seconds": round(seconds, 3), "mAP@100": result["mAP"][100],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_before_ranking_mib": round(inputs_rss, 1),
        "full_distance_matrix_mib": round(args.queries * args.database * 4 / 2 ** 20, 1),
    }
    if args.device == "cuda":
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
