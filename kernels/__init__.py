"""stack_fuse: fuse K encoder layer outputs with softmax weights and stack S
frames per group, as one Triton kernel on CUDA with an exact torch reference.

Importing this package never imports triton; the Triton path is loaded on
first use, so it works without a GPU and without triton installed.
"""
from .reference import stack_fuse_reference
from .stack_fuse import dispatch_mode, stack_fuse, triton_available, use_triton
from .stream import StackCarry, stack_fuse_flush, stack_fuse_stream

__all__ = [
    "stack_fuse",
    "stack_fuse_reference",
    "StackCarry",
    "stack_fuse_stream",
    "stack_fuse_flush",
    "dispatch_mode",
    "triton_available",
    "use_triton",
]
