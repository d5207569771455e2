"""The websocket server: the realtime protocol over `websockets` (asyncio).

One websocket per conversation at `/v1/realtime` (or `/`); `/healthz` and
`/metrics` answer plain HTTP on the same port. Each connection owns an engine
session; audio arrives as binary PCM16 frames or `input_audio_buffer.append`
events, is resampled to 16 kHz with soxr, and goes to the engine; engine events
go back as JSON text frames. A bad message gets an `error` event and the
connection stays open; a vanished client frees its session.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from agent.realtime.metrics import BATCH_BUCKETS, Metrics
from agent.realtime import events as ev
from agent.realtime import schema
from agent.realtime.speech_out import (
    SpeechAudio,
    SpeechDone,
    SpeechFailed,
    SpokenReply,
    encode_g711,
    open_spoken_reply,
    tts_voice,
)
from agent.realtime.protocol import (
    ProtocolError,
    WireSettings,
    apply_session_update,
    choose_dialect,
    decode_append,
    decode_audio,
    parse_event,
    response_options,
    session_patch,
)
from agent.realtime.wire import server_events

log = logging.getLogger("nestvox.server")
REALTIME_PATHS = ("/v1/realtime", "/")
SR = 16000


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 16
    max_message_bytes: int = 1 << 20  # larger messages get an error event (up to 4x; beyond, close 1009)
    idle_timeout_s: float = 300.0
    auth_token: Optional[str] = None
    allowed_origins: Optional[List[str]] = None  # None: any Origin (non-browser clients send none)
    require_session_update: bool = False  # audio before the first session.update is an error
    session: SessionConfig = field(default_factory=SessionConfig)
    tts: Optional[str] = "espeak"  # spoken replies' engine (agent.tts.build_tts); None: text replies only
    tts_options: Dict[str, object] = field(default_factory=dict)


def browser_page() -> Optional[str]:
    """clients/browser.html, found without importing the clients package."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("clients")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "browser.html")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


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


class RealtimeServer:
    def __init__(self, engine: Engine, config: Optional[ServerConfig] = None, model_name: str = ""):
        self.engine = engine
        self.config = config or ServerConfig()
        self.model_name = model_name
        self.metrics = Metrics()
        self.tts = None  # the TTSWorker of spoken replies, from start_engine()
        self.connections = 0
        self.server = None
        self.started = time.time()
        engine.on_encoder_step = self._encoder_step

    def _encoder_step(self, chunk_ms: int, batch_sizes, seconds: float, audio_seconds: float) -> None:
        """Compute per chunk size (engine thread): the encoder's real-time factor is
        nestvox_encoder_seconds_total / nestvox_encoder_audio_seconds_total per chunk_ms."""
        label = str(chunk_ms)
        self.metrics.inc("nestvox_encoder_seconds_total", seconds, chunk_ms=label)
        self.metrics.inc("nestvox_encoder_audio_seconds_total", audio_seconds, chunk_ms=label)
        for size in batch_sizes:
            self.metrics.observe("nestvox_encoder_batch_size", size, BATCH_BUCKETS, chunk_ms=label)

    # -- HTTP side of the port -------------------------------------------------------
    def process_request(self, connection, request):
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
        if url.path == "/metrics":
            response = connection.respond(HTTPStatus.OK, self.render_metrics())
            response.headers["Content-Type"] = "text/plain; version=0.0.4"
            return response
        if url.path == "/client":  # the browser client, same origin as the websocket
            page = browser_page()
            if page is None:
                return connection.respond(HTTPStatus.NOT_FOUND, "the browser client is not installed\n")
            response = connection.respond(HTTPStatus.OK, page)
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        if url.path not in REALTIME_PATHS:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no such path {url.path}: the realtime websocket "
                                      f"is at /v1/realtime\n")
        origin = request.headers.get("Origin")
        allowed = self.config.allowed_origins
        if origin is not None and allowed is not None and origin not in allowed:
            self.metrics.inc("nestvox_sessions_rejected_total", reason="origin")
            return connection.respond(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        token = self.config.auth_token
        if token:
            given = request.headers.get("Authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else ""
            given = given or (parse_qs(url.query).get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), token.encode()):
                self.metrics.inc("nestvox_sessions_rejected_total", reason="auth")
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send "
                                          "'Authorization: Bearer <token>' or ?token=<token>\n")
        return None

    def health(self) -> dict:
        """What /healthz answers (JSON)."""
        return {"status": "ok", "sessions": self.connections, "max_sessions": self.config.max_sessions,
                "model": self.model_name, "uptime_s": round(time.time() - self.started, 1),
                "engine": self.engine.time_split()}

    def render_metrics(self) -> str:
        """What /metrics answers (Prometheus text format)."""
        self.metrics.set("nestvox_sessions_active", self.connections)
        return self.metrics.render()

    @property
    def has_room(self) -> bool:
        return self.connections < self.config.max_sessions

    # -- websocket side ----------------------------------------------------------------
    async def handler(self, ws) -> None:
        await self.serve_connection(ws, ws.request.path, ws.request.headers)

    async def serve_connection(self, ws, path: str = "/v1/realtime", headers=None) -> None:
        """One conversation on `ws` (any object with async `recv()`, `send(str)` and
        `close(code, reason)`), until the client leaves: admission (`server_full`,
        close 1013), the protocol dialect from `path`'s query and `headers`, the
        session. The websockets handler and the Ray Serve ingress both come here."""
        if not self.has_room:
            self.metrics.inc("nestvox_sessions_rejected_total", reason="full")
            event = ProtocolError("server_full", f"the server is at max_sessions={self.config.max_sessions}: "
                                  f"try again later").event()
            await ws.send(json.dumps({**event, "event_id": "event_0"}))
            await ws.close(1013, "server full")
            return
        self.connections += 1
        self.metrics.inc("nestvox_sessions_total")
        self.metrics.set("nestvox_sessions_active", self.connections)
        try:
            await Connection(self, ws, choose_dialect(path, headers)).run()
        except Exception as exc:  # ConnectionClosed and friends: the client went away
            log.info("connection ended: %s", type(exc).__name__)
        finally:
            self.connections -= 1
            self.metrics.set("nestvox_sessions_active", self.connections)

    async def start(self):
        from websockets.asyncio.server import serve

        self.start_engine()
        self.server = await serve(self.handler, self.config.host, self.config.port,
                                  process_request=self.process_request,
                                  max_size=4 * self.config.max_message_bytes, compression=None)
        sock = next(iter(self.server.sockets))
        self.config = dataclasses.replace(self.config, port=sock.getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.config.port}/v1/realtime"

    def start_engine(self) -> None:
        """The engine thread and the TTS worker (a Ray replica calls this; `start` also listens)."""
        self.engine.start()
        if self.config.tts and self.tts is None:
            from agent.tts import TTSError, TTSWorker, build_tts

            try:
                self.tts = TTSWorker(build_tts(self.config.tts, **self.config.tts_options))
            except (TTSError, OSError, ImportError) as exc:  # text replies still work
                log.warning("spoken replies are off: the %s TTS engine failed to start (%s)", self.config.tts, exc)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.engine.stop()
        if self.tts is not None:
            self.tts.close()
            self.tts = None
