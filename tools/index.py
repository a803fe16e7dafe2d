"""A searchable index of a collection: the codes of a trained run, in a FAISS binary index.

build: encodes every video of a features file (N, M, D) with the run's selected model
(best.pth), packs the codes (B/8 bytes a video) and writes the index: exact (flat, default)
or approximate (ivf, hnsw). The index records the run id, config fingerprint, code length, the
videos' names (the features file's `names`, else FILE:row) and the sha256 of every features
file it was made from. add: appends the videos of another features file, encoded by the same
run. Writes are atomic. Needs the `index` extra (pip install -e .[index]).

examples:
  python -m tools.index build --run work_dirs/ucf_64bits --features data/ucf/ucf_train_feats.h5 \\
      --out ucf.index.npz
  python -m tools.index add --index ucf.index.npz --run work_dirs/ucf_64bits \\
      --features data/more/more_feats.h5
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import os
import time

import torch

from inference.encode import encode_feature_file
from inference.evaluate import load_model
from inference.extract import read_names
from inference.index import KINDS, CodeIndex, IndexFileError
from optim.run_dir import check_outside_runs, read_run_config
from utils.cli import command_parser, run_cli
from utils.content_hash import file_sha256
from utils.device import resolve_device
from utils.fileio import check_file, check_new_output
from utils.errors import UserError
from utils.log import get_logger

logger = get_logger("tools.index")


def parse_args(argv=None):
    parser = command_parser("python -m tools.index", __doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="a new index of a features file")
    build.add_argument("--out", required=True, help="the index file to write (.npz)")
    build.add_argument("--kind", default="flat", choices=KINDS,
                       help="flat: exact (default); ivf, hnsw: approximate, faster at scale")
    build.add_argument("--nlist", type=int, default=1024, help="ivf: coarse lists")
    build.add_argument("--nprobe", type=int, default=16, help="ivf: lists searched by default")
    build.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per code")
    build.add_argument("--replace", action="store_true",
                       help="overwrite an existing --out file (never the features file)")
    add = sub.add_parser("add", help="append the videos of a features file to an index")
    add.add_argument("--index", required=True, help="the index file to extend")
    for one in (build, add):
        one.add_argument("--run", required=True, help="the run directory whose model encodes")
        one.add_argument("--features", required=True,
                         help="features file (N, M, D) of the videos, e.g. from tools.extract")
        one.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def run_codes(run_dir, cfg, record, features, device):
    """(codes (N, B), names, features' attributes) of a features file, by the run's model."""
    check_file(features, "features")
    names, attrs = read_names(features)
    model = load_model(cfg, os.path.join(run_dir, "best.pth"), device, record["run_id"])
    codes = encode_feature_file(model, features, cfg, device)
    if names is None:
        names = [f"{os.path.basename(features)}:{row}" for row in range(len(codes))]
    return codes, names, attrs


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg, record = read_run_config(args.run)
    if args.action == "build":
        for option in ("nlist", "nprobe", "hnsw_m"):
            if getattr(args, option) < 1:
                raise UserError(f"--{option.replace('_', '-')} must be at least 1, got "
                                f"{getattr(args, option)}")
        check_new_output(args.out, "index file", [args.features,
                                                  os.path.join(args.run, "best.pth")],
                         args.replace)
        check_outside_runs(args.out, "index file")
    digest = file_sha256(args.features, "features")
    if args.action == "add":
        index = CodeIndex.load(args.index)
        if index.meta["run_id"] != record["run_id"]:
            raise IndexFileError(f"{args.index} holds codes of run {index.meta['run_id']}; "
                                 f"{args.run} is run {record['run_id']}: codes of two models "
                                 f"cannot be compared")
        added = [source["file"] for source in index.meta.get("sources", [])
                 if source["sha256"] == digest]
        if added:
            raise UserError(f"{args.index} already holds the videos of {args.features} (added "
                            f"from {added[0]}, the same bytes); each video would be in it twice")
    start = time.perf_counter()
    codes, names, attrs = run_codes(args.run, cfg, record, args.features, device)
    encoded = time.perf_counter()
    if args.action == "build":
        index = CodeIndex.build(codes, names, record["run_id"], record["fingerprint"],
                                args.kind, args.nlist, args.hnsw_m, args.nprobe)
        index.meta["features"] = {k: (v.item() if hasattr(v, "item") else v)
                                  for k, v in attrs.items()}
        out = args.out
    else:
        index.add(codes, names)
        out = args.index
    # what the index was made from, every byte of it: the features files, in the order added
    index.meta.setdefault("sources", []).append(
        {"file": os.path.abspath(args.features), "sha256": digest, "videos": len(codes)})
    index.save(out)
    logger.info(f"{out}: {index.meta['count']:,} videos, {index.meta['nbits']} bits, "
                f"{index.meta['kind']} (encoded {len(codes):,} in {encoded - start:.1f}s, "
                f"indexed in {time.perf_counter() - encoded:.1f}s)")
    return index


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
