"""NestEncoder: a NEST (FastConformer) encoder with layer selection.

`NestEncoder(model_path, torch_dtype=torch.float32, layer="last")` keeps only
the preprocessor and the encoder of a NEST SSL model and returns, for each
selected layer, its output frames. Fusing several layers (learned softmax
weights) and stacking frames is the projector's job (`kernels.stack_fuse`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from agent.nest.capture import capture_layers
from agent.nest.layers import LayerSpec, parse_layers
from agent.nest.loading import ModelSource, load_nest_parts, save_nest_nemo
from agent.nest.processor import NestProcessor


@dataclass
class NestEncoderOutput:
    hidden_states: torch.Tensor  # [K, B, T, D]: the selected layers, zero past each length
    lengths: torch.Tensor  # [B] valid encoder frames per item
    layer_indices: List[int]  # which layer each of the K slices is

    @property
    def last_hidden_state(self) -> torch.Tensor:
        """[B, T, D] of the deepest selected layer."""
        return self.hidden_states[-1]


class NestEncoder(nn.Module):
    def __init__(self, model_path: ModelSource, torch_dtype: torch.dtype = torch.float32, layer: LayerSpec = "last"):
        super().__init__()
        parts = load_nest_parts(model_path)
        self.model_path = parts.source
        self.nemo_cfg = parts.cfg
        self.preprocessor = parts.preprocessor.float().eval()  # STFT stays in fp32
        self.encoder = parts.encoder.to(torch_dtype).eval()
        self.torch_dtype = torch_dtype
        self.num_layers = len(self.encoder.layers)
        self.hidden_size = int(self.encoder.d_model)
        self.layer_indices = parse_layers(layer, self.num_layers)

    def set_layers(self, layer: LayerSpec) -> None:
        self.layer_indices = parse_layers(layer, self.num_layers)

    def processor(self, resample: bool = False) -> NestProcessor:
        """A NestProcessor that shares this model's preprocessor and subsampling."""
        return NestProcessor(resample=resample, preprocessor=self.preprocessor, pre_encode=self.encoder.pre_encode)

    def forward(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> NestEncoderOutput:
        """`input_features` [B, n_mels, T_mel] from the processor -> selected layers [K, B, T, D]."""
        features = input_features.to(self.torch_dtype)
        with capture_layers(self.encoder, self.layer_indices) as captured:
            _, lengths = self.encoder(audio_signal=features, length=feature_lengths)
        hidden = torch.stack([captured[i] for i in self.layer_indices])
        # NeMo leaves padded frames as they come out; zero them so a partial stack
        # group of a short item in a batch equals the same item alone.
        valid = torch.arange(hidden.shape[2], device=hidden.device)[None, :] < lengths[:, None]
        hidden = hidden * valid[None, :, :, None].to(hidden.dtype)
        return NestEncoderOutput(hidden, lengths, list(self.layer_indices))

    @torch.no_grad()
    def encode_audio(self, audio, sampling_rate: Optional[int] = None) -> NestEncoderOutput:
        """Waveform(s) -> selected layers, using this model's own front end."""
        feats = self.processor()(audio, sampling_rate=sampling_rate)
        device = next(self.encoder.parameters()).device
        return self(feats["input_features"].to(device), feats["feature_lengths"].to(device))

    def save_nemo(self, path: str) -> None:
        """Save encoder + preprocessor as a `.nemo` that NeMo's `restore_from` loads."""
        save_nest_nemo(self.preprocessor, self.encoder.float(), self.nemo_cfg, path)
        self.encoder.to(self.torch_dtype)
