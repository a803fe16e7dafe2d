"""From videos to an index: frame sampling and decoding (PyAV), feature extraction (layout,
names, labels, bad videos, resume), the FAISS index (exact ranking = the evaluation's, metadata
checks) and the search command. Videos are tiny ones the tests encode themselves; the backbone
is a small random network (torchvision's own backbones are tested where torchvision imports)."""
import json
import os
from unittest import mock

import h5py
import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
faiss = pytest.importorskip("faiss")

import eval as eval_script  # noqa: E402
from dataset.io import read_labels  # noqa: E402
from dataset.video import VideoError, read_frames, sample_indices  # noqa: E402
from inference import extract  # noqa: E402
from inference.index import CodeIndex, IndexFileError, pack_codes  # noqa: E402
from inference.metrics import rank_topk, retrieval_metrics  # noqa: E402
from model.backbones import preprocess_frames  # noqa: E402
from tests.test_integrity import listing, run_script  # noqa: E402
from tests.test_training import make_tiny_demo  # noqa: E402
from tests.conftest import DEMO_CONFIG  # noqa: E402
from tools import index as index_tool, search as search_tool  # noqa: E402
from utils.errors import UserError  # noqa: E402

FRAMES = 5


def write_video(path, count, seed, size=(48, 64)):
    """An mpeg4 video of `count` frames whose colour drifts with a seed of its own."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            image = np.zeros(size + (3,), np.uint8)
            image[:] = (base + 4 * i) % 256
            image[: size[0] // 2, : (i % size[1]) + 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class TinyBackbone(torch.nn.Module):
    """(n, 3, 224, 224) -> (n, 12): a random stand-in for a CNN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.proj = torch.nn.Linear(12, 12)

    def forward(self, images):
        return torch.relu(self.proj(self.pool(images).flatten(1)))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    lengths = {"walk/a.mp4": 12, "walk/b.avi": 30, "run/c.mp4": 7, "run/d.mp4": 20,
               "jump/e.mkv": 9}
    for i, (name, count) in enumerate(lengths.items()):
        write_video(root / name, count, seed=i)
    return root


def extract_into(root, prefix, **kwargs):
    return extract.extract_features(str(root), str(prefix), TinyBackbone(), 12, FRAMES,
                                    batch_videos=2, workers=2, **kwargs)


def test_frames_are_sampled_uniformly(videos):
    assert sample_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert sample_indices(25, 25).tolist() == list(range(25))
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    frames = read_frames(str(videos / "walk" / "b.avi"), FRAMES)
    assert frames.shape == (FRAMES, 48, 64, 3) and frames.dtype == np.uint8
    everything = read_frames(str(videos / "walk" / "b.avi"), 30)
    assert np.array_equal(frames, everything[sample_indices(30, FRAMES)])


def test_extraction_writes_the_configs_layout(videos, tmp_path):
    result = extract_into(videos, tmp_path / "set", labels_from_folders=True)
    assert result["videos"] == 5 and not result["skipped"]
    with h5py.File(tmp_path / "set_feats.h5") as f:
        feats = f["feats"][()]
        names = [n.decode() for n in f["names"][()]]
        classes = [c.decode() for c in f["classes"][()]]
        assert f.attrs["frames"] == FRAMES and f.attrs["backbone"] == "custom"
    assert names == ["jump/e.mkv", "run/c.mp4", "run/d.mp4", "walk/a.mp4", "walk/b.avi"]
    assert classes == ["jump", "run", "walk"] and feats.shape == (5, FRAMES, 12)
    labels = read_labels(str(tmp_path / "set_labels.mat"))
    assert labels.argmax(1).tolist() == [0, 1, 1, 2, 2]
    # a row is the backbone on the video's sampled frames
    with torch.no_grad():
        expected = TinyBackbone()(preprocess_frames(read_frames(str(videos / names[2]), FRAMES),
                                                    "cpu"))
    assert torch.allclose(torch.from_numpy(feats[2]), expected, atol=1e-6)
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_bad_videos_stop_before_anything_is_written_or_are_skipped(videos, tmp_path):
    bad_root = tmp_path / "bad"
    for name in ("ok1.mp4", "ok2.mp4"):
        write_video(bad_root / name, 10, seed=len(name))
    write_video(bad_root / "short.mp4", 3, seed=9)
    (bad_root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VideoError, match=r"2 of 4 videos cannot be used, the first .*broken.mp4: "
                                         r".*not a readable video.*--skip-bad"):
        extract_into(bad_root, out / "x")
    assert os.listdir(out) == []
    result = extract_into(bad_root, out / "x", skip_bad=True)
    assert result["videos"] == 2 and set(result["skipped"]) == {"broken.mp4", "short.mp4"}
    assert "3 frames, fewer than 5" in result["skipped"]["short.mp4"]
    skipped = (out / "x_skipped.txt").read_text()
    assert "broken.mp4\t" in skipped and "short.mp4\t" in skipped
    with h5py.File(out / "x_feats.h5") as f:
        assert [n.decode() for n in f["names"][()]] == ["ok1.mp4", "ok2.mp4"]


def test_a_killed_extraction_resumes_to_the_same_file(videos, tmp_path):
    extract_into(videos, tmp_path / "full")
    real_mark, calls = extract._Partial.mark, []

    def mark(self, done):
        real_mark(self, done)
        calls.append(done)
        if done == 2:                      # killed right after its first batch
            raise KeyboardInterrupt

    with mock.patch.object(extract._Partial, "mark", mark), pytest.raises(KeyboardInterrupt):
        extract_into(videos, tmp_path / "cut")
    assert not (tmp_path / "cut_feats.h5").exists() and (tmp_path / ".cut_feats.h5.partial").exists()
    reads = []
    real_read = extract.read_frames
    with mock.patch.object(extract, "read_frames", lambda p, m: reads.append(p) or real_read(p, m)):
        extract_into(videos, tmp_path / "cut")
    assert len(reads) == 3                 # the two videos done before are not read again
    with h5py.File(tmp_path / "full_feats.h5") as a, h5py.File(tmp_path / "cut_feats.h5") as b:
        assert np.array_equal(a["feats"][()], b["feats"][()])
        assert list(a["names"][()]) == list(b["names"][()])
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_packed_codes_and_the_exact_index_rank_as_the_evaluation():
    rng = np.random.default_rng(0)
    db = np.where(rng.random((3000, 16)) < 0.5, -1.0, 1.0)          # 16 bits: many ties
    queries = np.where(rng.random((40, 16)) < 0.5, -1.0, 1.0)
    packed = pack_codes(db)
    assert packed.shape == (3000, 2) and packed.dtype == np.uint8
    index = CodeIndex.build(db, [f"v{i}" for i in range(3000)], "run", "fp")
    distances, positions = index.search(queries, 200)
    expected = rank_topk(torch.tensor(queries), torch.tensor(db), 200).numpy()
    assert np.array_equal(positions, expected)
    hamming = (queries[:, None, :] != db[None]).sum(-1)
    assert np.array_equal(distances, np.take_along_axis(hamming, positions, 1))
    # approximate kinds find most of the exact neighbours and keep their record
    for kind in ("ivf", "hnsw"):
        approx = CodeIndex.build(db, [f"v{i}" for i in range(3000)], "run", "fp", kind=kind,
                                 nlist=16, nprobe=16)
        _, found = approx.search(queries, 10)
        _, exact = index.search(queries, 10)
        dist_found = np.take_along_axis(hamming, found, 1)
        dist_exact = np.take_along_axis(hamming, exact, 1)
        assert np.array_equal(dist_found.max(1) >= dist_exact.max(1), np.ones(40, bool))
        assert approx.meta["kind"] == kind


def test_index_files_round_trip_and_are_checked(tmp_path):
    rng = np.random.default_rng(1)
    codes = np.where(rng.random((50, 32)) < 0.5, -1.0, 1.0)
    index = CodeIndex.build(codes[:30], [f"a{i}" for i in range(30)], "r1", "f1")
    index.add(codes[30:], [f"b{i}" for i in range(20)])
    index.save(str(tmp_path / "i.npz"))
    again = CodeIndex.load(str(tmp_path / "i.npz"))
    assert again.names == index.names and again.meta == index.meta and again.meta["count"] == 50
    assert np.array_equal(again.search(codes[:5], 7)[1], index.search(codes[:5], 7)[1])
    with pytest.raises(IndexFileError, match="codes of 16 bits cannot join an index of 32-bit"):
        again.add(codes[:2, :16], ["x", "y"])
    with pytest.raises(IndexFileError, match="queries of 64 bits cannot search"):
        again.search(np.ones((1, 64)), 3)
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(IndexFileError, match="bad.npz: not an index of this project"):
        CodeIndex.load(str(tmp_path / "bad.npz"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run on the tiny demo, with eval.py's codes and mAP."""
    root = tmp_path_factory.mktemp("indexed")
    make_tiny_demo(str(root))
    from tests.test_training import TINY
    argv = ["--config", DEMO_CONFIG, "--no-progress", "--cfg-options",
            f"data_root={str(root)!r}", f"work_dir={str(root / 'runs')!r}", *TINY,
            "train.num_epochs=2"]
    import train as train_script
    train_script.main(argv)
    run_dir = root / "runs" / "demo_16bits"
    rows = eval_script.main(["--run", str(run_dir)])
    return root, run_dir, rows[0]


def test_search_results_give_the_evaluations_map(trained, tmp_path):
    root, run_dir, evaluated = trained
    db_feats = str(root / "demo" / "demo_train_feats.h5")
    index_tool.main(["build", "--run", str(run_dir), "--features", db_feats,
                     "--out", str(tmp_path / "i.npz")])
    rows = search_tool.main(["--index", str(tmp_path / "i.npz"), "--run", str(run_dir),
                             "--features", str(root / "demo" / "demo_test_feats.h5"),
                             "--k", "48", "--out", str(tmp_path / "r.jsonl")])
    written = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert written == rows and len(rows) == 16 * 48
    ranking = np.array([[r["position"] for r in rows if r["query"] == f"query:{q}"]
                        for q in range(16)])
    db_labels = read_labels(str(root / "demo" / "demo_train_labels.mat"))
    q_labels = read_labels(str(root / "demo" / "demo_test_labels.mat"))
    # mAP@R from the search results, by the definition of docs/method.md §7
    rel = (db_labels[ranking] * q_labels[:, None, :]).sum(-1) > 0
    for k in (5, 20, 40):
        hits = np.cumsum(rel[:, :k], 1)
        ap = (rel[:, :k] * hits / np.arange(1, k + 1)).sum(1) / k
        assert ap.mean() == pytest.approx(evaluated["mAP"][k], abs=1e-6)   # float32 there
    import hashlib
    sources = CodeIndex.load(str(tmp_path / "i.npz")).meta["sources"]
    assert sources == [{"file": db_feats, "videos": 48,
                        "sha256": hashlib.sha256(open(db_feats, "rb").read()).hexdigest()}]
    codes = np.load(run_dir / "codes.npz")
    assert np.array_equal(CodeIndex.load(str(tmp_path / "i.npz")).index.reconstruct_n(0, 48),
                          pack_codes(codes["database"]))
    scored = retrieval_metrics(codes["queries"], codes["database"], q_labels, db_labels,
                               topk=(5,))["mAP"][5]
    assert scored == pytest.approx(evaluated["mAP"][5], abs=1e-12)


def test_search_refuses_another_runs_codes(trained, tmp_path, capsys):
    root, run_dir, _ = trained
    from utils.config import config_fingerprint
    other = tmp_path / "other"
    import shutil
    shutil.copytree(run_dir, other)
    record = json.loads((other / "config.json").read_text())
    record["run_id"] = "someoneelse1"
    record["fingerprint"] = config_fingerprint(record["config"])
    (other / "config.json").write_text(json.dumps(record))
    index_tool.main(["build", "--run", str(run_dir), "--features",
                     str(root / "demo" / "demo_train_feats.h5"), "--out", str(tmp_path / "i.npz")])
    before = listing(tmp_path)
    code, err = run_script(search_tool, ["--index", str(tmp_path / "i.npz"), "--run", str(other),
                                         "--features", str(root / "demo" / "demo_test_feats.h5")],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot be compared" in err
    code, err = run_script(index_tool, ["add", "--index", str(tmp_path / "i.npz"), "--run",
                                        str(other), "--features",
                                        str(root / "demo" / "demo_test_feats.h5")], capsys)
    assert code == 2 and "codes of two models cannot be compared" in err
    assert listing(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_index_or_features_file_is_one_line(trained, tmp_path, capsys, damage):
    root, run_dir, _ = trained
    queries = str(root / "demo" / "demo_test_feats.h5")
    index_tool.main(["build", "--run", str(run_dir), "--features", queries,
                     "--out", str(tmp_path / "i.npz")])
    whole = (tmp_path / "i.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(whole[:100] if damage == "truncated" else b"")
    feats = open(queries, "rb").read()
    (tmp_path / "bad.h5").write_bytes(feats[:500] if damage == "truncated" else b"")
    for tool, argv, named in (
            (search_tool, ["--index", str(tmp_path / "bad.npz"), "--run", str(run_dir),
                           "--features", queries], "bad.npz"),
            (index_tool, ["add", "--index", str(tmp_path / "bad.npz"), "--run", str(run_dir),
                          "--features", queries], "bad.npz"),
            (search_tool, ["--index", str(tmp_path / "i.npz"), "--run", str(run_dir),
                           "--features", str(tmp_path / "bad.h5")], "bad.h5"),
            (index_tool, ["build", "--run", str(run_dir), "--features", str(tmp_path / "bad.h5"),
                          "--out", str(tmp_path / "new.npz")], "bad.h5")):
        code, err = run_script(tool, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "new.npz").exists()


@pytest.mark.parametrize("change, message", [
    ({"sources": "x"}, "'sources' must be a list, got str"),
    ({"sources": [{"file": 1}]}, "'sources[0].file' must be str, got int"),
    ({"kind": "lsh"}, "its record names the kind 'lsh'"),
    ({"features": {"backbone": "vgg16", "weights": 3, "frames": 5}},
     "'features.weights' must be str, got int"),
    ({"features": {"backbone": "alexnet", "weights": "random", "frames": 5}},
     "its record names features of backbone 'alexnet'"),
], ids=["sources", "source", "kind", "weights", "backbone"])
def test_a_damaged_index_record_is_one_line(trained, tmp_path, capsys, change, message):
    root, run_dir, _ = trained
    queries = str(root / "demo" / "demo_test_feats.h5")
    index_tool.main(["build", "--run", str(run_dir), "--features", queries,
                     "--out", str(tmp_path / "i.npz")])
    stored = np.load(tmp_path / "i.npz", allow_pickle=False)
    meta = {**json.loads(str(stored["meta"])), **change}
    with open(tmp_path / "bad.npz", "wb") as f:
        np.savez(f, faiss=stored["faiss"], names=stored["names"], meta=np.array(json.dumps(meta)))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not read: the record is checked first")
    argv = (["--index", str(tmp_path / "bad.npz"), "--run", str(run_dir), "--videos",
             str(tmp_path / "videos")] if "features" in change else
            ["--index", str(tmp_path / "bad.npz"), "--run", str(run_dir), "--features", queries])
    code, err = run_script(search_tool, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "bad.npz" in err and message in err, err


def test_outputs_never_overwrite_an_input_or_an_existing_file(trained, tmp_path, capsys):
    root, run_dir, _ = trained
    queries = tmp_path / "q.h5"
    queries.write_bytes(open(root / "demo" / "demo_test_feats.h5", "rb").read())
    index_tool.main(["build", "--run", str(run_dir), "--features", str(queries),
                     "--out", str(tmp_path / "i.npz")])
    (tmp_path / "mine.txt").write_text("a user's file\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    search = ["--index", str(tmp_path / "i.npz"), "--run", str(run_dir), "--features",
              str(queries)]
    for tool, argv, expected in (
            (search_tool, search + ["--out", str(tmp_path / "i.npz")], "is the input"),
            (search_tool, search + ["--out", str(queries), "--replace"], "is the input"),
            (search_tool, search + ["--out", str(tmp_path / "mine.txt")], "exists"),
            (search_tool, search + ["--out", str(tmp_path)], "is a directory"),
            (search_tool, search + ["--nprobe", "4"], "applies to ivf indexes"),
            (index_tool, ["build", "--run", str(run_dir), "--features", str(queries),
                          "--out", str(queries), "--replace"], "is the input"),
            (index_tool, ["build", "--run", str(run_dir), "--features", str(queries),
                          "--out", str(tmp_path / "i.npz")], "exists"),
            (index_tool, ["build", "--run", str(run_dir), "--features", str(queries),
                          "--out", str(tmp_path / "j.npz"), "--nlist", "0"], "--nlist")):
        code, err = run_script(tool, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, (argv, err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    search_tool.main(search + ["--out", str(tmp_path / "mine.txt"), "--replace"])
    assert (tmp_path / "mine.txt").read_text().startswith('{"query"')


def test_outputs_never_go_into_a_run_directory(trained, tmp_path, capsys):
    root, run_dir, _ = trained
    from tools import extract as extract_tool
    queries = str(root / "demo" / "demo_test_feats.h5")
    index_tool.main(["build", "--run", str(run_dir), "--features", queries,
                     "--out", str(tmp_path / "i.npz")])
    (tmp_path / "videos").mkdir()
    before = listing(run_dir)
    for tool, argv in (
            (search_tool, ["--index", str(tmp_path / "i.npz"), "--run", str(run_dir),
                           "--features", queries, "--out", str(run_dir / "found.jsonl")]),
            (index_tool, ["build", "--run", str(run_dir), "--features", queries,
                          "--out", str(run_dir / "i.npz")]),
            (extract_tool, [str(tmp_path / "videos"), "--out", str(run_dir / "set"),
                            "--weights", "random"])):
        code, err = run_script(tool, argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"lies in the run directory {run_dir}" in err, err
    assert listing(run_dir) == before


def test_a_features_file_already_in_the_index_is_not_added_again(trained, tmp_path, capsys):
    root, run_dir, _ = trained
    queries = str(root / "demo" / "demo_test_feats.h5")
    index_tool.main(["build", "--run", str(run_dir), "--features", queries,
                     "--out", str(tmp_path / "i.npz")])
    (tmp_path / "copy.h5").write_bytes(open(queries, "rb").read())
    before = (tmp_path / "i.npz").read_bytes()
    for features in (queries, str(tmp_path / "copy.h5")):     # the same bytes by another name
        code, err = run_script(index_tool, ["add", "--index", str(tmp_path / "i.npz"), "--run",
                                            str(run_dir), "--features", features], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"already holds the videos of {features} (added from {queries}" in err, err
    assert (tmp_path / "i.npz").read_bytes() == before
    index_tool.main(["add", "--index", str(tmp_path / "i.npz"), "--run", str(run_dir),
                     "--features", str(root / "demo" / "demo_train_feats.h5")])
    assert CodeIndex.load(str(tmp_path / "i.npz")).meta["count"] == 16 + 48


def test_extraction_never_overwrites_existing_features(tmp_path, capsys):
    from tools import extract as extract_tool
    (tmp_path / "videos").mkdir()
    (tmp_path / "set_feats.h5").write_text("a user's file\n")
    code, err = run_script(extract_tool, [str(tmp_path / "videos"), "--out",
                                          str(tmp_path / "set"), "--weights", "random"], capsys)
    assert code == 2 and err.count("\n") == 1 and "set_feats.h5 exists" in err, err
    assert (tmp_path / "set_feats.h5").read_text() == "a user's file\n"


def test_torchvision_backbones_give_their_documented_sizes():
    pytest.importorskip("torchvision", exc_type=ImportError)
    from model.backbones import FEATURE_SIZES, build_backbone
    images = torch.rand(2, 3, 224, 224)
    for name, size in FEATURE_SIZES.items():
        with torch.no_grad():
            assert build_backbone(name, "random")(images).shape == (2, size)
    with pytest.raises(UserError, match="weights file not found"):
        build_backbone("vgg16", "/nonexistent.pth")
