"""Video files: finding them in a folder, and M frames sampled uniformly over each, decoded with
PyAV (whose wheels carry FFmpeg). PyAV is imported only here, when videos are read (the `video`
extra: pip install -e .[video]).

Frame sampling: of a video's n frames, frame floor((i + 1/2) n / M) for i = 0..M-1, the middle of
each of M equal segments (as the published features of the paper's data sets were sampled).
"""
import os

import numpy as np

from utils.errors import UserError
from utils.fileio import check_file

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".flv",
                    ".wmv", ".3gp", ".ts")


class VideoError(UserError):
    """A video that cannot be read, or that has fewer frames than are sampled."""


def import_av():
    try:
        import av
    except ImportError:
        raise UserError("reading videos needs PyAV: pip install -e .[video]") from None
    return av


def find_videos(root):
    """Video files under `root` (a folder, searched recursively, or one file): sorted relative
    paths, the names the features and the index keep."""
    if os.path.isfile(root):
        return [os.path.basename(root)]
    if not os.path.isdir(root):
        raise UserError(f"video folder not found: {root}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    if not found:
        raise UserError(f"{root} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return sorted(found)


def classes_of(names):
    """The class of each video of a folder-per-class layout: the first folder of its name;
    returns (sorted class names, (N,) class index)."""
    tops = [name.split(os.sep)[0] if os.sep in name else None for name in names]
    missing = [name for name, top in zip(names, tops) if top is None]
    if missing:
        raise UserError(f"--labels-from-folders needs every video in a class folder; "
                        f"{missing[0]} is not")
    classes = sorted(set(tops))
    position = {c: i for i, c in enumerate(classes)}
    return classes, np.array([position[t] for t in tops], dtype=np.int64)


def sample_indices(count, frames):
    """The indices of `frames` frames spread uniformly over `count`: the middle of each of
    `frames` equal segments."""
    return ((np.arange(frames) + 0.5) * count / frames).astype(np.int64)


def _open(av, path):
    try:
        container = av.open(path)
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError, OSError, UnicodeDecodeError) as err:
        detail = "no video stream" if isinstance(err, IndexError) else type(err).__name__
        raise VideoError(f"{path}: not a readable video ({detail})") from None
    stream.thread_type = "AUTO"
    return container, stream


def frame_count(path):
    """Frames of the video at `path`, from its container (or by counting its packets)."""
    av = import_av()
    check_file(path, "video")
    container, stream = _open(av, path)
    try:
        count = stream.frames
        if not count:
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: not a readable video ({type(err).__name__})") from None
    finally:
        container.close()
    return count


def _decode(av, path, wanted):
    """(frames decoded, {index: (H, W, 3) uint8} of the indices in `wanted`)."""
    container, stream = _open(av, path)
    kept, total = {}, 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            total = index + 1
    except av.FFmpegError as err:
        raise VideoError(f"{path}: not a readable video ({type(err).__name__} at frame "
                         f"{total})") from None
    finally:
        container.close()
    return total, kept


def read_frames(path, frames):
    """(M, H, W, 3) uint8 RGB frames sampled uniformly from the video at `path`; a video with
    fewer than M frames, or one that cannot be decoded, is a VideoError naming it."""
    av = import_av()
    check_file(path, "video")
    count = frame_count(path)
    for _ in range(2):           # a second pass only when the container miscounted its frames
        if count < frames:
            raise VideoError(f"{path}: {count} frames, fewer than the {frames} to sample")
        wanted = sample_indices(count, frames)
        total, kept = _decode(av, path, set(wanted.tolist()))
        if total == count:
            return np.stack([kept[i] for i in wanted.tolist()])
        count = total
    raise VideoError(f"{path}: its frame count changes from one decoding to the next")
