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
    cfg = small_cfg(f"model.mamba_impl={impl!r}", "model.drop_path=0.0")
    model = build_model(cfg).cuda()
    centers = np.sign(np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
    criterion = S5VHLoss(centers, cfg.train).cuda()
    optimizer, scheduler = build_optimizer(cfg, model, criterion, graphs)
    features = torch.rand(40, FRAMES, DIM, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    table = LabelTable(np.arange(40) % 4, 4, "cuda")
    return model, scheduler, table, TrainStep(model, criterion, optimizer, features, table, 8, amp, graphs)


def _run_steps(step, scheduler, count=10):
    from optim.engine import make_views
    gen = torch.Generator("cuda").manual_seed(3)
    losses = []
    for i in range(count):
        index = torch.randperm(40, generator=gen, device="cuda")[:8]
        visible, masked = make_views(8, FRAMES, 0.5, gen, "cuda")
        loss, _ = step(index, visible, masked, None if i < 5 else 0.01)
        losses.append(float(loss))
        if i == 6:
            scheduler.step()
    return losses


@needs_cuda_mamba
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_cuda_graph_step_matches_eager_step(impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    eager_model, eager_sched, eager_table, eager = _graph_setup(graphs=False, impl=impl)
    graph_model, graph_sched, graph_table, graphed = _graph_setup(graphs=True, impl=impl)
    a, b = _run_steps(eager, eager_sched), _run_steps(graphed, graph_sched)
    assert graphed.graphs                                   # both phases were captured
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(abs(x) for x in a)
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), name
    assert torch.allclose(eager_table.table, graph_table.table, atol=1e-5)


@needs_cuda_mamba
def test_bf16_steps_are_finite_and_close_to_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    _, sched32, _, step32 = _graph_setup(amp=False, impl="triton")
    _, sched16, _, step16 = _graph_setup(amp=True, impl="triton")
    a, b = _run_steps(step32, sched32), _run_steps(step16, sched16)
    assert all(torch.isfinite(torch.tensor(b)))
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a)
