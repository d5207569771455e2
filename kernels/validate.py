"""Argument checks shared by every stack_fuse implementation."""
from __future__ import annotations

import torch


def num_groups(frames: int, stack: int) -> int:
    """Number of output groups for ``frames`` frames: ``ceil(frames / stack)``."""
    return -(-frames // stack)


def check_stack(stack) -> None:
    # bool is an int subclass; True as a stack factor is surely a bug.
    if isinstance(stack, bool) or not isinstance(stack, int) or stack < 1:
        raise ValueError(f"stack must be an int >= 1, got {stack!r}")


def check_inputs(hidden: torch.Tensor, weights: torch.Tensor, stack) -> None:
    """Raise ValueError with a precise message when the arguments do not fit."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise ValueError("hidden and weights must be torch.Tensors")
    if hidden.ndim != 4:
        raise ValueError(f"hidden must be [K, B, T, D] (4-D), got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}")
    K = hidden.shape[0]
    if K < 1:
        raise ValueError("hidden must hold at least one layer (K >= 1)")
    if weights.ndim != 1 or weights.shape[0] != K:
        raise ValueError(f"weights must be [K] = [{K}], got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a floating tensor, got {weights.dtype}")
    if weights.device != hidden.device:
        raise ValueError(f"weights on {weights.device} but hidden on {hidden.device}")
    check_stack(stack)
