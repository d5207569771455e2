"""The wire protocol: client events in, validated; error codes out.

Modelled on the OpenAI Realtime API (the convention voice clients already
speak). A client message is either a binary frame of little-endian PCM16 mono
audio at the session's input rate, or a JSON text event:

    session.update            {"session": {instructions, turn_detection, input_audio_format,
                               input_sample_rate, chunk_ms, temperature, top_p,
                               max_response_output_tokens}}
    input_audio_buffer.append {"audio": base64 PCM16}
    input_audio_buffer.commit / input_audio_buffer.clear
    response.create / response.cancel

Every problem is a `ProtocolError` with a stable `code`; the server sends it as
`{"type": "error", "error": {"code", "message", "event_id"?}}` and keeps the
connection open.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import numpy as np

from agent.realtime.config import SessionConfig
from agent.realtime.turns import TurnDetectionSettings
from agent.realtime.wire import error_event

CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.create",
    "response.cancel",
)
SUPPORTED_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_OUTPUT_TOKENS = 4096


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, event_id: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id

    def event(self) -> dict:
        return error_event(self.code, self.message, self.event_id)


@dataclass
class WireSettings:
    """Per-connection settings the server itself needs (the engine's are in SessionConfig)."""

    input_sample_rate: int = 16000
    input_audio_format: str = "pcm16"


def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ProtocolError("invalid_audio", f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def parse_event(text: Union[str, bytes]) -> dict:
    """A JSON text frame -> the event dict, or ProtocolError."""
    try:
        event = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "an event must be a JSON object with a \"type\"")
    kind = event.get("type")
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no string \"type\"", event_id)
    if kind not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event_type", f"unknown event type {kind!r}; expected one of "
                            f"{', '.join(CLIENT_EVENTS)}", event_id)
    return event


def decode_append(event: dict) -> bytes:
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise ProtocolError("invalid_audio", "input_audio_buffer.append needs \"audio\": base64 PCM16",
                            event.get("event_id"))
    try:
        return base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_audio", f"\"audio\" is not valid base64: {exc}", event.get("event_id")) from None


def _number(session: dict, key: str, low: float, high: float, event_id, integer: bool = False):
    value = session[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ProtocolError("invalid_session_config", f"{key} must be a{'n integer' if integer else ' number'}, "
                            f"got {value!r}", event_id)
    if not low <= value <= high:
        raise ProtocolError("invalid_session_config", f"{key} must be in [{low}, {high}], got {value!r}", event_id)
    return int(value) if integer else float(value)


def apply_session_update(event: dict, config: SessionConfig, wire: WireSettings, chunk_ok=None):
    """Validate a session.update and return the new (SessionConfig, WireSettings);
    nothing changes when any field is invalid. `chunk_ok(ms)` raises ValueError for
    a chunk size the server cannot run."""
    event_id = event.get("event_id")
    session = event.get("session", {})
    if not isinstance(session, dict):
        raise ProtocolError("invalid_session_config", "\"session\" must be an object", event_id)
    changes: Dict[str, Any] = {}
    wire_changes: Dict[str, Any] = {}
    if "instructions" in session:
        value = session["instructions"]
        if value is not None and not isinstance(value, str):
            raise ProtocolError("invalid_session_config", "instructions must be a string", event_id)
        changes["instructions"] = value or None
    if "turn_detection" in session:
        td = session["turn_detection"]
        if td is not None and not isinstance(td, dict):
            raise ProtocolError("invalid_session_config", "turn_detection must be an object or null", event_id)
        try:
            if td is not None and "type" not in td:
                td = {"type": "server_vad", **td}
            current = config.turn_detection
            if td is not None and td.get("type") == "server_vad" and current.mode == "server_vad":
                # a partial object updates the current settings
                merged = {**current.to_config(), **td}
                td = merged
            changes["turn_detection"] = TurnDetectionSettings.from_config(td)
        except (ValueError, TypeError) as exc:
            raise ProtocolError("invalid_session_config", f"turn_detection: {exc}", event_id) from None
    if "input_audio_format" in session:
        if session["input_audio_format"] != "pcm16":
            raise ProtocolError("invalid_session_config", "input_audio_format must be \"pcm16\"", event_id)
    if "input_sample_rate" in session:
        rate = _number(session, "input_sample_rate", 8000, 48000, event_id, integer=True)
        if rate not in SUPPORTED_RATES:
            raise ProtocolError("invalid_session_config", f"input_sample_rate must be one of {SUPPORTED_RATES}",
                                event_id)
        wire_changes["input_sample_rate"] = rate
    if "chunk_ms" in session:
        chunk = _number(session, "chunk_ms", 80, 2560, event_id, integer=True)
        if chunk_ok is not None:
            try:
                chunk_ok(chunk)
            except ValueError as exc:
                raise ProtocolError("invalid_session_config", str(exc), event_id) from None
        changes["chunk_ms"] = chunk
    if "temperature" in session:
        changes["temperature"] = _number(session, "temperature", 0.0, 2.0, event_id)
    if "top_p" in session:
        changes["top_p"] = _number(session, "top_p", 1e-6, 1.0, event_id)
    if "max_response_output_tokens" in session:
        value = session["max_response_output_tokens"]
        if value == "inf":
            value = MAX_OUTPUT_TOKENS
        changes["max_response_output_tokens"] = _number({"m": value}, "m", 1, MAX_OUTPUT_TOKENS, event_id, True)
    unknown = set(session) - {"instructions", "turn_detection", "input_audio_format", "input_sample_rate",
                              "chunk_ms", "temperature", "top_p", "max_response_output_tokens", "modalities",
                              "output_audio_format", "voice"}
    if unknown:
        raise ProtocolError("invalid_session_config", f"unknown session field(s): {sorted(unknown)}", event_id)
    return dataclasses.replace(config, **changes), dataclasses.replace(wire, **wire_changes)
