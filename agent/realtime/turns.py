"""Turn detection: when the user starts and stops talking.

Two modes, as in the OpenAI Realtime API's `turn_detection`:

- `server_vad`: Silero VAD probabilities per 32 ms window drive a small state
  machine. Speech starts at the first window whose probability reaches
  `threshold` (confirmed once it has lasted `min_speech_duration_ms`, so a click
  does not start a turn); `SpeechStarted.sample` is that onset minus
  `prefix_padding_ms` (never before the end of the previous turn). Speech stops
  once the probability has stayed below `threshold - 0.15` (hysteresis, as
  Silero's own iterator does) for `silence_duration_ms`; `SpeechStopped.sample`
  is where that silence began, so a short pause inside an utterance does not end
  the turn. The turn's audio ends `suffix_padding_ms` into that silence
  (`SpeechStopped.end`): speech models are trained on recordings that end in a
  little silence (the demo model's on 0.05-0.35 s), and a turn cut exactly where
  the VAD first heard silence is answered less accurately (README, "Turn end").
- `semantic_vad`: the same VAD finds speech and pauses, but how long a pause
  must last to end the turn is decided per pause from the content: the caller
  (the engine, from the LLM's probability that the user's turn is complete, read
  at the pause) calls `decide_pause(silence_ms)`. Until then, and for a pause
  the model doubts, the turn waits up to the eagerness's cap (`SEMANTIC`).
- `manual`: nothing is detected (the VAD does not even run); the client ends a
  turn with `commit()`.

Barge-in: the caller sets `reply_active` while a reply is being generated; a
`SpeechStarted` detected meanwhile has `barge_in=True` and the caller cancels
the reply (the detector only reports it).

All positions are sample indices at 16 kHz since the detector was created (or
`reset`). Events are decided per window, so they are identical however the
audio is split into packets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from agent.realtime.vad import SAMPLE_RATE, WINDOW, SileroVad, VadStream, as_float_audio

MODES = ("server_vad", "semantic_vad", "manual")
EAGERNESS = ("low", "medium", "high", "auto")
# semantic_vad, per eagerness: (the silence that ends a turn the model is sure of, the longest
# wait for one it doubts), in ms; OpenAI's caps: low 8 s, medium 4 s, high 2 s; auto = medium.
SEMANTIC = {"low": (500, 8000), "medium": (300, 4000), "high": (200, 2000), "auto": (300, 4000)}


def semantic_silence_ms(p_done: float, eagerness: str = "auto") -> int:
    """How long a pause must last to end the turn, given P(the user is done): the floor
    when sure, rising steeply to the cap as the model doubts ((1 - p)^2)."""
    floor, cap = SEMANTIC[eagerness]
    p = min(max(float(p_done), 0.0), 1.0)
    return int(round(floor + (cap - floor) * (1.0 - p) ** 2))
NEG_THRESHOLD_GAP = 0.15  # below threshold - gap counts as silence; in between keeps the current state
SAMPLES_PER_MS = SAMPLE_RATE // 1000


@dataclass(frozen=True)
class TurnDetectionSettings:
    """mode: "server_vad" or "manual".
    threshold: speech probability in (0, 1) at which speech starts.
    silence_duration_ms: silence that ends a turn (server_vad).
    prefix_padding_ms: audio kept before the detected speech onset.
    suffix_padding_ms: silence kept after the speech, as part of the turn (capped at
        silence_duration_ms: the turn ends once that much silence has been heard).
    min_speech_duration_ms: speech shorter than this does not start a turn.
    create_response / interrupt_response: what the session does on a turn end /
        on barge-in (carried for the session; the detector reports either way)."""

    mode: str = "server_vad"
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    suffix_padding_ms: int = 200
    min_speech_duration_ms: int = 64
    create_response: bool = True
    interrupt_response: bool = True
    eagerness: str = "auto"  # semantic_vad only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"turn detection mode must be one of {MODES}, got {self.mode!r}")
        if self.eagerness not in EAGERNESS:
            raise ValueError(f"eagerness must be one of {EAGERNESS}, got {self.eagerness!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise ValueError(f"threshold must be a number in (0, 1), got {t!r}")
        for name in ("silence_duration_ms", "prefix_padding_ms", "suffix_padding_ms", "min_speech_duration_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
                raise ValueError(f"{name} must be a whole number of milliseconds >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("create_response", "interrupt_response"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "threshold", float(t))

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - NEG_THRESHOLD_GAP, 0.01)

    @classmethod
    def from_config(cls, config: Optional[dict]) -> "TurnDetectionSettings":
        """From the protocol's `turn_detection` object: `{"type": "server_vad", "threshold": ...,
        "silence_duration_ms": ..., "prefix_padding_ms": ...}`, or None for manual commit."""
        if config is None:
            return cls(mode="manual")
        if not isinstance(config, dict):
            raise ValueError(f"turn_detection must be an object or null, got {type(config).__name__}")
        config = dict(config)
        kind = config.pop("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise ValueError(f"turn_detection type must be 'server_vad' or 'semantic_vad' (or null for manual), "
                             f"got {kind!r}")
        if kind == "semantic_vad":
            known = {"eagerness", "create_response", "interrupt_response", "threshold", "prefix_padding_ms",
                     "suffix_padding_ms", "min_speech_duration_ms"}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"unknown semantic_vad field(s) {unknown}; known: {sorted(known)}")
            return cls(mode="semantic_vad", **config)
        known = {f.name for f in dataclasses.fields(cls)} - {"mode", "eagerness"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown turn_detection field(s) {unknown}; known: {sorted(known)}")
        return cls(mode="server_vad", **config)

    def to_config(self) -> Optional[dict]:
        """The protocol's `turn_detection` object (None in manual mode)."""
        if self.mode == "manual":
            return None
        fields = dataclasses.asdict(self)
        del fields["mode"]
        if self.mode == "semantic_vad":
            del fields["silence_duration_ms"]
            return {"type": "semantic_vad", **fields}
        del fields["eagerness"]
        return {"type": "server_vad", **fields}

    @property
    def semantic(self) -> bool:
        return self.mode == "semantic_vad"


@dataclass(frozen=True)
class SpeechStarted:
    """sample: first sample of the turn's audio (onset - prefix padding, not before the
    previous turn's end); onset: first sample of the first speech window;
    barge_in: a reply was running; detected_at: samples fed when it was detected."""

    sample: int
    onset: int
    barge_in: bool
    detected_at: int


@dataclass(frozen=True)
class SpeechStopped:
    """sample: where the silence that ended the turn began; detected_at: samples fed
    when it was detected (sample + silence_duration, rounded up to a window);
    end: where the turn's audio ends (sample + suffix_padding_ms)."""

    sample: int
    detected_at: int
    end: int
    silence_ms: Optional[int] = None  # semantic_vad: the pause this turn needed
    p_done: Optional[float] = None  # semantic_vad: the model's P(the user is done) at it


@dataclass(frozen=True)
class TurnCommitted:
    """The turn was ended by `commit()`; sample: the end of the committed audio."""

    sample: int


TurnEvent = Union[SpeechStarted, SpeechStopped, TurnCommitted]

_IDLE, _ONSET, _SPEECH = "idle", "onset", "speech"


class TurnDetector:
    def __init__(self, settings: Optional[TurnDetectionSettings] = None, vad: Optional[SileroVad] = None):
        """`vad`: shared Silero network (loaded on first need when None)."""
        self.settings = settings or TurnDetectionSettings()
        self._vad = vad
        self.reply_active = False  # set by the caller while a reply is generated
        self.reset()

    # -- state -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: a new audio stream starting at sample 0."""
        self.samples = 0  # samples fed so far
        self._stream: Optional[VadStream] = None
        self._origin = 0  # stream position of the VAD stream's first sample
        self._decided: Optional[int] = None  # end of the last window the state machine has seen
        self._floor = 0  # a turn's audio never starts before this (the previous turn's end)
        self._clear_speech()

    def _clear_speech(self) -> None:
        self._state = _IDLE
        self._onset = 0
        self._silence_start: Optional[int] = None
        self._pause_decision: Optional[tuple] = None  # semantic_vad: (silence ms, p_done) for this pause

    @property
    def suffix_padding(self) -> int:
        """Samples of the closing silence that belong to the turn."""
        s = self.settings
        shortest = SEMANTIC[s.eagerness][0] if s.semantic else s.silence_duration_ms
        return min(s.suffix_padding_ms, shortest) * SAMPLES_PER_MS

    def _silence_needed(self) -> int:
        """Samples of silence that end the turn at the pause now running."""
        s = self.settings
        if not s.semantic:
            return s.silence_duration_ms * SAMPLES_PER_MS
        if self._pause_decision is not None:
            return self._pause_decision[0] * SAMPLES_PER_MS
        return SEMANTIC[s.eagerness][1] * SAMPLES_PER_MS  # undecided: the cap

    @property
    def pause_decided(self) -> bool:
        return self._pause_decision is not None

    def decide_pause(self, silence_ms: int, p_done: Optional[float] = None) -> List[TurnEvent]:
        """semantic_vad: the pause running now ends the turn once it lasts `silence_ms`;
        returns the SpeechStopped at once if it already has (by the windows decided)."""
        if self._state != _SPEECH or self._silence_start is None:
            return []
        self._pause_decision = (int(silence_ms), p_done)
        return self._maybe_stop(self._decided)

    def _maybe_stop(self, end: int) -> List[TurnEvent]:
        if self._silence_start is None or end - self._silence_start < self._silence_needed():
            return []
        decision = self._pause_decision or (None, None)
        turn_end = self._silence_start + self.suffix_padding
        waited = (end - self._silence_start) // SAMPLES_PER_MS if self.settings.semantic else None
        event = SpeechStopped(sample=self._silence_start, detected_at=end, end=turn_end, silence_ms=waited,
                              p_done=decision[1])
        self._floor = turn_end
        self._clear_speech()
        return [event]

    @property
    def in_speech(self) -> bool:
        return self._state == _SPEECH

    @property
    def pending_silence_start(self) -> Optional[int]:
        """Where the silence now running inside a turn began (None: no pause running)."""
        return self._silence_start if self._state == _SPEECH else None

    def speech_until(self, available: int) -> int:
        """How far the audio is known to belong to the current turn: a running pause
        is held back from `suffix_padding_ms` after its first window (the rest joins
        the turn only if speech resumes), and samples not yet in a complete VAD window
        are undecided.
        `available`: samples the caller holds. Manual mode: all of them."""
        if self.settings.mode == "manual" or self._decided is None:
            return available
        if self._silence_start is not None:
            return min(available, self._silence_start + self.suffix_padding)
        return min(available, self._decided)

    def update_settings(self, settings: TurnDetectionSettings) -> None:
        """New settings (e.g. `session.update`). Switching mode drops any speech in progress."""
        if settings.mode != self.settings.mode:
            self._clear_speech()
            self._stream = None  # the VAD did not see the audio in between: start it afresh
            self._decided = None
        self.settings = settings

    def clear(self) -> None:
        """The client dropped its uncommitted audio: no turn in progress, and the next
        one starts after this point."""
        self._clear_speech()
        self._floor = self.samples

    def commit(self) -> TurnCommitted:
        """End the turn now (manual mode, or a client commit in server_vad mode)."""
        self._clear_speech()
        self._floor = self.samples
        return TurnCommitted(sample=self.samples)

    # -- audio -------------------------------------------------------------------
    def feed(self, audio) -> List[TurnEvent]:
        """Feed 16 kHz mono audio (float in [-1, 1] or int16) in packets of any size;
        returns the events it completes, in order."""
        return TurnDetector.feed_batch([self], [audio])[0]

    @staticmethod
    def feed_batch(detectors: Sequence["TurnDetector"], audios: Sequence) -> List[List[TurnEvent]]:
        """`feed` for many streams (sessions) at once: their VAD windows run batched.
        Each detector's events are exactly what its own `feed` would return."""
        audios = [as_float_audio(a) for a in audios]
        events: List[List[TurnEvent]] = [[] for _ in detectors]
        vad_rows = []
        for i, (det, audio) in enumerate(zip(detectors, audios)):
            if det.settings.mode == "manual":
                det.samples += len(audio)
                continue
            if det._stream is None:
                if det._vad is None:
                    det._vad = SileroVad()
                det._stream = det._vad.new_stream()
                det._origin = det.samples
            vad_rows.append(i)
        by_net: dict = {}
        for i in vad_rows:  # detectors normally share one network; batch per network
            by_net.setdefault(id(detectors[i]._vad), []).append(i)
        for rows in by_net.values():
            vad = detectors[rows[0]]._vad
            firsts = [detectors[i]._origin + detectors[i]._stream.samples for i in rows]
            probs = vad.process_batch([detectors[i]._stream for i in rows], [audios[i] for i in rows])
            for i, first, p in zip(rows, firsts, probs):
                det = detectors[i]
                det.samples += len(audios[i])
                events[i] = det.push_probabilities(p, first)
        return events

    def push_probabilities(self, probs: np.ndarray, first_window: int) -> List[TurnEvent]:
        """The state machine on its own: `probs[k]` is the speech probability of the
        window starting at sample `first_window + k * 512` (for a caller that runs the
        VAD itself, e.g. batched across sessions)."""
        s = self.settings
        events: List[TurnEvent] = []
        self._decided = first_window + len(probs) * WINDOW
        min_speech = s.min_speech_duration_ms * SAMPLES_PER_MS
        for k, p in enumerate(np.asarray(probs, dtype=np.float32)):
            start = first_window + k * WINDOW
            end = start + WINDOW
            if self._state == _IDLE and p >= s.threshold:
                self._state, self._onset = _ONSET, start
            elif self._state == _ONSET and p < s.neg_threshold:
                self._state = _IDLE  # too short to be speech
            if self._state == _ONSET and end - self._onset >= min_speech:
                self._state, self._silence_start = _SPEECH, None
                begin = max(self._onset - s.prefix_padding_ms * SAMPLES_PER_MS, self._floor)
                events.append(SpeechStarted(sample=begin, onset=self._onset, barge_in=self.reply_active,
                                            detected_at=end))
            elif self._state == _SPEECH:
                if p >= s.threshold:
                    self._silence_start = self._pause_decision = None  # speech resumed: a new pause decides anew
                elif p < s.neg_threshold and self._silence_start is None:
                    self._silence_start = start
                events += self._maybe_stop(end)
        return events
