"""The engine-side state of one connection: audio, turn detection and the turn's phase.

A conversation is always in exactly one `Phase`; every change goes through
`_enter`, which refuses a transition the table does not allow:

    IDLE ──speech / audio──► LISTENING ──pause──► SPECULATING ──speech resumes──► LISTENING
                              │  end of turn            │ the pause was the end
                              ▼                         ▼
                            ENDING ──flush──► WAITING ──response.create──► REPLYING ──done──► IDLE
                                     └──────────(server VAD)─────────────►┘
    IDLE ──typed message──► WAITING;   IDLE ◄──delete the reply / the unanswered message──► WAITING

The engine owns the compute: this object says what its session needs encoded
(`encoder_work`) and takes the frames back (`encoder_done`); it never runs the
encoder or the LLM's batched forward itself. Everything the client should hear
goes out through `emit` as a typed event (`agent.realtime.events`).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from agent.realtime import events as ev
from agent.realtime.config import SessionConfig
from agent.realtime.session import Session, TurnTooLong
from agent.realtime.turns import SpeechStarted, SpeechStopped, TurnDetector, semantic_silence_ms

SR = 16000
# A pause that has lasted this long is treated as a possible end of turn: its
# end-of-turn work (encoder flush, last group, assistant header) runs while the
# VAD waits out the rest of its silence, and is rolled back if speech resumes.
SPECULATE_AFTER_MS = 150
_response_ids = itertools.count(1)


class Phase(enum.Enum):
    IDLE = "idle"  # no user turn open
    LISTENING = "listening"  # a turn is open: its audio goes to the encoder as it arrives
    SPECULATING = "speculating"  # a pause may end the turn: its end-of-turn work is done, undone if speech resumes
    ENDING = "ending"  # the turn's end is known: the encoder flush is due
    WAITING = "waiting"  # the turn is committed and pre-filled: the reply waits for response.create
    REPLYING = "replying"  # a reply decodes


_ALLOWED = {
    Phase.IDLE: {Phase.LISTENING, Phase.WAITING},
    Phase.LISTENING: {Phase.SPECULATING, Phase.ENDING, Phase.IDLE},
    Phase.SPECULATING: {Phase.LISTENING, Phase.WAITING, Phase.REPLYING, Phase.IDLE},
    Phase.ENDING: {Phase.WAITING, Phase.REPLYING, Phase.IDLE},
    Phase.WAITING: {Phase.REPLYING, Phase.LISTENING, Phase.IDLE},
    Phase.REPLYING: {Phase.IDLE},
}
_OPEN = (Phase.LISTENING, Phase.SPECULATING, Phase.ENDING)


@dataclass
class OpenTurn:
    """The audio span of the turn being heard (absolute 16 kHz sample indices)."""

    start: int
    fed: int  # up to here the turn's audio went to the encoder
    end: Optional[int] = None  # known in ENDING
    respond: bool = True  # reply as soon as the turn is committed


@dataclass
class Speculation:
    silence: int  # where the pause began
    snapshot: dict  # Session.snapshot() before the speculative end_turn
    encoder_state: object  # the encoder stream before its flush
    fed: int  # the turn's audio fed to the encoder before the flush (its call also took audio)


@dataclass
class QueuedTurn:
    """A turn heard while a reply still ran (manual mode, or interrupt_response off):
    it opens when the reply is done."""

    start: int
    end: Optional[int] = None
    respond: bool = True


@dataclass
class ReplyRun:
    response_id: str
    steps: Iterator[str]
    picked: int = 0  # tokens picked so far
    first_pick: Optional[float] = None  # perf_counter of the first pick (the engine's pacing clock)

    def due(self, tok_s: float) -> float:
        """When this reply's next pick is due at `tok_s` tokens per second (its first: now)."""
        if self.first_pick is None:
            return float("-inf")
        return self.first_pick + self.picked / tok_s


@dataclass(frozen=True)
class ReplyOptions:
    """response.create's per-response settings (None: the session's)."""

    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    ref: Optional[str] = None  # echoed in the events about it


@dataclass(frozen=True)
class EncoderWork:
    """What one session needs from this tick's batched encoder step."""

    audio: torch.Tensor
    final: bool
    speculative: bool = False
    start: int = 0  # absolute sample where `audio` begins


class LiveSession:
    """Touched only by the engine thread."""

    def __init__(self, sid: str, config: SessionConfig, emit: Callable[[ev.EngineEvent], None], session: Session,
                 streamer_for: Callable, vad, stats: dict, encoder_step_ms: float = 0.0):
        self.id = sid
        self.config = config
        self.emit = emit
        self.session = session
        self.streamer_for = streamer_for  # chunk_ms -> the engine's streamer (built at start-up)
        self.stats = stats
        self.encoder_step_ms = encoder_step_ms  # while listening, audio goes to the encoder in units this long
        self.detector = TurnDetector(config.turn_detection, vad=vad)
        self.phase = Phase.IDLE
        self.audio = np.zeros(0, dtype=np.float32)  # samples from `audio_start` on
        self.audio_start = 0  # absolute sample index of audio[0]
        self.streamer = streamer_for(config.chunk_ms)  # the current turn's
        self.encoder_state = None  # the current turn's EncoderStreamState (stepped by the engine only)
        self.turn: Optional[OpenTurn] = None
        self.spec: Optional[Speculation] = None
        self.queued: Optional[QueuedTurn] = None
        self.reply: Optional[ReplyRun] = None
        self.speech_end_time: Optional[float] = None
        self.reply_options = ReplyOptions()  # for the next reply
        self.speculate = True
        self.awaiting_probe = False  # semantic_vad: a pause's end-of-turn probability is on its way
        self._spec_refused: Optional[int] = None  # a pause whose speculative end could not run

    # -- phase ------------------------------------------------------------------
    def _enter(self, phase: Phase) -> None:
        if phase is not self.phase and phase not in _ALLOWED[self.phase]:
            raise RuntimeError(f"session {self.id}: no transition {self.phase.value} -> {phase.value}")
        self.phase = phase

    @property
    def manual(self) -> bool:
        return self.config.turn_detection.mode == "manual"

    def _error(self, code: str, message: str, ref: Optional[str] = None) -> None:
        self.emit(ev.ErrorEvent(code, message, ref))

    # -- audio and turns --------------------------------------------------------
    def receive(self, samples: np.ndarray) -> None:
        """New audio, buffered; its turn detection runs batched over sessions in the
        engine (`TurnDetector.feed_batch`), which hands the verdict to `on_turn_events`."""
        self.audio = np.concatenate([self.audio, samples]) if self.audio.size else samples
        if self.manual and samples.size and self.phase in (Phase.IDLE, Phase.WAITING, Phase.REPLYING) \
                and self.queued is None:
            if self.phase is Phase.REPLYING:
                self.queued = QueuedTurn(self.detector.samples)
            else:
                self.begin_turn(self.detector.samples)

    def on_turn_events(self, events) -> None:
        """The turn detector's verdict on the audio received since the last call."""
        for event in events:
            if isinstance(event, SpeechStarted):
                self.on_speech_started(event)
            elif isinstance(event, SpeechStopped):
                self.on_speech_stopped(event)
        limit = int(self.config.max_turn_seconds * SR)
        if self.phase is Phase.LISTENING and self.detector.samples - self.turn.start > limit:
            self._error("turn_too_long", f"the turn exceeded max_turn_seconds={self.config.max_turn_seconds:g} and "
                                         f"was committed")
            self.commit()
            self.turn.respond = self.config.turn_detection.create_response
        self._trim()

    def _trim(self) -> None:
        """Keep only audio that a turn may still need (the prefix padding window)."""
        if self.turn is not None:
            keep_from = max(self.turn.start, self.turn.fed if self.spec is None else self.spec.fed)
        elif self.queued is not None:
            keep_from = self.queued.start
        else:
            keep_from = self.audio_start + self.audio.size - int(
                SR * (self.config.turn_detection.prefix_padding_ms + 500) / 1000)
        drop = max(keep_from, self.audio_start) - self.audio_start
        if drop > 0:
            self.audio = self.audio[drop:]
            self.audio_start += drop

    def begin_turn(self, start: int, end: Optional[int] = None, respond: bool = True) -> None:
        self.streamer = self.streamer_for(self.config.chunk_ms)  # a chunk_ms update applies here
        self.encoder_state = self.streamer.init_state()
        self.session.start_turn()
        self._enter(Phase.LISTENING)
        self.turn = OpenTurn(start=start, fed=max(start, self.audio_start))
        if end is not None:
            self._end_at(end, respond)

    def _end_at(self, end: int, respond: bool) -> None:
        self.turn.end = max(end, self.turn.start)
        self.turn.respond = respond
        self._enter(Phase.ENDING)

    def on_speech_started(self, event: SpeechStarted) -> None:
        self.emit(ev.SpeechStartedEvent(event.sample))
        if self.phase is Phase.REPLYING:
            if not self.config.turn_detection.interrupt_response:
                self.queued = QueuedTurn(event.sample)  # answered after the running reply
                return
            self.session.cancel()  # barge-in: the user talks over the reply
            self.advance_reply(to_end=True)
        if self.phase in (Phase.IDLE, Phase.WAITING):
            self.begin_turn(event.sample)

    def on_speech_stopped(self, event: SpeechStopped) -> None:
        self.speech_end_time = time.perf_counter()
        self.emit(ev.SpeechStoppedEvent(event.sample, event.end, event.silence_ms, event.p_done))
        respond = self.config.turn_detection.create_response
        if self.phase is Phase.SPECULATING and self.spec.silence == event.sample:
            self.confirm_speculation()
            return
        self.rollback_speculation()
        if self.queued is not None:
            self.queued.end, self.queued.respond = max(event.end, self.queued.start), respond
        elif self.phase is Phase.LISTENING:
            self._end_at(event.end, respond)

    def commit(self, ref: Optional[str] = None) -> None:
        self.rollback_speculation()  # the committed turn includes the pause's audio
        respond = not self.manual and self.config.turn_detection.create_response
        if self.queued is not None:  # a reply is still running: the turn follows it
            self.queued.end, self.queued.respond = self.detector.commit().sample, respond
            return
        if self.phase not in (Phase.LISTENING, Phase.ENDING) or self.detector.samples <= self.turn.start:
            self._error("input_audio_buffer_commit_empty", "there is no uncommitted audio to commit", ref)
            return
        self.speech_end_time = time.perf_counter()
        end = self.detector.commit().sample
        if self.phase is Phase.ENDING:
            self.turn.end, self.turn.respond = end, respond
        else:
            self._end_at(end, respond)

    def clear(self, ref: Optional[str] = None) -> None:
        self.rollback_speculation()
        self.queued = None
        self.detector.clear()
        if self.phase is Phase.LISTENING:
            self.session.abort_turn()
            self.turn = None
            self._enter(Phase.IDLE)
        self.emit(ev.ClearedEvent())

    # -- the encoder: what this session needs, and what it got -------------------------
    def encoder_work(self, clocked: bool = True) -> Optional[EncoderWork]:
        """This tick's audio for the encoder (and whether it ends the turn), or None.
        While the user talks, audio goes in whole units of the engine's encoder
        step, and only on its clock (`clocked`); a turn's end goes at once."""
        if self.phase is Phase.SPECULATING:
            if self.detector.pending_silence_start == self.spec.silence:
                return None  # the speculated end still stands
            self.rollback_speculation()  # speech resumed: continue the turn
        if self.phase not in (Phase.LISTENING, Phase.ENDING):
            return None
        available = self.audio_start + self.audio.size
        turn = self.turn
        if self.phase is Phase.ENDING:
            upto = turn.end
        elif self.manual:
            upto = available
        else:  # while a pause runs, hold its audio back: it joins the turn only if speech resumes
            upto = self.detector.speech_until(available)
        upto = max(upto, turn.fed)
        speculative = self.phase is Phase.LISTENING and self._may_speculate(upto)
        final = self.phase is Phase.ENDING or speculative
        if not final:
            if not clocked:
                return None
            chunk = int(round(self.streamer.chunk_ms * SR / 1000))
            unit = chunk * max(1, int(round(self.encoder_step_ms / self.streamer.chunk_ms)))
            upto = turn.fed + (upto - turn.fed) // unit * unit
            if upto == turn.fed:
                return None
        piece = self.audio[turn.fed - self.audio_start: upto - self.audio_start]
        start, turn.fed = turn.fed, upto
        return EncoderWork(torch.from_numpy(np.ascontiguousarray(piece)), final, speculative, start)

    def _may_speculate(self, fed: int) -> bool:
        silence = self.detector.pending_silence_start
        semantic = self.config.turn_detection.semantic  # it needs the speculative end's probe
        if not (self.speculate or semantic) or self.manual or silence is None or silence == self._spec_refused:
            return False
        return fed >= silence + self.detector.suffix_padding and \
            self.detector.samples - silence >= SPECULATE_AFTER_MS * SR // 1000

    def encoder_done(self, work: EncoderWork, state, frames: torch.Tensor) -> None:
        """The encoder's last frames of a turn (`work.final`): its end, or a speculative
        one. (Frames of a turn still being spoken the engine stacks and projects for
        all sessions at once.)"""
        if not work.final:
            raise ValueError("encoder_done takes a turn's final frames")
        before, self.encoder_state = self.encoder_state, state
        if work.speculative:
            self._speculate(work, before, frames)
        else:
            self.finish_turn(frames)

    def encoder_failed(self, exc: Exception) -> None:
        """The batched encoder call failed: drop this turn rather than fail every tick from now on."""
        self._error("server_error", f"the encoder failed on this turn, which was dropped ({type(exc).__name__}: {exc})")
        self._to_idle()

    def _to_idle(self) -> None:
        """Drop whatever was in progress (after a failure): a clean idle state."""
        self.reply = self.spec = self.turn = None
        self.detector.reply_active = False
        try:
            self.session.abort_turn()
        except Exception:
            self.session.turn = None
        self.phase = Phase.IDLE  # from any phase: this is the reset, not a transition

    # -- speculative end of turn -----------------------------------------------------
    def _speculate(self, work: EncoderWork, encoder_before, frames: torch.Tensor) -> None:
        silence = self.detector.pending_silence_start
        snapshot = self.session.snapshot()
        semantic = self.config.turn_detection.semantic
        try:
            self.session.end_turn(frames=frames, probe=semantic)
        except ValueError:  # no audio yet: nothing to speculate on; the real end will say so
            self.session.restore(snapshot)
            self.encoder_state = encoder_before
            self.turn.fed = work.start
            self._spec_refused = silence
            return
        self.spec = Speculation(silence, snapshot, encoder_before, work.start)
        self._enter(Phase.SPECULATING)
        self.stats["speculations"] += 1
        self.awaiting_probe = semantic
        if semantic:
            self.on_end_of_turn_probe()  # a private LLM state has it already

    def on_end_of_turn_probe(self) -> None:
        """semantic_vad: the model's P(done) at this pause is in (after the engine's
        forward): it sets how long the pause must last to end the turn."""
        if not self.awaiting_probe or self.phase is not Phase.SPECULATING:
            self.awaiting_probe = False
            return
        p_done = self.session.end_of_turn_probability()
        if p_done is None:
            return  # the forward has not run yet
        self.awaiting_probe = False
        silence_ms = semantic_silence_ms(p_done, self.config.turn_detection.eagerness)
        self.on_turn_events(self.detector.decide_pause(silence_ms, p_done))

    def rollback_speculation(self) -> None:
        if self.phase is Phase.SPECULATING:
            self.session.restore(self.spec.snapshot)
            self.encoder_state = self.spec.encoder_state
            self.turn.fed = self.spec.fed  # the flush's call took audio too: it goes to the encoder again
            self.spec = None
            self.awaiting_probe = False
            self._enter(Phase.LISTENING)
            self.stats["speculation_rollbacks"] += 1

    def confirm_speculation(self) -> None:
        """The pause was the end of the turn: the work is done, answer now."""
        times = self.session.turn.times
        now = time.perf_counter()
        times.speech_end = self.speech_end_time or now
        times.encoder_done = now  # the flush ran during the silence
        self.spec = None
        self.turn = None
        self.stats["speculation_hits"] += 1
        self.emit(ev.CommittedEvent())
        if self.config.turn_detection.create_response:
            self.start_reply()
        else:
            self._enter(Phase.WAITING)

    def finish_turn(self, frames: torch.Tensor) -> None:
        respond = self.turn.respond
        self.turn = None
        try:
            self.session.end_turn(frames=frames, speech_end=self.speech_end_time)
        except ValueError as exc:  # no audio in the turn
            self.session.abort_turn()
            self._enter(Phase.IDLE)
            self._error("turn_empty", str(exc))
            return
        self.emit(ev.CommittedEvent())
        if respond:
            self.start_reply()
        else:
            self._enter(Phase.WAITING)

    # -- typed messages and the conversation's items ----------------------------------
    def add_text(self, text: str, ref: Optional[str] = None) -> None:
        """conversation.item.create with a user text message: a turn without audio,
        answered on response.create."""
        if self.phase in _OPEN or self.phase is Phase.REPLYING or self.queued is not None:
            what = "a response is in progress" if self.phase is Phase.REPLYING else "an audio turn is open"
            self._error("conversation_busy", f"{what}: a typed message can be added once it is done (or after "
                                             f"input_audio_buffer.clear / response.cancel)", ref)
            return
        try:
            self.session.add_text_turn(text)
        except ValueError as exc:
            self._error("invalid_item", str(exc), ref)
            return
        self._enter(Phase.WAITING)
        self.emit(ev.UserTextAddedEvent(text, ref))

    def delete_last(self, role: str, ref: Optional[str] = None) -> None:
        """conversation.item.delete of the most recent item (the wire checked which)."""
        if self.phase not in (Phase.IDLE, Phase.WAITING):
            self._error("item_delete_not_possible", f"the conversation is busy ({self.phase.value}): delete after "
                                                    f"the response or turn in progress", ref)
            return
        try:
            self.session.delete_last(role)
        except ValueError as exc:
            self._error("item_delete_not_possible", str(exc), ref)
            return
        self._enter(Phase.WAITING if role == "assistant" else Phase.IDLE)
        self.emit(ev.ItemDeletedEvent(role, ref))

    def truncate_reply(self, text: str, ref: Optional[str] = None) -> None:
        """conversation.item.truncate of the latest reply: it becomes `text` (what the user
        heard), in the history and the KV cache, even while the user's next turn is open."""
        if self.phase in (Phase.ENDING, Phase.REPLYING):
            self._error("item_truncate_not_possible", "the next turn has already ended: truncate the reply "
                                                      "while the user is still speaking or before", ref)
            return
        self.rollback_speculation()  # its snapshot holds positions the truncation moves
        try:
            self.session.truncate_reply(text)
        except ValueError as exc:
            self._error("item_truncate_not_possible", str(exc), ref)
            return
        self.emit(ev.ItemTruncatedEvent(text, ref))

    # -- replies -----------------------------------------------------------------
    def request_reply(self, options: Optional[ReplyOptions] = None) -> None:
        """response.create from the client."""
        options = options or ReplyOptions()
        if self.phase is Phase.ENDING:  # committed, flush not run yet: answer right after it
            self.turn.respond = True
            self.reply_options = options
        elif self.phase is Phase.WAITING:
            self.reply_options = options
            self.start_reply()
        elif self.phase is Phase.REPLYING:
            self._error("conversation_already_has_active_response", "a response is already in progress", options.ref)
        else:
            self._error("response_not_possible", "no committed user turn or message to answer", options.ref)

    def start_reply(self) -> None:
        options, self.reply_options = self.reply_options, ReplyOptions()
        settings = self.config.generation()
        if options.max_output_tokens is not None:
            settings = settings.replace(max_new_tokens=options.max_output_tokens)
        try:
            steps = self.session.reply(settings, instructions=options.instructions)
        except TurnTooLong as exc:
            self._error("response_not_possible", str(exc), options.ref)
            self._enter(Phase.WAITING)
            return
        self._enter(Phase.REPLYING)
        self.reply = ReplyRun(f"resp_{next(_response_ids)}", steps)
        self.detector.reply_active = True
        self.emit(ev.ResponseCreatedEvent(self.reply.response_id, settings.max_new_tokens, options.ref,
                                          self.session.turn.times.speech_end))

    def cancel_reply(self, ref: Optional[str] = None) -> None:
        if self.phase is not Phase.REPLYING:
            self._error("response_cancel_not_active", "there is no response to cancel", ref)
            return
        self.session.cancel("client_cancelled")
        self.advance_reply(to_end=True)

    def advance_reply(self, to_end: bool = False) -> bool:
        """One token of the running reply (or all of it); True while it runs on."""
        while self.phase is Phase.REPLYING:
            reply = self.reply
            if reply.first_pick is None:
                reply.first_pick = time.perf_counter()
            reply.picked += 1
            try:
                delta = next(reply.steps)
            except StopIteration:
                self.finish_reply()
                return False
            if delta:
                self.emit(ev.TextDeltaEvent(self.reply.response_id, delta))
            if not to_end:
                return True
        return False

    def finish_reply(self) -> None:
        result, turn = self.session.last_reply, self.session.turn
        response_id = self.reply.response_id
        self.reply = None
        self.detector.reply_active = False
        self._enter(Phase.IDLE)
        self.emit(ev.ResponseDoneEvent(
            response_id, result.text, result.status, result.reason, output_tokens=len(result.token_ids),
            input_positions=self.session.llm.positions,
            latency_ms=turn.times.latency_ms() if turn is not None else {},
            input_tokens=result.input_tokens, cached_tokens=result.cached_tokens, audio_tokens=result.audio_tokens))
        if self.queued is not None:  # the turn that waited for this reply
            queued, self.queued = self.queued, None
            self.begin_turn(queued.start, queued.end, queued.respond)

    # -- failure ---------------------------------------------------------------------
    def fail(self, exc: Exception) -> None:
        """This session's work raised: report it and return to a clean idle state."""
        self._error("server_error", f"{type(exc).__name__}: {exc}")
        self.queued = None
        self._to_idle()

    @property
    def replying(self) -> bool:
        return self.phase is Phase.REPLYING

    @property
    def hearing(self) -> bool:
        """A user turn of this session is open or on its way to a reply: its latency is
        at stake (the engine paces other sessions' replies meanwhile)."""
        return self.phase in (Phase.LISTENING, Phase.SPECULATING, Phase.ENDING, Phase.WAITING)

    @property
    def llm_urgent(self) -> bool:
        """Its queued LLM work is on the way to a reply (a turn's tail, a reply's
        tokens): it runs in this tick's forward, never deferred."""
        return self.phase in (Phase.REPLYING, Phase.SPECULATING, Phase.WAITING)

