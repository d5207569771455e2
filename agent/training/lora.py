"""A small LoRA for the LLM's linear layers (no peft dependency).

`add_lora(model, rank, alpha, targets)` swaps each matching `nn.Linear` for a `LoRALinear`
(frozen base + trainable low-rank update, B initialised to zero so training starts from the
base model). `merged_copy(model)` returns a plain copy with the updates folded into the
weights: what a checkpoint stores, so it loads with no LoRA code at all.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self):  # code that inspects .weight (dtype, device) keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight += (self.lora_b @ self.lora_a) * self.scale
        for p in out.parameters():
            p.requires_grad_(True)
        return out


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets: Iterable[str] = DEFAULT_TARGETS) -> int:
    """Freeze `model` and wrap its target linears; returns how many were wrapped."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                count += 1
    return count


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRALinear folded back into a plain nn.Linear."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return out


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
