"""Capture the outputs of selected conformer layers during one encoder call.

Forward hooks on `encoder.layers[i]`, attached for the duration of a call and
removed after it, so no capture state outlives the call (NeMo's
`ConformerMultiLayerFeatureExtractor` keeps class-wide capture state and cannot
return the next caches while streaming; the hooks give the same tensors in both
the offline and the cache-aware forward).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch


@contextmanager
def capture_layers(encoder: torch.nn.Module, indices: Sequence[int]) -> Iterator[Dict[int, torch.Tensor]]:
    """Yield a dict that fills with `{layer_index: [B, T, D]}` as the encoder runs."""
    captured: Dict[int, torch.Tensor] = {}
    out_proj = getattr(encoder, "out_proj", None)

    def hook_for(index: int):
        def hook(_module, _inputs, output):
            # In the cache-aware step a layer returns (x, cache_channel, cache_time).
            x = output[0] if isinstance(output, tuple) else output
            captured[index] = out_proj(x) if out_proj is not None else x

        return hook

    handles = [encoder.layers[i].register_forward_hook(hook_for(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
