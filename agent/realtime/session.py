"""Session: one conversation that pre-fills the LLM while the user speaks.

State, all explicit: the leftover frames of the stacking buffer, the LLM's KV
cache (an `LLMState`, or a slot of the engine's `BatchedLLM`) and the
conversation so far. The session never runs the encoder: whoever owns the
encoder stream (the engine, or `SingleStream` for one conversation alone) hands
it the new frames.

    session = Session(model, tokenizer, system_prompt="Answer briefly.")
    session.start_turn()                 # pre-fills the template up to the audio
    session.accept_frames(frames)        # stacks complete groups, pre-fills their embeddings
    ...
    session.end_turn(frames=last)        # last group + the rest of the user turn + assistant header
    for delta in session.reply():        # greedy or sampled, text deltas ("" for a token with no text yet)
        ...

With a `BatchedLLM` slot the pre-fills are queued and run in the engine's one
batched forward per tick; each `next()` of the reply picks one token and queues
it for the next batched decode forward. The reply is kept in the cache
(re-tokenized as the offline path would see it), so the next turn pre-fills
only its new tokens.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch

from agent.realtime.chat_prompt import (
    assistant_turn_ids,
    continuation_ids,
    generation_header_ids,
    user_content,
    user_turn_ids,
)
from agent.realtime.detokenize import IncrementalDetokenizer
from agent.realtime.llm_state import ContextFull, LLMState
from agent.realtime.sampling import GenerationSettings, Sampler, stop_ids
from kernels import StackCarry, stack_fuse_flush, stack_fuse_stream


def project_groups(model, groups: torch.Tensor) -> Optional[torch.Tensor]:
    """Stacked groups `[B, n, stack*D]` -> LLM input embeddings `[B*n, H]`, one projector
    call (None when there are none)."""
    if groups.shape[1] == 0:
        return None
    with torch.no_grad():
        return model.projector.project(groups.to(model.dtype)).flatten(0, 1)


class TurnTooLong(RuntimeError):
    """The current turn alone does not fit the LLM's context budget."""


@dataclass
class TurnTimes:
    """perf_counter stamps of one turn (None until reached)."""

    speech_end: Optional[float] = None  # end of speech detected (VAD) or commit
    encoder_done: Optional[float] = None  # last encoder step (flush) done
    first_token: Optional[float] = None
    last_token: Optional[float] = None

    def latency_ms(self) -> Dict[str, Optional[float]]:
        def ms(a, b):
            return None if a is None or b is None else round(1000 * (b - a), 2)

        return {
            "speech_end_to_encoder_done": ms(self.speech_end, self.encoder_done),
            "speech_end_to_first_token": ms(self.speech_end, self.first_token),
            "first_token_to_last_token": ms(self.first_token, self.last_token),
            "speech_end_to_last_token": ms(self.speech_end, self.last_token),
        }


@dataclass
class Turn:
    """The user turn in progress."""

    carry: Optional[StackCarry]
    start_position: int  # KV positions before this turn's `before` ids
    audio_position: int  # KV position of the first audio embedding
    embeddings: List[torch.Tensor] = field(default_factory=list)  # kept to rebuild after a context reset
    audio_positions: int = 0
    ended: bool = False
    times: TurnTimes = field(default_factory=TurnTimes)
    done_probe: Optional[tuple] = None  # (KV position of the last audio, the token that closes the turn)


@dataclass
class ReplyResult:
    text: str
    token_ids: List[int]
    status: str  # "completed", "cancelled", "incomplete"
    reason: Optional[str] = None  # "turn_detected", "client_cancelled", "max_output_tokens", "max_context"
    input_tokens: int = 0  # the context the reply was decoded from
    cached_tokens: int = 0  # of those, in the cache before the user turn began
    audio_tokens: int = 0  # of those, audio embeddings


class Session:
    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None, user_text: str = "",
                 settings: Optional[GenerationSettings] = None, max_positions: Optional[int] = None, llm=None):
        """`llm`: the conversation's LLM state (default: its own `LLMState`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        self.user_text = user_text  # text before the audio in each user message ("" = audio only)
        self.placeholder = model.config.audio_placeholder
        self.stack_factor = model.config.stack_factor
        self.llm = llm if llm is not None else LLMState(model.language_model, max_positions)
        default_stops = stop_ids(tokenizer.eos_token_id, model.language_model.generation_config.eos_token_id)
        self.settings = settings or GenerationSettings(max_new_tokens=64)
        if not self.settings.stop_token_ids:
            self.settings = self.settings.replace(stop_token_ids=default_stops)
        self.history: List[dict] = []  # the conversation in the cache, as the offline path renders it
        self.turn: Optional[Turn] = None
        self.last_reply: Optional[ReplyResult] = None
        self.audio_in_context = 0  # audio positions of the turns in the cache
        # While the last user message waits for its reply, the cache ends with the
        # assistant generation header (this many positions); another user message
        # first takes it off again.
        self.header_positions = 0
        self.reply_start: Optional[int] = None  # where the last reply's content begins in the cache
        self._cancel: Optional[str] = None

    # -- settings ----------------------------------------------------------------
    def set_instructions(self, system_prompt: Optional[str]) -> None:
        """A new system prompt re-renders the conversation: the cache restarts empty."""
        system_prompt = system_prompt or None
        if system_prompt != self.system_prompt:
            if self.turn is not None and not self.turn.ended:
                raise RuntimeError("cannot change the instructions in the middle of a user turn")
            self.system_prompt = system_prompt
            self._restart_conversation()

    # -- the user turn ---------------------------------------------------------------
    @property
    def listening(self) -> bool:
        return self.turn is not None and not self.turn.ended

    def _user_ids(self):
        return user_turn_ids(self.tokenizer, self.history, user_content(self.user_text, self.placeholder),
                             self.system_prompt, self.placeholder)

    def start_turn(self) -> None:
        """Begin a user turn: pre-fill the template's text up to the audio now, so
        nothing of it is left for the end of the turn."""
        if self.listening:
            raise RuntimeError("a user turn is already in progress")
        self._drop_header()
        ids = self._user_ids()
        start = self.llm.positions
        try:
            self.llm.prefill_ids(ids.before)
        except ContextFull:
            self._restart_conversation()
            start = 0
            ids = self._user_ids()
            self.llm.prefill_ids(ids.before)
        self.turn = Turn(carry=None, start_position=start, audio_position=self.llm.positions)

    def accept_frames(self, frames: torch.Tensor) -> int:
        """New encoder frames `[K, t, D]` of this turn: stack complete groups, project
        them and pre-fill the embeddings at once. (The engine does the same for many
        sessions with one projector call: `stack`, `project_groups`, `add_audio`.)"""
        return self.add_audio(project_groups(self.model, self.stack(frames)))

    def stack(self, frames: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Fuse and stack this turn's new frames `[K, t, D]` into complete groups
        `[1, n, stack*D]`; `final`: the partial last group too (the turn ended)."""
        turn = self.turn
        weights = self.model.projector.fusion_weights().to(frames.dtype)
        turn.carry, groups = stack_fuse_stream(turn.carry, frames.unsqueeze(1), weights, self.stack_factor)
        if final and turn.carry.pending:
            groups = torch.cat([groups, stack_fuse_flush(turn.carry, weights, self.stack_factor)], dim=1)
        return groups

    def _keep(self, embeds: Optional[torch.Tensor]) -> None:
        """Record the turn's audio embeddings (to rebuild it after a context restart)."""
        if embeds is not None and embeds.shape[0]:
            self.turn.embeddings.append(embeds)
            self.turn.audio_positions += embeds.shape[0]

    def add_audio(self, embeds: Optional[torch.Tensor]) -> int:
        """Pre-fill this turn's next audio embeddings `[n, H]` (None: none)."""
        if embeds is None or embeds.shape[0] == 0:
            return 0
        self._keep(embeds)
        try:
            self.llm.prefill_embeds(embeds)
        except ContextFull:
            self._restart_conversation()
            self._replay_turn()  # the turn's embeddings, these included
        return embeds.shape[0]

    def end_turn(self, frames: torch.Tensor, speech_end: Optional[float] = None, probe: bool = False) -> None:
        """End of the user turn: the encoder's last `frames` (its flush), the partial
        frame group, and the rest of the user turn and the assistant header go into
        ONE LLM pre-fill (the LLM step is weight-bandwidth bound: one call, not two,
        after the user stops).

        `probe`: also keep the logits at the turn's last audio position, whose
        probability of the template's next token (the end of the user turn) says
        whether the user is done (`end_of_turn_probability`); a batched slot gets them
        from the same forward, a private state with one more call."""
        turn = self.turn
        if turn is None or turn.ended:
            raise RuntimeError("no user turn in progress")
        turn.times.speech_end = speech_end if speech_end is not None else time.perf_counter()
        turn.times.encoder_done = time.perf_counter()
        audio = project_groups(self.model, self.stack(frames, final=True))
        self._keep(audio)
        if turn.audio_positions == 0:
            raise ValueError("the turn holds no audio (less than one encoder frame): nothing to answer")
        after = self._user_ids().after
        with torch.no_grad():
            tail = self.model.language_model.get_input_embeddings()(torch.tensor(after, device=self.llm.device))
        try:
            if probe:
                if audio is not None:
                    self.llm.prefill_embeds(audio.to(tail.dtype))
                turn.done_probe = (self.llm.probe(), after[0])
                self.llm.prefill_embeds(tail)
            else:
                self.llm.prefill_embeds(tail if audio is None else torch.cat([audio.to(tail.dtype), tail]))
        except ContextFull:
            self._restart_conversation()
            self._replay_turn()
            if probe:
                turn.done_probe = (self.llm.probe(), after[0])
            self.llm.prefill_ids(after)
        turn.ended = True
        self.audio_in_context += turn.audio_positions
        self._user_message_ended({"role": "user", "content": user_content(self.user_text, self.placeholder)})

    def end_of_turn_probability(self) -> Optional[float]:
        """P(the user's turn is complete) at the ended turn's audio, from a probed
        `end_turn`: the model's probability of the token that closes the user turn
        (ChatML: `<|im_end|>`) right after the audio. None until that forward ran."""
        turn = self.turn
        if turn is None or turn.done_probe is None:
            return None
        position, token = turn.done_probe
        logits = self.llm.probed.get(position)
        if logits is None:
            return None
        return float(torch.softmax(logits.float(), dim=-1)[token])

    def _user_message_ended(self, message: dict) -> None:
        self.history.append(message)
        self.header_positions = len(generation_header_ids(self.tokenizer, self.history, self.system_prompt))

    def _drop_header(self) -> None:
        """Another user message follows one that got no reply: take the generation header off the cache."""
        if self.header_positions:
            self.llm.truncate(self.llm.positions - self.header_positions)
            self.header_positions = 0

    def add_text_turn(self, text: str) -> None:
        """A typed user message: pre-filled at once with the generation header, like an
        audio turn at its end (the reply then starts from `reply()`)."""
        if self.listening:
            raise RuntimeError("a user turn is in progress: finish or clear it first")
        if not text.strip():
            raise ValueError("the message has no text")
        self._drop_header()
        message = {"role": "user", "content": text}
        ids = continuation_ids(self.tokenizer, self.history, [message], self.system_prompt)
        if not self.llm.fits(len(ids) + 1):
            self._restart_conversation()
            ids = continuation_ids(self.tokenizer, [], [message], self.system_prompt)
            if not self.llm.fits(len(ids) + 1):
                raise TurnTooLong(f"the message needs {len(ids)} positions but the context budget is "
                                  f"{self.llm.max_positions}")
        start = self.llm.positions
        self.llm.prefill_ids(ids)
        now = time.perf_counter()
        self.turn = Turn(carry=None, start_position=start, audio_position=self.llm.positions, ended=True,
                         times=TurnTimes(speech_end=now, encoder_done=now))
        self._user_message_ended(message)

    def truncate_reply(self, text: str) -> None:
        """The latest reply becomes `text` (a prefix of it: what the user heard before
        barging in), in the history and in the cache. If the user's next turn is open
        already, its pre-filled text and audio go in again after the shorter reply."""
        open_turn = self.listening
        at = -1
        if not self.history or self.history[at]["role"] != "assistant" or self.reply_start is None:
            raise ValueError("the conversation's latest message is not a reply")
        reply = self.history[at]["content"]
        if not reply.startswith(text):
            raise ValueError("the truncated text must be the start of the reply")
        if text == reply:
            return
        before = self.history[:at]
        ids = assistant_turn_ids(self.tokenizer, before, text, self.system_prompt)
        self.llm.truncate(self.reply_start)
        self.llm.prefill_ids(ids.reply + ids.closing)
        self.history[at] = {"role": "assistant", "content": text}
        if open_turn:  # the open turn's template text and audio, after the new reply
            turn_ids = self._user_ids()
            self.turn.start_position = self.llm.positions
            self.llm.prefill_ids(turn_ids.before)
            self.turn.audio_position = self.llm.positions
            for e in self.turn.embeddings:
                self.llm.prefill_embeds(e)

    def delete_last(self, role: str) -> None:
        """Take the conversation's most recent message (of `role`) out of the history
        and the cache. An assistant reply: the cache is back at its user turn plus the
        generation header, so `reply()` answers it again. A user message that got no
        reply: the cache is back where that message began."""
        if self.listening:
            raise RuntimeError("a user turn is in progress")
        if not self.history or self.history[-1]["role"] != role:
            raise ValueError(f"the conversation's most recent message is not a {role} message")
        if role == "assistant":
            if self.reply_start is None or self.reply_start > self.llm.positions:
                raise ValueError("the reply is no longer in the cache")
            self.history.pop()
            header = generation_header_ids(self.tokenizer, self.history, self.system_prompt)
            # the header's last token again: its logits start the next reply
            self.llm.truncate(self.reply_start - 1)
            self.llm.prefill_ids(header[-1:])
            self.header_positions = len(header)
            self.reply_start = None
            now = time.perf_counter()
            self.turn.times = TurnTimes(speech_end=now, encoder_done=now)
        else:
            if len(self.history) > 1 and self.history[-2]["role"] == "user":
                raise ValueError("the message before it is a user message that got no reply either: delete "
                                 "both from the newest, or answer them")
            if self.turn is None or not self.turn.ended or self.header_positions == 0:
                raise ValueError("the user message is no longer in the cache")
            self.llm.truncate(self.turn.start_position)
            self.history.pop()
            self.audio_in_context -= self.turn.audio_positions
            self.header_positions = 0
            self.turn = None

    # -- speculation: the end-of-turn work done during the VAD's silence -----------------
    def snapshot(self) -> dict:
        """What `end_turn` changes, so a speculative end of turn can be undone."""
        turn = self.turn
        carry = turn.carry
        # Queued (not yet run) pre-fill has no logits yet; reading them would run it alone.
        return {"positions": self.llm.positions, "logits": None if self.llm.pending else self.llm.last_logits,
                "carry": None if carry is None else StackCarry(None if carry.frames is None else carry.frames.clone()),
                "embeddings": len(turn.embeddings), "audio_positions": turn.audio_positions,
                "history": len(self.history), "times": dataclasses.replace(turn.times),
                "audio_in_context": self.audio_in_context, "header_positions": self.header_positions}

    def restore(self, snap: dict) -> None:
        """Undo a speculative `end_turn`: the user kept talking."""
        turn = self.turn
        if self.llm.positions < snap["positions"]:
            raise RuntimeError("the conversation was restarted since the snapshot: it cannot be restored")
        self.llm.truncate(snap["positions"])
        if not self.llm.pending:
            self.llm.last_logits = snap["logits"]
        turn.carry = snap["carry"]
        del turn.embeddings[snap["embeddings"]:]
        turn.audio_positions = snap["audio_positions"]
        del self.history[snap["history"]:]
        turn.times = snap["times"]
        turn.ended = False
        turn.done_probe = None
        self.audio_in_context = snap["audio_in_context"]
        self.header_positions = snap["header_positions"]

    def abort_turn(self) -> None:
        """Drop the user turn in progress (the client cleared its audio): its
        pre-filled positions leave the cache, the conversation stays."""
        if self.turn is not None and not self.turn.ended:
            self.llm.truncate(min(self.turn.start_position, self.llm.positions))
        self.turn = None

    def _restart_conversation(self) -> None:
        """The context budget is full: forget the earlier turns (the system prompt
        stays), so the conversation continues with the current turn alone."""
        self.history = []
        self.llm.reset()
        self.audio_in_context = self.header_positions = 0
        self.reply_start = None

    def _replay_turn(self) -> None:
        """Pre-fill the current turn again after a restart: template text + its audio."""
        ids = self._user_ids()
        total = len(ids.before) + sum(e.shape[0] for e in self.turn.embeddings)
        if not self.llm.fits(total + len(ids.after) + 1):
            raise TurnTooLong(f"this turn needs {total + len(ids.after)} positions but the context budget is "
                              f"{self.llm.max_positions}: shorten the turn (max turn length) or raise the budget")
        self.turn.start_position = 0
        self.llm.prefill_ids(ids.before)
        self.turn.audio_position = self.llm.positions
        for e in self.turn.embeddings:
            self.llm.prefill_embeds(e)

    # -- the reply -----------------------------------------------------------------
    def cancel(self, reason: str = "turn_detected") -> None:
        """Stop the running reply at the next token: barge-in ("turn_detected") or
        response.cancel ("client_cancelled")."""
        self._cancel = reason

    def reply(self, settings: Optional[GenerationSettings] = None, instructions: Optional[str] = None
              ) -> Iterator[str]:
        """Decode the reply; each `next()` picks ONE token and yields its text delta
        ("" when the token completes no text yet). The picked token is queued for the
        next forward, which the engine runs for every replying session at once (a
        private `LLMState` runs it at once). The reply then goes into the history
        and the cache (see `last_reply`).

        `instructions`: for this reply only, a system message just before it (the
        generation header comes off and goes back after it). Afterwards the cache
        holds the conversation without it, as if the reply had followed the user
        turn directly."""
        settings = settings or self.settings
        if not settings.stop_token_ids:
            settings = settings.replace(stop_token_ids=self.settings.stop_token_ids)
        turn = self.turn
        if turn is None or not turn.ended or not self.header_positions:
            raise RuntimeError("end the user turn before replying")
        usage = {"cached_tokens": turn.start_position, "audio_tokens": self.audio_in_context}
        restart_at = None
        if instructions:  # set up now, so the engine's next batched forward pre-fills it
            restart_at = self.llm.positions - self.header_positions
            extra = continuation_ids(self.tokenizer, self.history, [{"role": "system", "content": instructions}],
                                     self.system_prompt)
            if not self.llm.fits(len(extra) - self.header_positions + 1):
                raise TurnTooLong(f"the response's instructions need {len(extra)} positions; the context budget "
                                  f"is {self.llm.max_positions}")
            self.llm.truncate(restart_at)
            self.llm.prefill_ids(extra)
        self.header_positions = 0
        usage["input_tokens"] = self.llm.positions
        self._cancel = None  # here, not in the generator: a cancel may come before its first step
        return self._decode(settings, restart_at, usage)

    def _decode(self, settings: GenerationSettings, restart_at: Optional[int], usage: dict) -> Iterator[str]:
        turn = self.turn
        sampler = Sampler(settings)
        detok = IncrementalDetokenizer(self.tokenizer)
        reply_start = self.llm.positions
        emitted: List[int] = []
        status, reason = "completed", None
        while True:
            if self._cancel:
                status, reason = "cancelled", self._cancel
                break
            token = sampler(self.llm.last_logits)
            if turn.times.first_token is None:
                turn.times.first_token = time.perf_counter()
            emitted.append(token)
            if sampler.is_stop(token):
                break
            delta = detok.push(token)
            if len(emitted) >= settings.max_new_tokens:
                status, reason = "incomplete", "max_output_tokens"
            else:
                try:
                    self.llm.queue_token(token)
                except ContextFull:
                    status, reason = "incomplete", "max_context"
            yield delta
            if reason is not None:
                break
        rest = detok.flush()
        if rest:
            yield rest
        turn.times.last_token = time.perf_counter()
        text = detok.text
        self._close_reply(reply_start, emitted, text, restart_at)
        self.last_reply = ReplyResult(text, emitted, status, reason, **usage)

    def _close_reply(self, reply_start: int, emitted: List[int], text: str, restart_at: Optional[int] = None) -> None:
        """Put the reply into the cache as the offline path would tokenize it, plus the
        template's end of turn, so the next turn pre-fills only new tokens.
        `restart_at`: the reply followed a per-response system message that starts
        there; it leaves the cache (the header, the reply and its end go in again)."""
        ids = assistant_turn_ids(self.tokenizer, self.history, text, self.system_prompt)
        if restart_at is not None:
            self.llm.truncate(restart_at)
            header = generation_header_ids(self.tokenizer, self.history, self.system_prompt)
            reply_start, same, todo = restart_at + len(header), 0, header + ids.reply + ids.closing
        else:
            fed = emitted[:-1] if emitted else []  # every emitted token but the last went through the LLM
            fed = fed[: self.llm.positions - reply_start]
            # Keep what the model spelled as the tokenizer would; from the first token where
            # they differ, re-pre-fill the canonical spelling.
            same = next((i for i, (a, b) in enumerate(zip(fed, ids.reply)) if a != b), min(len(fed), len(ids.reply)))
            if same < len(fed):
                self.llm.truncate(reply_start + same)
            todo = ids.reply[same:] + ids.closing
        try:
            self.llm.prefill_ids(todo)
        except ContextFull:  # not even the reply fits: the next turn starts a fresh conversation
            self._restart_conversation()
            return
        self.reply_start = reply_start
        self.history.append({"role": "assistant", "content": text})
