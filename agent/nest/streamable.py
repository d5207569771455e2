"""Can this encoder be streamed exactly? The reasons it cannot, in words.

Exact cache-aware streaming needs `chunked_limited` attention, causal depthwise
convolutions and per-frame feature normalization (none, or fixed statistics).
The published NEST checkpoints have none of the three; `agent.training.streamify`
converts them. Used to refuse (or warn) before serving.
"""
from __future__ import annotations

from typing import List

from agent.nest.normalization import is_fixed


def not_streamable_reasons(nest_encoder) -> List[str]:
    """Empty when `nest_encoder` (a NestEncoder) streams exactly; else what stops it."""
    enc = nest_encoder.encoder
    reasons = []
    if enc.att_context_style != "chunked_limited":
        reasons.append(f"{enc.att_context_style} attention {list(enc.att_context_size)}")
    if not all(layer.conv.depthwise_conv._right_padding == 0 for layer in enc.layers):
        reasons.append("symmetric (non-causal) convolutions")
    fz = nest_encoder.preprocessor.featurizer
    fixed = getattr(fz, "fixed_normalization", None) is not None or is_fixed(fz.normalize)
    if not fixed and fz.normalize not in (None, "", "NA", "na", "none", "None"):
        reasons.append(f"{fz.normalize} feature normalization (utterance statistics)")
    return reasons
