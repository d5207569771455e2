"""Run the stack_fuse Triton kernel for real against the torch reference.

``python -m kernels.check [--quick] [--dtypes fp32 bf16 fp16] [--json PATH]``

On a CUDA machine (TRITON_INTERPRET unset) the kernel is compiled and launched:
forward and backward (grad of hidden and of weights) on NEST-L shapes, each
compared with the torch reference (``kernels.reference``, fp32 accumulation)
and with a float64 ground truth, then timed against the reference and the
unfused eager sequence (CUDA events, median of ``--iters``). It exits 1 on any
mismatch, or if the kernel did not run compiled on the GPU.

Without CUDA it needs ``TRITON_INTERPRET=1`` (set before triton is imported;
``--quick`` sets it when no GPU is there) and runs tiny shapes in the
interpreter: the plumbing only, not a kernel check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kernel vs the torch reference: both accumulate in fp32 and round once, so fp32
# agrees to rounding noise and half precision to one output ulp.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
# (K layers, B streams, T frames, D width, S stack): NEST-L (17 layers x 512) streaming
# chunks and a 10 s utterance, a 1024-wide encoder, ragged tails, a big batch.
FULL_SHAPES = [(17, 1, 4, 512, 8), (17, 16, 4, 512, 8), (17, 1, 125, 512, 8), (17, 32, 125, 512, 8),
               (4, 8, 125, 1024, 8), (3, 5, 19, 33, 8), (1, 3, 7, 40, 2), (17, 2, 1, 512, 8)]
QUICK_SHAPES = [(3, 2, 19, 33, 8), (2, 1, 5, 16, 2)]


def compare(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_shape(tsf, reference, shape, dtype, device, gen) -> dict:
    K, B, T, D, S = shape
    # A strided view (layers not outermost), as the encoder's stacked captures can be.
    buf = torch.randn((B, T, K, D), generator=gen).to(device=device, dtype=dtype)
    hidden = buf.permute(2, 0, 1, 3).detach().requires_grad_()
    weights = torch.softmax(torch.randn(K, generator=gen), 0).to(device).requires_grad_()
    out = tsf.stack_fuse_triton(hidden, weights, S)
    ref = reference(hidden, weights, S)
    grad_out = torch.randn(ref.shape, generator=gen).to(device=device, dtype=dtype)
    gh, gw = torch.autograd.grad(out, (hidden, weights), grad_out)
    rgh, rgw = torch.autograd.grad(ref, (hidden, weights), grad_out)
    truth = reference(hidden.detach().double(), weights.detach().double(), S)
    rtol, atol = TOL[dtype]
    row = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "fwd_vs_ref": compare(out, ref), "fwd_vs_fp64": compare(out, truth),
        "ref_vs_fp64": compare(ref, truth),
        "grad_h_vs_ref": compare(gh, rgh), "grad_w_vs_ref": compare(gw, rgw),
    }
    scale_w = max(1.0, math.sqrt(B * T * D))  # grad_w sums B*T*D products
    ok = out.shape == ref.shape and out.dtype == dtype and not out.isnan().any().item()
    ok = ok and torch.allclose(out.float(), ref.float(), rtol=rtol, atol=atol)
    ok = ok and torch.allclose(gh.float(), rgh.float(), rtol=rtol, atol=atol)
    ok = ok and torch.allclose(gw.float(), rgw.float(), rtol=rtol, atol=atol * scale_w)
    if T % S:
        ok = ok and bool((out[:, -1, (T % S) * D:] == 0).all())
    row["ok"] = bool(ok)
    return row


def time_ms(fn, iters: int, device) -> float:
    """Median milliseconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU plumbing run)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None, help="write the results here")
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not opts.quick:
            print("kernels.check: no CUDA device; run with --quick for the interpreter plumbing check",
                  file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from . import triton_stack_fuse as tsf
    from .reference import stack_fuse_reference
    from .stack_fuse import stack_fuse, use_triton

    device = torch.device("cuda" if cuda else "cpu")
    compiled = not tsf.interpreting()
    probe = torch.zeros(1, 1, 1, 1, device=device)
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu (interpreter)'}; torch {torch.__version__}, "
          f"triton {triton.__version__}; kernel {'compiled' if compiled else 'INTERPRETED'}; "
          f"auto dispatch -> {'Triton' if use_triton(probe) else 'torch reference'}")
    failures = []
    if cuda and not compiled:
        failures.append("TRITON_INTERPRET is set on a CUDA machine: the kernel was not compiled")
    if cuda and not use_triton(probe):
        failures.append("kernels.stack_fuse does not dispatch CUDA tensors to the Triton kernel")
    gen = torch.Generator().manual_seed(0)
    shapes = QUICK_SHAPES if opts.quick else FULL_SHAPES
    rows = []
    header = (f"{'dtype':>8} {'K':>3} {'B':>3} {'T':>4} {'D':>5} {'S':>2} | {'fwd-ref':>8} {'fwd-fp64':>8} "
              f"{'ref-fp64':>8} {'gh-ref':>8} {'gw-ref':>8} | ok")
    print(header)
    print("-" * len(header))
    for name in opts.dtypes:
        dtype = DTYPES[name]
        for shape in shapes:
            row = check_shape(tsf, stack_fuse_reference, shape, dtype, device, gen)
            rows.append(row)
            print(f"{row['dtype']:>8} {shape[0]:>3} {shape[1]:>3} {shape[2]:>4} {shape[3]:>5} {shape[4]:>2} | "
                  f"{row['fwd_vs_ref']:8.1e} {row['fwd_vs_fp64']:8.1e} {row['ref_vs_fp64']:8.1e} "
                  f"{row['grad_h_vs_ref']:8.1e} {row['grad_w_vs_ref']:8.1e} | {'OK' if row['ok'] else 'FAIL'}",
                  flush=True)
            if not row["ok"]:
                failures.append(f"mismatch {name} {shape}")
    timings = []
    if cuda:
        print(f"\ntimings (median of {opts.iters}, CUDA events): kernel = kernels.stack_fuse on CUDA (Triton); "
              f"reference = kernels.reference; unfused = (w*h).sum(0) -> pad -> reshape")
        th = (f"{'dtype':>8} {'K':>3} {'B':>3} {'T':>4} {'D':>5} | {'kernel us':>9} {'ref us':>8} {'unfused us':>10} "
              f"| {'f+b kernel':>10} {'f+b ref':>8}")
        print(th)
        print("-" * len(th))
        for name in opts.dtypes:
            dtype = DTYPES[name]
            for K, B, T, D, S in [(17, 1, 4, 512, 8), (17, 16, 4, 512, 8), (17, 32, 125, 512, 8)]:
                h = torch.randn((K, B, T, D), generator=gen).to(device=device, dtype=dtype)
                w = torch.softmax(torch.randn(K, generator=gen), 0).to(device)

                def unfused():
                    fused = (w.view(K, 1, 1, 1).to(dtype) * h).sum(0)
                    fused = torch.nn.functional.pad(fused, (0, 0, 0, -T % S))
                    return fused.reshape(B, -1, S * D)

                with torch.no_grad():
                    t_k = time_ms(lambda: stack_fuse(h, w, S), opts.iters, device)
                    t_r = time_ms(lambda: stack_fuse_reference(h, w, S), opts.iters, device)
                    t_u = time_ms(unfused, opts.iters, device)
                hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()

                def fb(fn):
                    def run():
                        out = fn(hg, wg, S)
                        torch.autograd.grad(out, (hg, wg), torch.ones_like(out))
                    return run

                t_kb = time_ms(fb(stack_fuse), opts.iters, device)
                t_rb = time_ms(fb(stack_fuse_reference), opts.iters, device)
                timings.append({"dtype": name, "shape": [K, B, T, D, S], "kernel_us": 1000 * t_k,
                                "reference_us": 1000 * t_r, "unfused_us": 1000 * t_u,
                                "fwd_bwd_kernel_us": 1000 * t_kb, "fwd_bwd_reference_us": 1000 * t_rb})
                print(f"{name:>8} {K:>3} {B:>3} {T:>4} {D:>5} | {1000 * t_k:9.1f} {1000 * t_r:8.1f} {1000 * t_u:10.1f} "
                      f"| {1000 * t_kb:10.1f} {1000 * t_rb:8.1f}", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "compiled": compiled,
              "torch": torch.__version__, "triton": triton.__version__, "rows": rows, "timings": timings,
              "failures": failures, "ok": not failures}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    print("\n" + ("kernels.check: OK" if not failures else "kernels.check: FAILED: " + "; ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
