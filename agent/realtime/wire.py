"""Every JSON event the server sends, built in one place, in either dialect.

The engine emits typed values (`agent.realtime.events`); a connection's
`ServerEvents` (GA or beta) turns them into the protocol's events. The GA one
also keeps the conversation's item ids, so every item event chains to the one
before (`previous_item_id`), as OpenAI Realtime does. Every event gets an
`event_id`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from agent.realtime import events as ev

SR = 16000
_SERVER_CODES = ("server_error", "session_failed")


def error_event(code: str, message: str, event_id: Optional[str] = None, param: Optional[str] = None) -> dict:
    """`error`: `type` is server_error for our faults, invalid_request_error for the client's."""
    kind = "server_error" if code in _SERVER_CODES else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def _ms(sample: int) -> int:
    return sample * 1000 // SR


def _usage(event: ev.ResponseDoneEvent) -> dict:
    text_in = max(event.input_tokens - event.audio_tokens, 0)
    return {"total_tokens": event.input_tokens + event.output_tokens, "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": event.audio_tokens,
                                    "image_tokens": 0, "cached_tokens": event.cached_tokens},
            "output_token_details": {"text_tokens": event.output_tokens, "audio_tokens": 0}}


def _semantic(event: ev.SpeechStoppedEvent) -> dict:
    """semantic_vad's choice (our extension): the silence waited, and why."""
    if event.silence_ms is None:
        return {}
    return {"silence_ms": event.silence_ms,
            "end_of_turn_probability": event.p_done}


def _status_details(event: ev.ResponseDoneEvent) -> Optional[dict]:
    if event.status == "completed":
        return None
    return {"type": event.status, "reason": event.reason}


@dataclass
class ResponseState:
    response_id: str
    item_id: str
    text: List[str] = field(default_factory=list)
    metadata: Optional[dict] = None
    modalities: tuple = ("text",)

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities


class ServerEvents:
    """One connection's server events. Subclasses: `GAEvents`, `BetaEvents`."""

    dialect = ""

    def __init__(self):
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        # a command's ref (a typed item's id, a deleted item's id) -> the client's event_id
        self._refs: Dict[str, Optional[str]] = {}
        self._requests: Dict[Optional[str], dict] = {}  # response.create's event_id -> its metadata, modalities
        self._truncating: Dict[str, int] = {}  # item id -> the audio_end_ms asked for

    def stamp(self, event: dict) -> dict:
        event.setdefault("event_id", f"event_{next(self._event_ids)}")
        return event

    def new_item_id(self) -> str:
        return f"item_{next(self._item_ids)}"

    def error(self, code: str, message: str, event_id: Optional[str] = None, param: Optional[str] = None) -> dict:
        return self.stamp(error_event(code, message, event_id, param))

    def to_wire(self, event: ev.EngineEvent) -> List[dict]:
        return [self.stamp(e) for e in self._convert(event)]

    def _convert(self, event: ev.EngineEvent) -> List[dict]:
        raise NotImplementedError

    def session(self, sid: str, config, wire, chunk_ms: float, latency_ms: float, model: str) -> dict:
        raise NotImplementedError

    # typed items: the client's item id, remembered until the engine confirms it
    def typed_item(self, item_id: Optional[str], event_id: Optional[str]) -> str:
        item_id = item_id or self.new_item_id()
        self._refs[item_id] = event_id
        return item_id

    def response_requested(self, event_id: Optional[str], metadata: Optional[dict],
                           modalities: Optional[tuple] = None) -> None:
        """response.create's `metadata` comes back in its response.created / .done (clients
        such as LiveKit Agents find their response by it); `modalities` for this response."""
        self._requests[event_id] = {"metadata": metadata, "modalities": modalities}

    def deleting(self, item_id: str, event_id: Optional[str]) -> None:
        self._refs[item_id] = event_id

    def truncating(self, item_id: str, event_id: Optional[str], audio_end_ms: int) -> None:
        self._refs[item_id] = event_id
        self._truncating[item_id] = audio_end_ms

    def _typed_id(self, ref: Optional[str]) -> str:
        if ref in self._refs:
            del self._refs[ref]
            return ref
        return self.new_item_id()

    def _error(self, event: ev.ErrorEvent) -> dict:
        # an engine error about a command carries that command's ref: the client's event_id
        event_id = self._refs.pop(event.ref) if event.ref in self._refs else event.ref
        self._requests.pop(event.ref, None)  # a refused response.create
        return error_event(event.code, event.message, event_id)


class GAEvents(ServerEvents):
    dialect = "ga"

    def __init__(self):
        super().__init__()
        self.items: List[str] = []  # the conversation's item ids, oldest first
        self.roles: Dict[str, str] = {}
        self.user_item: Optional[str] = None  # the audio turn being heard
        self.response: Optional[ResponseState] = None
        self.output_modalities = ("text",)
        self.max_output_tokens = 0

    @property
    def last_item(self) -> Optional[str]:
        return self.items[-1] if self.items else None

    def role_of(self, item_id: str) -> str:
        return self.roles[item_id]

    def _add_item(self, item: dict) -> List[dict]:
        previous = self.last_item
        self.items.append(item["id"])
        self.roles[item["id"]] = item["role"]
        return [{"type": "conversation.item.added", "previous_item_id": previous, "item": item},
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item}]

    def _user_item_id(self) -> str:
        if self.user_item is None:
            self.user_item = self.new_item_id()
        return self.user_item

    @staticmethod
    def _assistant_item(item_id: str, status: str, text: Optional[str]) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text}]
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
                "content": content}

    def _convert(self, event: ev.EngineEvent) -> List[dict]:
        r = self.response
        if isinstance(event, ev.TextDeltaEvent):  # the most frequent first
            r.text.append(event.delta)
            return [{"type": "response.output_text.delta", "response_id": r.response_id, "item_id": r.item_id,
                     "output_index": 0, "content_index": 0, "delta": event.delta}]
        if isinstance(event, ev.SpeechStartedEvent):
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": _ms(event.sample),
                     "item_id": self._user_item_id(), "audio_start_sample": event.sample}]
        if isinstance(event, ev.SpeechStoppedEvent):
            # audio_end_*: where the silence began; turn_end_*: where the turn's audio ends (our extension)
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": _ms(event.sample),
                     "item_id": self._user_item_id(), "audio_end_sample": event.sample,
                     "turn_end_ms": _ms(event.end), "turn_end_sample": event.end, **_semantic(event)}]
        if isinstance(event, ev.CommittedEvent):
            item_id, self.user_item = self._user_item_id(), None
            item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                    "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
            return [{"type": "input_audio_buffer.committed", "item_id": item_id,
                     "previous_item_id": self.last_item}] + self._add_item(item)
        if isinstance(event, ev.ClearedEvent):
            self.user_item = None
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, ev.UserTextAddedEvent):
            item_id = self._typed_id(event.ref)
            item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                    "status": "completed", "content": [{"type": "input_text", "text": event.text}]}
            return self._add_item(item)
        if isinstance(event, ev.ItemTruncatedEvent):
            audio_end_ms = self._truncating.pop(event.ref, 0)
            self._refs.pop(event.ref, None)
            return [{"type": "conversation.item.truncated", "item_id": event.ref, "content_index": 0,
                     "audio_end_ms": audio_end_ms}]
        if isinstance(event, ev.ItemDeletedEvent):
            self._refs.pop(event.ref, None)
            if event.ref in self.items:
                self.items.remove(event.ref)
            return [{"type": "conversation.item.deleted", "item_id": event.ref}]
        if isinstance(event, ev.ResponseCreatedEvent):
            request = self._requests.pop(event.ref, None) or {}
            r = self.response = ResponseState(event.response_id, self.new_item_id(), metadata=request.get("metadata"),
                                              modalities=request.get("modalities") or self.output_modalities)
            item = self._assistant_item(r.item_id, "in_progress", None)
            previous = self.last_item
            self.items.append(r.item_id)
            self.roles[r.item_id] = "assistant"
            return [
                {"type": "response.created", "response": {
                    "id": r.response_id, "object": "realtime.response", "status": "in_progress",
                    "status_details": None, "output": [], "conversation_id": "conv_1",
                    "output_modalities": list(r.modalities), "metadata": r.metadata,
                    "max_output_tokens": event.max_output_tokens or self.max_output_tokens, "usage": None}},
                {"type": "response.output_item.added", "response_id": r.response_id, "output_index": 0,
                 "item": item},
                {"type": "conversation.item.added", "previous_item_id": previous, "item": item},
                {"type": "response.content_part.added", "response_id": r.response_id, "item_id": r.item_id,
                 "output_index": 0, "content_index": 0,
                 "part": {"type": "audio", "transcript": ""} if r.audio else {"type": "text", "text": ""}},
            ]
        if isinstance(event, ev.ResponseDoneEvent):
            self.response = None
            at = {"response_id": r.response_id, "item_id": r.item_id, "output_index": 0}
            status = "completed" if event.status == "completed" else "incomplete"
            if r.audio:  # event.text: the transcript of the audio sent
                item = {**self._assistant_item(r.item_id, status, None),
                        "content": [{"type": "output_audio", "transcript": event.text}]}
                parts = [{"type": "response.output_audio.done", **at, "content_index": 0},
                         {"type": "response.output_audio_transcript.done", **at, "content_index": 0,
                          "transcript": event.text},
                         {"type": "response.content_part.done", **at, "content_index": 0,
                          "part": {"type": "audio", "transcript": event.text}}]
            else:
                item = self._assistant_item(r.item_id, status, event.text)
                parts = [{"type": "response.output_text.done", **at, "content_index": 0, "text": event.text},
                         {"type": "response.content_part.done", **at, "content_index": 0,
                          "part": {"type": "text", "text": event.text}}]
            previous = self.items[self.items.index(r.item_id) - 1] if self.items.index(r.item_id) else None
            return parts + [
                {"type": "response.output_item.done", "response_id": r.response_id, "output_index": 0, "item": item},
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item},
                {"type": "response.done", "response": {
                    "id": r.response_id, "object": "realtime.response", "status": event.status,
                    "status_details": _status_details(event), "output": [item], "conversation_id": "conv_1",
                    "output_modalities": list(r.modalities), "metadata": r.metadata,
                    "usage": _usage(event), "latency_ms": event.latency_ms}},
            ]
        if isinstance(event, ev.ErrorEvent):
            return [self._error(event)]
        raise TypeError(f"not an engine event: {event!r}")

    # -- spoken replies (agent.realtime.speech_out) ---------------------------------------
    @property
    def speaking(self) -> bool:
        return self.response is not None and self.response.audio

    def audio_delta(self, audio_b64: str) -> dict:
        r = self.response
        return self.stamp({"type": "response.output_audio.delta", "response_id": r.response_id,
                           "item_id": r.item_id, "output_index": 0, "content_index": 0, "delta": audio_b64})

    def transcript_delta(self, text: str) -> dict:
        r = self.response
        return self.stamp({"type": "response.output_audio_transcript.delta", "response_id": r.response_id,
                           "item_id": r.item_id, "output_index": 0, "content_index": 0, "delta": text})

    def session(self, sid: str, config, wire, chunk_ms: float, latency_ms: float, model: str) -> dict:
        from agent.realtime.schema import INPUT_RATES

        self.output_modalities = wire.output_modalities
        self.max_output_tokens = config.max_response_output_tokens
        td = config.turn_detection.to_config()
        if td is not None:
            td = {**td, "idle_timeout_ms": None}
        return {
            "type": "realtime", "object": "realtime.session", "id": sid, "model": model,
            "output_modalities": list(wire.output_modalities),
            "instructions": config.instructions,
            "max_output_tokens": config.max_response_output_tokens,
            "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {"format": _format(wire.input_format, wire.input_sample_rate), "turn_detection": td,
                          "transcription": None, "noise_reduction": None},
                "output": {"format": _format(wire.output_format, wire.output_sample_rate), "voice": wire.voice,
                           "speed": wire.speed},
            },
            "nestvox": {"chunk_ms": chunk_ms, "algorithmic_latency_ms": round(latency_ms, 1),
                        "temperature": config.temperature, "top_p": config.top_p,
                        "max_turn_seconds": config.max_turn_seconds, "input_rates": list(INPUT_RATES)},
        }


def _format(fmt: str, rate: int) -> dict:
    if fmt == "pcm16":
        return {"type": "audio/pcm", "rate": rate}
    return {"type": f"audio/{fmt}"}


class BetaEvents(ServerEvents):
    """The beta dialect: flat session, `response.text.*`, `conversation.item.created`."""

    dialect = "beta"

    def __init__(self):
        super().__init__()
        self.last_item: Optional[str] = None

    def _convert(self, event: ev.EngineEvent) -> List[dict]:
        if isinstance(event, ev.TextDeltaEvent):
            return [{"type": "response.text.delta", "response_id": event.response_id, "delta": event.delta}]
        if isinstance(event, ev.SpeechStartedEvent):
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": _ms(event.sample),
                     "audio_start_sample": event.sample}]
        if isinstance(event, ev.SpeechStoppedEvent):
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": _ms(event.sample),
                     "audio_end_sample": event.sample, "turn_end_ms": _ms(event.end), "turn_end_sample": event.end,
                     **_semantic(event)}]
        if isinstance(event, ev.CommittedEvent):
            self.last_item = self.new_item_id()
            return [{"type": "input_audio_buffer.committed", "item_id": self.last_item}]
        if isinstance(event, ev.ClearedEvent):
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, ev.UserTextAddedEvent):
            item_id = self._typed_id(event.ref)
            previous, self.last_item = self.last_item, item_id
            return [{"type": "conversation.item.created", "previous_item_id": previous, "item": {
                "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": event.text}]}}]
        if isinstance(event, ev.ItemDeletedEvent):
            self._refs.pop(event.ref, None)
            return [{"type": "conversation.item.deleted", "item_id": event.ref}]
        if isinstance(event, ev.ResponseCreatedEvent):
            return [{"type": "response.created", "response": {"id": event.response_id, "object": "realtime.response",
                                                              "status": "in_progress", "output": []}}]
        if isinstance(event, ev.ResponseDoneEvent):
            return [{"type": "response.text.done", "response_id": event.response_id, "text": event.text},
                    {"type": "response.done", "response": {
                        "id": event.response_id, "object": "realtime.response", "status": event.status,
                        "status_details": _status_details(event),
                        "output": [{"type": "message", "role": "assistant",
                                    "content": [{"type": "text", "text": event.text}]}],
                        "usage": {**_usage(event), "input_positions": event.input_positions},
                        "latency_ms": event.latency_ms}}]
        if isinstance(event, ev.ErrorEvent):
            return [self._error(event)]
        raise TypeError(f"not an engine event: {event!r}")

    def session(self, sid: str, config, wire, chunk_ms: float, latency_ms: float, model: str) -> dict:
        formats = {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw"}
        return {
            "id": sid, "object": "realtime.session", "model": model,
            "modalities": list(wire.output_modalities),
            "instructions": config.instructions,
            "turn_detection": config.turn_detection.to_config(),
            "input_audio_format": formats[wire.input_format],
            "input_sample_rate": wire.input_sample_rate,
            "output_audio_format": formats[wire.output_format],
            "voice": wire.voice,
            "chunk_ms": chunk_ms,
            "algorithmic_latency_ms": round(latency_ms, 1),
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_response_output_tokens": config.max_response_output_tokens,
            "max_turn_seconds": config.max_turn_seconds,
        }


def server_events(dialect: str) -> ServerEvents:
    return GAEvents() if dialect == "ga" else BetaEvents()
