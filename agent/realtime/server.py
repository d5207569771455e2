"""The websocket server: the realtime protocol over `websockets` (asyncio).

One websocket per conversation at `/v1/realtime` (or `/`); `/healthz`,
`/metrics` and `/client` answer plain HTTP on the same port. This module is the
listener: auth and Origin checks, admission (`max_sessions`), health, metrics,
the TTS worker's life; each conversation is an `agent.realtime.connection.Connection`.
A bad message gets an `error` event and the connection stays open; a vanished
client frees its session.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

from agent.realtime.config import SessionConfig
from agent.realtime.connection import Connection
from agent.realtime.engine import Engine
from agent.realtime.metrics import BATCH_BUCKETS, Metrics
from agent.realtime.protocol import ProtocolError, choose_dialect

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
