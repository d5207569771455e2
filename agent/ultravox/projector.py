"""The Ultravox projector with NEST layer fusion.

fusion (learned softmax weights over the K selected layers) + frame stacking
(one `kernels.stack_fuse` call) -> RMSNorm -> Linear -> SwiGLU -> RMSNorm -> Linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import stack_fuse


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class UltravoxProjector(nn.Module):
    def __init__(self, num_layers: int, audio_dim: int, stack_factor: int, hidden_size: int, text_dim: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"projector hidden size must be even for SwiGLU, got {hidden_size}")
        self.stack_factor = stack_factor
        # Logits, not weights: softmax keeps the fusion a convex mix. Zeros = plain mean.
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        in_dim = audio_dim * stack_factor
        self.ln_pre = nn.RMSNorm(in_dim, eps=eps)
        self.linear_1 = nn.Linear(in_dim, hidden_size, bias=False)
        self.act = SwiGLU()
        self.ln_mid = nn.RMSNorm(hidden_size // 2, eps=eps)
        self.linear_2 = nn.Linear(hidden_size // 2, text_dim, bias=False)

    def fusion_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits.float(), dim=0)

    def fuse_and_stack(self, hidden: torch.Tensor) -> torch.Tensor:
        """[K, B, T, D] layer outputs -> [B, ceil(T/S), S*D] fused, stacked frames."""
        weights = self.fusion_weights().to(hidden.dtype)
        return stack_fuse(hidden, weights, self.stack_factor)

    def project(self, stacked: torch.Tensor) -> torch.Tensor:
        """[B, G, S*D] stacked frames -> [B, G, text_dim] LLM input embeddings."""
        x = self.linear_1(self.ln_pre(stacked))
        return self.linear_2(self.ln_mid(self.act(x)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(self.fuse_and_stack(hidden))
