"""Public entry point: pick the Triton kernel or the torch reference.

``NESTVOX_STACK_FUSE`` overrides the choice (read on every call, so tests can
flip it): ``triton`` forces the kernel (on CPU tensors that needs
``TRITON_INTERPRET=1``), ``torch`` forces the reference, ``auto``/unset picks
Triton for CUDA tensors when triton imports, the reference otherwise.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from .reference import stack_fuse_reference
from .validate import check_inputs

ENV_VAR = "NESTVOX_STACK_FUSE"
_MODES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def _triton_module() -> tuple[ModuleType | None, str]:
    """Import the Triton implementation lazily: importing triton is slow, fixes
    interpreter mode for the whole process, and may be missing altogether."""
    try:
        from . import triton_stack_fuse
    except Exception as exc:  # ImportError, or a broken triton install
        return None, f"{type(exc).__name__}: {exc}"
    return triton_stack_fuse, ""


def triton_available() -> bool:
    """True when the Triton implementation imports."""
    return _triton_module()[0] is not None


def dispatch_mode() -> str:
    """The NESTVOX_STACK_FUSE setting, validated."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {_MODES}")
    return mode


def use_triton(hidden: torch.Tensor) -> bool:
    """Whether :func:`stack_fuse` would run the Triton kernel for ``hidden``."""
    mode = dispatch_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return hidden.is_cuda and torch.cuda.is_available() and triton_available()


def stack_fuse(hidden: torch.Tensor, weights: torch.Tensor, stack: int) -> torch.Tensor:
    """Fuse K layer outputs with ``weights`` and stack ``stack`` frames per group.

    Args:
        hidden: ``[K, B, T, D]`` selected encoder layer outputs.
        weights: ``[K]`` ALREADY-NORMALIZED fusion weights: the caller applies
            softmax to its learned logits; they are used as given here.
        stack: frames per group ``S >= 1``.

    Returns:
        ``[B, ceil(T/S), S*D]`` in ``hidden.dtype`` (fp32 accumulation),
        ``out[b, g, s*D:(s+1)*D] = sum_k weights[k] * hidden[k, b, g*S+s]``,
        zero where ``g*S+s >= T``. ``T == 0`` gives ``[B, 0, S*D]``.
        Differentiable with respect to ``hidden`` and ``weights``.
    """
    check_inputs(hidden, weights, stack)
    if not use_triton(hidden):
        return stack_fuse_reference(hidden, weights, stack)
    module, why = _triton_module()
    if module is None:
        raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({why})")
    return module.stack_fuse_triton(hidden, weights, stack)
