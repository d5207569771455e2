"""NestProcessor: 16 kHz waveforms in, NEST log-mel features and lengths out."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from agent.nest._nemo import nemo_asr
from agent.nest.configs import SAMPLE_RATE, preprocessor_config
from agent.nest.lengths import FrameCounter

AudioLike = Union[np.ndarray, torch.Tensor, Sequence[float]]


def to_float_waveform(audio: AudioLike) -> np.ndarray:
    """One mono waveform as float32 in [-1, 1]; int16 PCM is scaled."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    array = np.asarray(audio)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    array = array.astype(np.float32, copy=False)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got an array of shape {array.shape}")
    return array


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """High-quality resampling with soxr (the library that does the job)."""
    if from_rate == to_rate:
        return audio
    import soxr

    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32)


class NestProcessor:
    """Turns waveforms into the features a NEST encoder takes.

    `NestProcessor(sample_rate=16000)` uses NEST's published front end (80 mel,
    25 ms / 10 ms, per-feature normalization). `NestProcessor.from_config(cfg)` or
    `NestEncoder.processor()` match a specific model, including streaming models
    whose normalization is off. Audio at another rate is refused unless
    `resample=True`, in which case soxr converts it.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        preprocessor_config_dict: Optional[dict] = None,
        encoder_config: Optional[dict] = None,
        resample: bool = False,
        preprocessor: Optional[torch.nn.Module] = None,
        pre_encode: Optional[torch.nn.Module] = None,
    ):
        if sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"NEST models take {SAMPLE_RATE} Hz audio; NestProcessor(sample_rate={sample_rate}) is not "
                f"supported. Pass resample=True to convert other rates at call time."
            )
        self.sample_rate = sample_rate
        self.resample = resample
        if preprocessor is None:
            nemo_asr()
            from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

            cfg = dict(preprocessor_config_dict or preprocessor_config())
            cfg.pop("_target_", None)
            preprocessor = AudioToMelSpectrogramPreprocessor(**cfg)
            # Fixed statistics (a streamified encoder's) for any batch size: NeMo's own path takes one.
            from agent.nest.normalization import install_fixed_normalization

            install_fixed_normalization(preprocessor)
        self.preprocessor = preprocessor.eval()  # eval: no dither, deterministic features
        if pre_encode is not None:
            self.frames = FrameCounter(self.preprocessor, pre_encode)
        else:
            self.frames = FrameCounter.from_configs(self.preprocessor, encoder_config or _NEST_LARGE_ENCODER)

    @classmethod
    def from_config(cls, nemo_cfg, **kwargs) -> "NestProcessor":
        """Match the preprocessor and subsampling of a NeMo NEST model config."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(nemo_cfg, resolve=True) if not isinstance(nemo_cfg, dict) else nemo_cfg
        return cls(preprocessor_config_dict=cfg["preprocessor"], encoder_config=cfg["encoder"], **kwargs)

    # -- lengths -----------------------------------------------------------------
    def feature_frames(self, num_samples) -> torch.Tensor:
        return self.frames.mel_frames(num_samples)

    def encoder_frames(self, num_samples) -> torch.Tensor:
        """Encoder output frames (80 ms each for NEST) for `num_samples` of 16 kHz audio."""
        return self.frames.encoder_frames(num_samples)

    # -- features ----------------------------------------------------------------
    def prepare_waveforms(self, audio, sampling_rate: Optional[int] = None) -> List[np.ndarray]:
        """Validate, convert to float mono and (if allowed) resample each waveform."""
        rate = self.sample_rate if sampling_rate is None else int(sampling_rate)
        if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 2 and 1 not in audio.shape:
            waves = [audio[i] for i in range(audio.shape[0])]
        elif isinstance(audio, (list, tuple)) and audio and not np.isscalar(audio[0]):
            waves = list(audio)
        else:
            waves = [audio]
        waves = [to_float_waveform(w) for w in waves]
        if rate != self.sample_rate:
            if not self.resample:
                raise ValueError(
                    f"audio is {rate} Hz but the NEST encoder expects {self.sample_rate} Hz: resample it "
                    f"(e.g. soxr.resample(audio, {rate}, {self.sample_rate})) or create the processor "
                    f"with resample=True"
                )
            waves = [resample(w, rate, self.sample_rate) for w in waves]
        return waves

    @torch.no_grad()
    def __call__(self, audio, sampling_rate: Optional[int] = None, return_tensors: str = "pt") -> dict:
        """Features for one waveform or a batch: `input_features` [B, 80, T] (float32),
        `feature_lengths` [B], `audio_lengths` [B] (samples)."""
        if return_tensors != "pt":
            raise ValueError("NestProcessor only returns PyTorch tensors (return_tensors='pt')")
        waves = self.prepare_waveforms(audio, sampling_rate)
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), max(int(lengths.max()), 1), dtype=torch.float32)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = torch.from_numpy(w)
        features, feature_lengths = self.preprocessor(input_signal=batch, length=lengths)
        return {"input_features": features, "feature_lengths": feature_lengths.long(), "audio_lengths": lengths}


# NEST-L's encoder settings that decide frame counts (used when no model is given).
_NEST_LARGE_ENCODER = {"subsampling": "dw_striding", "subsampling_factor": 8, "feat_in": 80, "causal_downsampling": False}
