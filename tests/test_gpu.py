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
def test_plain_mixer_matches_mamba_ssm(frames):
    from inference.mamba_parity import compare
    torch.backends.cuda.matmul.allow_tf32 = False
    result = compare(frames, batch=4, d_model=64, repeats=1)
    assert result["output_rel_err"] < 1e-4 and result["max_grad_rel_err"] < 1e-4


@needs_cuda_mamba
def test_model_state_dict_moves_between_plain_and_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cuda_model = build_model(small_cfg("model.mamba_impl='cuda'")).cuda().eval()
    plain_model = build_model(small_cfg("model.mamba_impl='plain'")).cuda().eval()
    plain_model.load_state_dict(cuda_model.state_dict(), strict=True)
    x = torch.rand(4, FRAMES, DIM, device="cuda")
    vis, msk = (t.cuda() for t in views(4))
    a, b = cuda_model(x, vis, msk), plain_model(x, vis, msk)
    assert torch.allclose(a["reconstruction"], b["reconstruction"], rtol=1e-4, atol=1e-5)
    round_trip = build_model(small_cfg("model.mamba_impl='cuda'")).cuda()
    round_trip.load_state_dict(plain_model.state_dict(), strict=True)


@needs_cuda_mamba
def test_bf16_training_step_is_finite_and_close_to_float32():
    import numpy as np

    from Loss.losses import LabelTable, S5VHLoss
    from optim.engine import epoch_generator, training_step
    torch.manual_seed(0)
    cfg = small_cfg("model.mamba_impl='cuda'")
    model = build_model(cfg).cuda()
    centers = np.sign(np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
    criterion = S5VHLoss(centers, cfg.train).cuda()
    table = LabelTable(np.arange(8) % 4, 4, "cuda")
    x, index = torch.rand(8, FRAMES, DIM, device="cuda"), torch.arange(8, device="cuda")
    losses = {}
    for amp in (False, True):
        gen = epoch_generator(0, 0, "cuda")
        loss, _ = training_step(model.eval(), criterion, x, index, table, 0.01, gen, 0.5, amp=amp)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[amp] = float(loss)
        model.zero_grad()
    assert abs(losses[True] - losses[False]) < 0.05 * abs(losses[False])
