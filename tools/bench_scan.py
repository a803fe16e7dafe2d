"""Selective scan alone: the Triton kernel vs mamba_ssm's CUDA kernel vs the plain-PyTorch scan.

    python -m tools.bench_scan                      # S5VH training shapes + longer sequences
    python -m tools.bench_scan --sweep --out scan.json
    python -m tools.bench_scan --conv [--sweep]     # the causal convolution + SiLU instead

Times forward and forward+backward of one scan call (replayed from a CUDA graph, as in the
training step, so launch overhead is left out) with
E = 512 channels (d = 256, expand 2) and N = 16 states, each implementation fed the layout its
mixer hands it: mamba_ssm gets contiguous (b, E, L) tensors, the Triton kernel the (b, L, E)-major
views of `MambaMixer`. S5VH's training step runs 2 * 128 = 256 rows through L = 13 (encoder,
visible frames) and L = 25 (decoder). `--sweep` also times the Triton kernel at those shapes
with other channel blocks, warp counts, backward segment lengths and pipeline stages (all
combinations; segment "all" keeps every state, the backward pass before segments). `--conv`
times the Mamba block's causal depthwise convolution and SiLU instead: PyTorch's convolution
(in bf16 autocast, as the model runs it) against the fused Triton kernel, at the encoder's and
decoder's training shapes.
"""
import argparse
import functools
import itertools
import json

import torch

import model.conv_triton as conv_triton
import model.scan_triton as scan_triton
from model.mamba import causal_conv1d_silu_ref, selective_scan_ref
from utils.fileio import write_json

TRAINING_SHAPES = [(256, 13), (256, 25)]
LONG_SHAPES = [(16, 64), (16, 128), (16, 256), (16, 1024), (256, 64), (256, 128), (256, 256)]


def make_inputs(b, E, L, N, layout, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, device="cuda", generator=gen)

    if layout == "triton":   # what MambaMixer passes: projections' outputs, transposed views
        u, delta, z = (rand(b, L, E, scale=s).to(dtype).transpose(1, 2) for s in (1.0, 0.5, 1.0))
        B, C = (rand(b, L, N).to(dtype).transpose(1, 2) for _ in range(2))
    else:                    # what mamba_ssm.Mamba passes its kernel
        u, delta, z = (rand(b, E, L, scale=s).to(dtype) for s in (1.0, 0.5, 1.0))
        B, C = (rand(b, N, L).to(dtype) for _ in range(2))
    A = -(torch.rand(E, N, device="cuda", generator=gen) + 0.5)
    D, bias = rand(E), rand(E)
    tensors = [u, delta, A, B, C, D, z, bias]
    return [t.detach().requires_grad_() for t in tensors]


def replay_ms(fn, rounds=5, replays=10):
    """Median time of one call of `fn`, replayed from a CUDA graph: the kernels' time without
    Python and launch overhead, as in the captured training step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def time_scan(scan, inputs):
    u, delta, A, B, C, D, z, bias = inputs
    grad_out = torch.ones_like(u)

    def forward():
        with torch.no_grad():
            scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)

    def forward_backward():
        y = scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
        torch.autograd.grad(y, inputs, grad_out)

    return replay_ms(forward), replay_ms(forward_backward)


def triton_with(block, warps, segment, stages):
    return functools.partial(scan_triton.selective_scan_triton, block=block, num_warps=warps,
                             segment=segment, stages=stages)


# (b, E, L) of the training step's convolutions: encoder (d = 256) and decoder (d' = 192)
CONV_SHAPES = [(256, 512, 13), (256, 384, 25)]


def time_conv(conv, b, E, L, K=4):
    """Forward and forward+backward of one convolution call on bf16 x stored (b, L, 2E) as the
    projection leaves it, float32 weights, in bf16 autocast."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, L, 2 * E, device="cuda", generator=gen).to(torch.bfloat16)
    x = x.transpose(1, 2)[:, :E].detach().requires_grad_()
    weight = torch.randn(E, K, device="cuda", generator=gen).requires_grad_()
    bias = torch.randn(E, device="cuda", generator=gen).requires_grad_()
    grad_out = torch.ones(b, L, E, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    def forward():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            conv(x, weight, bias)

    def forward_backward():
        with torch.autocast("cuda", torch.bfloat16):
            y = conv(x, weight, bias)
        torch.autograd.grad(y, (x, weight, bias), grad_out)

    return replay_ms(forward), replay_ms(forward_backward)


def bench_conv(sweep):
    rows = []
    for b, E, L in CONV_SHAPES:
        impls = {"torch": causal_conv1d_silu_ref, "triton": conv_triton.causal_conv1d_silu_triton}
        if sweep:
            for block, warps, stages in itertools.product((32, 64, 128, 256), (1, 2, 4),
                                                          (1, 2, 3)):
                impls[f"triton block={block} warps={warps} stages={stages}"] = functools.partial(
                    conv_triton.causal_conv1d_silu_triton, block=block, num_warps=warps,
                    stages=stages)
        row = {"b": b, "E": E, "L": L}
        for name, conv in impls.items():
            fwd, fwd_bwd = time_conv(conv, b, E, L)
            row[name] = {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fwd_bwd, 4)}
        row["triton_speedup_fwd_bwd"] = round(row["torch"]["fwd_bwd_ms"]
                                              / row["triton"]["fwd_bwd_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "defaults": {"block": conv_triton.BLOCK_E, "warps": conv_triton.NUM_WARPS,
                         "stages": conv_triton.STAGES},
            "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--conv", action="store_true",
                        help="time the causal convolution + SiLU instead of the scan")
    parser.add_argument("--no-ref", action="store_true", help="skip the plain-PyTorch scan")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the scan benchmark needs a CUDA device")
    if args.conv:
        report = bench_conv(args.sweep)
        if args.sweep:
            print_sweep(report["rows"])
        if args.out:
            write_json(args.out, report)
        return report
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    dtype = getattr(torch, args.dtype)
    E, N = 512, 16
    rows = []
    for b, L in TRAINING_SHAPES + LONG_SHAPES:
        impls = {"cuda": (selective_scan_fn, "cuda"),
                 "triton": (scan_triton.selective_scan_triton, "triton")}
        if not args.no_ref and L <= 256:
            impls["plain"] = (selective_scan_ref, "triton")
        if args.sweep and (b, L) in TRAINING_SHAPES:
            for block, warps, segment, stages in itertools.product(
                    (32, 64, 128), (1, 2), (3, 4, 5, 8, "all"), (1, 2, 3)):
                steps = L if segment == "all" else segment
                impls[f"triton block={block} warps={warps} segment={segment} stages={stages}"] \
                    = (triton_with(block, warps, steps, stages), "triton")
        row = {"b": b, "L": L, "E": E, "N": N, "dtype": args.dtype}
        for name, (scan, layout) in impls.items():
            fwd, fwd_bwd = time_scan(scan, make_inputs(b, E, L, N, layout, dtype))
            row[name] = {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fwd_bwd, 4)}
        row["triton_speedup_fwd_bwd"] = round(row["cuda"]["fwd_bwd_ms"]
                                              / row["triton"]["fwd_bwd_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'b':>5}{'L':>6}{'cuda fwd':>10}{'triton fwd':>12}{'cuda f+b':>10}"
          f"{'triton f+b':>12}{'speed-up f+b':>14}")
    for r in rows:
        print(f"{r['b']:>5}{r['L']:>6}{r['cuda']['fwd_ms']:>10.3f}{r['triton']['fwd_ms']:>12.3f}"
              f"{r['cuda']['fwd_bwd_ms']:>10.3f}{r['triton']['fwd_bwd_ms']:>12.3f}"
              f"{r['triton_speedup_fwd_bwd']:>13.2f}x")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "defaults": {"block": scan_triton.BLOCK_E, "warps": scan_triton.NUM_WARPS,
                           "segment": scan_triton.SEGMENT, "stages": scan_triton.STAGES},
              "rows": rows}
    if args.sweep:
        print_sweep([r for r in rows if (r["b"], r["L"]) in TRAINING_SHAPES])
    if args.out:
        write_json(args.out, report)
    return report


def print_sweep(swept):
    """The ten fastest settings by forward+backward time summed over the swept rows."""
    totals = {name: sum(r[name]["fwd_bwd_ms"] for r in swept)
              for name in swept[0] if name.startswith("triton ")}
    default = sum(r["triton"]["fwd_bwd_ms"] for r in swept)
    print(f"\nfastest settings, forward+backward summed over L = {[r['L'] for r in swept]} "
          f"(the default: {default:.3f} ms)")
    for name, total in sorted(totals.items(), key=lambda item: item[1])[:10]:
        print(f"  {total:.3f} ms  {name}")


if __name__ == "__main__":
    main()
