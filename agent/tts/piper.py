"""Piper (`pip install 'nestvox[piper]'`, i.e. piper-tts) with a voice file the user provides:
``voice.onnx`` and its ``voice.onnx.json`` config. Imported lazily: nestvox runs without it."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from .base import TTSEngine, TTSError, clamp_speed

_INSTALL_HINT = "pip install 'nestvox[piper]' (or: pip install piper-tts)"


class PiperEngine(TTSEngine):
    """`model`: path to a Piper voice ``.onnx``; `config`: its ``.onnx.json`` (default: model
    path + ``.json``). `voice` at synthesis: a speaker name of a multi-speaker model (its
    ``speaker_id_map``), else None. `speed` scales the model's length_scale (2.0 = half as long)."""

    name = "piper"

    def __init__(self, model: Optional[str] = None, config: Optional[str] = None,
                 use_cuda: bool = False, voice: Optional[str] = None):
        if not model:
            raise TTSError("the piper engine needs a voice file: model='path/to/voice.onnx' "
                           "(with voice.onnx.json beside it)")
        model = os.fspath(model)
        config = os.fspath(config) if config else model + ".json"
        # Files first: a missing voice is the likelier mistake, and the message names the path.
        if not os.path.isfile(model):
            raise TTSError(f"piper voice model not found: {model!r} (a Piper .onnx voice file)")
        if not os.path.isfile(config):
            raise TTSError(f"piper voice config not found: {config!r} (the .onnx.json that "
                           "comes with the voice)")
        try:
            from piper import PiperVoice  # lazy: an optional extra
        except ImportError as e:
            raise TTSError(f"the piper engine needs the piper-tts package ({e}); "
                           f"{_INSTALL_HINT}") from None
        try:
            self._voice = PiperVoice.load(model, config_path=config, use_cuda=use_cuda)
        except Exception as e:  # onnxruntime / json errors: say which file
            raise TTSError(f"cannot load piper voice {model!r}: {e}") from e
        cfg = self._voice.config
        self.sample_rate = int(cfg.sample_rate)
        self._length_scale = float(getattr(cfg, "length_scale", 1.0) or 1.0)
        self._speakers = dict(getattr(cfg, "speaker_id_map", {}) or {})
        self.default_voice = voice
        self.model_path = model
        if voice is not None:
            self._speaker_id(voice)

    def _speaker_id(self, voice: Optional[str]) -> Optional[int]:
        if voice is None:
            return None
        if voice in self._speakers:
            return int(self._speakers[voice])
        raise TTSError(f"piper voice {self.model_path!r} has no speaker {voice!r}"
                       + (f"; it has {sorted(self._speakers)[:20]}" if self._speakers
                          else " (a single-speaker model: use voice=None)"))

    def synthesize(self, text: str, voice: Optional[str] = None, speed: float = 1.0) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, np.float32)
        sid = self._speaker_id(voice or self.default_voice)
        length_scale = self._length_scale / clamp_speed(speed)
        try:
            from piper import SynthesisConfig  # piper-tts >= 1.3
        except ImportError:
            SynthesisConfig = None
        try:
            if SynthesisConfig is not None:
                cfg = SynthesisConfig(speaker_id=sid, length_scale=length_scale)
                parts = [np.asarray(c.audio_float_array, np.float32)
                         for c in self._voice.synthesize(text, syn_config=cfg)]
            else:  # piper-tts 1.2: raw int16 bytes per sentence
                parts = [np.frombuffer(b, np.int16).astype(np.float32) / 32768.0
                         for b in self._voice.synthesize_stream_raw(
                             text, speaker_id=sid, length_scale=length_scale)]
        except Exception as e:
            raise TTSError(f"piper synthesis failed: {e}") from e
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts).reshape(-1)

    def check_voice(self, voice: Optional[str]) -> None:
        self._speaker_id(voice)

    def voices(self) -> List[str]:
        return sorted(self._speakers)
