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
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import List, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from agent.realtime.metrics import BATCH_BUCKETS, Metrics
from agent.realtime import schema
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
        while True:
            for event in self.out.to_wire(await self.handle.next_event()):
                self.count(event)
                try:
                    await self.ws.send(json.dumps(event))
                except Exception:  # the client is gone; the reader's finally cleans up
                    return

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
        if "audio" in wire.output_modalities:
            raise ProtocolError("invalid_session_config", "audio replies are not available on this server: use "
                                "output_modalities [\"text\"]", event.event_id,
                                "session.output_modalities" if self.wire.dialect == "ga" else "session.modalities")
        if wire.input_sample_rate != self.wire.input_sample_rate:
            self.resampler = Resampler(wire.input_sample_rate)
        self.config, self.wire, self.updated = config, wire, True
        self.handle.update(config)
        await self.send({"type": "session.updated", "session": self.describe()})

    async def on_input_audio_buffer_append(self, event: schema.Append) -> None:
        self.append(decode_append(event), event.event_id)

    async def on_input_audio_buffer_commit(self, event) -> None:
        self.handle.commit(ref=event.event_id)

    async def on_input_audio_buffer_clear(self, event) -> None:
        self.handle.clear(ref=event.event_id)

    async def on_response_create(self, event: schema.ResponseCreate) -> None:
        options = event.response
        if options is not None and "audio" in (options.output_modalities or options.modalities or []):
            raise ProtocolError("invalid_event", "audio replies are not available on this server",
                                event.event_id, "response.output_modalities")
        instructions, tokens = response_options(event, self.config)
        self.out.response_requested(event.event_id, options.metadata if options is not None else None)
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
        raise ProtocolError("item_truncate_not_supported", "conversation.item.truncate cuts an assistant item's "
                            "audio to what was played, and this server's replies are text only", event.event_id,
                            "item_id")

    async def on_output_audio_buffer_clear(self, event) -> None:
        raise ProtocolError("invalid_event", "there is no output audio buffer: replies are text only",
                            event.event_id)

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
        self.connections = 0
        self.server = None
        self.started = time.time()
        engine.on_encoder_batch = lambda n: self.metrics.observe("nestvox_encoder_batch_size", n, BATCH_BUCKETS)

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

        self.engine.start()
        self.server = await serve(self.handler, self.config.host, self.config.port,
                                  process_request=self.process_request,
                                  max_size=4 * self.config.max_message_bytes, compression=None)
        sock = next(iter(self.server.sockets))
        self.config = dataclasses.replace(self.config, port=sock.getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.config.port}/v1/realtime"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.engine.stop()
