"""int8 weights for CPU serving: PyTorch's dynamic quantization of every nn.Linear.

On a CPU one engine step reads every weight of the encoder or the LLM, and
MKL's fp32 GEMM for the few rows a realtime step has (one per session) runs at a
fraction of the machine's bandwidth; fbgemm's int8 kernels read a quarter of
the bytes and stay fast at small batch (`python -m agent.bench decode --llm bench
[--quantize int8]`: a batch-8 decode step 149.5 ms fp32 vs 38.8 ms int8 here). Activations are quantized
per call, so results differ slightly from fp32 and, in a batched step, depend a
little on the other rows: streaming is then no longer bit-equal to the offline
forward. It is an opt-in serving mode (`serve.py --quantize int8`), never used
in training or in the tests' equality checks.
"""
from __future__ import annotations

import warnings

import torch

QUANTIZE_CHOICES = ("none", "int8")


def quantize_linear_int8(module: torch.nn.Module) -> int:
    """Replace every nn.Linear in `module` (in place) by its dynamic int8 version;
    returns how many were replaced. CPU only."""
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU only: drop --quantize, or serve with --device cpu")
    count = sum(1 for m in module.modules() if type(m) is torch.nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao is its successor)
        torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return count


def quantize_model(model, mode: str) -> str:
    """Apply `mode` ("none" or "int8") to an UltravoxModel's encoder, projector and
    LLM; returns a one-line description for the startup log."""
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {mode!r}")
    if mode == "none":
        return "fp weights"
    n = quantize_linear_int8(model.audio_tower.encoder)
    n += quantize_linear_int8(model.projector)
    n += quantize_linear_int8(model.language_model)
    return f"int8 dynamic quantization of {n} linear layers (encoder, projector, LLM)"
