"""Search an index with queries given as a features file or as video files.

The queries are encoded by the run that made the index (--run, checked against the index's
record): features files directly, videos after extracting their frame features the way the
indexed features were made (backbone, weights, frames, as the index records them). Prints or
writes the top --k neighbours of each query, nearest first, with their Hamming distances, as
JSON lines or CSV. An exact (flat) index ranks as this repository's evaluation does (ties by
position in the index), so mAP computed from its results equals eval.py's.

examples:
  python -m tools.search --index ucf.index.npz --run work_dirs/ucf_64bits \\
      --features data/ucf/ucf_test_feats.h5 --k 20 --out results.jsonl
  python -m tools.search --index ucf.index.npz --run work_dirs/ucf_64bits --videos clip.mp4
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import csv
import io
import json
import os
import sys

import torch

from dataset.video import find_videos
from inference.encode import encode, encode_feature_file
from inference.evaluate import load_model
from inference.extract import read_names, video_features, weights_tag
from inference.index import CodeIndex, IndexFileError
from model.backbones import FEATURE_SIZES, build_backbone
from optim.run_dir import check_outside_runs, read_run_config
from utils.cli import command_parser, run_cli
from utils.device import resolve_device
from utils.errors import UserError
from utils.fileio import atomic_write_text, check_file, check_new_output
from utils.schema import check_structure


def parse_args(argv=None):
    parser = command_parser("python -m tools.search", __doc__)
    parser.add_argument("--index", required=True, help="an index from tools.index")
    parser.add_argument("--run", required=True, help="the run directory that made the index")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--features", help="a features file (N, M, D) of the queries")
    queries.add_argument("--videos", nargs="+", help="video files (or folders of them)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf: lists to search")
    parser.add_argument("--format", default="jsonl", choices=["jsonl", "csv"])
    parser.add_argument("--out", default=None, help="file to write (default: the console)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite an existing --out file (never one of the inputs)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="--videos: the backbone's weights file, when the index records "
                             "weights loaded from a file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def query_features(args, index, device):
    """(names, (Q, M, D) features or a features file path) of the queries."""
    if args.features:
        check_file(args.features, "features")
        names, _ = read_names(args.features)
        return names, args.features
    made = index.meta.get("features")
    if not isinstance(made, dict) or "backbone" not in made:
        raise IndexFileError(f"{args.index} does not record how its features were made (they "
                             f"did not come from tools.extract); give the queries as --features")
    check_structure(made, {"backbone": str, "weights": str, "frames": int}, args.index,
                    "features")
    if made["backbone"] not in FEATURE_SIZES or made["frames"] < 1:
        raise IndexFileError(f"{args.index}: its record names features of backbone "
                             f"{made['backbone']!r} and {made['frames']} frames; expected one of "
                             f"{sorted(FEATURE_SIZES)} and at least 1 frame")
    weights = made["weights"]
    if weights.startswith("sha256:"):
        if not args.weights or weights_tag(args.weights) != weights:
            raise UserError(f"the indexed features were made with the weights {weights}; give "
                            f"that file with --weights")
        weights = args.weights
    paths = []
    for given in args.videos:
        paths += [os.path.join(given, n) for n in find_videos(given)] if os.path.isdir(given) \
            else [given]
    backbone = build_backbone(made["backbone"], weights)
    feats = torch.cat(list(video_features(paths, backbone, int(made["frames"]), device)))
    return paths, feats


def main(argv=None):
    args = parse_args(argv)
    if args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.nprobe is not None and args.nprobe < 1:
        raise UserError(f"--nprobe must be at least 1, got {args.nprobe}")
    if args.out:
        check_new_output(args.out, "--out file", [args.index, args.features, *(args.videos or []),
                                                  os.path.join(args.run, "best.pth")],
                         args.replace)
        check_outside_runs(args.out, "--out file")
    device = resolve_device(args.device)
    index = CodeIndex.load(args.index)
    if args.nprobe is not None and index.meta["kind"] != "ivf":
        raise UserError(f"--nprobe applies to ivf indexes; {args.index} is "
                        f"{index.meta['kind']}")
    cfg, record = read_run_config(args.run)
    if record["run_id"] != index.meta["run_id"]:
        raise IndexFileError(f"{args.index} holds codes of run {index.meta['run_id']}, not of "
                             f"{args.run} (run {record['run_id']}): its codes cannot be compared "
                             f"with this model's")
    model = load_model(cfg, os.path.join(args.run, "best.pth"), device, record["run_id"])
    names, source = query_features(args, index, device)
    if isinstance(source, str):
        codes = encode_feature_file(model, source, cfg, device)
    else:
        codes = encode(model, source, device, cfg.eval.batch_size)
    names = names or [f"query:{row}" for row in range(len(codes))]
    distances, positions = index.search(codes, args.k, args.nprobe)
    rows = [{"query": names[q], "rank": r + 1, "video": index.names[p],
             "position": int(p), "distance": int(d)}
            for q in range(len(codes))
            for r, (d, p) in enumerate(zip(distances[q], positions[q])) if p >= 0]
    if args.format == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["query", "rank", "video", "position",
                                                    "distance"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
