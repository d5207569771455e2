"""Engine: one compute thread that owns the models and serves every session.

Each tick it (1) applies the commands sessions sent (audio, commit, cancel, ...),
(2) runs turn detection on the new audio, (3) runs ONE batched encoder step for
every session with audio to encode (turn ends flush in the same call), whose
frames each session stacks, projects and pre-fills at once, and (4) advances
every running reply by one token, round-robin, so concurrent replies all make
progress. Events (OpenAI-Realtime-shaped dicts) go back to each session's
asyncio queue through `loop.call_soon_threadsafe`.

    engine = Engine(model, tokenizer, streamer); engine.start()
    handle = engine.open_session(loop=asyncio.get_running_loop(), instructions="...")
    handle.append_audio(samples_16k_float32)
    event = await handle.next_event()
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from agent.realtime.sampling import GenerationSettings
from agent.realtime.session import Session
from agent.realtime.turns import SpeechStarted, SpeechStopped, TurnDetectionSettings, TurnDetector

log = logging.getLogger("nestvox.engine")
SR = 16000
# A pause that has lasted this long is treated as a possible end of turn: its
# end-of-turn work (encoder flush, last group, assistant header) runs while the
# VAD waits out the rest of its silence, and is rolled back if speech resumes.
SPECULATE_AFTER_MS = 150
_ids = itertools.count(1)


def error_event(code: str, message: str) -> dict:
    return {"type": "error", "error": {"code": code, "message": message}}


@dataclass
class SessionConfig:
    instructions: Optional[str] = None
    turn_detection: TurnDetectionSettings = field(default_factory=TurnDetectionSettings)
    temperature: float = 0.0
    top_p: float = 1.0
    max_response_output_tokens: int = 64
    max_positions: Optional[int] = None
    chunk_ms: Optional[int] = None  # encoder chunk; None: the server's default
    max_turn_seconds: float = 60.0  # a longer turn is committed where it stands

    def generation(self) -> GenerationSettings:
        return GenerationSettings(temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_response_output_tokens)


class LiveSession:
    """Engine-side state of one connection (touched only by the engine thread)."""

    def __init__(self, engine: "Engine", sid: str, config: SessionConfig, emit: Callable[[dict], None]):
        self.id = sid
        self.engine = engine
        self.config = config
        self.emit = emit
        self.session = Session(engine.model, engine.tokenizer, engine.streamer_for(config.chunk_ms),
                               system_prompt=config.instructions,
                               settings=config.generation(), max_positions=config.max_positions)
        self.detector = TurnDetector(config.turn_detection, vad=engine.vad())
        self.audio = np.zeros(0, dtype=np.float32)  # samples from `audio_start` on
        self.audio_start = 0  # absolute sample index of audio[0]
        self.turn_start: Optional[int] = None  # absolute sample where the current turn's audio starts
        self.fed = 0  # absolute sample index up to which the turn's audio went to the encoder
        self.turn_end: Optional[int] = None  # set when the turn ended and its flush is due
        self.speech_end_time: Optional[float] = None
        self.respond_after_turn = True
        self.reply: Optional[Iterator[str]] = None
        self.response_id: Optional[str] = None
        self.deltas: List[str] = []
        self.closed = False
        self.spec: Optional[dict] = None  # {"silence": sample, "snap": Session.snapshot()}
        # A turn that began while a reply was still running (manual mode, or server VAD
        # with interrupt_response off): it starts when the reply is done.
        self.pending_start: Optional[int] = None
        self.pending_end: Optional[int] = None
        self.speculate = True

    # -- audio and turns --------------------------------------------------------
    @property
    def manual(self) -> bool:
        return self.config.turn_detection.mode == "manual"

    def append(self, samples: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, samples]) if self.audio.size else samples
        if self.manual and self.turn_start is None and self.pending_start is None and samples.size:
            if self.reply is not None:
                self.pending_start = self.detector.samples
            else:
                self.begin_turn(self.detector.samples)
        for event in self.detector.feed(samples):
            if isinstance(event, SpeechStarted):
                self.on_speech_started(event)
            elif isinstance(event, SpeechStopped):
                self.on_speech_stopped(event)
        limit = int(self.config.max_turn_seconds * SR)
        if self.turn_start is not None and self.turn_end is None and self.detector.samples - self.turn_start > limit:
            self.emit(error_event("turn_too_long", f"the turn exceeded max_turn_seconds="
                                                   f"{self.config.max_turn_seconds:g} and was committed"))
            self.commit()
            self.respond_after_turn = self.config.turn_detection.create_response
        self._trim()

    def _trim(self) -> None:
        """Keep only audio that a turn may still need (the prefix padding window)."""
        keep_from = self.turn_start if self.turn_start is not None else self.pending_start if \
            self.pending_start is not None else (
            self.audio_start + self.audio.size - int(SR * (self.config.turn_detection.prefix_padding_ms + 500) / 1000))
        keep_from = max(keep_from, self.audio_start)
        if self.turn_start is not None:
            keep_from = max(keep_from, self.fed)
        drop = keep_from - self.audio_start
        if drop > 0:
            self.audio = self.audio[drop:]
            self.audio_start = keep_from

    def begin_turn(self, start: int) -> None:
        self.session.streamer = self.engine.streamer_for(self.config.chunk_ms)  # a chunk_ms update applies here
        self.session.start_turn()
        self.turn_start = start
        self.fed = max(start, self.audio_start)
        self.turn_end = None

    def on_speech_started(self, event: SpeechStarted) -> None:
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": event.sample * 1000 // SR,
                   "audio_start_sample": event.sample})
        if self.reply is not None:
            if not self.config.turn_detection.interrupt_response:
                self.pending_start = event.sample  # answered after the running reply
                return
            self.session.cancel()  # barge-in: the user talks over the reply
            self.advance_reply(to_end=True)
        if self.turn_start is None:
            self.begin_turn(event.sample)

    def on_speech_stopped(self, event: SpeechStopped) -> None:
        self.speech_end_time = time.perf_counter()
        # audio_end_*: where the silence began; turn_end_*: where the turn's audio ends
        # (suffix_padding_ms into that silence)
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": event.sample * 1000 // SR,
                   "audio_end_sample": event.sample, "turn_end_ms": event.end * 1000 // SR,
                   "turn_end_sample": event.end})
        if self.spec is not None and self.spec["silence"] == event.sample and self.turn_start is not None:
            self.confirm_speculation()
            return
        self.rollback_speculation()
        if self.pending_start is not None:
            self.pending_end = max(event.end, self.pending_start)
            self.respond_after_turn = self.config.turn_detection.create_response
        elif self.turn_start is not None:
            self.turn_end = max(event.end, self.turn_start)
            self.respond_after_turn = self.config.turn_detection.create_response

    def commit(self) -> None:
        self.rollback_speculation()  # the committed turn includes the pause's audio
        if self.pending_start is not None:  # a reply is still running: the turn follows it
            self.pending_end = self.detector.commit().sample
            self.respond_after_turn = not self.manual and self.config.turn_detection.create_response
            return
        if self.turn_start is None or self.detector.samples <= self.turn_start:
            self.emit(error_event("input_audio_buffer_commit_empty", "there is no uncommitted audio to commit"))
            return
        self.speech_end_time = time.perf_counter()
        event = self.detector.commit()
        self.turn_end = event.sample
        self.respond_after_turn = not self.manual and self.config.turn_detection.create_response

    def clear(self) -> None:
        self.rollback_speculation()
        self.pending_start = self.pending_end = None
        self.detector.clear()
        if self.turn_start is not None and self.turn_end is None:
            self.session.abort_turn()
            self.turn_start = None
        self.emit({"type": "input_audio_buffer.cleared"})

    # -- speculative end of turn -----------------------------------------------------
    def maybe_speculate(self) -> bool:
        """Run the end-of-turn work for a pause that may be the end of the turn."""
        if self.spec is not None or not self.speculate or self.manual or self.turn_start is None \
                or self.turn_end is not None or self.reply is not None:
            return False
        silence = self.detector.pending_silence_start
        if silence is None:
            return False
        end = silence + self.detector.suffix_padding  # where the turn ends if this pause ends it
        if self.fed < end or self.detector.samples - silence < SPECULATE_AFTER_MS * SR // 1000:
            return False
        turn = self.session.turn
        snap = self.session.snapshot()
        streamer = self.session.streamer
        (state,), (frames,) = streamer.step([turn.encoder_state], [None], final=[True])
        turn.encoder_state = state
        self.session.end_turn(frames=frames)
        self.spec = {"silence": silence, "snap": snap}
        self.engine.stats["speculations"] += 1
        return True

    def rollback_speculation(self) -> None:
        if self.spec is not None:
            self.session.restore(self.spec["snap"])
            self.spec = None
            self.engine.stats["speculation_rollbacks"] += 1

    def confirm_speculation(self) -> None:
        """The pause was the end of the turn: the work is done, answer now."""
        turn = self.session.turn
        now = time.perf_counter()
        turn.times.speech_end = self.speech_end_time or now
        turn.times.encoder_done = now  # the flush ran during the silence
        self.spec = None
        self.engine.stats["speculation_hits"] += 1
        self.turn_start = None
        self.turn_end = None
        self.emit({"type": "input_audio_buffer.committed"})
        if self.config.turn_detection.create_response:
            self.start_reply()

    def encoder_input(self):
        """(samples to encode now, is this the turn's end) or None."""
        if self.spec is not None:
            if self.detector.pending_silence_start == self.spec["silence"]:
                return None  # the speculated end still stands
            self.rollback_speculation()  # speech resumed: continue the turn
        if self.turn_start is None:
            return None
        if self.turn_end is not None:
            upto = self.turn_end
        elif self.manual:
            upto = self.audio_start + self.audio.size
        else:  # while a pause runs, hold its audio back: it joins the turn only if speech resumes
            upto = self.detector.speech_until(self.audio_start + self.audio.size)
        piece = self.audio[self.fed - self.audio_start: max(upto, self.fed) - self.audio_start]
        if piece.size == 0 and self.turn_end is None:
            return None
        self.fed = max(upto, self.fed)
        return torch.from_numpy(np.ascontiguousarray(piece)), self.turn_end is not None

    def finish_turn(self, frames: torch.Tensor) -> None:
        self.turn_start = None
        self.turn_end = None
        try:
            self.session.end_turn(speech_end=self.speech_end_time, frames=frames)
        except ValueError as exc:  # no audio in the turn
            self.session.turn = None
            self.emit(error_event("turn_empty", str(exc)))
            return
        self.emit({"type": "input_audio_buffer.committed"})
        if self.respond_after_turn:
            self.start_reply()

    # -- replies -----------------------------------------------------------------
    def start_reply(self) -> None:
        if self.turn_end is not None and self.reply is None:  # committed, flush not run yet: answer right after it
            self.respond_after_turn = True
            return
        turn = self.session.turn
        if turn is None or not turn.ended or self.reply is not None:
            self.emit(error_event("response_not_possible",
                                  "no committed user turn to answer" if self.reply is None else
                                  "a response is already in progress"))
            return
        self.response_id = f"resp_{next(_ids)}"
        self.deltas = []
        self.detector.reply_active = True
        self.emit({"type": "response.created", "response": {"id": self.response_id, "status": "in_progress"}})
        self.reply = self.session.reply(self.config.generation())

    def advance_reply(self, to_end: bool = False) -> None:
        """One step of the running reply (or all of it)."""
        while self.reply is not None:
            try:
                delta = next(self.reply)
            except StopIteration:
                self.finish_reply()
                return
            self.deltas.append(delta)
            self.emit({"type": "response.text.delta", "response_id": self.response_id, "delta": delta})
            if not to_end:
                return

    def finish_reply(self) -> None:
        result = self.session.last_reply
        turn = self.session.turn
        self.reply = None
        self.detector.reply_active = False
        self._emit_done(result, turn)
        if self.pending_start is not None:  # the turn that waited for this reply
            start, end = self.pending_start, self.pending_end
            self.pending_start = self.pending_end = None
            self.begin_turn(start)
            self.turn_end = end

    def _emit_done(self, result, turn) -> None:
        self.emit({"type": "response.text.done", "response_id": self.response_id, "text": result.text})
        self.emit({"type": "response.done", "response": {
            "id": self.response_id, "status": result.status,
            "status_details": {"reason": result.reason} if result.reason else None,
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "text", "text": result.text}]}],
            "usage": {"input_positions": self.session.llm.positions, "output_tokens": len(result.token_ids)},
            "latency_ms": turn.times.latency_ms() if turn is not None else {},
        }})


class SessionHandle:
    """The asyncio side of one session: send commands, await events. Thread-safe."""

    def __init__(self, engine: "Engine", sid: str, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.id = sid
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def _emit(self, event: dict) -> None:  # engine thread -> event loop
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody listens any more
            pass

    def append_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32 samples."""
        self.engine.submit(self.id, "append", np.asarray(samples, dtype=np.float32))

    def commit(self) -> None:
        self.engine.submit(self.id, "commit")

    def clear(self) -> None:
        self.engine.submit(self.id, "clear")

    def create_response(self) -> None:
        self.engine.submit(self.id, "response")

    def cancel(self) -> None:
        self.engine.submit(self.id, "cancel")

    def update(self, config: SessionConfig) -> None:
        self.engine.submit(self.id, "update", config)

    def close(self) -> None:
        self.engine.submit(self.id, "close")

    async def next_event(self, timeout: Optional[float] = None) -> dict:
        return await asyncio.wait_for(self.events.get(), timeout)


class Engine:
    def __init__(self, model, tokenizer, streamer, max_batch: int = 32, idle_wait_s: float = 0.01):
        """`streamer`: the default StreamingNestEncoder; sessions asking for another
        chunk size get their own streamer over the same encoder."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.streamer = streamer
        self.streamers = {streamer.chunk_frames: streamer}
        self.max_batch = max_batch
        self.idle_wait_s = idle_wait_s
        self.sessions: Dict[str, LiveSession] = {}
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._vad = None
        self.stats = {"encoder_calls": 0, "encoder_batch_sizes": [], "ticks": 0, "errors": 0,
                      "speculations": 0, "speculation_rollbacks": 0, "speculation_hits": 0}
        self.on_encoder_batch: Optional[Callable[[int], None]] = None  # metrics hook

    def streamer_for(self, chunk_ms: Optional[int]):
        """The streamer for `chunk_ms` (a multiple of the 80 ms frame; None: default)."""
        if chunk_ms is None:
            return self.streamer
        frame_ms = self.streamer.frame_ms
        frames = int(round(chunk_ms / frame_ms))
        if frames < 1 or abs(frames * frame_ms - chunk_ms) > 1e-6:
            raise ValueError(f"chunk_ms must be a positive multiple of {frame_ms:g} ms, got {chunk_ms}")
        if frames not in self.streamers:
            import warnings

            from agent.nest.streaming import StreamingNestEncoder

            left = max(frames, self.streamer.left_context_frames // frames * frames)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the engine reports the setting at session.updated
                self.streamers[frames] = StreamingNestEncoder(self.streamer.nest, chunk_frames=frames,
                                                              left_context_frames=left)
            self.streamer.activate()
        return self.streamers[frames]

    def vad(self):
        if self._vad is None:
            from agent.realtime.vad import SileroVad

            self._vad = SileroVad()
        return self._vad

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self.vad()  # load it before serving, not on the first speech
            self._thread = threading.Thread(target=self._run, name="nestvox-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def open_session(self, loop: Optional[asyncio.AbstractEventLoop] = None, config: Optional[SessionConfig] = None
                     ) -> SessionHandle:
        loop = loop or asyncio.get_running_loop()
        handle = SessionHandle(self, f"sess_{next(_ids)}", loop)
        self.submit(handle.id, "open", (config or SessionConfig(), handle._emit))
        return handle

    def submit(self, sid: str, what: str, payload=None) -> None:
        self._commands.put((sid, what, payload))
        self._wake.set()

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    # -- the compute thread -------------------------------------------------------
    def _run(self) -> None:
        torch.set_flush_denormal(True)  # per thread: see agent.nest.streaming
        while not self._stop.is_set():
            try:
                busy = self.tick()
            except Exception:  # never let one bad tick kill the server
                log.exception("engine tick failed")
                self.stats["errors"] += 1
                busy = False
            if not busy:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()

    def tick(self) -> bool:
        """One round of work; returns whether there was any."""
        self.stats["ticks"] += 1
        busy = self._apply_commands()
        busy |= self._encode()
        for live in list(self.sessions.values()):
            try:
                busy |= live.maybe_speculate()
            except Exception as exc:
                live.spec = None
                self._guard(live, self._raise, exc)
        for live in list(self.sessions.values()):
            if live.reply is not None:
                self._guard(live, live.advance_reply)
                busy = True
        return busy

    def _guard(self, live: LiveSession, fn, *args) -> None:
        """Run one session's work; its failure is its own error event, not the server's."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("session %s failed", live.id)
            self.stats["errors"] += 1
            live.emit(error_event("server_error", f"{type(exc).__name__}: {exc}"))
            live.reply = None
            live.detector.reply_active = False
            live.turn_start = live.turn_end = None
            live.session.turn = None

    @staticmethod
    def _raise(exc: Exception) -> None:
        raise exc

    def _apply_commands(self, limit: int = 256) -> bool:
        """Apply queued commands; at most `limit` per tick, so an overloaded tick still
        leaves room for encoding, speculation and decoding."""
        busy = False
        for _ in range(limit):
            try:
                sid, what, payload = self._commands.get_nowait()
            except queue.Empty:
                return busy
            busy = True
            if what == "open":
                config, emit = payload
                try:
                    live = LiveSession(self, sid, config, emit)
                except Exception as exc:
                    emit(error_event("session_failed", f"{type(exc).__name__}: {exc}"))
                    continue
                self.sessions[sid] = live
                continue
            live = self.sessions.get(sid)
            if live is None:
                continue
            if what == "close":
                del self.sessions[sid]  # frees its caches: nothing else refers to them
            elif what == "append":
                self._guard(live, live.append, payload)
            elif what == "commit":
                self._guard(live, live.commit)
            elif what == "clear":
                self._guard(live, live.clear)
            elif what == "response":
                self._guard(live, live.start_reply)
            elif what == "cancel":
                if live.reply is not None:
                    live.session.cancel()
                    self._guard(live, live.advance_reply, True)
                else:
                    live.emit(error_event("response_cancel_not_active", "there is no response to cancel"))
            elif what == "update":
                self._guard(live, self._update, live, payload)
        return busy

    def _update(self, live: LiveSession, config: SessionConfig) -> None:
        streamer = self.streamer_for(config.chunk_ms)  # validates before anything changes
        live.config = config
        if live.turn_start is None:
            live.session.streamer = streamer
        live.detector.update_settings(config.turn_detection)
        live.session.settings = config.generation().replace(stop_token_ids=live.session.settings.stop_token_ids)
        if config.instructions != live.session.system_prompt:
            live.session.set_instructions(config.instructions)

    def _encode(self) -> bool:
        """One batched encoder step per chunk size over every session with audio to encode."""
        groups: Dict[int, list] = {}
        lives = list(self.sessions.values())
        # Rotate where the scan starts, so a max_batch smaller than the sessions
        # with audio serves them in turn instead of starving the last ones.
        self._rotation = (getattr(self, "_rotation", -1) + 1) % max(len(lives), 1)
        taken = 0
        for live in lives[self._rotation:] + lives[:self._rotation]:
            if taken >= self.max_batch:
                break
            try:
                item = live.encoder_input()
            except Exception as exc:
                live.emit(error_event("server_error", str(exc)))
                continue
            if item is not None:
                groups.setdefault(id(live.session.streamer), []).append((live, item[0], item[1]))
                taken += 1
        for members in groups.values():
            streamer = members[0][0].session.streamer
            states = [live.session.turn.encoder_state for live, _, _ in members]
            try:
                new_states, frames = streamer.step(states, [m[1] for m in members], final=[m[2] for m in members])
            except Exception as exc:  # drop these turns rather than failing every tick from now on
                log.exception("encoder step failed")
                self.stats["errors"] += 1
                for live, _, _ in members:
                    live.emit(error_event("server_error", f"the encoder failed on this turn, which was dropped "
                                                          f"({type(exc).__name__}: {exc})"))
                    live.spec = None
                    live.turn_start = live.turn_end = None
                    live.session.abort_turn()
                continue
            self.stats["encoder_calls"] += streamer.last_stats.calls
            self.stats["encoder_batch_sizes"] += streamer.last_stats.batch_sizes
            if self.on_encoder_batch is not None:
                for size in streamer.last_stats.batch_sizes:
                    self.on_encoder_batch(size)
            for (live, _, final), state, feats in zip(members, new_states, frames):
                live.session.turn.encoder_state = state
                if final:
                    self._guard(live, live.finish_turn, feats)
                else:
                    self._guard(live, live.session.accept_frames, feats)
        return bool(groups)
