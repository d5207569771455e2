"""Triton kernels for stack_fuse: one forward pass, one backward pass.

Importing this module imports triton; callers go through
:mod:`kernels.stack_fuse`, which guards the import. On CPU tensors the kernels
only run under the interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported); on a GPU they are compiled as usual.

Layout: the output ``[B, G, S*D]`` is the contiguous buffer ``[B, G*S, D]``,
so "stacking" is free: output row ``r = g*S + s`` is input frame ``t = r``.
Rows ``r >= T`` are the zero padding of the last group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validate import check_inputs, num_groups


@triton.jit
def stack_fuse_fwd_kernel(
    h_ptr, w_ptr, out_ptr,
    K, T, D, ROWS,
    s_hk, s_hb, s_ht, s_hd,
    s_ob, s_or,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, r, d] = sum_k w[k] * h[k, b, r, d] for r < T, 0 for T <= r < ROWS."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    # int64 before any multiply by a stride: B*T*D and K*B*T*D can exceed 2**31.
    b = tl.program_id(2).to(tl.int64)
    r = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < D
    load_mask = (r < T)[:, None] & d_ok[None, :]
    h_off = r[:, None] * s_ht + d[None, :] * s_hd
    h_layer = h_ptr + b * s_hb
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        wk = tl.load(w_ptr + k).to(tl.float32)
        x = tl.load(h_layer + h_off, mask=load_mask, other=0.0)
        acc += wk * x.to(tl.float32)
        # Advance the pointer rather than computing k * s_hk in int32.
        h_layer += s_hk
    store_mask = (r < ROWS)[:, None] & d_ok[None, :]
    out = out_ptr + b * s_ob + r[:, None] * s_or + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def stack_fuse_bwd_kernel(
    h_ptr, w_ptr, go_ptr, gh_ptr, gw_part_ptr,
    K, T, D, S, N_PROG,
    s_hk, s_hb, s_ht, s_hd,
    s_gb, s_gg, s_gc,
    s_ghk, s_ghb, s_ght,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_GW: tl.constexpr,
):
    """grad_h[k, b, t, :] = w[k] * go[b, t, :] (t < T; padding rows get no grad)
    and gw_part[k, program] = sum over this tile of h[k] * go, in fp32."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    b = pid_b.to(tl.int64)
    r = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (r < T)[:, None] & (d < D)[None, :]
    # Unstack: frame r lives in group r // S at column (r % S) * D + d; general
    # strides so a non-contiguous grad_out needs no copy.
    g = r // S
    col = (r - g * S) * D
    go_off = b * s_gb + (g * s_gg)[:, None] + (col[:, None] + d[None, :]) * s_gc
    go = tl.load(go_ptr + go_off, mask=mask, other=0.0).to(tl.float32)
    h_off = r[:, None] * s_ht + d[None, :] * s_hd
    gh_off = r[:, None] * s_ght + d[None, :]
    h_layer = h_ptr + b * s_hb
    gh_layer = gh_ptr + b * s_ghb
    prog = pid_t + tl.num_programs(0) * (pid_d + tl.num_programs(1) * pid_b)
    part = gw_part_ptr + prog
    for k in range(K):
        if NEED_GH:
            wk = tl.load(w_ptr + k).to(tl.float32)
            tl.store(gh_layer + gh_off, (wk * go).to(gh_ptr.dtype.element_ty), mask=mask)
        if NEED_GW:
            x = tl.load(h_layer + h_off, mask=mask, other=0.0).to(tl.float32)
            tl.store(part, tl.sum(x * go))
        h_layer += s_hk
        gh_layer += s_ghk
        part += N_PROG


def interpreting() -> bool:
    """True when these kernels run in triton's numpy interpreter. Decided when
    ``@triton.jit`` ran (i.e. by TRITON_INTERPRET at import), so ask the kernel."""
    return not isinstance(stack_fuse_fwd_kernel, triton.runtime.JITFunction)


def pick_blocks(rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): whole rows of D when they fit, many rows per tile.

    The interpreter pays per program, so it gets much bigger tiles. On a GPU a
    2048-element tile is 16 values per thread at 4 warps (four 16-byte loads
    in flight per layer) and leaves enough programs to spread a 10 s
    utterance (125 frames x 1024) over ~64 SMs.
    """
    tile = 1 << 16 if interpreting() else 2048
    block_d = min(triton.next_power_of_2(max(dim, 1)), tile)
    block_t = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_d))
    return block_t, block_d


def _check_runnable(t: torch.Tensor) -> None:
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            "the Triton stack_fuse path needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is first imported to run on CPU tensors"
        )


# FMA contraction on (better rounding, fewer instructions); explicit, because
# triton 3.9 warns when it is left to a default that 3.10 changes.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def forward_launch(hidden: torch.Tensor, weights: torch.Tensor, stack: int):
    """Allocate the output and build the forward launch: ``(out, grid, args, meta)``.

    Split from the launch itself so the compile-only check
    (:mod:`kernels.compile_check`) compiles exactly what a real call launches.
    """
    K, B, T, D = hidden.shape
    groups = num_groups(T, stack)
    rows = groups * stack
    out = torch.empty((B, groups, stack * D), dtype=hidden.dtype, device=hidden.device)
    block_t, block_d = pick_blocks(rows, D)
    grid = (triton.cdiv(rows, block_t), triton.cdiv(D, block_d), B)
    args = (
        hidden, weights.contiguous(), out,
        K, T, D, rows,
        *hidden.stride(),
        groups * stack * D, D,
    )
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, **COMPILE_OPTIONS)
    return out, grid, args, meta


def stack_fuse_triton_forward(hidden: torch.Tensor, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """Forward only (no autograd): one kernel launch, output in hidden.dtype."""
    check_inputs(hidden, weights, stack)
    _check_runnable(hidden)
    out, grid, args, meta = forward_launch(hidden, weights, stack)
    if out.numel():
        stack_fuse_fwd_kernel[grid](*args, **meta)
    return out


def backward_launch(hidden, weights, grad_out, stack, need_hidden=True, need_weights=True):
    """Allocate the gradient buffers and build the backward launch:
    ``(grad_h or None, parts or None, grid, args, meta)``; ``parts[K, n_prog]``
    holds per-program fp32 partial sums of grad_weights."""
    K, B, T, D = hidden.shape
    grad_h = torch.empty((K, B, T, D), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    block_t, block_d = pick_blocks(T, D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d), B)
    n_prog = grid[0] * grid[1] * grid[2]
    # Partial sums reduced by torch afterwards: no atomics, so deterministic.
    parts = torch.empty((K, n_prog), dtype=torch.float32, device=hidden.device) if need_weights else None
    # The unwanted half gets a dummy pointer; the kernel never touches it.
    args = (
        hidden, weights.contiguous(), grad_out,
        grad_h if grad_h is not None else hidden,
        parts if parts is not None else hidden,
        K, T, D, stack, n_prog,
        *hidden.stride(),
        *grad_out.stride(),
        *(grad_h.stride()[:3] if grad_h is not None else (0, 0, 0)),
    )
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, NEED_GH=need_hidden, NEED_GW=need_weights, **COMPILE_OPTIONS)
    return grad_h, parts, grid, args, meta


def stack_fuse_triton_backward(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    stack: int,
    need_hidden: bool = True,
    need_weights: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden [K,B,T,D] in hidden.dtype, grad_weights [K] in weights.dtype)."""
    _check_runnable(hidden)
    K, B, T, D = hidden.shape
    if grad_out.shape != (B, num_groups(T, stack), stack * D):
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} does not match the forward output")
    grad_h, parts, grid, args, meta = backward_launch(hidden, weights, grad_out, stack, need_hidden, need_weights)
    if B * T * D == 0:
        if grad_h is not None:
            grad_h.zero_()
        return grad_h, (torch.zeros_like(weights) if need_weights else None)
    stack_fuse_bwd_kernel[grid](*args, **meta)
    return grad_h, (parts.sum(dim=1).to(weights.dtype) if parts is not None else None)


class StackFuseFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward."""

    @staticmethod
    def forward(ctx, hidden, weights, stack):
        ctx.save_for_backward(hidden, weights)
        ctx.stack = stack
        return stack_fuse_triton_forward(hidden, weights, stack)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weights = ctx.saved_tensors
        need_h, need_w, _ = ctx.needs_input_grad
        if not (need_h or need_w):
            return None, None, None
        grad_h, grad_w = stack_fuse_triton_backward(
            hidden, weights, grad_out, ctx.stack, need_hidden=need_h, need_weights=need_w
        )
        return grad_h, grad_w, None


def stack_fuse_triton(hidden: torch.Tensor, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """Triton stack_fuse with gradients for hidden and weights (see reference for semantics)."""
    check_inputs(hidden, weights, stack)
    return StackFuseFunction.apply(hidden, weights, stack)
