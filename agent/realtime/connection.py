"""One client's conversation: protocol validation, resampling, the bridge to its
engine session, and its spoken replies.

`Connection.run` reads the client's messages (binary audio, or JSON events
validated by `agent.realtime.schema`) and turns each into an engine command;
`forward_events` turns the engine's typed events, and the spoken-reply events
of `agent.realtime.speech_out`, into the dialect's JSON (`agent.realtime.wire`).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from agent.realtime import events as ev
from agent.realtime import schema
from agent.realtime.protocol import (
    ProtocolError,
    WireSettings,
    apply_session_update,
    decode_append,
    decode_audio,
    parse_event,
    response_options,
    session_patch,
)
from agent.realtime.speech_out import (
    SpeechAudio,
    SpeechDone,
    SpeechFailed,
    SpokenReply,
    encode_g711,
    open_spoken_reply,
    tts_voice,
)
from agent.realtime.wire import server_events

if TYPE_CHECKING:
    from agent.realtime.server import RealtimeServer

SR = 16000


class Resampler:
    """Streaming resampler to 16 kHz (soxr keeps its filter state between packets)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.stream = None
        if rate != SR:
            import soxr

            self.stream = soxr.ResampleStream(rate, SR, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.stream is None:
            return samples
        return self.stream.resample_chunk(samples)


class Connection:
    """One client: protocol validation, resampling, and the bridge to its engine session."""

    def __init__(self, server: "RealtimeServer", ws, dialect: str = "ga"):
        self.server = server
        self.ws = ws
        self.config = server.config.session
        self.wire = WireSettings(dialect=dialect)
        self.out = server_events(dialect)
        self.resampler = Resampler(self.wire.input_sample_rate)
        self.updated = False
        self.handle = None
        self.speech: Optional[SpokenReply] = None  # the spoken reply in progress
        self.spoken: Dict[str, SpokenReply] = {}  # the latest spoken reply by item id (for truncate)
        self.deferred: List[object] = []  # engine events held while a finished reply's audio completes

    def describe(self) -> dict:
        streamer = self.server.engine.streamer_for(self.config.chunk_ms)
        return self.out.session(self.handle.id, self.config, self.wire, int(streamer.chunk_ms), streamer.latency_ms,
                                self.server.model_name)

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(self.out.stamp(event)))

    async def error(self, err: ProtocolError) -> None:
        self.server.metrics.inc("nestvox_errors_total", code=err.code)
        await self.send(err.event())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.handle = self.server.engine.open_session(loop=loop, config=self.config)
        await self.send({"type": "session.created", "session": self.describe()})
        writer = asyncio.create_task(self.forward_events())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.recv(), self.server.config.idle_timeout_s)
                except asyncio.TimeoutError:
                    await self.error(ProtocolError("idle_timeout", f"no message for "
                                                   f"{self.server.config.idle_timeout_s:g} s: closing"))
                    await self.ws.close(1000, "idle timeout")
                    return
                try:
                    await self.on_message(message)
                except ProtocolError as err:
                    await self.error(err)
        finally:
            writer.cancel()
            self.handle.close()  # frees the session's caches, even mid-turn

    async def forward_events(self) -> None:
        try:
            while True:
                await self.dispatch(await self.handle.next_event())
        except Exception:  # the client is gone; the reader's finally cleans up
            if self.speech is not None:
                self.speech.stream.cancel()

    async def emit(self, events: List[dict]) -> None:
        for event in events:
            self.count(event)
            await self.ws.send(json.dumps(event))

    async def dispatch(self, event) -> None:
        """One engine event (or spoken-reply event) -> the client's events."""
        if isinstance(event, (SpeechAudio, SpeechDone, SpeechFailed)):
            await self.on_speech(event)
            return
        speech = self.speech
        if speech is not None and speech.held is not None:  # a finished reply's audio is still coming
            if isinstance(event, ev.SpeechStartedEvent) and self.config.turn_detection.interrupt_response:
                await self.stop_speech("turn_detected")  # barge-in: its audio stops; then the event
            else:
                self.deferred.append(event)
                return
        if speech is not None:
            if isinstance(event, ev.TextDeltaEvent) and event.response_id == speech.response_id:
                speech.stream.push_text(event.delta)
                return
            if isinstance(event, ev.ResponseDoneEvent) and event.response_id == speech.response_id:
                speech.held = event
                if speech.cancelled or speech.failed or event.status == "cancelled":
                    await self.stop_speech(speech.cancelled or "turn_detected")
                else:
                    speech.stream.finish()
                return
            if isinstance(event, ev.SpeechStartedEvent) and self.config.turn_detection.interrupt_response:
                speech.stream.cancel()  # the engine cancels the reply too; its done finishes this
                speech.cancelled = "turn_detected"
        await self.emit(self.out.to_wire(event))
        if isinstance(event, ev.ResponseCreatedEvent) and getattr(self.out, "speaking", False):
            self.start_speech(event)

    # -- spoken replies ---------------------------------------------------------------------
    def start_speech(self, event: ev.ResponseCreatedEvent) -> None:
        w = self.wire
        self.speech = open_spoken_reply(self.server.tts, event.response_id, w.output_sample_rate, w.voice, w.speed,
                                        self.handle.post, event.speech_end)

    async def on_speech(self, event) -> None:
        speech = self.speech
        if speech is None or event.response_id != speech.response_id or speech.cancelled:
            return  # a cancelled stream's late word
        if isinstance(event, SpeechAudio):
            speech.on_audio(event)
            if event.piece:
                await self.emit([self.out.transcript_delta(event.piece)])
            if event.pcm16:
                pcm = event.pcm16 if self.wire.output_format == "pcm16" else encode_g711(event.pcm16,
                                                                                         self.wire.output_format)
                await self.emit([self.out.audio_delta(base64.b64encode(pcm).decode())])
        elif isinstance(event, SpeechFailed):
            speech.failed = event.error
            self.server.metrics.inc("nestvox_errors_total", code="tts_failed")
            await self.emit([self.out.error("tts_failed", f"speech synthesis failed ({event.error}); the reply "
                                                          f"continues as its transcript only")])
            if speech.held is not None:
                await self.finish_speech()
        elif speech.held is not None:  # SpeechDone
            await self.finish_speech()

    async def stop_speech(self, reason: str) -> None:
        """Stop the reply's audio (barge-in, output_audio_buffer.clear)."""
        speech = self.speech
        speech.stream.cancel()
        speech.cancelled = speech.cancelled or reason
        if speech.held is not None:
            await self.finish_speech()

    async def finish_speech(self) -> None:
        """The reply's audio is complete (or stopped): its done events, then what waited."""
        speech, done = self.speech, self.speech.held
        self.speech = None
        if speech.cancelled:
            text = speech.transcript
            status, reason = ("cancelled", speech.cancelled) if done.status == "completed" else (done.status,
                                                                                                 done.reason)
        else:
            text, status, reason = done.text, done.status, done.reason
            rest = done.text[len(speech.transcript):] if done.text.startswith(speech.transcript) else ""
            if speech.failed and rest:  # the text reply still arrives, as its transcript
                await self.emit([self.out.transcript_delta(rest)])
        latency = {**done.latency_ms, "speech_end_to_first_audio": speech.first_audio_ms()}
        item_id = self.out.response.item_id
        await self.emit(self.out.to_wire(dataclasses.replace(done, text=text, status=status, reason=reason,
                                                             latency_ms=latency)))
        self.spoken = {item_id: speech}
        deferred, self.deferred = self.deferred, []
        for event in deferred:
            await self.dispatch(event)

    def count(self, event: dict) -> None:
        metrics = self.server.metrics
        kind = event["type"]
        if kind == "response.done":
            response = event["response"]
            metrics.inc("nestvox_responses_total", status=response["status"])
            for stage, value in (response.get("latency_ms") or {}).items():
                if value is not None:
                    metrics.observe("nestvox_latency_ms", value, stage=stage)
        elif kind == "input_audio_buffer.committed":
            metrics.inc("nestvox_turns_total")
        elif kind == "error":
            metrics.inc("nestvox_errors_total", code=event["error"]["code"])

    async def on_message(self, message) -> None:
        size = len(message)
        if size > self.server.config.max_message_bytes:
            raise ProtocolError("message_too_large", f"message of {size} bytes exceeds the limit of "
                                f"{self.server.config.max_message_bytes} bytes: send audio in smaller frames")
        if isinstance(message, bytes):
            self.append(message)
            return
        event = parse_event(message)
        handler = getattr(self, "on_" + event.type.replace(".", "_"))
        await handler(event)

    # -- client events, one method each ---------------------------------------------------
    async def on_session_update(self, event: schema.SessionUpdate) -> None:
        patch = session_patch(self.wire.dialect, event.session, event.event_id)
        config, wire = apply_session_update(patch, self.config, self.wire, self.server.engine.streamer_for,
                                            event.event_id)
        self.check_audio(wire, patch, event.event_id)
        if wire.input_sample_rate != self.wire.input_sample_rate:
            self.resampler = Resampler(wire.input_sample_rate)
        self.config, self.wire, self.updated = config, wire, True
        self.handle.update(config)
        await self.send({"type": "session.updated", "session": self.describe()})

    def check_audio(self, wire: WireSettings, patch, event_id) -> None:
        """Spoken replies need the TTS stage (and GA's audio events); a voice must be one it has."""
        ga = self.wire.dialect == "ga"
        if "audio" in wire.output_modalities:
            why = None if ga else "spoken replies need the GA dialect (response.output_audio.*)"
            why = why or (None if self.server.tts is not None else "this server runs without a TTS engine "
                          "(serve.py --tts none)")
            if why:
                raise ProtocolError("invalid_session_config", f"audio replies are not available: {why}; use "
                                    f"output_modalities [\"text\"]", event_id,
                                    "session.output_modalities" if ga else "session.modalities")
        if "voice" in patch and self.server.tts is not None and wire.voice is not None:
            from agent.tts import TTSError

            try:
                self.server.tts.engine.check_voice(tts_voice(wire.voice))
            except TTSError as exc:
                raise ProtocolError("invalid_session_config", str(exc), event_id, patch["voice"][1]) from None

    async def on_input_audio_buffer_append(self, event: schema.Append) -> None:
        self.append(decode_append(event), event.event_id)

    async def on_input_audio_buffer_commit(self, event) -> None:
        self.handle.commit(ref=event.event_id)

    async def on_input_audio_buffer_clear(self, event) -> None:
        self.handle.clear(ref=event.event_id)

    async def on_response_create(self, event: schema.ResponseCreate) -> None:
        options = event.response
        modalities = tuple(options.output_modalities or options.modalities or ()) if options else ()
        if modalities:
            self.check_audio(dataclasses.replace(self.wire, output_modalities=modalities), {}, event.event_id)
        instructions, tokens = response_options(event, self.config)
        self.out.response_requested(event.event_id, options.metadata if options is not None else None,
                                    modalities or None)
        self.handle.create_response(instructions, tokens, ref=event.event_id)

    async def on_response_cancel(self, event: schema.ResponseCancel) -> None:
        self.handle.cancel(ref=event.event_id)

    async def on_conversation_item_create(self, event: schema.ItemCreate) -> None:
        last = getattr(self.out, "last_item", None)
        if event.previous_item_id not in (None, "root", last) or (event.previous_item_id == "root" and last):
            raise ProtocolError("invalid_event", "items can only be added at the end of the conversation "
                                f"(previous_item_id {last!r} or omitted)", event.event_id, "previous_item_id")
        text = "".join(part.text for part in event.item.content)
        item_id = self.out.typed_item(event.item.id, event.event_id)
        self.handle.add_text(text, ref=item_id)

    async def on_conversation_item_delete(self, event: schema.ItemDelete) -> None:
        items = getattr(self.out, "items", None)
        if items is None:
            raise ProtocolError("invalid_event", "conversation.item.delete needs the GA dialect", event.event_id)
        if event.item_id not in items:
            raise ProtocolError("item_not_found", f"no item {event.item_id!r} in this conversation",
                                event.event_id, "item_id")
        if event.item_id != items[-1]:
            raise ProtocolError("item_delete_not_supported", "only the conversation's most recent item can be "
                                "deleted: later turns are computed on the earlier ones (they sit in the KV cache)",
                                event.event_id, "item_id")
        self.out.deleting(event.item_id, event.event_id)
        self.handle.delete_last(self.out.role_of(event.item_id), ref=event.item_id)

    async def on_conversation_item_truncate(self, event: schema.ItemTruncate) -> None:
        """The client played `audio_end_ms` of the reply's audio: the reply (in the history
        and the KV cache) becomes the text heard by then."""
        out = self.out
        speech = self.spoken.get(event.item_id)
        current = self.speech is not None and out.response is not None and out.response.item_id == event.item_id
        if not current and speech is None:
            known = event.item_id in getattr(out, "items", ())
            raise ProtocolError("item_truncate_not_supported" if known else "item_not_found",
                                "only the latest spoken reply can be truncated" if known else
                                f"no spoken reply {event.item_id!r} in this conversation", event.event_id, "item_id")
        if event.content_index != 0:
            raise ProtocolError("invalid_event", "a reply has one content part: content_index 0", event.event_id,
                                "content_index")
        if current:  # still speaking: stop the reply and its audio first
            speech = self.speech
            self.handle.cancel()
            await self.stop_speech("client_cancelled")
        out.truncating(event.item_id, event.event_id, event.audio_end_ms)
        self.handle.truncate_reply(speech.heard(event.audio_end_ms), ref=event.item_id)

    async def on_output_audio_buffer_clear(self, event) -> None:
        if self.speech is None:
            raise ProtocolError("invalid_event", "no reply audio is being sent", event.event_id)
        response_id = self.speech.response_id
        await self.stop_speech("client_cancelled")
        await self.send({"type": "output_audio_buffer.cleared", "response_id": response_id})

    def append(self, data: bytes, event_id: Optional[str] = None) -> None:
        if self.server.config.require_session_update and not self.updated:
            raise ProtocolError("session_update_required", "send session.update (with the input audio format) "
                                "before any audio", event_id)
        samples = decode_audio(data, self.wire.input_format)
        self.handle.append_audio(self.resampler(samples))
