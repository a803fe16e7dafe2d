"""MambaMixer (plain-PyTorch and Triton scans) vs mamba_ssm.Mamba, same weights, float32.

Compares the forward output and the gradient of every parameter (and of the input) as relative
errors ||mixer - cuda|| / ||cuda||, and times forward+backward of all three.

    python -m tools.mamba_parity --frames 25 30 256 2048 --out parity.json
"""
import argparse

import torch

from model.mamba import MambaMixer, selective_scan_ref
from utils.fileio import write_json


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def fwd_bwd(mixer, x, grad_out):
    x = x.detach().requires_grad_(True)
    mixer.zero_grad(set_to_none=True)
    y = mixer(x)
    y.backward(grad_out)
    grads = {name: p.grad.detach().clone() for name, p in mixer.named_parameters()}
    grads["input"] = x.grad.detach().clone()
    return y.detach(), grads


def timed_ms(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def compare(frames, batch, d_model, repeats, seed=0):
    from mamba_ssm import Mamba

    from model.scan_triton import selective_scan_triton
    torch.manual_seed(seed)
    cuda_mixer = Mamba(d_model, d_state=16, d_conv=4, expand=2).cuda()
    x = torch.randn(batch, frames, d_model, device="cuda")
    grad_out = torch.randn(batch, frames, d_model, device="cuda")
    y_cuda, g_cuda = fwd_bwd(cuda_mixer, x, grad_out)
    result = {"frames": frames, "batch": batch, "d_model": d_model,
              "cuda_fwd_bwd_ms": timed_ms(lambda: fwd_bwd(cuda_mixer, x, grad_out), repeats)}
    for name, scan in (("plain", selective_scan_ref), ("triton", selective_scan_triton)):
        mixer = MambaMixer(d_model, d_state=16, d_conv=4, expand=2, scan=scan).cuda()
        mixer.load_state_dict(cuda_mixer.state_dict(), strict=True)
        y, grads = fwd_bwd(mixer, x, grad_out)
        errors = {key: relative_error(grads[key], g_cuda[key]) for key in g_cuda}
        result[name] = {"output_rel_err": relative_error(y, y_cuda),
                        "max_grad_rel_err": max(errors.values()), "grad_rel_err": errors,
                        "fwd_bwd_ms": timed_ms(lambda: fwd_bwd(mixer, x, grad_out), repeats)}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[25, 30, 256, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False       # parity is judged in true float32
    torch.backends.cudnn.allow_tf32 = False
    rows = [compare(m, args.batch, args.d_model, args.repeats) for m in args.frames]
    print(f"{'M':>6}{'mixer':>8}{'out err':>11}{'max grad err':>14}{'ms':>10}"
          f"{'cuda ms':>10}  ok")
    for r in rows:
        for name in ("plain", "triton"):
            m = r[name]
            ok = max(m["output_rel_err"], m["max_grad_rel_err"]) <= args.tolerance
            print(f"{r['frames']:>6}{name:>8}{m['output_rel_err']:>11.2e}"
                  f"{m['max_grad_rel_err']:>14.2e}{m['fwd_bwd_ms']:>10.2f}"
                  f"{r['cuda_fwd_bwd_ms']:>10.2f}  {ok}")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tolerance": args.tolerance, "rows": rows}
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
