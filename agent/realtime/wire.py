"""Every JSON event the server sends, built in one place.

The engine emits typed values (`agent.realtime.events`); the websocket layer
turns them into the protocol's events here, together with the `error` events
of protocol validation and the `session` object of session.created/updated.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from agent.realtime import events as ev

SR = 16000


def error_event(code: str, message: str, event_id: Optional[str] = None) -> dict:
    error: Dict[str, Any] = {"code": code, "message": message}
    if event_id:
        error["event_id"] = event_id
    return {"type": "error", "error": error}


def _ms(sample: int) -> int:
    return sample * 1000 // SR


def to_wire(event: ev.EngineEvent) -> List[dict]:
    """An engine event -> its protocol JSON events (a finished response is two)."""
    return [_one(event)] if not isinstance(event, ev.ResponseDoneEvent) else [
        {"type": "response.text.done", "response_id": event.response_id, "text": event.text}, _one(event)]


def _one(event: ev.EngineEvent) -> dict:
    if isinstance(event, ev.TextDeltaEvent):  # the most frequent first
        return {"type": "response.text.delta", "response_id": event.response_id, "delta": event.delta}
    if isinstance(event, ev.SpeechStartedEvent):
        return {"type": "input_audio_buffer.speech_started", "audio_start_ms": _ms(event.sample),
                "audio_start_sample": event.sample}
    if isinstance(event, ev.SpeechStoppedEvent):
        # audio_end_*: where the silence began; turn_end_*: where the turn's audio ends
        return {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": _ms(event.sample),
                "audio_end_sample": event.sample, "turn_end_ms": _ms(event.end), "turn_end_sample": event.end}
    if isinstance(event, ev.CommittedEvent):
        return {"type": "input_audio_buffer.committed"}
    if isinstance(event, ev.ClearedEvent):
        return {"type": "input_audio_buffer.cleared"}
    if isinstance(event, ev.ResponseCreatedEvent):
        return {"type": "response.created", "response": {"id": event.response_id, "status": "in_progress"}}
    if isinstance(event, ev.ResponseDoneEvent):
        return {"type": "response.done", "response": {
            "id": event.response_id, "status": event.status,
            "status_details": {"reason": event.reason} if event.reason else None,
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "text", "text": event.text}]}],
            "usage": {"input_positions": event.input_positions, "output_tokens": event.output_tokens},
            "latency_ms": event.latency_ms,
        }}
    if isinstance(event, ev.ErrorEvent):
        return error_event(event.code, event.message)
    raise TypeError(f"not an engine event: {event!r}")


def session_description(sid: str, config, wire, chunk_ms: float, latency_ms: float, model: str) -> dict:
    """The effective settings, as session.created / session.updated carry them."""
    return {
        "id": sid,
        "model": model,
        "instructions": config.instructions,
        "turn_detection": config.turn_detection.to_config(),
        "input_audio_format": wire.input_audio_format,
        "input_sample_rate": wire.input_sample_rate,
        "chunk_ms": chunk_ms,
        "algorithmic_latency_ms": round(latency_ms, 1),
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_response_output_tokens": config.max_response_output_tokens,
        "max_turn_seconds": config.max_turn_seconds,
    }
