"""How many mel frames and encoder frames a waveform of N samples yields.

Both come from NeMo's own formulas: the featurizer's `get_seq_len` and the
subsampling module's `calc_length` with that module's real padding, kernel,
stride and repeat count. Nothing here hard-codes an 8x factor.
"""
from __future__ import annotations

import torch

from agent.nest._nemo import nemo_asr


class FrameCounter:
    """Maps sample counts to encoder frame counts for one preprocessor + encoder pair."""

    def __init__(self, preprocessor: torch.nn.Module, pre_encode: torch.nn.Module):
        self._featurizer = preprocessor.featurizer
        self._pre_encode = pre_encode

    @classmethod
    def from_configs(cls, preprocessor: torch.nn.Module, encoder_cfg) -> "FrameCounter":
        """Build the subsampling module described by `encoder_cfg` with one channel:
        NeMo then derives its own padding, kernel and stride, at no real cost."""
        nemo_asr()
        from nemo.collections.asr.parts.submodules.subsampling import ConvSubsampling

        if encoder_cfg.get("reduction") is not None:
            raise ValueError("encoders with an extra reduction stage are not supported")
        pre_encode = ConvSubsampling(
            subsampling=encoder_cfg.get("subsampling", "dw_striding"),
            subsampling_factor=int(encoder_cfg.get("subsampling_factor", 8)),
            feat_in=int(encoder_cfg.get("feat_in", 80)),
            feat_out=1,
            conv_channels=1,
            activation=torch.nn.ReLU(),
            is_causal=bool(encoder_cfg.get("causal_downsampling", False)),
        )
        return cls(preprocessor, pre_encode)

    def mel_frames(self, num_samples) -> torch.Tensor:
        n = torch.as_tensor(num_samples, dtype=torch.long)
        return torch.where(n > 0, self._featurizer.get_seq_len(n), torch.zeros_like(n))

    def encoder_frames(self, num_samples) -> torch.Tensor:
        from nemo.collections.asr.parts.submodules.subsampling import calc_length

        mel = self.mel_frames(num_samples)
        sub = self._pre_encode
        out = calc_length(
            mel,
            all_paddings=sub._left_padding + sub._right_padding,
            kernel_size=sub._kernel_size,
            stride=sub._stride,
            ceil_mode=sub._ceil_mode,
            repeat_num=sub._sampling_num,
        ).long()
        return torch.where(mel > 0, out.clamp(min=0), torch.zeros_like(out))
