"""What the engine tells a session's client, as typed values.

The engine knows nothing of the wire: `agent.realtime.wire` turns these into
the protocol's JSON events. Sample positions are 16 kHz samples of the
session's audio stream. `ref` is an opaque tag the client side gave with the
command that caused the event (the engine only echoes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    ref: Optional[str] = None


@dataclass(frozen=True)
class SpeechStartedEvent:
    sample: int  # first sample of the turn's audio (prefix padding included)


@dataclass(frozen=True)
class SpeechStoppedEvent:
    sample: int  # where the silence began
    end: int  # where the turn's audio ends (suffix padding into the silence)
    silence_ms: Optional[int] = None  # semantic_vad: the pause the turn needed (chosen from p_done)
    p_done: Optional[float] = None  # semantic_vad: the model's P(the user's turn is complete)


@dataclass(frozen=True)
class CommittedEvent:
    """The user's audio turn is complete and pre-filled."""


@dataclass(frozen=True)
class ClearedEvent:
    """The uncommitted audio was dropped."""


@dataclass(frozen=True)
class UserTextAddedEvent:
    """A typed user message is in the conversation (pre-filled)."""

    text: str
    ref: Optional[str] = None


@dataclass(frozen=True)
class ItemDeletedEvent:
    """The conversation's most recent message left the history and the KV cache."""

    role: str
    ref: Optional[str] = None


@dataclass(frozen=True)
class ItemTruncatedEvent:
    """The latest reply was cut to what the user heard (history and KV cache)."""

    text: str
    ref: Optional[str] = None


@dataclass(frozen=True)
class ResponseCreatedEvent:
    response_id: str
    max_output_tokens: int = 0
    ref: Optional[str] = None  # the response.create's, None for a response the server VAD started
    speech_end: Optional[float] = None  # perf_counter of the end of the user's speech (or commit)


@dataclass(frozen=True)
class TextDeltaEvent:
    response_id: str
    delta: str


@dataclass(frozen=True)
class ResponseDoneEvent:
    response_id: str
    text: str
    status: str  # completed / cancelled / incomplete
    reason: Optional[str]  # turn_detected / client_cancelled / max_output_tokens / max_context
    output_tokens: int
    input_positions: int  # the context after the reply
    latency_ms: Dict[str, Optional[float]] = field(default_factory=dict)
    input_tokens: int = 0  # the context the reply was decoded from
    cached_tokens: int = 0  # of those, in the KV cache before this user turn began
    audio_tokens: int = 0  # of those, audio embeddings


EngineEvent = Union[ErrorEvent, SpeechStartedEvent, SpeechStoppedEvent, CommittedEvent, ClearedEvent,
                    UserTextAddedEvent, ItemDeletedEvent, ItemTruncatedEvent, ResponseCreatedEvent, TextDeltaEvent, ResponseDoneEvent]
