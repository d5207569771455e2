"""What the nestvox clients share: connecting (with an optional token), the GA
session object (reading it, building session.update), PCM16 conversion, reading
a wav at the session rate, streaming one turn (spoken or typed) and receiving
its events until `response.done`, and per-turn latency figures.

This module talks the wire protocol only: the OpenAI Realtime GA dialect, the
server's default (README, "Protocol"). It never imports the server's code (no
torch), so a client starts in a second.

The GA session (session.created / session.updated `session`) as the clients read it:
  audio.input.format.rate          the input rate of binary PCM16 frames (24000 by default)
  audio.input.turn_detection       server_vad settings, or null (manual commit)
  output_modalities                ["text"] (written replies) or ["audio"] (spoken replies)
  audio.output.format.rate / voice / speed   the spoken replies' PCM16 rate (24000), voice, speed
  instructions, max_output_tokens
  nestvox.chunk_ms / algorithmic_latency_ms / temperature / top_p / max_turn_seconds / input_rates
`Connection.update(rate=16000, manual=True, chunk_ms=320, ...)` sends a GA
session.update with only those fields ({"type": "realtime", "audio": {"input":
{"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": null}},
"nestvox": {"chunk_ms": 320}}).

Spoken replies: `session_update(**reply_audio(voice="en-us", speed=1.0))` asks for
them ({"output_modalities": ["audio"], "audio": {"output": {"format": {"type":
"audio/pcm", "rate": 24000}, "voice": "en-us", "speed": 1.0}}}); a reply then comes
as `response.output_audio.delta` (base64 PCM16 mono at the output rate) with
`response.output_audio_transcript.delta` / `.done` (its text). `TurnResult` keeps
the decoded audio (`audio_pcm`, `audio_chunks`, `output_rate`, `audio_seconds`), the
transcript (`transcript`; `text` is the transcript when no output_text came) and the
assistant item's id (`item_id`: `await conn.truncate(item_id, audio_end_ms)` sends
conversation.item.truncate after a barge-in and returns conversation.item.truncated).

The clients send the model's 16 kHz by default (`MODEL_RATE`) and declare it in
session.update, so the server does not resample (the GA default, 24 kHz, is one
--rate away).

Latency figures of one turn (`TurnResult`):

- `latency_ms`: what the server measured, from `response.done`:
  speech_end_to_encoder_done (the encoder flush), speech_end_to_first_token,
  first_token_to_last_token, speech_end_to_last_token. "speech end" is the
  moment the server's VAD decided the user stopped (server_vad) or the moment
  the commit arrived (manual).
- `client_ms`: what the client saw on its own clock (perf_counter), from the
  reference point `t_end`:
    manual mode: when the last audio packet was sent (commit and
      response.create follow at once);
    typed turns: when response.create was sent;
    server_vad mode: when the client sent the audio at the point where, by the
      server's `speech_stopped.audio_end_ms`, the user stopped talking. These
      figures therefore INCLUDE the VAD's silence window (silence_duration_ms,
      500 ms by default) that the server waits before it ends a turn.
  end_to_speech_stopped, end_to_created (response.created: the server has
  flushed the encoder and pre-filled the turn), end_to_first_delta (the first
  `response.output_text.delta`), end_to_first_audio (the first
  `response.output_audio.delta`: the first byte of a spoken reply), end_to_done
  (`response.done`); and, server_vad only, speech_stopped_to_first_delta /
  speech_stopped_to_first_audio: from the arrival of `speech_stopped` to the first
  text delta / audio delta (the client's view of what the server reports as
  speech_end_to_first_token / speech_end_to_first_audio, plus loopback transit).
  The server's `speech_end_to_first_audio` (response.done latency_ms) is there
  only for spoken replies.
  At --speed 0 every packet leaves at once, so `t_end` is close to the start of
  the stream and these figures include the server working through the backlog.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import ipaddress
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

DEFAULT_URL = "ws://127.0.0.1:8765/v1/realtime"
START_HINT = "start a server with `python serve.py` (it listens on ws://127.0.0.1:8765/v1/realtime), or pass --url"
MODEL_RATE = 16000  # the model's rate: audio sent at it is not resampled by the server
GA_RATE = 24000  # the GA session's default input rate (audio/pcm)
OUTPUT_RATE = 24000  # the GA default output rate of spoken replies (audio.output.format)
SERVER_STAGES = ("speech_end_to_encoder_done", "speech_end_to_first_token", "first_token_to_last_token",
                 "speech_end_to_last_token", "speech_end_to_first_audio")
CLIENT_STAGES = ("end_to_speech_stopped", "end_to_created", "end_to_first_delta", "end_to_first_audio",
                 "end_to_done", "speech_stopped_to_first_delta", "speech_stopped_to_first_audio")
AUDIO_STAGES = ("speech_end_to_first_audio", "end_to_first_audio", "speech_stopped_to_first_audio")
TEXT_DELTA = ("response.output_text.delta", "response.text.delta")  # GA (beta's name also read)
TEXT_DONE = ("response.output_text.done", "response.text.done")
AUDIO_DELTA = ("response.output_audio.delta", "response.audio.delta")
AUDIO_DONE = ("response.output_audio.done", "response.audio.done")
TRANSCRIPT_DELTA = ("response.output_audio_transcript.delta", "response.audio_transcript.delta")
TRANSCRIPT_DONE = ("response.output_audio_transcript.done", "response.audio_transcript.done")


class ClientError(Exception):
    """A problem the command line reports in one line, without a traceback."""

    code = "client_error"


class ServerUnreachable(ClientError):
    code = "unreachable"


class ServerRefused(ClientError):
    """The server turned the connection away (full, auth, HTTP status); `code` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServerErrorMixin:
    """`error`: the GA error object ({type, code, message, param, event_id}) when an error event caused it."""

    error: Dict[str, Any]

    @property
    def param(self) -> Optional[str]:
        return (self.error or {}).get("param")


class UpdateRefused(ServerErrorMixin, ClientError):
    """The server answered session.update with an error event (nothing changed)."""

    def __init__(self, code: str, message: str, error: Optional[dict] = None):
        super().__init__(message)
        self.code = code
        self.error = error or {}


class TurnFailed(ServerErrorMixin, ClientError):
    """An `error` event, a closed connection or a timeout during a turn."""

    def __init__(self, code: str, message: str, error: Optional[dict] = None):
        super().__init__(message)
        self.code = code
        self.error = error or {}


def error_of(event: dict) -> Dict[str, Any]:
    """The GA `error` object of an error event, with every field present (None where missing)."""
    err = event.get("error")
    err = err if isinstance(err, dict) else {}
    return {"type": err.get("type"), "code": err.get("code") or "error", "message": err.get("message") or "",
            "param": err.get("param"), "event_id": err.get("event_id")}


def describe_error(err: Dict[str, Any]) -> str:
    """`code: message (param x)`: one line for a GA error object."""
    param = f" (param {err['param']})" if err.get("param") else ""
    return f"{err.get('code')}: {err.get('message')}{param}"


# -- audio ------------------------------------------------------------------------------
def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> little-endian PCM16 bytes (clipped)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def read_audio(path: str, rate: int) -> np.ndarray:
    """Any wav/flac/ogg soundfile reads -> mono float32 at `rate` (channels averaged, soxr resampling)."""
    import soundfile as sf

    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError, RuntimeError, OSError...
        raise ClientError(f"cannot read audio file {path!r}: {exc}") from None
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if mono.size == 0:
        raise ClientError(f"audio file {path!r} holds no samples")
    if file_rate != rate:
        import soxr

        mono = soxr.resample(mono, file_rate, rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def synthesize_speech(text: str, folder: str, voice: str = "en-us") -> str:
    """Speak `text` with espeak-ng into `folder`/speech.wav (its native rate; read_audio resamples)."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        raise ClientError("espeak-ng is not installed (apt-get install espeak-ng): pass a recording with --wav")
    path = f"{folder}/speech.wav"
    try:
        subprocess.run(["espeak-ng", "-v", voice, "-w", path, text], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise ClientError(f"espeak-ng failed: {exc.stderr.decode(errors='replace').strip()}") from None
    return path


# -- connection -------------------------------------------------------------------------
def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_path(url: str) -> str:
    """Accept host:port or ws://host:port and add the /v1/realtime path when none is given."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ClientError(f"the server URL must start with ws:// or wss://, got {url!r}")
    if parts.path in ("", "/") and not parts.query:
        url = url.rstrip("/") + "/v1/realtime"
    return url


# -- the GA session object ------------------------------------------------------------
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET", "__bool__": lambda self: False})()


def session_rate(session: dict) -> int:
    """audio.input.format.rate of a GA session (24000 when it says nothing)."""
    fmt_ = (((session.get("audio") or {}).get("input") or {}).get("format") or {})
    return int(fmt_.get("rate") or GA_RATE)


def session_turn_detection(session: dict) -> Optional[dict]:
    """audio.input.turn_detection of a GA session: the server_vad settings, or None (manual commit)."""
    return ((session.get("audio") or {}).get("input") or {}).get("turn_detection")


def session_output_rate(session: dict) -> int:
    """audio.output.format.rate of a GA session (24000 when it says nothing)."""
    fmt_ = (((session.get("audio") or {}).get("output") or {}).get("format") or {})
    return int(fmt_.get("rate") or OUTPUT_RATE)


def session_speaks(session: dict) -> bool:
    """Whether the session's replies are spoken (output_modalities holds "audio")."""
    return "audio" in (session.get("output_modalities") or ())


def session_voice(session: dict) -> Optional[str]:
    """audio.output.voice of a GA session."""
    return ((session.get("audio") or {}).get("output") or {}).get("voice")


def reply_audio(audio: bool = True, *, voice: Optional[str] = None, speed: Optional[float] = None,
                rate: Optional[int] = OUTPUT_RATE) -> Dict[str, Any]:
    """The session_update fields that ask for spoken replies (audio=True: output_modalities
    ["audio"], the output format at `rate`, `voice`, `speed`) or written ones (audio=False:
    ["text"]). Use as `session_update(rate=16000, **reply_audio(voice="en-gb"))`."""
    if not audio:
        return {"output_modalities": ["text"]}
    return {"output_modalities": ["audio"], "output_rate": rate, "voice": voice, "voice_speed": speed}


def session_extension(session: dict) -> dict:
    """Our extensions of a GA session (`nestvox`: chunk_ms, algorithmic_latency_ms, temperature, ...)."""
    return dict(session.get("nestvox") or {})


def describe_session(session: dict) -> str:
    """One line: chunk, algorithmic latency, input rate, turn mode."""
    ext, td = session_extension(session), session_turn_detection(session)
    mode = "manual commit" if td is None else f"server VAD ({td.get('silence_duration_ms')} ms silence)"
    spoken = ""
    if session_speaks(session):
        out = (session.get("audio") or {}).get("output") or {}
        spoken = (f", spoken replies (voice {out.get('voice')}, speed {fmt(out.get('speed'), 2)}, "
                  f"{session_output_rate(session)} Hz)")
    return (f"chunk {fmt(ext.get('chunk_ms'), 0)} ms (algorithmic latency {fmt(ext.get('algorithmic_latency_ms'))} "
            f"ms), input {session_rate(session)} Hz, {mode}{spoken}")


def session_update(*, rate: Optional[int] = None, manual: Optional[bool] = None, turn_detection: Any = UNSET,
                   instructions: Any = UNSET, max_output_tokens: Optional[int] = None,
                   chunk_ms: Optional[int] = None, temperature: Optional[float] = None,
                   top_p: Optional[float] = None, max_turn_seconds: Optional[float] = None,
                   output_modalities: Optional[Sequence[str]] = None, output_rate: Optional[int] = None,
                   voice: Optional[str] = None, voice_speed: Optional[float] = None) -> dict:
    """The GA `session` of a session.update that changes only the given fields.

    rate: audio.input.format {"type": "audio/pcm", "rate"}; manual=True: turn_detection
    null, manual=False: server VAD (its defaults, or the current settings); turn_detection:
    an explicit (partial) server_vad object or None; instructions / max_output_tokens:
    top-level GA fields; chunk_ms, temperature, top_p, max_turn_seconds: under "nestvox".
    Replies: output_modalities (["text"] or ["audio"]); output_rate: audio.output.format
    {"type": "audio/pcm", "rate"}; voice, voice_speed: audio.output.voice / .speed
    (`reply_audio(...)` builds these four)."""
    session: Dict[str, Any] = {"type": "realtime"}
    audio_input: Dict[str, Any] = {}
    if rate is not None:
        audio_input["format"] = {"type": "audio/pcm", "rate": int(rate)}
    if manual is not None and turn_detection is UNSET:
        turn_detection = None if manual else {"type": "server_vad"}
    if turn_detection is not UNSET:
        audio_input["turn_detection"] = turn_detection
    audio_output: Dict[str, Any] = {}
    if output_rate is not None:
        audio_output["format"] = {"type": "audio/pcm", "rate": int(output_rate)}
    if voice is not None:
        audio_output["voice"] = voice
    if voice_speed is not None:
        audio_output["speed"] = float(voice_speed)
    audio = {k: v for k, v in (("input", audio_input), ("output", audio_output)) if v}
    if audio:
        session["audio"] = audio
    if output_modalities is not None:
        session["output_modalities"] = list(output_modalities)
    if instructions is not UNSET:
        session["instructions"] = instructions
    if max_output_tokens is not None:
        session["max_output_tokens"] = int(max_output_tokens)
    ext = {k: v for k, v in (("chunk_ms", chunk_ms), ("temperature", temperature), ("top_p", top_p),
                             ("max_turn_seconds", max_turn_seconds)) if v is not None}
    if ext:
        session["nestvox"] = ext
    return session


# -- connection -------------------------------------------------------------------------
class Connection:
    """One websocket conversation. Use `await connect(url)`; `session` holds the
    effective settings (the GA session of session.created / session.updated)."""

    def __init__(self, ws, url: str, session: dict):
        self.ws = ws
        self.url = url
        self.session = session
        self.sent_ms = 0.0  # audio sent on this connection, in ms of stream time
        self.send_log: List[tuple] = []  # (stream ms at the end of a packet, perf_counter when sent)
        self._ids = itertools.count(1)

    @property
    def rate(self) -> int:
        return session_rate(self.session)

    @property
    def turn_detection(self) -> Optional[dict]:
        return session_turn_detection(self.session)

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def output_rate(self) -> int:
        """The spoken replies' PCM16 rate (audio.output.format.rate)."""
        return session_output_rate(self.session)

    @property
    def speaks(self) -> bool:
        """Whether replies are spoken (output_modalities holds "audio")."""
        return session_speaks(self.session)

    @property
    def silence_ms(self) -> Optional[int]:
        """The VAD's silence_duration_ms (None in manual mode)."""
        td = self.turn_detection
        return None if td is None else int(td.get("silence_duration_ms", 500))

    @property
    def nestvox(self) -> dict:
        return session_extension(self.session)

    def new_event_id(self) -> str:
        return f"evt_client_{next(self._ids)}"

    async def send_event(self, event: dict) -> str:
        """Send a client event (an `event_id` is added when it has none); returns its event_id."""
        if "event_id" not in event:
            event = {**event, "event_id": self.new_event_id()}
        try:
            await self.ws.send(json.dumps(event))
        except Exception as exc:
            raise _closed(exc, self.url) from None
        return event["event_id"]

    async def send_audio(self, pcm: bytes, as_json: bool = False) -> None:
        """PCM16 at the session rate: a binary frame (the fast path), or an input_audio_buffer.append event."""
        try:
            if as_json:
                await self.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                               "audio": base64.b64encode(pcm).decode()}))
            else:
                await self.ws.send(pcm)
        except Exception as exc:
            raise _closed(exc, self.url) from None
        self.sent_ms += 1000.0 * (len(pcm) // 2) / self.rate
        self.send_log.append((self.sent_ms, time.perf_counter()))

    def sent_at(self, stream_ms: float) -> Optional[float]:
        """perf_counter when the audio at `stream_ms` (connection stream time) was sent."""
        if not self.send_log:
            return None
        i = bisect.bisect_left(self.send_log, (stream_ms, -math.inf))
        return self.send_log[min(i, len(self.send_log) - 1)][1]

    async def recv_event(self, timeout: Optional[float] = None) -> dict:
        try:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
        except asyncio.TimeoutError:
            raise TurnFailed("timeout", f"no event from {self.url} for {timeout:g} s") from None
        except Exception as exc:
            raise _closed(exc, self.url) from None
        if isinstance(message, bytes):
            message = message.decode("utf-8", errors="replace")
        try:
            event = json.loads(message)
        except json.JSONDecodeError as exc:
            raise TurnFailed("invalid_json", f"{self.url} sent a message that is not JSON ({exc}): "
                             f"is this a nestvox server?") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise TurnFailed("invalid_event", f"{self.url} sent an event without a \"type\": {message[:200]!r}")
        return event

    async def update(self, timeout: float = 10.0, **fields) -> dict:
        """A GA session.update with only `fields` (see `session_update`: rate, manual,
        turn_detection, instructions, max_output_tokens, chunk_ms, temperature, top_p,
        max_turn_seconds, output_modalities, output_rate, voice, voice_speed) -> the effective
        session from session.updated. UpdateRefused
        on the error event that answers it (nothing changed)."""
        return await self.update_session(session_update(**fields), timeout)

    async def update_session(self, session: dict, timeout: float = 10.0) -> dict:
        """Send `session` (a GA session object, "type": "realtime" added) as session.update."""
        session = {"type": "realtime", **session}
        event_id = await self.send_event({"type": "session.update", "session": session})
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv_event(max(0.01, deadline - time.monotonic()))
            if event["type"] == "session.updated":
                self.session = event["session"]
                return self.session
            if event["type"] == "error":
                err = error_of(event)
                if err["event_id"] not in (None, event_id):
                    continue  # about an earlier event, not this update
                raise UpdateRefused(err["code"], f"the server refused session.update {json.dumps(session)}: "
                                    f"{describe_error(err)}", err)

    async def truncate(self, item_id: str, audio_end_ms: float, timeout: float = 10.0) -> dict:
        """conversation.item.truncate: the spoken reply `item_id` becomes its first
        `audio_end_ms` (what the user heard) -> the conversation.item.truncated event.
        TurnFailed on the error event that answers it (item_truncate_not_possible, ...)."""
        event_id = await self.send_event({"type": "conversation.item.truncate", "item_id": item_id,
                                          "content_index": 0, "audio_end_ms": int(audio_end_ms)})
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv_event(max(0.01, deadline - time.monotonic()))
            if event["type"] == "conversation.item.truncated" and event.get("item_id") == item_id:
                return event
            if event["type"] == "error":
                err = error_of(event)
                if err["event_id"] in (None, event_id):
                    raise TurnFailed(err["code"], f"the server refused the truncate: {describe_error(err)}", err)

    async def close(self) -> None:
        try:
            await self.ws.close()
        except Exception:
            pass

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _closed(exc: Exception, url: str) -> ClientError:
    from websockets.exceptions import ConnectionClosed

    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd
        code, reason = (frame.code, frame.reason) if frame is not None else (None, "")
        if code == 1013:
            return ServerRefused("server_full", f"{url} closed the connection: {reason or 'server full'} (1013)")
        return TurnFailed("connection_closed", f"{url} closed the connection"
                          + (f" (code {code}{': ' + reason if reason else ''})" if code else " (no close frame)"))
    if isinstance(exc, ClientError):
        return exc
    return TurnFailed("connection_error", f"connection to {url} failed: {type(exc).__name__}: {exc}")


async def connect(url: str = DEFAULT_URL, token: Optional[str] = None, open_timeout: float = 10.0) -> Connection:
    """Open a conversation (GA dialect) and wait for session.created.

    Raises ServerUnreachable (nothing listens: the message names the URL and
    `python serve.py`), ServerRefused (server_full / 1013, 401 unauthorized, any
    other HTTP status) or ClientError (a bad URL, or a server that does not speak GA)."""
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus, InvalidURI

    url = with_path(url)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await ws_connect(url, additional_headers=headers, open_timeout=open_timeout, compression=None,
                              max_size=1 << 24, proxy=None if is_loopback(url) else True)
    except InvalidURI as exc:
        raise ClientError(f"not a websocket URL: {url!r} ({exc})") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = (exc.response.body or b"").decode(errors="replace").strip()
        if status == 401:
            raise ServerRefused("unauthorized", f"{url} refused the token: {body or 'HTTP 401'} "
                                f"(pass the server's --auth-token with --token)") from None
        code = "server_full" if status in (429, 503) else f"http_{status}"
        raise ServerRefused(code, f"{url} answered HTTP {status}: {body}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else f"{type(exc).__name__}: {exc}"
        raise ServerUnreachable(f"cannot reach the nestvox server at {url} ({why}); {START_HINT}") from None
    except Exception as exc:  # InvalidHandshake, InvalidMessage (not a websocket server), ...
        raise ServerUnreachable(f"no nestvox websocket at {url} ({type(exc).__name__}: {exc}); {START_HINT}") from None
    conn = Connection(ws, url, {})
    try:
        first = await conn.recv_event(open_timeout)
    except ClientError:
        await conn.close()
        raise
    if first.get("type") == "error":
        err = error_of(first)
        await conn.close()
        raise ServerRefused(err["code"], f"{url}: {describe_error(err)}")
    if first.get("type") != "session.created":
        await conn.close()
        raise ClientError(f"{url} did not start with session.created (got {first.get('type')!r})")
    session = first.get("session") or {}
    if session.get("type") != "realtime" or "audio" not in session:
        await conn.close()
        raise ClientError(f"{url} does not speak the Realtime GA dialect (its session.created has no "
                          f"\"type\": \"realtime\" session with \"audio\"): these clients speak GA; drop a "
                          f"?dialect=beta from the URL, or update the server")
    conn.session = session
    return conn


# -- one turn ---------------------------------------------------------------------------
@dataclass
class TurnResult:
    """One user turn and the reply: `text`, the `response.done` event, every event; for a
    spoken reply also its audio (`audio_chunks`: decoded PCM16 bytes at `output_rate`) and
    `transcript`."""

    text: str = ""
    done: Optional[dict] = None
    events: List[dict] = field(default_factory=list)
    stamps: Dict[str, float] = field(default_factory=dict)  # perf_counter of: start, end, speech_stopped, ...
    audio_ms: float = 0.0  # audio sent for the turn (speech, without trailing silence)
    deltas: List[str] = field(default_factory=list)
    response_id: Optional[str] = None
    user_item_id: Optional[str] = None  # input_audio_buffer.committed / the typed item's id
    output_rate: int = OUTPUT_RATE  # the rate of the reply's audio (the session's audio.output.format.rate)
    audio_chunks: List[bytes] = field(default_factory=list)  # decoded response.output_audio.delta
    transcript_deltas: List[str] = field(default_factory=list)
    transcript: str = ""  # response.output_audio_transcript.done (or the deltas joined)
    item_id: Optional[str] = None  # the assistant item of the reply (conversation.item.truncate names it)
    audio_done: bool = False  # response.output_audio.done arrived

    @property
    def response(self) -> dict:
        return (self.done or {}).get("response") or {}

    @property
    def status(self) -> Optional[str]:
        return self.response.get("status") if self.done else None

    @property
    def usage(self) -> dict:
        return dict(self.response.get("usage") or {})

    @property
    def latency_ms(self) -> Dict[str, Optional[float]]:
        return dict(self.response.get("latency_ms") or {})

    @property
    def audio_pcm(self) -> bytes:
        """The reply's audio: PCM16 mono at `output_rate` (empty for a written reply)."""
        return b"".join(self.audio_chunks)

    @property
    def audio_seconds(self) -> float:
        return sum(len(c) for c in self.audio_chunks) / 2 / self.output_rate

    @property
    def spoken(self) -> bool:
        return bool(self.audio_chunks)

    @property
    def client_ms(self) -> Dict[str, Optional[float]]:
        end = self.stamps.get("end")
        names = {"end_to_speech_stopped": "speech_stopped", "end_to_created": "created",
                 "end_to_first_delta": "first_delta", "end_to_first_audio": "first_audio", "end_to_done": "done"}
        out = {k: (None if end is None or self.stamps.get(s) is None else round(1000 * (self.stamps[s] - end), 2))
               for k, s in names.items()}
        stopped = self.stamps.get("speech_stopped")
        for key, stamp in (("speech_stopped_to_first_delta", "first_delta"),
                           ("speech_stopped_to_first_audio", "first_audio")):
            first = self.stamps.get(stamp)
            out[key] = None if stopped is None or first is None else round(1000 * (first - stopped), 2)
        return out

    def observe(self, event: dict, now: Optional[float] = None,
                sent_at: Optional[Callable[[float], Optional[float]]] = None, stream_start_ms: float = 0.0) -> str:
        """Record one server event; returns "done" (response.done), "error", "audio" (an audio
        delta: its PCM is `audio_chunks[-1]`) or "" (anything else, unknown events included).
        `sent_at(stream_ms)` (server VAD turns): when the client sent the audio at a stream
        position, to place the reference point `end` at speech_stopped."""
        now = time.perf_counter() if now is None else now
        kind = event.get("type")
        stamps = self.stamps
        if kind in AUDIO_DELTA:  # the most frequent first; the base64 is decoded, not kept in `events`
            stamps.setdefault("first_audio", now)
            self.item_id = self.item_id or event.get("item_id")
            self.audio_chunks.append(base64.b64decode(event.get("delta") or ""))
            self.events.append({k: v for k, v in event.items() if k != "delta"})
            return "audio"
        self.events.append(event)
        if kind in TEXT_DELTA:
            stamps.setdefault("first_delta", now)
            self.deltas.append(event.get("delta", ""))
        elif kind in TRANSCRIPT_DELTA:
            stamps.setdefault("first_transcript", now)
            self.transcript_deltas.append(event.get("delta", ""))
        elif kind in TEXT_DONE:
            self.text = event.get("text", "".join(self.deltas))
        elif kind in TRANSCRIPT_DONE:
            self.transcript = event.get("transcript", "".join(self.transcript_deltas))
        elif kind in AUDIO_DONE:
            self.audio_done = True
        elif kind == "input_audio_buffer.speech_started":
            stamps.setdefault("speech_started", now)
        elif kind == "input_audio_buffer.speech_stopped":
            stamps.setdefault("speech_stopped", now)
            if sent_at is not None:
                # the reference point: when we sent the audio where the user stopped talking
                end_ms = max(float(event.get("audio_end_ms", 0.0)), stream_start_ms)
                stamps["end"] = sent_at(end_ms) or now
        elif kind == "input_audio_buffer.committed":
            stamps.setdefault("committed", now)
            self.user_item_id = event.get("item_id", self.user_item_id)
        elif kind in ("conversation.item.added", "response.output_item.added"):
            item = event.get("item") or {}
            if item.get("role") == "user" and self.user_item_id is None:
                self.user_item_id = item.get("id")
            elif item.get("role") == "assistant" and self.item_id is None:
                self.item_id = item.get("id")
        elif kind == "response.created":
            stamps.setdefault("created", now)
            self.response_id = (event.get("response") or {}).get("id")
        elif kind == "response.done":
            stamps["done"] = now
            self.done = event
            if not self.transcript:
                self.transcript = "".join(self.transcript_deltas) or _output_transcript(self.response)
            if not self.text:
                self.text = "".join(self.deltas) or _output_text(self.response) or self.transcript
            return "done"
        elif kind == "error":
            return "error"
        return ""


def _output_transcript(response: dict) -> str:
    """The transcript of a GA response's spoken output (output_audio parts)."""
    for item in response.get("output") or []:
        for part in (item or {}).get("content") or []:
            if isinstance(part, dict) and part.get("type") in ("output_audio", "audio") and part.get("transcript"):
                return part["transcript"]
    return ""


def write_wav(path: str, pcm: bytes, rate: int) -> str:
    """PCM16 mono bytes -> a 16-bit wav file at `rate`."""
    import wave

    try:
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(rate))
            w.writeframes(pcm)
    except OSError as exc:
        raise ClientError(f"cannot write {path!r}: {exc}") from None
    return path


def _output_text(response: dict) -> str:
    """The text of a GA response's output message (output_text parts)."""
    for item in response.get("output") or []:
        for part in (item or {}).get("content") or []:
            if isinstance(part, dict) and part.get("type") in ("output_text", "text") and part.get("text"):
                return part["text"]
    return ""


async def stream_pcm(conn: Connection, pcm: bytes, packet_ms: float = 20.0, speed: float = 1.0,
                     as_json: bool = False, clock_start: Optional[float] = None) -> float:
    """Send PCM16 at the session rate in packets of `packet_ms`, paced at `speed` x real time
    (0: as fast as possible) against an absolute schedule (no drift). Returns the schedule's end."""
    step = max(2, int(round(conn.rate * packet_ms / 1000.0)) * 2)
    start = time.perf_counter() if clock_start is None else clock_start
    sent_s = 0.0
    for i in range(0, len(pcm), step):
        piece = pcm[i:i + step]
        if speed > 0:
            delay = start + sent_s / speed - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await conn.send_audio(piece, as_json)
        sent_s += len(piece) / 2 / conn.rate
    return start + (sent_s / speed if speed > 0 else 0.0)


def response_create(response: Optional[dict] = None) -> dict:
    """A response.create event; `response`: per-response {instructions, max_output_tokens}."""
    event: Dict[str, Any] = {"type": "response.create"}
    if response:
        event["response"] = dict(response)
    return event


def typed_item(text: str) -> dict:
    """A conversation.item.create event: a typed user message (input_text)."""
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


async def run_turn(conn: Connection, audio: np.ndarray, *, packet_ms: float = 20.0, speed: float = 1.0,
                   trailing_silence_ms: Optional[float] = None, as_json: bool = False,
                   on_event: Optional[Callable[[dict], None]] = None, timeout: float = 60.0,
                   vad_grace_s: float = 10.0, response: Optional[dict] = None) -> TurnResult:
    """Stream one utterance (float32 at the session rate) and receive events until response.done.

    server_vad sessions: the utterance is followed by `trailing_silence_ms` of zeros
    (default: the session's silence_duration_ms + 300) so the server's VAD ends the turn.
    manual sessions (turn_detection null): input_audio_buffer.commit + response.create
    (with `response`: per-response instructions / max_output_tokens) follow the last
    packet. Raises TurnFailed on an error event, a closed connection, a timeout, or a
    VAD that heard no (end of) speech within `vad_grace_s` after the audio."""
    result = TurnResult(audio_ms=1000.0 * audio.size / conn.rate, output_rate=conn.output_rate)
    stamps = result.stamps
    manual = conn.manual
    pcm = float_to_pcm16(audio)
    if not manual:
        if trailing_silence_ms is None:
            trailing_silence_ms = conn.silence_ms + 300
        silence = bytes(2 * int(conn.rate * trailing_silence_ms / 1000.0))
    speech_start_ms = conn.sent_ms
    deadline = time.monotonic() + timeout
    stamps["start"] = time.perf_counter()

    async def send() -> None:
        clock = stamps["start"]
        end = await stream_pcm(conn, pcm, packet_ms, speed, as_json, clock)
        if manual:
            stamps["end"] = time.perf_counter()
            await conn.send_event({"type": "input_audio_buffer.commit"})
            await conn.send_event(response_create(response))
        else:
            await stream_pcm(conn, silence, packet_ms, speed, as_json, end)
        stamps["sent"] = time.perf_counter()

    sender = asyncio.create_task(send())
    try:
        while True:
            if sender.done() and sender.exception() is not None:
                raise sender.exception()
            wait = deadline - time.monotonic()
            if not manual and "sent" in stamps and "speech_stopped" not in stamps:
                wait = min(wait, stamps["sent"] + vad_grace_s - time.perf_counter())
            if wait <= 0:
                if not manual and "speech_stopped" not in stamps and "sent" in stamps:
                    heard = "speech_started" in stamps
                    raise TurnFailed("no_speech_end" if heard else "no_speech", (
                        "the server's VAD heard speech but no end of it" if heard else
                        "the server's VAD heard no speech in the audio") + f" within {vad_grace_s:g} s after the "
                        "audio ended (too quiet, or no pause at the end? try manual commit)")
                raise TurnFailed("timeout", f"no response.done from {conn.url} within {timeout:g} s")
            try:
                event = await conn.recv_event(min(wait, 0.5) if not sender.done() else wait)
            except TurnFailed as exc:
                if exc.code == "timeout":
                    continue  # re-check the deadlines and the sender
                raise
            if on_event is not None:
                on_event(event)
            kind = result.observe(event, time.perf_counter(), None if manual else conn.sent_at, speech_start_ms)
            if kind == "done":
                break
            if kind == "error":
                err = error_of(event)
                raise TurnFailed(err["code"], f"server error {describe_error(err)}", err)
    except BaseException:
        if not sender.done():
            sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, Exception):
            pass
        raise
    try:
        await sender  # the rest of the trailing silence (at most ~300 ms), so the stream stays whole
    except ClientError:
        pass  # the reply is complete; a later turn on this connection reports the failure
    return result


async def run_text_turn(conn: Connection, text: str, *, response: Optional[dict] = None,
                        on_event: Optional[Callable[[dict], None]] = None, timeout: float = 60.0) -> TurnResult:
    """A typed user turn: conversation.item.create (input_text) + response.create (with
    `response`: per-response instructions / max_output_tokens), then events until
    response.done. The reference point `end` of client_ms is when response.create left."""
    result = TurnResult(output_rate=conn.output_rate)
    result.stamps["start"] = time.perf_counter()
    await conn.send_event(typed_item(text))
    await conn.send_event(response_create(response))
    result.stamps["end"] = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise TurnFailed("timeout", f"no response.done from {conn.url} within {timeout:g} s")
        event = await conn.recv_event(wait)
        if on_event is not None:
            on_event(event)
        kind = result.observe(event)
        if kind == "done":
            return result
        if kind == "error":
            err = error_of(event)
            raise TurnFailed(err["code"], f"server error {describe_error(err)}", err)


# -- the server's HTTP side (same port as the websocket) ---------------------------------
def http_base(url: str) -> str:
    """http(s)://host:port of a server's websocket URL (where /healthz and /metrics answer)."""
    parts = urlsplit(with_path(url))
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


def http_get(url: str, path: str, token: Optional[str] = None, timeout: float = 10.0) -> str:
    """GET `path` (/metrics, /healthz) on the server of websocket `url`; ServerUnreachable if
    nothing answers, ServerRefused on an HTTP error status."""
    import urllib.error
    import urllib.request

    target = http_base(url) + path
    request = urllib.request.Request(target)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise ServerRefused(f"http_{exc.code}", f"{target} answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise ServerUnreachable(f"cannot reach {target} ({type(exc).__name__}: {exc}); {START_HINT}") from None


def parse_metrics(text: str) -> Dict[str, Dict[tuple, float]]:
    """Prometheus text format -> {name: {((label, value), ...) sorted: value}} (comments skipped)."""
    import re

    out: Dict[str, Dict[tuple, float]] = {}
    pattern = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = pattern.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        pairs = tuple(sorted(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or "")))
        try:
            out.setdefault(name, {})[pairs] = float(value)
        except ValueError:
            continue
    return out


def metric_value(metrics: Dict[str, Dict[tuple, float]], name: str, **labels: str) -> Optional[float]:
    """The sample of `name` with exactly these labels (None if the server does not export it)."""
    return (metrics.get(name) or {}).get(tuple(sorted((k, str(v)) for k, v in labels.items())))


# -- numbers and tables -----------------------------------------------------------------
def percentile(values: Iterable[Optional[float]], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default) of the non-None values; None if none."""
    vals = [float(v) for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: Optional[str] = None) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def _stages(names: Sequence[str], results: Sequence[TurnResult]) -> List[str]:
    """The stages worth a row: the first-audio ones only when some reply was spoken."""
    spoken = any(r.spoken or r.latency_ms.get("speech_end_to_first_audio") is not None for r in results)
    return [k for k in names if spoken or k not in AUDIO_STAGES]


def turn_latency_table(result: TurnResult) -> str:
    rows = [(f"server {k}", result.latency_ms.get(k)) for k in _stages(SERVER_STAGES, [result])]
    rows += [(f"client {k}", result.client_ms.get(k)) for k in _stages(CLIENT_STAGES, [result])]
    return format_table(("latency", "ms"), rows)


def summary_table(results: Sequence[TurnResult], qs: Sequence[float] = (50, 90)) -> str:
    """Percentiles of every stage over several turns."""
    headers = ["latency (ms)", "n"] + [f"p{q:g}" for q in qs]
    rows = []
    for source, names, get in (("server", SERVER_STAGES, lambda r: r.latency_ms),
                               ("client", CLIENT_STAGES, lambda r: r.client_ms)):
        for k in _stages(names, results):
            vals = [get(r).get(k) for r in results if get(r).get(k) is not None]
            rows.append([f"{source} {k}", len(vals)] + [percentile(vals, q) for q in qs])
    return format_table(headers, rows)


def setup_stdout() -> None:
    """Replies of an untrained model may hold any character: never fail to print them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def printable(text: str) -> str:
    """Control characters (an untrained model emits them) as \\xNN, newlines kept."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def add_connection_args(p, default_url: str = DEFAULT_URL) -> None:
    p.add_argument("--url", default=default_url, help=f"server websocket URL (default {default_url})")
    p.add_argument("--token", default=None, help="bearer token, when the server runs with --auth-token "
                   "(also read from NESTVOX_AUTH_TOKEN)")


def token_from(args) -> Optional[str]:
    import os

    return args.token or os.environ.get("NESTVOX_AUTH_TOKEN") or None
