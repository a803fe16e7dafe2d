"""GPU checks, run on a CUDA machine with mamba-ssm; skipped elsewhere."""
import pytest
import torch

from model.mamba import cuda_mamba_available
from model.s5vh import build_model
from tests.test_model import DIM, FRAMES, small_cfg, views

needs_cuda_mamba = pytest.mark.skipif(not cuda_mamba_available(),
                                      reason="needs CUDA and the mamba-ssm package")


@needs_cuda_mamba
@pytest.mark.parametrize("frames", [25, 30])
def test_plain_and_triton_mixers_match_mamba_ssm(frames):
    from tools.mamba_parity import compare
    torch.backends.cuda.matmul.allow_tf32 = False
    result = compare(frames, batch=4, d_model=64, repeats=1)
    for name in ("plain", "triton"):
        assert result[name]["output_rel_err"] < 1e-4, name
        assert result[name]["max_grad_rel_err"] < 1e-4, name


@needs_cuda_mamba
@pytest.mark.parametrize("impl", ["plain", "triton"])
def test_model_state_dict_moves_between_implementations(impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cuda_model = build_model(small_cfg("model.mamba_impl='cuda'")).cuda().eval()
    other = build_model(small_cfg(f"model.mamba_impl={impl!r}")).cuda().eval()
    other.load_state_dict(cuda_model.state_dict(), strict=True)
    x = torch.rand(4, FRAMES, DIM, device="cuda")
    vis, msk = (t.cuda() for t in views(4))
    a, b = cuda_model(x, vis, msk), other(x, vis, msk)
    assert torch.allclose(a["reconstruction"], b["reconstruction"], rtol=1e-4, atol=1e-5)
    round_trip = build_model(small_cfg("model.mamba_impl='cuda'")).cuda()
    round_trip.load_state_dict(other.state_dict(), strict=True)


def _graph_setup(amp=False, graphs=False, impl="cuda"):
    import numpy as np

    from Loss.losses import LabelTable, S5VHLoss
    from optim.engine import TrainStep
    from optim.optimizer import build_optimizer
    torch.manual_seed(0)
    cfg = small_cfg(f"model.mamba_impl={impl!r}", "model.variant='small'")
    model = build_model(cfg).cuda()
    centers = np.sign(np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
    criterion = S5VHLoss(centers, cfg.train).cuda()
    optimizer = build_optimizer(cfg, model, criterion, graphs)
    features = torch.rand(40, FRAMES, DIM, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    table = LabelTable(np.arange(40) % 4, 4, "cuda")
    return model, optimizer, table, TrainStep(model, criterion, optimizer, features, table, 8, amp,
                                              graphs)


def _run_steps(step, optimizer, count=10):
    """`count` steps, half in warm-up and half smoothing; every third a smaller batch of 6, as
    an epoch's last batch. A graphed step captures its four graphs first."""
    from optim.engine import draw_step_inputs
    from optim.optimizer import set_epoch_lr
    gen = torch.Generator("cuda").manual_seed(3)
    steps = []
    for i in range(count):
        index = torch.randperm(40, generator=gen, device="cuda")[:6 if i % 3 == 2 else 8]
        steps.append((draw_step_inputs(index, FRAMES, 0.5, step.model.depth, gen),
                      None if i < count // 2 else 0.01))
    losses = []
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        if step.use_graphs:
            examples = {(beta is not None, len(inputs.index)): (inputs, beta)
                        for inputs, beta in steps}
            for _ in step.capture_graphs(list(examples.values())):
                pass
        for i, (inputs, beta) in enumerate(steps):
            loss, _ = step(inputs, beta)
            losses.append(float(loss))
            if i == count // 2 + 1:
                set_epoch_lr(optimizer, 2e-4)
    return losses


@needs_cuda_mamba
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_cuda_graph_step_matches_eager_step(impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    eager_model, eager_opt, eager_table, eager = _graph_setup(graphs=False, impl=impl)
    graph_model, graph_opt, graph_table, graphed = _graph_setup(graphs=True, impl=impl)
    a, b = _run_steps(eager, eager_opt, 36), _run_steps(graphed, graph_opt, 36)
    assert sorted(graphed.graphs) == [(False, 6), (False, 8), (True, 6), (True, 8)]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(abs(x) for x in a)
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), name
    assert torch.allclose(eager_table.table, graph_table.table, atol=1e-5)


@needs_cuda_mamba
def test_bf16_steps_are_finite_and_close_to_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    _, opt32, _, step32 = _graph_setup(amp=False, impl="triton")
    _, opt16, _, step16 = _graph_setup(amp=True, impl="triton")
    a, b = _run_steps(step32, opt32), _run_steps(step16, opt16)
    assert all(torch.isfinite(torch.tensor(b)))
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stop_after", [1, 3])              # in warm-up, after it
def test_a_resumed_gpu_run_equals_an_uninterrupted_one(tmp_path, stop_after):
    """With CUDA graphs every step is a replay, the first ones too, so a run resumed after a kill
    replays exactly the steps of one that was never stopped: bit for bit the same weights,
    label table and losses."""
    import json

    from optim.engine import step_examples
    from optim.runner import start_run
    from tests.test_training import (TINY, interrupted_run, make_tiny_demo, resume,
                                     tiny_run_config)
    from utils.checkpoint import load_checkpoint
    make_tiny_demo(str(tmp_path))
    cuda = [item.replace("'cpu'", "'cuda'") for item in TINY]
    cfg = tiny_run_config(tmp_path, *cuda, "train.num_epochs=5", "train.warm_up_epoch=2",
                          "train.batch_size=10")
    assert len(step_examples(cfg, 48, 2, "cpu")) == 4     # both phases, full and last batch
    start_run(cfg, str(tmp_path / "full"), progress=False)
    interrupted_run(cfg, str(tmp_path / "cut"), stop_after)
    resume(str(tmp_path / "cut"))
    a = load_checkpoint(str(tmp_path / "full" / "last.pth"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pth"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["label_table"]["table"], b["label_table"]["table"])
    logs = [[{k: r[k] for k in ("loss", "rec", "con", "ca")}
             for r in map(json.loads, open(tmp_path / name / "log.jsonl"))]
            for name in ("full", "cut")]
    assert logs[0] == logs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_trained_together_equal_runs_trained_alone(tmp_path):
    """Three runs (two code lengths, two seeds) trained at once on one GPU, each on its own
    stream with CUDA graphs, give bit for bit the weights, label table, log losses and mAP that
    each gives alone."""
    import json
    import os

    from optim.runner import Job, train_runs
    from tests.test_training import TINY, make_tiny_demo, tiny_run_config
    from utils.checkpoint import load_checkpoint
    make_tiny_demo(str(tmp_path))
    cuda = [item.replace("'cpu'", "'cuda'") for item in TINY]
    configs = {f"b{bits}_s{seed}": tiny_run_config(tmp_path, *cuda, f"nbits={bits}",
                                                   f"seed={seed}", "train.num_epochs=6",
                                                   "train.select='val'", "train.eval_every=2")
               for bits, seed in ((16, 1), (32, 1), (16, 2))}
    together = train_runs([Job(cfg, str(tmp_path / "together" / name))
                           for name, cfg in configs.items()], progress=False)
    for (name, cfg), shared in zip(configs.items(), together):
        alone = train_runs([Job(cfg, str(tmp_path / "alone" / name))], progress=False)[0]
        assert alone["test_mAP"] == shared["test_mAP"], name
        a = load_checkpoint(str(tmp_path / "alone" / name / "last.pth"))
        b = load_checkpoint(str(tmp_path / "together" / name / "last.pth"))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
        assert torch.equal(a["label_table"]["table"], b["label_table"]["table"]), name
        losses = [[{k: r[k] for k in ("loss", "rec", "con", "ca")}
                   for r in map(json.loads, open(os.path.join(root, name, "log.jsonl")))]
                  for root in (tmp_path / "alone", tmp_path / "together")]
        assert losses[0] == losses[1], name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_compiled_run_repeats_in_a_fresh_process_and_stays_near_the_eager_one(tmp_path):
    """train.compile=True: the same run in two processes, each with an empty Inductor cache
    (so each compiles and tunes its kernels afresh), logs the same losses and test mAP; the
    losses stay within 1% of the eager run's (fused kernels round differently)."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_training import TINY, make_tiny_demo
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    make_tiny_demo(str(tmp_path))
    cuda = [item.replace("'cpu'", "'cuda'") for item in TINY]

    def run(name, *extra):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"cache_{name}")}
        command = [sys.executable, "train.py", "--config", "configs/S5VH/demo.py", "--no-progress",
                   "--work-dir", str(tmp_path / name), "--cfg-options",
                   f"data_root={str(tmp_path)!r}", *cuda, "train.num_epochs=4", *extra]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        (run_dir,) = [os.path.join(tmp_path, name, d) for d in os.listdir(tmp_path / name)]
        log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
        results = json.load(open(os.path.join(run_dir, "results.json")))
        return [[r[k] for k in ("loss", "rec", "con", "ca")] for r in log], results

    first, results = run("compiled_1", "train.compile=True")
    second, again = run("compiled_2", "train.compile=True")
    eager, _ = run("eager")
    assert results["runtime"]["compiled"] and results["runtime"]["cuda_graphs"]
    assert first == second and results["test_mAP"] == again["test_mAP"]
    assert torch.allclose(torch.tensor(first), torch.tensor(eager), rtol=1e-2)


@needs_cuda_mamba
def test_directions_on_two_streams_change_no_number():
    """model.two_streams overlaps the two scan directions on the GPU where they run apart; the
    kernels of each branch and their order are unchanged, so steps replayed from CUDA graphs
    give identical numbers. Checked on the Triton kernels (deterministic, unlike mamba_ssm's
    backward) with the directions kept apart, as other mixers run them."""
    import numpy as np

    from Loss.losses import LabelTable, S5VHLoss
    from optim.engine import TrainStep
    from optim.optimizer import build_optimizer
    results = []
    for two in (False, True):
        torch.manual_seed(0)
        cfg = small_cfg("model.mamba_impl='triton'", "model.variant='small'",
                        f"model.two_streams={two}")
        model = build_model(cfg, torch.device("cuda"))
        for layer in [*model.encoder.layers, *model.decoder.layers]:
            layer.paired = False
        assert ("two CUDA streams" in model.describe_mixer()) is two
        centers = np.sign(np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
        criterion = S5VHLoss(centers, cfg.train).cuda()
        optimizer = build_optimizer(cfg, model, criterion, True)
        features = torch.rand(40, FRAMES, DIM, device="cuda",
                              generator=torch.Generator("cuda").manual_seed(1))
        table = LabelTable(np.arange(40) % 4, 4, "cuda")
        step = TrainStep(model, criterion, optimizer, features, table, 8, True, True)
        losses = _run_steps(step, optimizer, count=12)
        results.append((losses, [p.detach().clone() for p in model.parameters()], table.table))
    (a, pa, ta), (b, pb, tb) = results
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(pa, pb)) and torch.equal(ta, tb)


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@needs_two_gpus
def test_two_gpus_train_what_one_trains(tmp_path):
    """One float32 run trained by two processes over NCCL, one GPU each, against one process on
    one GPU: the same losses and label-table drift epoch by epoch and the same mAP within float
    rounding (the GPUs sum the gradients in another order)."""
    import json

    from tests.test_distributed import options, torchrun
    from tests.test_training import make_tiny_demo
    make_tiny_demo(str(tmp_path))
    cuda = ["train.device='cuda'", "train.amp=False"]
    one = torchrun(1, options(tmp_path, "one", *cuda), {"CUDA_VISIBLE_DEVICES": "0"})
    two = torchrun(2, options(tmp_path, "two", *cuda), {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(line) for line in open(tmp_path / work / "demo_16bits" / "log.jsonl")]
            for work in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        for key in ("loss", "rec", "con", "ca", "label_changed", "label_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
        for k, v in a["val_mAP"].items():
            assert b["val_mAP"][k] == pytest.approx(v, abs=1e-3)


@needs_two_gpus
def test_runs_spread_over_two_gpus_equal_runs_on_one(tmp_path, monkeypatch):
    """Runs placed round-robin on two GPUs give bit for bit the weights and mAP they give when
    all train on the first."""
    from optim import runner
    from tests.test_training import TINY, make_tiny_demo, tiny_run_config
    from utils.checkpoint import load_checkpoint
    make_tiny_demo(str(tmp_path))
    cuda = [item.replace("'cpu'", "'cuda'") for item in TINY]
    configs = {f"s{seed}": tiny_run_config(tmp_path, *cuda, f"seed={seed}",
                                           "train.num_epochs=4") for seed in (1, 2, 3)}

    def train(work):
        jobs = [runner.Job(cfg, str(tmp_path / work / name)) for name, cfg in configs.items()]
        return runner.train_runs(jobs, progress=False)

    spread = train("spread")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    first = train("first")
    for name, a, b in zip(configs, spread, first):
        assert a["test_mAP"] == b["test_mAP"], name
        wa, wb = (load_checkpoint(str(tmp_path / work / name / "last.pth"))["model"]
                  for work in ("spread", "first"))
        assert all(torch.equal(wa[key], wb[key]) for key in wa), name
