"""Text to speech for spoken replies: engines (`build_tts`), the streaming text cutter
(`TextSegmenter`) and the synthesis thread shared by sessions (`TTSWorker`)."""

from __future__ import annotations

from .base import SPEED_MAX, SPEED_MIN, TTSEngine, TTSError, clamp_speed
from .segmenter import TextSegmenter
from .worker import SpeechStream, StreamStats, TTSWorker

ENGINES = ("espeak", "piper")


def build_tts(name: str = "espeak", **options) -> TTSEngine:
    """An engine by name. espeak: voice="en-us", mode="auto"|"library"|"subprocess";
    piper: model="voice.onnx", config=None, use_cuda=False, voice=None (speaker)."""
    key = (name or "").strip().lower()
    if key in ("espeak", "espeak-ng", "espeak_ng"):
        from .espeak import EspeakEngine
        return EspeakEngine(**options)
    if key == "piper":
        from .piper import PiperEngine  # lazy: piper-tts is an optional extra
        return PiperEngine(**options)
    raise TTSError(f"unknown TTS engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "SPEED_MAX", "SPEED_MIN", "SpeechStream", "StreamStats", "TTSEngine",
           "TTSError", "TTSWorker", "TextSegmenter", "build_tts", "clamp_speed"]
