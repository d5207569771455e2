"""Spoken replies on the connection side: one response's text goes to the TTS
worker as it decodes; its audio comes back as typed events on the connection's
own event queue, in order with the engine's.

The engine never sees audio output: synthesis runs on the shared `TTSWorker`
thread (agent.tts), so it cannot stall encoder steps or other sessions'
decoding. The worker's callbacks only hop onto the connection's event loop.

`SpokenReply` also keeps the reply's timeline (which text starts at which ms
of audio), so a client's `conversation.item.truncate` (audio_end_ms: what it
actually played) maps to the text the user heard.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

# OpenAI's built-in voice names: clients (LiveKit Agents, the SDK's examples) send them by
# habit; they mean the server's default voice here.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")


def tts_voice(voice: Optional[str]) -> Optional[str]:
    """The engine's voice for a session's `voice` (None: the engine's default)."""
    return None if voice is None or voice in OPENAI_VOICES else voice


@dataclass(frozen=True)
class SpeechAudio:
    response_id: str
    pcm16: bytes  # mono, at the stream's rate (before any G.711 coding)
    piece: str  # the text whose audio starts in this chunk ("" for the rest of a piece)
    audio_ms: float


@dataclass(frozen=True)
class SpeechDone:
    response_id: str


@dataclass(frozen=True)
class SpeechFailed:
    response_id: str
    error: str


@dataclass
class SpokenReply:
    """One response's audio: the TTS stream, what was sent, and when."""

    response_id: str
    stream: object  # agent.tts.SpeechStream
    speech_end: Optional[float] = None  # perf_counter of the user's end of speech
    first_audio: Optional[float] = None
    audio_ms: float = 0.0  # sent so far
    timeline: List[Tuple[float, str]] = field(default_factory=list)  # (start ms, piece)
    held: object = None  # the engine's ResponseDoneEvent, waiting for the audio to end
    cancelled: Optional[str] = None  # why the audio stopped early
    failed: Optional[str] = None

    @property
    def transcript(self) -> str:
        return "".join(piece for _, piece in self.timeline)

    def on_audio(self, chunk: SpeechAudio) -> None:
        if self.first_audio is None:
            self.first_audio = time.perf_counter()
        if chunk.piece:
            self.timeline.append((self.audio_ms, chunk.piece))
        self.audio_ms += chunk.audio_ms

    def first_audio_ms(self) -> Optional[float]:
        if self.first_audio is None or self.speech_end is None:
            return None
        return round(1000 * (self.first_audio - self.speech_end), 2)

    def heard(self, audio_end_ms: float) -> str:
        """The transcript up to `audio_end_ms` of played audio: whole pieces that ended
        before it, and of the piece playing then, the words spoken by then (in
        proportion to its duration)."""
        text = []
        for i, (start, piece) in enumerate(self.timeline):
            end = self.timeline[i + 1][0] if i + 1 < len(self.timeline) else self.audio_ms
            if audio_end_ms >= end - 1:  # to the ms: clients send whole ms
                text.append(piece)
                continue
            if audio_end_ms > start and end > start:
                cut = int(len(piece) * (audio_end_ms - start) / (end - start))
                partial = piece[:cut]
                # keep whole words only
                partial = partial if cut >= len(piece) or piece[cut:cut + 1].isspace() else \
                    partial[: partial.rfind(" ") + 1] if " " in partial else ""
                text.append(partial)
            break
        return "".join(text)


def open_spoken_reply(worker, response_id: str, rate: int, voice: Optional[str], speed: float,
                      post: Callable[[object], None], speech_end: Optional[float]) -> SpokenReply:
    """A TTS stream for one response; its callbacks `post` typed events (thread-safe)."""
    stream = worker.open_stream(
        rate=rate, voice=tts_voice(voice), speed=speed,
        on_audio=lambda pcm, piece, ms: post(SpeechAudio(response_id, pcm, piece, ms)),
        on_error=lambda exc: post(SpeechFailed(response_id, f"{type(exc).__name__}: {exc}")),
        on_done=lambda stats: post(SpeechDone(response_id)))
    return SpokenReply(response_id, stream, speech_end=speech_end)


# -- G.711 output --------------------------------------------------------------------------
_ENCODE = {}


def encode_g711(pcm16: bytes, fmt: str) -> bytes:
    """PCM16 -> mu-law ("pcmu") or A-law ("pcma") bytes, each sample to its nearest code."""
    table = _ENCODE.get(fmt)
    if table is None:
        from agent.realtime.protocol import G711

        levels = np.round(G711[fmt] * 32768).astype(np.int32)
        order = np.argsort(levels)
        sorted_levels = levels[order]
        values = np.arange(-32768, 32768, dtype=np.int32)
        i = np.clip(np.searchsorted(sorted_levels, values), 1, 255)
        nearer_left = (values - sorted_levels[i - 1]) <= (sorted_levels[i] - values)
        table = _ENCODE[fmt] = order[np.where(nearer_left, i - 1, i)].astype(np.uint8)
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.int32) + 32768
    return table[samples].tobytes()
