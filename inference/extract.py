"""Frame features of a folder of videos, in the layout the configs read (docs/method.md §12).

`extract_features` writes PREFIX_feats.h5 with `feats` (N, M, D), `names` (the videos' paths
relative to the folder, in row order) and, with a folder-per-class layout, `classes`, plus
PREFIX_labels.mat (key `labels`, (N, C) one-hot). The file's attributes say how the features
were made (backbone, weights, frames, preprocessing), so that queries given as videos can be
made the same way later.

Every video is probed before anything is written: one that cannot be read or has fewer than M
frames stops the extraction with one line naming it, or, with `skip_bad`, is left out and listed
in PREFIX_skipped.txt. Decoding runs in a pool of threads (PyAV decodes without the GIL), the
backbone on the device in batches of whole videos, and the features go to a partial file video
batch by video batch, so memory does not grow with the collection. A killed extraction resumes
from the partial file and its record (same videos, same settings) and gives the same file:
batches always start at multiples of `batch_videos`, so each video is computed in the same batch
as in an uninterrupted run. The finished file replaces the partial one in one rename.
"""
import collections
import concurrent.futures
import json
import os

import h5py
import numpy as np
import torch

from dataset.io import DataError, write_labels
from dataset.video import VideoError, classes_of, find_videos, frame_count, read_frames
from model.backbones import preprocess_frames
from utils.content_hash import file_sha256
from utils.errors import UserError
from utils.fileio import atomic_write_text, check_file, ensure_space, write_json
from utils.log import get_logger

logger = get_logger(__name__)

PREPROCESSING = "shorter side 256 (bilinear, antialiased), centre crop 224, ImageNet mean/std"


def video_features(paths, backbone, frames, device, batch_videos=8, workers=4):
    """(n, M, D) float32 CPU features of the videos at `paths`, in order, `batch_videos` videos
    at a time: frames decoded in a pool of `workers` threads, the backbone on `device`."""
    backbone = backbone.to(device).eval()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decoded = _prefetched(pool, lambda p: read_frames(p, frames), paths,
                              depth=max(2 * workers, batch_videos))
        for first in range(0, len(paths), batch_videos):
            count = min(batch_videos, len(paths) - first)
            clips = [next(decoded) for _ in range(count)]
            images = torch.cat([preprocess_frames(clip, device) for clip in clips])
            with torch.no_grad():
                yield backbone(images).float().reshape(count, frames, -1).cpu()


def weights_tag(weights):
    """How the weights are named in a features file: 'imagenet', 'random' or 'sha256:...'."""
    if weights in ("imagenet", "random"):
        return weights
    return "sha256:" + file_sha256(weights, "weights")


def probe(root, names, frames, workers):
    """{name: why it cannot be used} for the videos that cannot be read or are too short."""
    def check(name):
        try:
            count = frame_count(os.path.join(root, name))
        except VideoError as err:
            return name, str(err)
        return name, None if count >= frames else f"{count} frames, fewer than {frames}"

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return {name: why for name, why in pool.map(check, names) if why}


def _prefetched(pool, read, items, depth):
    """read(item) for each item, in order, at most `depth` running or waiting ahead."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(read, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Partial:
    """The partial features file of an extraction and its record of how far it got."""

    def __init__(self, out_feats, settings, shape):
        folder, base = os.path.split(os.path.abspath(out_feats))
        self.path = os.path.join(folder, f".{base}.partial")
        self.record_path = self.path + ".json"
        self.settings, self.shape = settings, shape

    def start(self):
        """The row to continue from (0 for a new extraction)."""
        try:
            with open(self.record_path) as f:
                record = json.load(f)
            if record.get("settings") == self.settings and os.path.isfile(self.path):
                with h5py.File(self.path, "r") as f:
                    if f["feats"].shape == self.shape:
                        return int(record["done"])
        except (OSError, ValueError, KeyError, TypeError):
            pass                              # no usable partial: begin again
        ensure_space(self.path, int(np.prod(self.shape)) * 4)
        with h5py.File(self.path, "w") as f:
            f.create_dataset("feats", shape=self.shape, dtype=np.float32,
                             chunks=(1,) + self.shape[1:])
        self.mark(0)
        return 0

    def mark(self, done):
        write_json(self.record_path, {"settings": self.settings, "done": done})

    def remove(self):
        for path in (self.path, self.record_path):
            if os.path.exists(path):
                os.remove(path)


def extract_features(root, prefix, backbone, feature_size, frames=25, device="cpu",
                     batch_videos=8, workers=4, skip_bad=False, labels_from_folders=False,
                     backbone_name="custom", weights="random", progress=None):
    """Extract M = `frames` features per video of `root` with `backbone` ((n, 3, 224, 224) ->
    (n, D)); returns {'feats', 'labels' or None, 'videos', 'skipped': {name: why}}."""
    names = find_videos(root)
    if frames < 1:
        raise UserError(f"--frames must be at least 1, got {frames}")
    bad = probe(root, names, frames, workers)
    if bad and not skip_bad:
        first = next(iter(bad))
        raise VideoError(f"{len(bad)} of {len(names)} videos cannot be used, the first "
                         f"{os.path.join(root, first)}: {bad[first]}; --skip-bad extracts "
                         f"the others and lists these")
    names = [name for name in names if name not in bad]
    if not names:
        raise VideoError(f"no usable video in {root}")
    out_feats, out_labels = f"{prefix}_feats.h5", f"{prefix}_labels.mat"
    classes = classes_of(names) if labels_from_folders else None
    settings = {"videos": names, "frames": frames, "feature_size": feature_size,
                "backbone": backbone_name, "weights": weights, "preprocessing": PREPROCESSING,
                "batch_videos": batch_videos}
    partial = _Partial(out_feats, settings, (len(names), frames, feature_size))
    start = partial.start()
    if start:
        logger.info(f"resuming the extraction into {out_feats} at video {start + 1} of "
                    f"{len(names)}")
    paths = [os.path.join(root, name) for name in names[start:]]
    with h5py.File(partial.path, "r+") as out:
        done = start
        for feats in video_features(paths, backbone, frames, device, batch_videos, workers):
            if feats.shape[-1] != feature_size:
                raise UserError(f"the backbone gives {feats.shape[-1]}-d features, not "
                                f"{feature_size}")
            out["feats"][done:done + len(feats)] = feats.numpy()
            out.flush()
            done += len(feats)
            partial.mark(done)
            if progress is not None:
                progress(done, len(names))
        out.create_dataset("names", data=np.array(names, dtype=object),
                           dtype=h5py.string_dtype())
        if classes is not None:
            out.create_dataset("classes", data=np.array(classes[0], dtype=object),
                               dtype=h5py.string_dtype())
        out.attrs.update({k: v for k, v in settings.items() if k not in ("videos",)})
        out.attrs["source"] = os.path.abspath(root)
    if classes is not None:
        write_labels(out_labels, np.eye(len(classes[0]), dtype=np.uint8)[classes[1]])
    if bad:
        atomic_write_text(f"{prefix}_skipped.txt",
                          "".join(f"{name}\t{why}\n" for name, why in bad.items()))
    os.replace(partial.path, out_feats)
    os.remove(partial.record_path)
    return {"feats": out_feats, "labels": out_labels if classes is not None else None,
            "videos": len(names), "skipped": bad}


def read_names(path):
    """The video names of a features file (None when it has none) and its attributes."""
    check_file(path, "features")
    try:
        with h5py.File(path, "r") as f:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]] \
                if "names" in f else None
            return names, dict(f.attrs)
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
