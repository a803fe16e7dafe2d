"""Feature extraction speed: videos per second of tools.extract on synthetic videos.

    python -m tools.bench_extract --videos 48 --backbone vgg16 --device cuda

Writes --videos mpeg4 videos of --seconds at 320 x 240 and 25 frames/s (a UCF101-like clip) into
--folder once, then extracts M = 25 frames per video with the backbone's randomly initialised
weights (the speed does not depend on the weights) and reports videos/s, the time to decode
and sample the frames alone, and the backbone's images/s.
"""
import json
import os
import time

import numpy as np
import torch

from dataset.video import import_av, read_frames
from inference.extract import extract_features, video_features
from model.backbones import FEATURE_SIZES, build_backbone, preprocess_frames
from utils.device import resolve_device
from utils.cli import command_parser
from utils.fileio import write_json


def write_clips(folder, count, seconds, size=(240, 320), rate=25):
    av = import_av()
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(folder, f"clip{i:04d}.mp4")
        if os.path.exists(path):
            continue
        with av.open(path, "w") as container:
            stream = container.add_stream("mpeg4", rate=rate)
            stream.height, stream.width = size
            stream.pix_fmt = "yuv420p"
            base = rng.integers(0, 255, size + (3,), dtype=np.uint8)
            for t in range(seconds * rate):
                image = np.roll(base, 4 * t, axis=1)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def main(argv=None):
    parser = command_parser("python -m tools.bench_extract", __doc__)
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--seconds", type=int, default=7)
    parser.add_argument("--backbone", default="vgg16", choices=sorted(FEATURE_SIZES))
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--batch-videos", type=int, default=8)
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--folder", default=os.path.join("work_dirs", "bench_videos"))
    parser.add_argument("--out", default=None, help="JSON report (default: tools/results/"
                                                    "bench_extract_<device>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.set_grad_enabled(False)
    write_clips(args.folder, args.videos, args.seconds)
    names = sorted(os.listdir(args.folder))[:args.videos]
    paths = [os.path.join(args.folder, n) for n in names]
    backbone = build_backbone(args.backbone, "random").to(device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "backbone": args.backbone,
              "videos": len(paths), "seconds_per_video": args.seconds, "frames": args.frames,
              "workers": args.workers, "batch_videos": args.batch_videos}
    start = time.perf_counter()
    for path in paths:
        read_frames(path, args.frames)
    report["decode_videos_per_s"] = round(len(paths) / (time.perf_counter() - start), 2)
    images = torch.cat([preprocess_frames(read_frames(paths[0], args.frames), device)] *
                       args.batch_videos)
    backbone(images)                                   # warm-up (kernels, cuDNN choice)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        backbone(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    report["backbone_images_per_s"] = round(3 * len(images) / (time.perf_counter() - start), 1)
    list(video_features(paths[:args.batch_videos], backbone, args.frames, device,
                        args.batch_videos, args.workers))    # the pipeline warm
    out_prefix = os.path.join(args.folder + "_out", "bench")
    os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    start = time.perf_counter()
    extract_features(args.folder, out_prefix, backbone, FEATURE_SIZES[args.backbone],
                     args.frames, device, args.batch_videos, args.workers,
                     backbone_name=args.backbone, weights="random")
    report["extract_videos_per_s"] = round(len(paths) / (time.perf_counter() - start), 2)
    print(json.dumps(report), flush=True)
    write_json(args.out or os.path.join("tools", "results",
                                        f"bench_extract_{device.type}.json"), report)
    return report


if __name__ == "__main__":
    main()
