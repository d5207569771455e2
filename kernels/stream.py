"""Streaming stack_fuse: frames arrive in chunks whose length is not a
multiple of the stack factor, so the incomplete tail group waits for the next
chunk in an explicit per-session carry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .stack_fuse import stack_fuse
from .validate import check_inputs, check_stack


@dataclass
class StackCarry:
    """Leftover UNFUSED layer frames ``[K, B, r, D]`` (``0 <= r < S``).

    Unfused, so the weights in force when a group completes apply to all of
    its frames. ``frames is None`` means empty with no known shape (the start
    of a session); ``None`` is also accepted wherever a carry is.
    """

    frames: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_layers: int | None = None, batch: int | None = None, dim: int | None = None,
              *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "StackCarry":
        """An empty carry; with ``num_layers, batch, dim`` it also knows its
        shape, so :func:`stack_fuse_flush` can return ``[B, 0, S*D]`` before
        any frame arrived."""
        if num_layers is None and batch is None and dim is None:
            return cls(None)
        if None in (num_layers, batch, dim):
            raise ValueError("give all of num_layers, batch, dim or none of them")
        return cls(torch.empty((num_layers, batch, 0, dim), dtype=dtype, device=device))

    @property
    def pending(self) -> int:
        """Number of frames waiting for their group to complete."""
        return 0 if self.frames is None else self.frames.shape[2]


def _check_carry(carry: StackCarry, hidden: torch.Tensor) -> None:
    f = carry.frames
    if f is None:
        return
    if f.ndim != 4 or (f.shape[0], f.shape[1], f.shape[3]) != (hidden.shape[0], hidden.shape[1], hidden.shape[3]):
        raise ValueError(
            f"carry frames {tuple(f.shape)} do not match new frames {tuple(hidden.shape)} in K, B or D"
        )
    if f.dtype != hidden.dtype or f.device != hidden.device:
        raise ValueError(f"carry is {f.dtype} on {f.device}, new frames {hidden.dtype} on {hidden.device}")


def stack_fuse_stream(
    carry: StackCarry | None, hidden_new: torch.Tensor, weights: torch.Tensor, stack: int
) -> tuple[StackCarry, torch.Tensor]:
    """Append ``hidden_new [K, B, t, D]`` (t may be 0) and emit complete groups.

    Returns ``(new_carry, groups [B, n, S*D])``; the input carry is not
    modified. Concatenating every ``groups`` of a turn plus the final
    :func:`stack_fuse_flush` equals ``stack_fuse`` over the whole turn exactly.
    """
    check_inputs(hidden_new, weights, stack)
    carry = carry if carry is not None else StackCarry()
    _check_carry(carry, hidden_new)
    frames = hidden_new if carry.pending == 0 else torch.cat([carry.frames, hidden_new], dim=2)
    total = frames.shape[2]
    complete = total - total % stack
    groups = stack_fuse(frames[:, :, :complete], weights, stack)
    # Clone the tail: a view would pin the whole chunk (and its cat buffer) in memory.
    return StackCarry(frames[:, :, complete:].clone()), groups


def stack_fuse_flush(carry: StackCarry | None, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """End of turn: emit the zero-padded partial group ``[B, 0 or 1, S*D]``
    and empty ``carry`` in place (keeping its shape) for the next turn."""
    check_stack(stack)
    if carry is None or carry.frames is None:
        raise ValueError(
            "cannot flush a carry that never saw frames: its batch size and width are unknown "
            "(create it with StackCarry.empty(num_layers, batch, dim, ...))"
        )
    frames = carry.frames
    groups = stack_fuse(frames, weights, stack)
    carry.frames = frames[:, :, :0]
    return groups
