"""Synthesis off the caller's thread: one `TTSWorker` thread serves many `SpeechStream`s.

    worker = TTSWorker(build_tts("espeak"))
    s = worker.open_stream(rate=24000, voice="en-us", speed=1.0,
                           on_audio=..., on_error=..., on_done=...)
    s.push_text("Hello there. ")      # as the LLM decodes; never blocks on synthesis
    s.finish()                        # no more text: the rest is spoken, then on_done(stats)
    s.cancel()                        # barge-in: drop what is queued, no callbacks after return

Callbacks run on the worker thread; keep them short and hop to your own loop
(`loop.call_soon_threadsafe`). Per stream, callbacks come in order:

* ``on_audio(pcm16: bytes, piece: str, audio_ms: float)``: little-endian PCM16 mono at the
  stream's rate, at most `chunk_ms` (100 ms) per call. `piece` is the transcript text the audio
  speaks, given with the first chunk of its piece and "" with the rest; a piece with nothing to
  say (whitespace, bare punctuation) comes once with b"" and 0.0. So, unless the stream was
  cancelled or failed, the `piece`s joined are exactly the text pushed.
* then exactly one of ``on_done(stats)`` (after finish(), all audio delivered) or
  ``on_error(exc)`` (the engine or a callback raised: the stream stops, its queued text is
  dropped; other streams go on; a worker closed under an unfinished stream gives
  ``TTSError("TTS worker closed")``).
* ``cancel()``: once it returns, no callback of that stream runs any more (none of on_audio,
  on_done, on_error); a callback already running finishes first (cancel waits for it, unless
  called from inside a callback). A piece being synthesized when cancel is called is dropped.

Streams are served round-robin, one piece each in turn, so a long reply does not hold back
another session's first audio.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Deque, Dict, Optional

import numpy as np
import soxr

from .base import TTSEngine, TTSError, clamp_speed
from .segmenter import TextSegmenter

log = logging.getLogger(__name__)

OnAudio = Callable[[bytes, str, float], None]
OnError = Callable[[BaseException], None]
OnDone = Callable[["StreamStats"], None]

_OPEN, _FINISHING, _DONE, _CANCELLED, _ERROR, _CLOSED = (
    "open", "finishing", "done", "cancelled", "error", "closed")
_TERMINAL = (_DONE, _CANCELLED, _ERROR, _CLOSED)


@dataclasses.dataclass
class StreamStats:
    """One stream's counters (a snapshot: `SpeechStream.stats()`)."""

    stream_id: int
    rate: int
    voice: Optional[str]
    speed: float
    state: str = _OPEN
    chars_pushed: int = 0
    pieces: int = 0  # pieces synthesized and delivered
    pieces_queued: int = 0  # waiting for the worker now
    audio_s: float = 0.0  # audio delivered
    synth_s: float = 0.0  # engine + resampling time for that audio
    first_audio_s: Optional[float] = None  # first non-empty push_text -> first audio delivered
    error: Optional[str] = None

    @property
    def real_time_factor(self) -> Optional[float]:
        """synth_s / audio_s (below 1: faster than real time)."""
        return self.synth_s / self.audio_s if self.audio_s > 0 else None


def _to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _speakable(piece: str) -> bool:
    return any(c.isalnum() for c in piece)


class SpeechStream:
    """One reply's audio. Made by `TTSWorker.open_stream`; its methods are thread-safe."""

    def __init__(self, worker: "TTSWorker", sid: int, rate: int, voice: Optional[str], speed: float,
                 on_audio: Optional[OnAudio], on_error: Optional[OnError], on_done: Optional[OnDone],
                 chunk_ms: float, segmenter: TextSegmenter, max_queue: int):
        self._w = worker
        self.id = sid
        self.rate = rate
        self.voice = voice
        self.speed = speed
        self._on_audio, self._on_error, self._on_done = on_audio, on_error, on_done
        self._chunk = max(1, int(round(rate * chunk_ms / 1000.0)))
        self._seg = segmenter
        self._max_queue = max_queue
        self._pending: Deque[str] = collections.deque()
        self._state = _OPEN
        self._cancelled = False
        self._in_ready = False
        self._first_push: Optional[float] = None
        self._deliver = threading.Lock()  # held while one of this stream's callbacks runs
        self._stats = StreamStats(sid, rate, voice, speed)

    # -- caller side ------------------------------------------------------------------------

    def push_text(self, delta: str) -> None:
        """Add reply text. Complete pieces are queued for synthesis; returns at once. Ignored
        once the stream was cancelled or failed; an error after finish()."""
        if not delta:
            return
        with self._w._cv:
            if self._state in (_FINISHING, _DONE):
                raise RuntimeError("push_text after finish()")
            if self._state != _OPEN:
                return
            if self._first_push is None:
                self._first_push = time.perf_counter()
            self._stats.chars_pushed += len(delta)
            self._enqueue(self._seg.push(delta))

    def finish(self) -> None:
        """No more text: the rest is spoken, then on_done(stats). Idempotent."""
        with self._w._cv:
            if self._state != _OPEN:
                return
            self._set_state(_FINISHING)
            self._enqueue(self._seg.flush(), force_ready=True)

    def cancel(self) -> None:
        """Stop: queued pieces dropped, and no callback of this stream after this returns."""
        with self._w._cv:
            self._cancelled = True
            if self._state not in _TERMINAL:
                self._set_state(_CANCELLED)
                self._pending.clear()
        if not self._w._on_worker_thread():
            with self._deliver:  # wait out a callback in flight
                pass

    def stats(self) -> StreamStats:
        with self._w._cv:
            s = dataclasses.replace(self._stats)
            s.pieces_queued = len(self._pending)
            return s

    @property
    def state(self) -> str:
        """open, finishing, done, cancelled, error or closed."""
        return self._state

    @property
    def pending_text(self) -> str:
        """Text pushed and not yet spoken nor being spoken (what a barge-in leaves unsaid)."""
        with self._w._cv:
            return "".join(self._pending) + self._seg.pending

    # -- worker side (the worker's lock held where noted) --------------------------------

    def _set_state(self, state: str) -> None:  # lock held
        self._state = self._stats.state = state
        if state in _TERMINAL:
            self._w._streams.pop(self.id, None)

    def _enqueue(self, pieces, force_ready: bool = False) -> None:  # lock held
        for p in pieces:
            # A worker far behind merges further text into the last queued piece: nothing is
            # dropped or blocked, and the queue stays bounded in count.
            if len(self._pending) >= self._max_queue:
                self._pending[-1] += p
            else:
                self._pending.append(p)
        if (self._pending or force_ready) and not self._in_ready:
            self._in_ready = True
            self._w._ready.append(self)
            self._w._cv.notify()

    def _call(self, fn, *args) -> bool:
        """Run one callback unless cancelled; False if it raised."""
        if fn is None:
            return True
        with self._deliver:
            if self._cancelled:
                return True
            try:
                fn(*args)
            except Exception as e:  # a broken callback stops its own stream only
                log.exception("TTS stream %d: callback %s raised", self.id, getattr(fn, "__name__", fn))
                self._fail_locked_delivery(e, fn)
                return False
        return True

    def _fail_locked_delivery(self, exc: BaseException, failed_cb) -> None:
        with self._w._cv:
            if self._state in _TERMINAL:
                return
            self._set_state(_ERROR)
            self._stats.error = repr(exc)
            self._pending.clear()
        if self._on_error is not None and failed_cb is not self._on_error and not self._cancelled:
            try:
                self._on_error(exc)
            except Exception:
                log.exception("TTS stream %d: on_error raised", self.id)

    def _fail(self, exc: BaseException) -> None:
        with self._w._cv:
            if self._state in _TERMINAL:
                return
            self._set_state(_ERROR)
            self._stats.error = repr(exc)
            self._pending.clear()
        with self._deliver:
            if self._cancelled or self._on_error is None:
                return
            try:
                self._on_error(exc)
            except Exception:
                log.exception("TTS stream %d: on_error raised", self.id)

    def _close(self) -> None:
        with self._w._cv:
            if self._state in _TERMINAL:
                return
            self._set_state(_CLOSED)
            self._pending.clear()
        with self._deliver:
            if not self._cancelled and self._on_error is not None:
                try:
                    self._on_error(TTSError("TTS worker closed"))
                except Exception:
                    log.exception("TTS stream %d: on_error raised", self.id)


class TTSWorker:
    """One background thread running `engine` for every stream opened on it."""

    def __init__(self, engine: TTSEngine, max_queue: int = 64, chunk_ms: float = 100.0,
                 min_clause_chars: int = 25, warmup: bool = True, name: str = "nestvox-tts"):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if not 10 <= chunk_ms <= 1000:
            raise ValueError("chunk_ms must be within 10..1000")
        self.engine = engine
        self.max_queue = int(max_queue)
        self.chunk_ms = float(chunk_ms)
        self.min_clause_chars = int(min_clause_chars)
        self._cv = threading.Condition(threading.Lock())
        self._ready: Deque[SpeechStream] = collections.deque()
        self._streams: Dict[int, SpeechStream] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._totals = {"streams": 0, "pieces": 0, "audio_s": 0.0, "synth_s": 0.0, "errors": 0}
        self._warmup = warmup
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def open_stream(self, rate: int = 24000, voice: Optional[str] = None, speed: float = 1.0,
                    on_audio: Optional[OnAudio] = None, on_error: Optional[OnError] = None,
                    on_done: Optional[OnDone] = None, chunk_ms: Optional[float] = None) -> SpeechStream:
        """A new stream speaking at `rate` Hz (8000..96000) in `voice` (None: the engine's
        default) at `speed` (clamped to 0.25..1.5)."""
        rate = int(rate)
        if not 8000 <= rate <= 96000:
            raise ValueError(f"rate must be within 8000..96000 Hz, got {rate}")
        speed = clamp_speed(speed)
        with self._cv:
            if self._closing:
                raise TTSError("TTS worker closed")
            sid = next(self._ids)
            s = SpeechStream(self, sid, rate, voice, speed, on_audio, on_error, on_done,
                             chunk_ms or self.chunk_ms, TextSegmenter(self.min_clause_chars),
                             self.max_queue)
            self._streams[sid] = s
            self._totals["streams"] += 1
            return s

    def stats(self) -> dict:
        """Totals: streams opened, open now, pieces, audio_s, synth_s, errors, queued pieces."""
        with self._cv:
            out = dict(self._totals)
            out["streams_open"] = len(self._streams)
            out["pieces_queued"] = sum(len(s._pending) for s in self._streams.values())
            return out

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the piece in progress; unfinished streams get on_error(TTSError)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if not self._on_worker_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "TTSWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        if self._warmup:
            try:  # the first call loads the voice data: not on a user's first piece
                self.engine.synthesize("Ready.", None, 1.0)
            except Exception:
                log.exception("TTS warm-up failed (%r)", self.engine)
        while True:
            with self._cv:
                while not self._ready and not self._closing:
                    self._cv.wait()
                if self._closing:
                    break
                s = self._ready.popleft()
                s._in_ready = False
                if s._state in _TERMINAL:
                    continue
                if s._pending:
                    piece = s._pending.popleft()
                elif s._state == _FINISHING:
                    piece = None
                else:
                    continue
            if piece is None:
                with self._cv:
                    if s._state != _FINISHING:
                        continue
                    s._set_state(_DONE)
                    stats = dataclasses.replace(s._stats)
                s._call(s._on_done, stats)
                continue
            try:
                self._speak(s, piece)
            except Exception as e:  # a bug here must not kill the thread every session shares
                log.exception("TTS worker: stream %d failed", s.id)
                s._fail(e)
            with self._cv:
                if s._state in (_OPEN, _FINISHING) and (s._pending or s._state == _FINISHING) \
                        and not s._in_ready:
                    s._in_ready = True
                    self._ready.append(s)  # to the back: round-robin
        for s in list(self._streams.values()):
            s._close()

    def _speak(self, s: SpeechStream, piece: str) -> None:
        t0 = time.perf_counter()
        try:
            if _speakable(piece):
                audio = np.asarray(self.engine.synthesize(piece, s.voice, s.speed), np.float32)
                sr = self.engine.sample_rate
                if len(audio) and sr != s.rate:
                    audio = soxr.resample(audio, sr, s.rate, quality="HQ")
            else:
                audio = np.zeros(0, np.float32)
            pcm = _to_pcm16(audio)
        except Exception as e:
            with self._cv:
                self._totals["errors"] += 1
            s._fail(e if isinstance(e, TTSError) else TTSError(f"TTS failed: {e!r}"))
            return
        synth = time.perf_counter() - t0
        n = len(pcm) // 2
        audio_s = n / s.rate
        with self._cv:
            s._stats.pieces += 1
            s._stats.synth_s += synth
            s._stats.audio_s += audio_s
            self._totals["pieces"] += 1
            self._totals["synth_s"] += synth
            self._totals["audio_s"] += audio_s
        if n == 0:
            s._call(s._on_audio, b"", piece, 0.0)
            return
        step = s._chunk * 2
        for k in range(0, len(pcm), step):
            if s._cancelled or s._state in (_ERROR, _CLOSED):
                return
            chunk = pcm[k:k + step]
            if s._stats.first_audio_s is None and s._first_push is not None:
                with self._cv:
                    s._stats.first_audio_s = time.perf_counter() - s._first_push
            if not s._call(s._on_audio, chunk, piece if k == 0 else "", len(chunk) / 2 / s.rate * 1000.0):
                return
