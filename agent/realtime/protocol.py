"""The wire protocol's client side: which dialect, events in (validated), audio decoding.

Modelled on OpenAI Realtime. GA is the default dialect; a client that sends
`OpenAI-Beta: realtime=v1` (the SDK's `client.beta.realtime`) or connects with
`?dialect=beta` speaks the older beta shape. Either way a client message is a
binary frame of audio at the session's input format and rate (the fast path),
or a JSON event (`agent.realtime.schema`).

Every problem is a `ProtocolError` with a stable `code` and, where one field is
to blame, its path as `param`; the server sends it as an `error` event and
keeps the connection open.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit

import numpy as np
from pydantic import BaseModel, ValidationError

from agent.realtime import schema
from agent.realtime.config import SessionConfig
from agent.realtime.turns import TurnDetectionSettings
from agent.realtime.wire import error_event

DIALECTS = ("ga", "beta")
SUPPORTED_RATES = schema.INPUT_RATES
MAX_OUTPUT_TOKENS = schema.MAX_OUTPUT_TOKENS


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, event_id: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param

    def event(self) -> dict:
        return error_event(self.code, self.message, self.event_id, self.param)


def choose_dialect(path: str, headers: Optional[Mapping[str, str]] = None) -> str:
    """"beta" for `?dialect=beta` or an `OpenAI-Beta: realtime=v1` header, else "ga"."""
    query = parse_qs(urlsplit(path or "").query)
    asked = (query.get("dialect") or [""])[0].lower()
    if asked in DIALECTS:
        return asked
    beta = (headers or {}).get("OpenAI-Beta") or (headers or {}).get("openai-beta") or ""
    return "beta" if "realtime=v1" in beta.replace(" ", "") else "ga"


@dataclass(frozen=True)
class WireSettings:
    """Per-connection settings the server itself needs (the engine's are in SessionConfig)."""

    dialect: str = "ga"
    input_format: str = "pcm16"  # pcm16 / pcmu / pcma
    input_sample_rate: int = 24000  # GA's (and beta's) PCM rate
    output_modalities: Tuple[str, ...] = ("text",)
    output_format: str = "pcm16"
    output_sample_rate: int = 24000
    voice: Optional[str] = None
    speed: float = 1.0


# -- audio -------------------------------------------------------------------------------
def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ProtocolError("invalid_audio", f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return (np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84) / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a & 0x70) >> 4
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return (np.where(a & 0x80, magnitude, -magnitude) / 32768.0).astype(np.float32)


G711 = {"pcmu": _ulaw_table(), "pcma": _alaw_table()}


def decode_audio(data: bytes, fmt: str) -> np.ndarray:
    """Audio bytes in the session's input format -> float32 samples."""
    if fmt == "pcm16":
        return pcm16_to_float(data)
    return G711[fmt][np.frombuffer(data, dtype=np.uint8)]


# -- events --------------------------------------------------------------------------------
def _param(loc, data, prefix: str = "") -> str:
    """The offending field's path in the client's own event (pydantic's `loc` also
    names union members and discriminator tags, which the client never wrote)."""
    parts, node = [], data
    for key in loc:
        if isinstance(node, dict) and key in node:
            parts.append(str(key))
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            parts.append(f"[{key}]")
            node = node[key]
        elif isinstance(key, str) and not parts and key not in ("audio/pcm",):
            parts.append(key)  # a missing field at the top
    path = ".".join(parts).replace(".[", "[")
    return f"{prefix}.{path}" if prefix and path else (path or prefix)


def _validation_error(exc: ValidationError, data, code: str, event_id, prefix: str = "") -> ProtocolError:
    first = exc.errors()[0]
    param = _param(first["loc"], data, prefix)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown field {param!r}" + (" (nestvox's own settings go under session.nestvox)"
                                                if prefix == "session" else "")
    elif param:
        message = f"{param}: {message}"
    return ProtocolError(code, message, event_id, param or None)


def parse_event(text: Union[str, bytes]) -> BaseModel:
    """A JSON text frame -> its validated `schema` event, or ProtocolError."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "an event must be a JSON object with a \"type\"")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no string \"type\"", event_id, "type")
    model = schema.CLIENT_EVENTS.get(kind)
    if model is None:
        raise ProtocolError("unknown_event_type", f"unknown event type {kind!r}; expected one of "
                            f"{', '.join(schema.CLIENT_EVENTS)}", event_id, "type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data, "invalid_event", event_id) from None


def decode_append(event: schema.Append) -> bytes:
    try:
        return base64.b64decode(event.audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_audio", f"\"audio\" is not valid base64: {exc}", event.event_id,
                            "audio") from None


# -- session.update --------------------------------------------------------------------------
_G711 = {"audio/pcmu": "pcmu", "audio/pcma": "pcma", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}


def session_patch(dialect: str, session: Dict[str, Any], event_id: Optional[str] = None) -> schema.SessionPatch:
    """The client's session object, validated, as internal setting -> (value, param)."""
    model = schema.GASession if dialect == "ga" else schema.BetaSession
    try:
        given = model.model_validate(session).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise _validation_error(exc, session, "invalid_session_config", event_id, "session") from None
    patch: schema.SessionPatch = {}

    def put(name, value, param):
        patch[name] = (value, f"session.{param}")

    if dialect == "ga":
        for key in ("instructions", "max_output_tokens"):
            if key in given:
                put(key, given[key], key)
        if "output_modalities" in given:
            put("output_modalities", tuple(given["output_modalities"]), "output_modalities")
        audio = given.get("audio") or {}
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        if "format" in inp:
            fmt = inp["format"]
            put("input_format", _G711.get(fmt["type"], "pcm16"), "audio.input.format")
            put("input_sample_rate", fmt.get("rate", 24000) if fmt["type"] == "audio/pcm" else schema.G711_RATE,
                "audio.input.format")
        if "turn_detection" in inp:
            put("turn_detection", inp["turn_detection"], "audio.input.turn_detection")
        if "format" in out:
            fmt = out["format"]
            put("output_format", _G711.get(fmt["type"], "pcm16"), "audio.output.format")
            put("output_sample_rate", fmt.get("rate", 24000) if fmt["type"] == "audio/pcm" else schema.G711_RATE,
                "audio.output.format")
        for key in ("voice", "speed"):
            if key in out:
                value = out[key]["id"] if isinstance(out[key], dict) else out[key]
                put(key, value, f"audio.output.{key}")
        for key, value in (given.get("nestvox") or {}).items():
            put(key, value, f"nestvox.{key}")
    else:
        simple = {"instructions": "instructions", "max_response_output_tokens": "max_output_tokens",
                  "turn_detection": "turn_detection", "input_sample_rate": "input_sample_rate",
                  "voice": "voice", "speed": "speed", "chunk_ms": "chunk_ms", "temperature": "temperature",
                  "top_p": "top_p", "max_turn_seconds": "max_turn_seconds"}
        for key, name in simple.items():
            if key in given:
                put(name, given[key], key)
        if "modalities" in given:
            put("output_modalities", ("audio",) if "audio" in given["modalities"] else ("text",), "modalities")
        if "input_audio_format" in given:
            fmt = _G711.get(given["input_audio_format"], "pcm16")
            put("input_format", fmt, "input_audio_format")
            if fmt != "pcm16":
                put("input_sample_rate", schema.G711_RATE, "input_audio_format")
        if "output_audio_format" in given:
            fmt = _G711.get(given["output_audio_format"], "pcm16")
            put("output_format", fmt, "output_audio_format")
            if fmt != "pcm16":
                put("output_sample_rate", schema.G711_RATE, "output_audio_format")
    return patch


def apply_session_update(patch: schema.SessionPatch, config: SessionConfig, wire: WireSettings,
                         chunk_ok=None, event_id: Optional[str] = None):
    """A validated patch -> the new (SessionConfig, WireSettings); nothing changes when
    any field is refused. `chunk_ok(ms)` raises ValueError for a chunk size the
    server cannot run."""
    changes: Dict[str, Any] = {}
    wire_changes: Dict[str, Any] = {}
    for name, (value, param) in patch.items():
        if name == "instructions":
            changes["instructions"] = value or None
        elif name == "max_output_tokens":
            changes["max_response_output_tokens"] = value
        elif name == "turn_detection":
            changes["turn_detection"] = _turn_detection(value, config.turn_detection, param, event_id)
        elif name == "chunk_ms":
            if chunk_ok is not None:
                try:
                    chunk_ok(value)
                except ValueError as exc:
                    raise ProtocolError("invalid_session_config", str(exc), event_id, param) from None
            changes["chunk_ms"] = value
        elif name in ("temperature", "top_p", "max_turn_seconds"):
            changes[name] = float(value)
        elif name in ("input_format", "input_sample_rate", "output_modalities", "output_format",
                      "output_sample_rate", "voice", "speed"):
            wire_changes[name] = value
        else:  # a schema field without a home here is a bug, not a client error
            raise KeyError(name)
    return dataclasses.replace(config, **changes), dataclasses.replace(wire, **wire_changes)


def _turn_detection(value, current: TurnDetectionSettings, param: str, event_id) -> TurnDetectionSettings:
    if value is not None:
        value = {k: v for k, v in value.items() if v is not None and k != "idle_timeout_ms"}
        if current.mode == value.get("type", "server_vad"):  # a partial object updates the current settings
            value = {**current.to_config(), **value}
    try:
        return TurnDetectionSettings.from_config(value)
    except (ValueError, TypeError) as exc:
        raise ProtocolError("invalid_session_config", f"{param}: {exc}", event_id, param) from None


def response_options(event: schema.ResponseCreate, config: SessionConfig) -> Tuple[Optional[str], Optional[int]]:
    """response.create's per-response (instructions, max_output_tokens); None: the session's."""
    options = event.response
    if options is None:
        return None, None
    tokens = options.max_output_tokens if options.max_output_tokens is not None else options.max_response_output_tokens
    instructions = options.instructions if options.instructions else None
    return instructions, tokens
