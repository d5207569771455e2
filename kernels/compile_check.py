"""Compile the stack_fuse kernels to cubin for real GPUs on a GPU-less machine.

``python -m kernels.compile_check [--arch 80 90] [--dtype fp32 fp16 bf16]``

The triton wheel ships ptxas, so the whole pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin) runs without a GPU. A stand-in driver reports the chosen
compute capability, and each kernel is compiled through ``JITFunction.warmup``
with the exact arguments that a real call builds (CPU tensors stand in for
CUDA ones: only their dtype and alignment matter), so the specializations
(stride-1 constants, 16-byte alignment) match a real launch.

Must run with TRITON_INTERPRET unset (the interpreter never compiles).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _stand_in_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInCudaDriver(DriverBase):
        """Just enough of a CUDA driver for JIT compilation, never for launches."""

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return StandInCudaDriver()


@contextlib.contextmanager
def compile_target(arch: int):
    """Make triton compile for CUDA compute capability ``arch`` (e.g. 80, 90)."""
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(_stand_in_driver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_kernels(arch: int, dtype: torch.dtype, K=4, B=2, T=125, D=1024, stack=8) -> dict:
    """Compile forward and backward for one arch/dtype; returns name -> CompiledKernel."""
    from . import triton_stack_fuse as tsf

    if tsf.interpreting():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter never compiles)")

    hidden = torch.zeros((K, B, T, D), dtype=dtype)
    weights = torch.full((K,), 1.0 / K)
    compiled = {}
    with compile_target(arch):
        # Each JITFunction keeps per-device caches; clear them so the stand-in
        # target is honoured even if this process compiled for another arch.
        for fn in (tsf.stack_fuse_fwd_kernel, tsf.stack_fuse_bwd_kernel):
            fn.device_caches.clear()
        _, grid, args, meta = tsf.forward_launch(hidden, weights, stack)
        compiled["stack_fuse_fwd_kernel"] = tsf.stack_fuse_fwd_kernel.warmup(*args, grid=grid, **meta)
        grad_out = torch.zeros((B, -(-T // stack), stack * D), dtype=dtype)
        _, _, grid, args, meta = tsf.backward_launch(hidden, weights, grad_out, stack)
        compiled["stack_fuse_bwd_kernel"] = tsf.stack_fuse_bwd_kernel.warmup(*args, grid=grid, **meta)
    return compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"])
    opts = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}")
    for arch in opts.arch:
        for name in opts.dtype:
            for kname, kernel in compile_kernels(arch, DTYPES[name]).items():
                cubin, ptx = kernel.asm["cubin"], kernel.asm["ptx"]
                ok = len(cubin) > 0 and f".entry {kname}" in ptx and kname.encode() in cubin
                print(f"sm_{arch} {name:4s} {kname:22s} cubin {len(cubin):7d} B  "
                      f"warps {kernel.metadata.num_warps}  smem {kernel.metadata.shared:6d} B  {'OK' if ok else 'FAIL'}")
                if not ok:
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
