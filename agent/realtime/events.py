"""What the engine tells a session's client, as typed values.

The engine knows nothing of the wire: `agent.realtime.wire` turns these into
the protocol's JSON events. Sample positions are 16 kHz samples of the
session's audio stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str


@dataclass(frozen=True)
class SpeechStartedEvent:
    sample: int  # first sample of the turn's audio (prefix padding included)


@dataclass(frozen=True)
class SpeechStoppedEvent:
    sample: int  # where the silence began
    end: int  # where the turn's audio ends (suffix padding into the silence)


@dataclass(frozen=True)
class CommittedEvent:
    """The user turn is complete and pre-filled."""


@dataclass(frozen=True)
class ClearedEvent:
    """The uncommitted audio was dropped."""


@dataclass(frozen=True)
class ResponseCreatedEvent:
    response_id: str


@dataclass(frozen=True)
class TextDeltaEvent:
    response_id: str
    delta: str


@dataclass(frozen=True)
class ResponseDoneEvent:
    response_id: str
    text: str
    status: str  # completed / cancelled / incomplete
    reason: Optional[str]
    output_tokens: int
    input_positions: int
    latency_ms: Dict[str, Optional[float]] = field(default_factory=dict)


EngineEvent = Union[ErrorEvent, SpeechStartedEvent, SpeechStoppedEvent, CommittedEvent, ClearedEvent,
                    ResponseCreatedEvent, TextDeltaEvent, ResponseDoneEvent]
