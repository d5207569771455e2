"""The TTS engine interface: text in, mono float32 audio at the engine's own rate out."""

from __future__ import annotations

import abc
import math
from typing import List, Optional

import numpy as np

# GA Realtime's `speed` range; sessions validate against it, engines clamp to it.
SPEED_MIN = 0.25
SPEED_MAX = 1.5


class TTSError(RuntimeError):
    """A TTS engine could not be built or could not synthesize (missing library, voice, file...)."""


def clamp_speed(speed: float) -> float:
    """Clamp `speed` to [SPEED_MIN, SPEED_MAX]; a non-number or non-finite value is an error."""
    try:
        s = float(speed)
    except (TypeError, ValueError):
        raise TTSError(f"speed must be a number, got {speed!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise TTSError(f"speed must be a positive finite number, got {speed!r}")
    return min(max(s, SPEED_MIN), SPEED_MAX)


class TTSEngine(abc.ABC):
    """One synthesizer. Implementations need not be thread-safe: `TTSWorker` calls one engine
    from one thread only."""

    name: str = "tts"
    sample_rate: int = 0
    default_voice: Optional[str] = None

    @abc.abstractmethod
    def synthesize(self, text: str, voice: Optional[str] = None, speed: float = 1.0) -> np.ndarray:
        """Speak `text`: mono float32 samples in [-1, 1] at `self.sample_rate` (may be empty for
        text with nothing to say). `voice=None` is the engine's default voice; `speed` 1.0 is
        the engine's normal rate (clamped to [SPEED_MIN, SPEED_MAX]). Raises `TTSError`."""

    def check_voice(self, voice: Optional[str]) -> None:
        """Raise `TTSError` if `voice` cannot be used (for a session.update error event, before
        any reply). Default: accept; engines that can check cheaply override it."""

    def voices(self) -> List[str]:
        """Voice names this engine accepts (empty when unknown or costly to list)."""
        return []

    def close(self) -> None:
        """Release what the engine holds (no-op by default)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.sample_rate} Hz>"
