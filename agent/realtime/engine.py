"""Engine: one compute thread that owns the models and every session's compute state.

Each tick runs each stage once for all sessions, latency-critical work first:

1. the commands sessions sent (audio -> turn detection batched over sessions,
   commit, cancel, ...); replies whose logits are ready pick their next token;
2. ONE batched encoder step per chunk size for the sessions whose turn ends
   (their flush, or a speculative one during the VAD's silence);
3. ONE batched LLM forward (`BatchedLLM`) over the sessions' KV-cache slots:
   the tokens the replying sessions picked (decode), turn tails, and the audio
   groups and template tokens of listening sessions (pre-fill, which waits up
   to `prefill_delay_ms` to ride along with a forward that runs anyway); long
   pieces run packed in a second forward, a slice per tick;
4. every replying session picks its next token from its fresh logits (with its
   own sampling settings) and queues it for the next forward: a reply's first
   token goes out in the tick its turn's tail was pre-filled;
5. on the encoder's clock (`encoder_step_ms`), ONE batched encoder step for
   every session still talking, the same whole number of chunks each; their
   frames are stacked, projected in one call and queued for the LLM.

With `llm_batching=False` every session keeps its own batch-1 cache and replies
decode round-robin, one forward per session per token: the old behaviour, kept
as the baseline of `agent.bench load`.

    engine = Engine(model, tokenizer, streamer).start()
    handle = engine.open_session(loop=asyncio.get_running_loop(), config=SessionConfig(...))
    handle.append_audio(samples_16k_float32)
    event = await handle.next_event()        # agent.realtime.events values
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from agent.realtime import events as ev
from agent.realtime.config import SessionConfig
from agent.realtime.handle import SessionHandle
from agent.realtime.live_session import LiveSession
from agent.realtime.llm_batch import NARROW_ROW, BatchedLLM
from agent.realtime.session import Session, project_groups
from agent.realtime.turns import TurnDetector

log = logging.getLogger("nestvox.engine")
SR = 16000
# Chunk sizes a session may ask for (session.update chunk_ms), besides the server's default.
OFFERED_CHUNK_MS = (80, 160, 320, 640, 1280)
# Long pre-fill pieces not on the way to a reply (a finished reply's canonical re-fill, a
# new turn's template) run at most this many tokens per tick, so they never stall the
# decode steps of the other sessions for long (chunked pre-fill).
PREFILL_TOKENS_PER_TICK = 64
# Each session's context budget when none is given: the cache is preallocated for every slot,
# and a model's own limit (128k positions for Llama 3) would not fit in memory times 16 slots.
DEFAULT_SLOT_POSITIONS = 4096
_session_ids = itertools.count(1)


def new_stats() -> dict:
    """Counters only: nothing here grows with the run's length."""
    return {"ticks": 0, "errors": 0, "commands": 0, "command_lag_seconds": 0.0, "command_lag_max": 0.0, "encoder_calls": 0, "encoder_batch_hist": Counter(), "encoder_batch_max": 0,
            "busy_seconds": 0.0, "encoder_seconds": 0.0, "audio_seconds": 0.0, "vad_seconds": 0.0, "llm_forwards": 0, "llm_rows": 0, "llm_batch_max": 0,
            "llm_decode_forwards": 0, "llm_decode_rows": 0, "llm_seconds": 0.0,
            "speculations": 0, "speculation_rollbacks": 0, "speculation_hits": 0, "paced_ticks": 0}


class Engine:
    def __init__(self, model, tokenizer, streamer, max_batch: int = 32, llm_batching: bool = True,
                 max_sessions: int = 16, offered_chunk_ms: Sequence[int] = OFFERED_CHUNK_MS,
                 max_positions: Optional[int] = None, encoder_step_ms: float = 640.0,
                 prefill_delay_ms: float = 1000.0, idle_wait_s: float = 0.01, speculate: bool = True,
                 reply_tok_s: float = 0.0):
        """`streamer`: the default StreamingNestEncoder; one more is built at start-up
        for every chunk size in `offered_chunk_ms`. `max_sessions`: LLM cache slots.
        `max_positions`: each slot's context budget (default: the model's, at most
        DEFAULT_SLOT_POSITIONS; the K/V of every slot is allocated up front).
        `encoder_step_ms`: while users talk, the encoder runs on a clock of this
        period, taking from every listening session the same whole number of chunks
        (the chunks nearest this period), so concurrent sessions meet in ONE batched
        call and each call spreads the weight read, which dominates a step on a CPU
        (one NEST-L step costs about the same for 160 ms of audio as for 640 ms),
        over more audio. A turn's end flushes at once, off the clock. `prefill_delay_ms`: the longest a listening
        session's audio groups wait for a forward that runs anyway (see _forward).
        Neither delays a turn's end: speculation runs the flush during the silence.
        `speculate`: False turns that off (server_vad then does all end-of-turn work
        after the silence; semantic_vad still speculates: it needs the probe).
        `reply_tok_s`: while any session's user turn is open or on its way to a reply,
        replies decode at about this many tokens per second instead of as fast as the
        forwards go (0: never paced). Speech is read out at ~3-4 tok/s, so a paced
        reply still runs far ahead of its voice, and the forwards it does not run are
        the headroom a turn's end needs to be answered on time."""
        if reply_tok_s < 0:
            raise ValueError(f"reply_tok_s must be >= 0 (0: unpaced), got {reply_tok_s}")
        self.reply_tok_s = float(reply_tok_s)
        self.speculate = speculate
        if encoder_step_ms < 0:
            raise ValueError(f"encoder_step_ms must be >= 0, got {encoder_step_ms}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.streamer = streamer
        self.streamers = {streamer.chunk_frames: streamer}
        self.offered_chunk_ms = tuple(offered_chunk_ms)
        self.max_batch = max_batch
        self.max_sessions = max_sessions
        self.llm_batching = llm_batching
        self.max_positions = max_positions
        self.idle_wait_s = idle_wait_s
        self.encoder_step_s = float(encoder_step_ms) / 1000.0
        self._encoder_due = 0.0  # perf_counter of the next clocked step for listening sessions
        self.prefill_delay_s = float(prefill_delay_ms) / 1000.0
        self.prefill_tokens_per_tick = PREFILL_TOKENS_PER_TICK
        self.llm = None  # BatchedLLM, built at start-up
        self.sessions: Dict[str, LiveSession] = {}
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._vad = None
        self._rotation = -1
        self._decoding: set = set()  # sessions whose picked token waits for the next forward
        self.stats = new_stats()
        # metrics hook: (chunk_ms, batch sizes of the call, its seconds, the audio seconds it encoded)
        self.on_encoder_step: Optional[Callable[[int, List[int], float, float], None]] = None

    # -- chunk sizes ---------------------------------------------------------------
    def streamer_for(self, chunk_ms: Optional[int]):
        """The streamer for `chunk_ms` (None: the default); ValueError if not offered."""
        if chunk_ms is None:
            return self.streamer
        frame_ms = self.streamer.frame_ms
        frames = chunk_ms / frame_ms
        offered = sorted(int(round(s.chunk_ms)) for s in self.streamers.values())
        if frames < 1 or abs(frames - round(frames)) > 1e-6:
            raise ValueError(f"chunk_ms must be a positive multiple of {frame_ms:g} ms, got {chunk_ms}; "
                             f"this server offers {offered}")
        streamer = self.streamers.get(int(round(frames)))
        if streamer is None:
            raise ValueError(f"chunk_ms {chunk_ms} is not offered by this server; choose one of {offered} "
                             f"(serve.py --chunk-sizes-ms)")
        return streamer

    def _build_streamers(self) -> None:
        """One streamer per offered chunk size, each with its own encoder settings over
        the shared weights, so a session's chunk size never reconfigures another's."""
        from agent.nest.streaming import build_streamers

        base = self.streamer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a session sees its setting in session.updated
            built = build_streamers(base.nest, self.offered_chunk_ms,
                                    left_context_ms=base.left_context_frames * base.frame_ms,
                                    approximate=base.approximate)
        for frames, streamer in built.items():
            self.streamers.setdefault(frames, streamer)

    def vad(self):
        if self._vad is None:
            from agent.realtime.vad import SileroVad

            self._vad = SileroVad()
        return self._vad

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the compute thread; returns once it has built its state (or raises)."""
        if self._thread is None:
            self._ready.clear()
            self._thread = threading.Thread(target=self._run, name="nestvox-engine", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._start_error is not None:
                self._thread = None
                raise self._start_error
        return self

    def _prepare(self) -> None:
        """Everything a session may need, built on the engine thread before serving."""
        self.vad()
        self._build_streamers()
        if self.llm_batching and self.llm is None:
            limit = getattr(self.model.language_model.config.get_text_config(), "max_position_embeddings", None)
            positions = self.max_positions or min(limit or DEFAULT_SLOT_POSITIONS, DEFAULT_SLOT_POSITIONS)
            self.llm = BatchedLLM(self.model.language_model, slots=self.max_sessions, max_positions=positions)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def open_session(self, loop: Optional[asyncio.AbstractEventLoop] = None, config: Optional[SessionConfig] = None
                     ) -> SessionHandle:
        loop = loop or asyncio.get_running_loop()
        handle = SessionHandle(self, f"sess_{next(_session_ids)}", loop)
        self.submit(handle.id, "open", (config or SessionConfig(), handle._emit))
        return handle

    def submit(self, sid: str, what: str, payload=None) -> None:
        self._commands.put((sid, what, payload, time.perf_counter()))
        self._wake.set()

    def time_split(self) -> dict:
        """Where the engine thread's time went so far (seconds, counters): the counters
        a load test differences to say which stage is the limit."""
        keys = ("busy_seconds", "encoder_seconds", "audio_seconds", "llm_seconds", "vad_seconds",
                "encoder_calls", "llm_forwards", "llm_rows", "llm_decode_rows", "commands", "command_lag_seconds",
                "speculations", "speculation_hits")
        return {k: round(self.stats[k], 4) if isinstance(self.stats[k], float) else self.stats[k] for k in keys}

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    # -- the compute thread -------------------------------------------------------
    def _run(self) -> None:
        torch.set_flush_denormal(True)  # per thread: see agent.nest.streaming
        torch.set_grad_enabled(False)
        try:
            self._prepare()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
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
        start = time.perf_counter()
        self.stats["ticks"] += 1
        busy = self._apply_commands()
        busy |= self._pick_tokens()  # a reply confirmed just now has its first token ready
        # Turn ends first: their flush, tail pre-fill and first token go out before the
        # (longer) clocked step of the sessions still talking.
        busy |= self._encode(listening=False)
        busy |= self._forward()
        self._read_probes()
        busy |= self._pick_tokens()
        if self._encode(listening=True):
            busy = True
            self._apply_commands()  # the audio that arrived during that call, before the next forward
        if busy:
            self.stats["busy_seconds"] += time.perf_counter() - start
        return busy

    def _guard(self, live: LiveSession, fn, *args):
        """Run one session's work; its failure is its own error event, not the server's."""
        try:
            return fn(*args)
        except Exception as exc:
            log.exception("session %s failed", live.id)
            self.stats["errors"] += 1
            live.fail(exc)
            return None

    # -- 1. commands ---------------------------------------------------------------
    def _open(self, sid: str, config: SessionConfig, emit) -> None:
        llm = None
        try:
            if self.llm is not None:
                llm = self.llm.open()
                if config.max_positions is not None:
                    if not 1 <= config.max_positions <= self.llm.max_positions:
                        raise ValueError(f"max_positions must be in [1, {self.llm.max_positions}], "
                                         f"got {config.max_positions}")
                    llm.max_positions = config.max_positions
            session = Session(self.model, self.tokenizer, system_prompt=config.instructions,
                              settings=config.generation(), max_positions=config.max_positions, llm=llm)
            self.sessions[sid] = LiveSession(sid, config, emit, session, self.streamer_for, self.vad(), self.stats,
                                             encoder_step_ms=self.encoder_step_s * 1000.0)
            self.sessions[sid].speculate = self.speculate
        except Exception as exc:
            if llm is not None:
                self.llm.close(llm)
            emit(ev.ErrorEvent("session_failed", f"{type(exc).__name__}: {exc}"))

    def _close(self, sid: str) -> None:
        live = self.sessions.pop(sid)
        if self.llm is not None:
            self.llm.close(live.session.llm)  # the slot is free for the next session

    def _apply_commands(self, limit: int = 256) -> bool:
        """Apply queued commands; at most `limit` per tick, so an overloaded tick still
        leaves room for encoding and decoding. Audio is buffered as it comes and its
        turn detection runs batched for every session at the end (or before another
        command of the same session, so each session sees its commands in order)."""
        busy = False
        heard: Dict[str, list] = {}  # session -> audio received this tick, not yet through the VAD
        for _ in range(limit):
            try:
                sid, what, payload, sent = self._commands.get_nowait()
            except queue.Empty:
                break
            busy = True
            lag = time.perf_counter() - sent  # how far behind its clients the engine runs
            self.stats["commands"] += 1
            self.stats["command_lag_seconds"] += lag
            self.stats["command_lag_max"] = max(self.stats["command_lag_max"], lag)
            if what == "open":
                self._open(sid, *payload)
                continue
            live = self.sessions.get(sid)
            if live is None:
                continue
            if what == "append":
                self._guard(live, live.receive, payload)
                heard.setdefault(sid, []).append(payload)
                continue
            if sid in heard:
                self._detect({sid: heard.pop(sid)})
            if what == "close":
                self._close(sid)
            elif what == "commit":
                self._guard(live, live.commit, payload)
            elif what == "clear":
                self._guard(live, live.clear, payload)
            elif what == "response":
                self._guard(live, live.request_reply, payload)
            elif what == "cancel":
                self._guard(live, live.cancel_reply, payload)
            elif what == "text":
                self._guard(live, live.add_text, *payload)
            elif what == "delete":
                self._guard(live, live.delete_last, *payload)
            elif what == "truncate":
                self._guard(live, live.truncate_reply, *payload)
            elif what == "update":
                self._guard(live, self._update, live, payload)
        if heard:
            self._detect(heard)
        return busy

    def _detect(self, heard: Dict[str, list]) -> None:
        """Turn detection for every session's new audio, the VAD windows batched."""
        lives = [self.sessions[sid] for sid in heard if sid in self.sessions]
        audio = [np.concatenate(heard[live.id]) if len(heard[live.id]) > 1 else heard[live.id][0] for live in lives]
        start = time.perf_counter()
        try:
            verdicts = TurnDetector.feed_batch([live.detector for live in lives], audio)
        except Exception as exc:
            log.exception("turn detection failed")
            self.stats["errors"] += 1
            for live in lives:
                live.fail(exc)
            return
        self.stats["vad_seconds"] += time.perf_counter() - start
        for live, events in zip(lives, verdicts):
            self._guard(live, live.on_turn_events, events)

    def _update(self, live: LiveSession, config: SessionConfig) -> None:
        self.streamer_for(config.chunk_ms)  # validates before anything changes; applies at the next turn
        live.config = config
        live.detector.update_settings(config.turn_detection)
        session = live.session
        session.settings = config.generation().replace(stop_token_ids=session.settings.stop_token_ids)
        if config.instructions != session.system_prompt:
            session.set_instructions(config.instructions)

    # -- 2. the encoder -----------------------------------------------------------
    def _encode(self, listening: bool) -> bool:
        """One batched encoder step per chunk size: over the sessions whose turn ends
        (`listening=False`), or, when the encoder clock is due, over every session
        with audio to encode (`listening=True`)."""
        now = time.perf_counter()
        clocked = listening and now >= self._encoder_due  # listening sessions step only on the clock
        if listening and not clocked:
            return False
        lives = list(self.sessions.values())
        # Rotate where the scan starts, so a max_batch smaller than the sessions
        # with audio serves them in turn instead of starving the last ones.
        self._rotation = (self._rotation + 1) % max(len(lives), 1)
        groups: Dict[int, tuple] = {}
        taken = 0
        for live in lives[self._rotation:] + lives[:self._rotation]:
            if taken >= self.max_batch:
                break
            work = self._guard(live, live.encoder_work, clocked)
            if work is not None:
                groups.setdefault(id(live.streamer), (live.streamer, []))[1].append((live, work))
                taken += 1
        if clocked and any(not work.final for _, members in groups.values() for _, work in members):
            self._encoder_due = now + self.encoder_step_s
        stats = self.stats
        for streamer, members in groups.values():
            start = time.perf_counter()
            try:
                states, frames = streamer.step([live.encoder_state for live, _ in members],
                                               [work.audio for _, work in members],
                                               final=[work.final for _, work in members])
            except Exception as exc:
                log.exception("encoder step failed")
                stats["errors"] += 1
                for live, _ in members:
                    live.encoder_failed(exc)
                continue
            seconds = time.perf_counter() - start
            audio_seconds = sum(work.audio.numel() for _, work in members) / SR
            stats["encoder_seconds"] += seconds
            stats["audio_seconds"] += audio_seconds
            stats["encoder_calls"] += streamer.last_stats.calls
            for size in streamer.last_stats.batch_sizes:
                stats["encoder_batch_hist"][size] += 1
                stats["encoder_batch_max"] = max(stats["encoder_batch_max"], size)
            if self.on_encoder_step is not None:
                self.on_encoder_step(int(streamer.chunk_ms), list(streamer.last_stats.batch_sizes), seconds,
                                     audio_seconds)
            listening = []
            for (live, work), state, feats in zip(members, states, frames):
                if work.final:  # a turn's end (or a speculative one): its own end-of-turn path
                    self._guard(live, live.encoder_done, work, state, feats)
                else:
                    live.encoder_state = state
                    listening.append((live, feats))
            self._add_audio(listening)
        return bool(groups)

    def _add_audio(self, listening) -> None:
        """Stack every listening session's new frames, project all complete groups in
        ONE projector call, and queue each session's embeddings for the LLM."""
        stacked = []
        for live, feats in listening:
            groups = self._guard(live, live.session.stack, feats)
            if groups is not None and groups.shape[1]:
                stacked.append((live, groups))
        if not stacked:
            return
        try:
            embeds = project_groups(self.model, torch.cat([groups for _, groups in stacked], dim=1))
        except Exception as exc:
            log.exception("projector failed")
            self.stats["errors"] += 1
            for live, _ in stacked:
                live.fail(exc)
            return
        start = 0
        for live, groups in stacked:
            n = groups.shape[1]
            self._guard(live, live.session.add_audio, embeds[start: start + n])
            start += n

    # -- 3. and 4. the LLM -----------------------------------------------------------
    def _forward(self) -> bool:
        """ONE batched forward over the slots' queued work: the tokens the replying
        sessions picked at the end of the last tick (decode), turn tails, and the
        audio groups and template tokens of listening sessions (pre-fill). A forward
        reads every LLM weight whatever its rows, so listening sessions' audio does
        not call one by itself before it has waited `prefill_delay_s`: it rides
        along with the next forward that runs anyway. Long pieces run packed in a
        second forward (see BatchedLLM.flush), a slice of PREFILL_TOKENS_PER_TICK
        per tick unless a reply waits for them."""
        if self.llm is None:  # round-robin: every call already ran on its own cache
            self._decoding.clear()
            return False
        now = time.perf_counter()
        pending = [live for live in self.sessions.values() if live.session.llm.pending]
        # Due now: work on the way to a reply; long pieces (they go a slice per tick,
        # so start at once); short audio groups that have waited prefill_delay_s.
        due = [live for live in pending if live.llm_urgent or live.session.llm.pending > NARROW_ROW
               or now - live.session.llm.pending_since >= self.prefill_delay_s]
        if not due:
            return False
        urgent = [live for live in due if live.llm_urgent]
        lives = urgent + [live for live in due if not live.llm_urgent] + [
            live for live in pending if live not in due]  # short ones ride along
        # Long pieces beyond what is on the way to a reply are pre-filled a slice per tick.
        budget = sum(live.session.llm.pending for live in urgent) + self.prefill_tokens_per_tick
        decoding = sum(1 for live in lives if live.id in self._decoding)
        forwards = self.llm.forwards
        start = time.perf_counter()
        try:
            rows = self.llm.flush([live.session.llm for live in lives], wide_budget=budget)
        except Exception as exc:
            log.exception("batched LLM forward failed")
            self.stats["errors"] += 1
            for live in lives:
                live.fail(exc)
            return True
        stats = self.stats
        stats["llm_seconds"] += time.perf_counter() - start
        stats["llm_forwards"] += self.llm.forwards - forwards
        stats["llm_rows"] += rows
        stats["llm_batch_max"] = max(stats["llm_batch_max"], self.llm.max_rows)
        if decoding:
            stats["llm_decode_forwards"] += 1
            stats["llm_decode_rows"] += decoding
        self._decoding.clear()
        return True

    def _read_probes(self) -> None:
        """semantic_vad: pauses whose end-of-turn probability came out of this forward decide now."""
        for live in list(self.sessions.values()):
            if live.awaiting_probe:
                self._guard(live, live.on_end_of_turn_probe)

    def _pick_tokens(self) -> bool:
        """Every replying session whose logits are ready picks its next token (its own
        sampling settings) and queues it for the next forward; new text goes out as it
        forms. Paced (see `reply_tok_s`): while some user turn's latency is at stake,
        the picks wait until one reply is due (a first token always is) or other work
        on the way to a reply runs a forward anyway; then every ready reply rides along,
        so the decode rows stay in one forward."""
        ready = [live for live in self.sessions.values() if live.replying and not live.session.llm.pending]
        if not ready:
            return False
        if self.reply_tok_s > 0 and any(live.hearing for live in self.sessions.values()):
            now = time.perf_counter()
            forward_anyway = any(live.llm_urgent and not live.replying and live.session.llm.pending
                                 for live in self.sessions.values())
            if not forward_anyway and all(live.reply.due(self.reply_tok_s) > now for live in ready):
                self.stats["paced_ticks"] += 1
                return False
        for live in ready:
            if self._guard(live, live.advance_reply) and live.replying:
                self._decoding.add(live.id)
        return True
