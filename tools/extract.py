"""Frame features of a folder of videos, ready for this repository's configs.

Samples M frames uniformly over each video (PyAV), runs them through an ImageNet CNN from
torchvision (VGG16 relu6, 4,096-d, as UCF101/HMDB51/FCVID's published features; ResNet-50 pool,
2,048-d, as ActivityNet's) on the GPU when there is one, and writes PREFIX_feats.h5 (`feats`
(N, M, D), `names`), and with --labels-from-folders PREFIX_labels.mat (one-hot, a class per
top-level folder). Every video is probed first: an unreadable one or one with fewer than M
frames stops the command before anything is written (--skip-bad: left out, listed in
PREFIX_skipped.txt). A killed extraction continues where it stopped when run again and gives
the same file. Needs the `video` extra (pip install -e .[video]).

examples:
  python -m tools.extract data/videos/ucf --out data/myucf/train --labels-from-folders
  python -m tools.extract clips/ --out data/clips/all --backbone resnet50 --frames 30
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

import os
import time

import torch

from inference.extract import extract_features, weights_tag
from model.backbones import FEATURE_SIZES, build_backbone
from optim.run_dir import check_outside_runs
from utils.cli import command_parser, run_cli
from utils.device import resolve_device
from utils.errors import UserError
from utils.fileio import check_new_output
from utils.log import get_logger

logger = get_logger("tools.extract")


def parse_args(argv=None):
    parser = command_parser("python -m tools.extract", __doc__)
    parser.add_argument("videos", help="a folder of video files (searched recursively)")
    parser.add_argument("--out", required=True, metavar="PREFIX",
                        help="output prefix: PREFIX_feats.h5 and PREFIX_labels.mat are written")
    parser.add_argument("--backbone", default="vgg16", choices=sorted(FEATURE_SIZES),
                        help="frame network (default vgg16)")
    parser.add_argument("--weights", default="imagenet", metavar="imagenet|random|PATH",
                        help="ImageNet weights fetched by torchvision (default), a state dict "
                             "file of torchvision's model, or 'random' (tests, speed only)")
    parser.add_argument("--frames", type=int, default=25, help="M, frames per video (25 or 30 "
                                                               "in the paper's data sets)")
    parser.add_argument("--labels-from-folders", action="store_true",
                        help="each top-level folder is a class: write PREFIX_labels.mat")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable or too short videos (listed in "
                             "PREFIX_skipped.txt) instead of stopping")
    parser.add_argument("--batch-videos", type=int, default=8,
                        help="videos per backbone batch (default 8: 200 images at M = 25)")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite existing PREFIX_feats.h5 / PREFIX_labels.mat files")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for option in ("batch_videos", "workers", "frames"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1, got "
                            f"{getattr(args, option)}")
    if os.path.isfile(args.videos):
        raise UserError(f"{args.videos} is a file; give the folder that holds the videos")
    outputs = [f"{args.out}_feats.h5"] + ([f"{args.out}_labels.mat"]
                                          if args.labels_from_folders else [])
    for path in outputs:
        check_new_output(path, "output file", [args.weights], args.replace)
        check_outside_runs(path, "output file")
    device = resolve_device(args.device)
    backbone = build_backbone(args.backbone, args.weights)
    logger.info(f"{args.backbone} ({args.weights} weights) on {device}, {args.frames} frames "
                f"per video")
    start = time.perf_counter()
    result = extract_features(args.videos, args.out, backbone, FEATURE_SIZES[args.backbone],
                              args.frames, device, args.batch_videos, args.workers,
                              args.skip_bad, args.labels_from_folders, args.backbone,
                              weights_tag(args.weights))
    seconds = time.perf_counter() - start
    logger.info(f"{result['videos']} videos in {seconds:.1f}s "
                f"({result['videos'] / seconds:.2f} videos/s) -> {result['feats']}"
                + (f", {result['labels']}" if result["labels"] else "")
                + (f"; skipped {len(result['skipped'])}, listed in {args.out}_skipped.txt"
                   if result["skipped"] else ""))
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
