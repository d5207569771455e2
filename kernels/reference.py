"""Exact torch implementation of the fuse-and-stack op.

This is the CPU path of :func:`kernels.stack_fuse` and the oracle the Triton
kernel is tested against. It is plain differentiable torch, so autograd gives
gradients for both ``hidden`` and ``weights``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validate import check_inputs, num_groups


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32, fp64 stays fp64 (gradcheck needs it)."""
    return torch.promote_types(dtype, torch.float32)


def stack_fuse_reference(hidden: torch.Tensor, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """Weighted sum over layers, then stack ``stack`` frames per group.

    Args:
        hidden: ``[K, B, T, D]`` outputs of the K selected encoder layers.
        weights: ``[K]`` fusion weights, ALREADY normalized (the caller applies
            softmax to its learned logits; this op does not).
        stack: frames per output group ``S >= 1``.

    Returns:
        ``[B, ceil(T/S), S*D]`` in ``hidden.dtype``; the last group is
        zero-padded when ``T % S != 0``. ``out[b, g, s*D:(s+1)*D] =
        sum_k weights[k] * hidden[k, b, g*S+s, :]``.
    """
    check_inputs(hidden, weights, stack)
    K, B, T, D = hidden.shape
    acc_dtype = accumulation_dtype(hidden.dtype)
    # [K,1,1,1] weights in the accumulation dtype: tensor-tensor promotion
    # makes the products fp32 even for fp16/bf16 hidden.
    products = (weights.to(acc_dtype).view(K, 1, 1, 1) * hidden).unbind(0)
    # Left-to-right elementwise adds, not .sum(0): every output element is then
    # the same sequence of IEEE operations whatever T, memory layout, SIMD
    # tail or thread split, so chunked streaming is bit-identical to one call.
    # (ATen's sum(0) was measured to change bits with T at K=33; a BLAS gemv
    # is faster but MKL promises no reproducibility across sizes/alignment.)
    # unbind, not indexing: its backward stacks the K grads in one copy.
    fused = products[0]
    for k in range(1, K):
        fused = fused + products[k]
    fused = fused.to(hidden.dtype)
    groups = num_groups(T, stack)
    pad = groups * stack - T
    if pad:
        fused = F.pad(fused, (0, 0, 0, pad))
    return fused.reshape(B, groups, stack * D)
