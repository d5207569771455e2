"""Benchmark stack_fuse against the unfused eager torch sequence.

``python -m kernels.bench [--min-time 0.2] [--no-compile]``

Runs on CUDA when present (fused = the Triton kernel), else on CPU (fused =
the torch reference the dispatch picks there). Both sides run in one process,
interleaved per shape, and the table reports their ratio (this machine is
noisy: compare ratios, not absolute times). On CPU it also measures whether
``torch.compile`` of the reference beats eager.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from .reference import stack_fuse_reference
from .stack_fuse import stack_fuse, use_triton

LAYERS = (1, 4, 17)
DIMS = (512, 1024)
FRAMES = (4, 125)  # one streaming chunk; 10 s of audio at 80 ms per frame
STACKS = (2, 8)


def unfused(hidden: torch.Tensor, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """What one writes without the op: weighted sum, pad, reshape (3+ kernels)."""
    K, B, T, D = hidden.shape
    fused = (weights.view(K, 1, 1, 1).to(hidden.dtype) * hidden).sum(0)
    pad = -T % stack
    fused = F.pad(fused, (0, 0, 0, pad))
    return fused.reshape(B, (T + pad) // stack, stack * D)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"


def time_us(fn, min_time: float) -> float:
    """Median microseconds per call (torch.utils.benchmark syncs CUDA)."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median * 1e6


def fwd_bwd(fn, hidden, weights, stack):
    def run():
        out = fn(hidden, weights, stack)
        torch.autograd.grad(out, (hidden, weights), torch.ones_like(out))
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.15, help="seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison on CPU")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    opts = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[opts.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        triton_version = f"unavailable ({type(exc).__name__})"
    probe = torch.zeros(1, 1, 1, 1, device=device)
    print(f"device: {device_name(device)}")
    print(f"torch {torch.__version__}, triton {triton_version}, dtype {opts.dtype}, B=1")
    print(f"fused path: {'Triton kernel' if use_triton(probe) else 'torch reference (kernels.reference)'}")
    print("unfused: (w[:,None,None,None] * h).sum(0) -> F.pad -> reshape, eager\n")

    header = f"{'K':>3} {'D':>5} {'T':>4} {'S':>2} | {'fused us':>9} {'unfused us':>10} {'speedup':>7} | " \
             f"{'fused f+b':>9} {'unfused f+b':>11} {'speedup':>7} | max|diff|"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for K, D, T, S in itertools.product(LAYERS, DIMS, FRAMES, STACKS):
        hidden = torch.randn(K, 1, T, D, generator=gen).to(device, dtype)
        weights = torch.softmax(torch.randn(K, generator=gen), 0).to(device)
        diff = (stack_fuse(hidden, weights, S).float() - unfused(hidden, weights, S).float()).abs().max().item()
        with torch.no_grad():
            t_f = time_us(lambda: stack_fuse(hidden, weights, S), opts.min_time)
            t_u = time_us(lambda: unfused(hidden, weights, S), opts.min_time)
        hg, wg = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        tb_f = time_us(fwd_bwd(stack_fuse, hg, wg, S), opts.min_time)
        tb_u = time_us(fwd_bwd(unfused, hg, wg, S), opts.min_time)
        print(f"{K:>3} {D:>5} {T:>4} {S:>2} | {t_f:>9.1f} {t_u:>10.1f} {t_u / t_f:>6.2f}x | "
              f"{tb_f:>9.1f} {tb_u:>11.1f} {tb_u / tb_f:>6.2f}x | {diff:.1e}")

    if device.type == "cpu" and not opts.no_compile:
        compare_compile(dtype, opts.min_time)


def compare_compile(dtype: torch.dtype, min_time: float) -> None:
    """Is torch.compile(stack_fuse_reference) worth it on CPU? Measured on the
    larger shapes, where it has the best chance; compile time shown apart."""
    print("\nCPU: torch.compile(stack_fuse_reference) vs eager reference (forward, no grad)")
    header = f"{'K':>3} {'D':>5} {'T':>4} {'S':>2} | {'eager us':>9} {'compiled us':>11} {'speedup':>7} | " \
             f"compile s | bit-equal"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(1)
    for K, T in ((4, 4), (4, 125), (17, 125)):
        D, S = 1024, 8
        hidden = torch.randn(K, 1, T, D, generator=gen).to(dtype)
        weights = torch.softmax(torch.randn(K, generator=gen), 0)
        compiled = torch.compile(stack_fuse_reference, dynamic=False)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(hidden, weights, S)
            t_compile = time.perf_counter() - start
            t_e = time_us(lambda: stack_fuse_reference(hidden, weights, S), min_time)
            t_c = time_us(lambda: compiled(hidden, weights, S), min_time)
            same = torch.equal(compiled(hidden, weights, S), stack_fuse_reference(hidden, weights, S))
        print(f"{K:>3} {D:>5} {T:>4} {S:>2} | {t_e:>9.1f} {t_c:>11.1f} {t_e / t_c:>6.2f}x | "
              f"{t_compile:>9.1f} | {same}")


if __name__ == "__main__":
    main()
