"""Sessions sustained in real time: N simulated streams driving the engine in one process.

    python -m agent.bench load [--streams 1,4,8,16] [--duration 30] [--mode batched,round-robin]
                               [--budget-ms 1000] [--nest large] [--llm bench] [--device cpu] [--dtype float32]
                               [--json PATH]

The same model as `agent.bench ttft` (NEST-L streaming + the 76M "bench" Llama by
default, random weights). No websocket: every stream is a session opened on one
`agent.realtime.engine.Engine` through its public API (open_session /
append_audio / next_event), on one asyncio loop, like the server's connections.

Each stream, in a loop for --duration seconds: sends a spoken utterance (espeak-ng,
leading and trailing silence trimmed) in 20 ms packets at real-time pace (wall
clock), then 20 ms packets of silence until the engine's server VAD (Silero) ends
the turn, then waits for response.done before speaking again (nothing is sent
while the reply runs). Starts are staggered over one utterance, so streams are at
different points. A stream starts no turn that cannot end (speech + VAD silence +
budget) before --duration; what is still running at --duration is cut.

Without espeak-ng, speech_like noise is sent instead, which Silero does not hear
as speech: the streams then commit the turn themselves after the same silence
(a note says so; the VAD's cost is then missing from the figures).

Reported per mode and N:
  turns / on time  turns whose first text delta arrived within silence_ms + --budget-ms
                   of the moment the stream sent its last speech packet (as
                   clients/load.py counts: the VAD's silence window is inherent to
                   server-VAD turns; the budget is what the engine adds); a turn
                   that had no first token by the end is late.
  e2ft             end of speech -> first token, client side (last speech packet
                   sent -> first text delta; includes the silence window), p50/p99.
                   A reply whose tokens decode to no text (the random "bench" LLM's
                   ids beyond the tokenizer's vocabulary) sends no delta: its first
                   token is then response.done's arrival minus the engine's
                   first_token_to_last_token (counted in first_token_from_engine);
                   and the engine's own latency_ms speech_end_to_first_token (from
                   the moment its VAD decided the turn ended), p50/p99.
  tok/s/session    per completed reply: (output_tokens - 1) / (last token - first
                   token), the engine's own stamps (latency_ms first_token_to_last_token);
                   p50 over replies.
  agg tok/s        all output tokens / wall time during which at least one reply
                   was decoding (client-side first delta -> response.done, unioned);
                   and all output tokens / the run's wall time.
  enc RTF          encoder compute seconds per second of audio encoded, over the
                   run's window (engine.stats encoder_seconds / audio_seconds when
                   the engine keeps them; otherwise timed here around the
                   streamers' step calls).
  busy             fraction of wall time the engine thread spent in ticks that did
                   work; enc% and llm%: the encoder's and (batched mode) the batched
                   LLM forwards' (engine.stats llm_seconds) share of that time:
                   where it breaks, encoder or LLM. lag p99: how late this process
                   sent its packets (a high value means the client, not the
                   engine, fell behind).

--mode: "batched" passes llm_batching=True to Engine, "round-robin" llm_batching=False
(the old per-session decode path, the baseline). An Engine without that switch
has only its round-robin path: "batched" is then skipped with a note.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SR = 16000
PACKET_MS = 20
MODES = ("batched", "round-robin")
UTTERANCES = (
    "what is the weather like in paris tomorrow",
    "turn on the lights in the kitchen please",
    "set a timer for ten minutes",
    "play some quiet music in the living room",
)


# -- audio --------------------------------------------------------------------------------
def trim_silence(audio: np.ndarray, rel: float = 0.02) -> np.ndarray:
    """Drop leading/trailing samples quieter than `rel` of the peak (so the last packet
    sent is the end of speech)."""
    loud = np.flatnonzero(np.abs(audio) > rel * float(np.abs(audio).max() or 1.0))
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio


def synthesize_utterances(texts: Sequence[str] = UTTERANCES) -> Tuple[List[np.ndarray], Optional[str]]:
    """Spoken utterances at 16 kHz float32 (espeak-ng + sox, as tests/conftest.py does).
    Returns (utterances, note): note is None for real speech, else why speech_like noise
    is used instead."""
    from agent.bench import speech_like

    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        note = (f"{' and '.join(missing)} not installed: streams send agent.bench.speech_like noise, which Silero "
                f"does not hear as speech, and commit each turn themselves after the VAD's silence window")
        return [speech_like(1.5 + 0.5 * i, 100 + i) for i in range(len(texts))], note
    import soundfile as sf

    out = []
    with tempfile.TemporaryDirectory(prefix="nestvox-bench-load-") as tmp:
        for i, text in enumerate(texts):
            raw, path = f"{tmp}/{i}.raw.wav", f"{tmp}/{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", raw, text], check=True, capture_output=True)
            subprocess.run(["sox", raw, "-r", str(SR), "-c", "1", "-b", "16", path], check=True, capture_output=True)
            data, rate = sf.read(path, dtype="float32")
            assert rate == SR
            out.append(trim_silence(data))
    return out, None


# -- the one place that reads engine events -------------------------------------------------
def read_event(event) -> Tuple[str, dict]:
    """(kind, fields) for an engine event: kind is "speech_stopped", "delta" {delta},
    "done" {status, text, output_tokens, latency_ms}, "error" {code, message} or "other".
    Takes OpenAI-shaped dicts (the Realtime GA dialect: response.output_text.delta, a
    response.done whose output message holds output_text parts; beta's
    response.text.delta and text parts too) and typed event objects
    (SpeechStoppedEvent, TextDeltaEvent, ResponseDoneEvent, ErrorEvent; the "Event"
    suffix is optional) alike."""
    if isinstance(event, dict):
        kind = event.get("type", "")
        if kind == "input_audio_buffer.speech_stopped":
            return "speech_stopped", {}
        if kind in ("response.output_text.delta", "response.text.delta"):
            return "delta", {"delta": event.get("delta", "")}
        if kind == "response.done":
            response = event.get("response") or {}
            parts = [part for item in response.get("output") or [] for part in (item or {}).get("content") or []
                     if isinstance(part, dict) and part.get("type") in ("output_text", "text")]
            return "done", {"status": response.get("status"), "text": parts[0].get("text", "") if parts else "",
                            "output_tokens": (response.get("usage") or {}).get("output_tokens", 0),
                            "latency_ms": response.get("latency_ms") or {}}
        if kind == "error":
            err = event.get("error") or {}
            return "error", {"code": err.get("code"), "message": err.get("message")}
        return "other", {}
    name = type(event).__name__
    if name.endswith("Event"):  # agent.realtime.events: SpeechStoppedEvent, TextDeltaEvent, ...
        name = name[:-len("Event")]
    if name == "SpeechStopped":
        return "speech_stopped", {}
    if name == "TextDelta":
        return "delta", {"delta": event.delta}
    if name == "ResponseDone":
        return "done", {"status": event.status, "text": event.text, "output_tokens": event.output_tokens,
                        "latency_ms": dict(event.latency_ms or {})}
    if name == "Error":
        return "error", {"code": event.code, "message": event.message}
    return "other", {}


# -- one turn, one stream -------------------------------------------------------------------
@dataclass
class TurnRecord:
    stream: int
    audio_s: float
    speech_end: Optional[float] = None  # perf_counter: last speech packet sent
    speech_stopped: Optional[float] = None  # the engine's VAD ended the turn (event received)
    first_token: Optional[float] = None  # first text delta received
    last_token: Optional[float] = None  # last text delta received
    done: Optional[float] = None  # response.done received
    deltas: List[str] = field(default_factory=list)
    status: Optional[str] = None
    text: Optional[str] = None
    output_tokens: int = 0
    latency_ms: dict = field(default_factory=dict)
    committed_by_client: bool = False
    first_token_from_engine: bool = False  # no text delta came: first_token = done - first_token_to_last_token

    @property
    def e2ft_ms(self) -> Optional[float]:
        if self.first_token is None or self.speech_end is None:
            return None
        return 1000 * (self.first_token - self.speech_end)


@dataclass
class EncoderClock:
    """Encoder compute time and audio, timed around StreamingNestEncoder.step calls."""

    seconds: float = 0.0
    samples: int = 0
    calls: int = 0
    patched: list = field(default_factory=list)
    window: tuple = (-math.inf, math.inf)  # only calls that start inside the run count

    def wrap(self, streamer) -> None:
        if getattr(streamer, "_bench_load_clock", None) is self:
            return
        original = streamer.step

        def step(states, audio, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(states, audio, *args, **kwargs)
            finally:
                if self.window[0] <= start < self.window[1]:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1
                    self.samples += sum(int(a.numel() if hasattr(a, "numel") else len(a))
                                        for a in audio if a is not None)

        streamer.step = step
        streamer._bench_load_clock = self
        self.patched.append((streamer, original))

    def unwrap(self) -> None:
        for streamer, _ in self.patched:
            del streamer.step  # the class's method again
            del streamer._bench_load_clock
        self.patched.clear()


class TickClock:
    """Time the engine thread spends in ticks that did work (wraps engine.tick)."""

    def __init__(self, engine):
        self.busy_s = 0.0
        self.ticks = 0
        self.window = (math.inf, math.inf)  # only ticks that start inside the run count
        original = engine.tick

        def tick():
            start = time.perf_counter()
            busy = original()
            if busy and self.window[0] <= start < self.window[1]:
                self.busy_s += min(time.perf_counter(), self.window[1]) - start  # the part inside the run
                self.ticks += 1
            return busy

        engine.tick = tick


def numeric_stats(engine) -> Dict[str, float]:
    """The engine's numeric counters now (read from another thread: plain numbers)."""
    return {k: v for k, v in dict(getattr(engine, "stats", {}) or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def engine_kwargs(engine_cls, mode: str, streams: int, max_batch: Optional[int],
                  max_positions: Optional[int] = None, reply_tok_s: float = 0.0) -> Optional[dict]:
    """Constructor keywords for `mode`, or None if this Engine cannot run it."""
    params = inspect.signature(engine_cls.__init__).parameters
    kwargs = {"max_batch": max_batch or max(streams, 1)}
    if reply_tok_s:
        if "reply_tok_s" not in params:
            raise ValueError("this Engine has no reply pacing (reply_tok_s): run without --reply-tok-s")
        kwargs["reply_tok_s"] = reply_tok_s
    if "max_sessions" in params:  # LLM cache slots: one per stream
        kwargs["max_sessions"] = max(streams, 1)
    if max_positions is not None and "max_positions" in params:
        kwargs["max_positions"] = max_positions
    if "llm_batching" in params:
        kwargs["llm_batching"] = mode == "batched"
    elif mode == "batched":
        return None
    return kwargs


# -- one run: N streams, one mode -------------------------------------------------------
async def run_streams(engine, utterances: Sequence[np.ndarray], streams: int, duration: float, *,
                      budget_ms: float = 1000.0, silence_ms: int = 500, client_commit: bool = False,
                      instructions: Optional[str] = None, max_tokens: int = 64, progress=None,
                      on_start=None) -> dict:
    """Drive `streams` real-time streams on a started engine for `duration` seconds;
    returns {"turns": [TurnRecord], "elapsed_s", "client_lag_ms", "errors": [...]}."""
    from agent.realtime.turns import TurnDetectionSettings

    try:
        from agent.realtime.config import SessionConfig
    except ImportError:  # before the engine's rewrite
        from agent.realtime.engine import SessionConfig

    loop = asyncio.get_running_loop()
    packet = SR * PACKET_MS // 1000
    silence = np.zeros(packet, dtype=np.float32)
    names = {f.name for f in dataclasses.fields(SessionConfig)}  # GA's name for the reply limit, or beta's
    limit = "max_output_tokens" if "max_output_tokens" in names else "max_response_output_tokens"
    config = SessionConfig(instructions=instructions, **{limit: max_tokens},
                           turn_detection=TurnDetectionSettings(silence_duration_ms=silence_ms))
    t0 = time.perf_counter()
    deadline = t0 + duration
    if on_start is not None:
        on_start(t0, deadline)
    stats_at = {"start": numeric_stats(engine)}
    mean_utt = float(np.mean([u.size for u in utterances])) / SR
    stagger = mean_utt / max(streams, 1)
    turns: List[TurnRecord] = []
    errors: List[dict] = []
    lags: List[float] = []  # how late the client sent its packets (ms): the bench's own overload
    # A turn whose VAD end has not come this long after the silence began is committed by the client.
    vad_grace_s = silence_ms / 1000 + 3.0

    async def pace(target: float) -> None:
        now = time.perf_counter()
        if target > now:
            await asyncio.sleep(target - now)
        else:
            await asyncio.sleep(0)
        lags.append(1000 * max(0.0, time.perf_counter() - target))

    async def stream(i: int) -> None:
        handle = engine.open_session(loop=loop, config=config)
        current: List[Optional[TurnRecord]] = [None]
        stopped = asyncio.Event()
        done = asyncio.Event()

        async def reader() -> None:
            while True:
                event = await handle.next_event()
                now = time.perf_counter()
                kind, info = read_event(event)
                turn = current[0]
                if kind == "error":
                    errors.append({"stream": i, **info})
                    if info.get("code") not in ("input_audio_buffer_commit_empty",):
                        done.set()  # the turn failed: do not wait for it forever
                    continue
                if turn is None:
                    continue
                if kind == "speech_stopped":
                    if turn.speech_stopped is None:
                        turn.speech_stopped = now
                    stopped.set()
                elif kind == "delta":
                    if turn.first_token is None:
                        turn.first_token = now
                    turn.last_token = now
                    turn.deltas.append(info["delta"])
                elif kind == "done":
                    turn.done = now
                    span = (info["latency_ms"] or {}).get("first_token_to_last_token")
                    if turn.first_token is None and span is not None and info["output_tokens"]:
                        # tokens without text (the "bench" LLM's ids beyond the tokenizer's vocabulary
                        # decode to nothing): the first token's time from the engine's own stamps
                        turn.first_token = now - span / 1000
                        turn.last_token = now
                        turn.first_token_from_engine = True
                    turn.status, turn.text = info["status"], info["text"]
                    turn.output_tokens, turn.latency_ms = int(info["output_tokens"] or 0), info["latency_ms"]
                    done.set()

        read_task = asyncio.create_task(reader())
        try:
            await asyncio.sleep(i * stagger)
            k = 0
            while True:
                audio = utterances[(i + k) % len(utterances)]
                k += 1
                need = audio.size / SR + silence_ms / 1000 + 0.1 + budget_ms / 1000
                if time.perf_counter() + need > deadline:
                    return
                stopped.clear()
                done.clear()
                # events during the speech count for this turn too (a VAD that cut it short shows)
                turn = TurnRecord(stream=i, audio_s=audio.size / SR)
                current[0] = turn
                start = time.perf_counter()
                n = math.ceil(audio.size / packet)
                for j in range(n):
                    await pace(start + j * PACKET_MS / 1000)
                    handle.append_audio(audio[j * packet:(j + 1) * packet])
                turn.speech_end = time.perf_counter()
                turns.append(turn)
                # silence at real time until the VAD ends the turn (or we commit it)
                j = n
                while not stopped.is_set() and not done.is_set():
                    since = time.perf_counter() - turn.speech_end
                    if client_commit and since >= silence_ms / 1000:
                        break
                    if since >= vad_grace_s:
                        break
                    await pace(start + j * PACKET_MS / 1000)
                    handle.append_audio(silence)
                    j += 1
                if not stopped.is_set() and not done.is_set():
                    turn.committed_by_client = True
                    handle.commit()
                await done.wait()
        finally:
            read_task.cancel()
            handle.close()

    async def ticker() -> None:  # progress for long runs: `progress(seconds so far, turns so far)`
        while True:
            await asyncio.sleep(5.0)
            progress(time.perf_counter() - t0, list(turns))

    ticking = asyncio.create_task(ticker()) if progress is not None else None
    tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    done_tasks, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()) + 0.05)
    for task in pending:
        task.cancel()
    stats_at["end"] = numeric_stats(engine)  # at the deadline: what the cut replies do after it is not the run's
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if time.perf_counter() < deadline:  # every stream had its last turn: the run still lasts `duration`
        await asyncio.sleep(deadline - time.perf_counter())
    if ticking is not None:
        ticking.cancel()
    elapsed = time.perf_counter() - t0
    for i, res in enumerate(results):
        if isinstance(res, Exception) and not isinstance(res, asyncio.CancelledError):
            errors.append({"stream": i, "code": "client_exception", "message": f"{type(res).__name__}: {res}"})
    return {"turns": turns, "stats_start": stats_at["start"], "stats_end": stats_at["end"], "duration_s": duration, "elapsed_s": elapsed, "t0": t0, "client_lag_ms": lags, "errors": errors}


# -- summaries ----------------------------------------------------------------------------
def pct(values, q: float) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def union_seconds(intervals: Sequence[Tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(run: dict, *, mode: str, streams: int, budget_ms: float, silence_ms: int,
              encoder_s: Optional[float], audio_s: Optional[float], busy_s: Optional[float],
              tick_encoder_s: Optional[float], llm_s: Optional[float] = None) -> dict:
    turns: List[TurnRecord] = run["turns"]
    elapsed = run["elapsed_s"]
    end = run["t0"] + elapsed
    # a turn counts once its budget window is over or it has its first token
    limit_ms = silence_ms + budget_ms
    counted = [t for t in turns if t.first_token is not None or 1000 * (end - t.speech_end) >= limit_ms]
    on_time = [t for t in counted if t.e2ft_ms is not None and t.e2ft_ms <= limit_ms]
    completed = [t for t in turns if t.done is not None and t.status is not None]
    tokens = sum(t.output_tokens for t in completed)
    rates = []
    for t in completed:
        span = t.latency_ms.get("first_token_to_last_token")
        if span is None and t.first_token is not None:
            span = 1000 * (t.last_token - t.first_token)
        if t.output_tokens >= 2 and span:
            rates.append((t.output_tokens - 1) / (span / 1000))
    decoding = union_seconds([(t.first_token, t.done) for t in completed if t.first_token is not None])
    engine_e2ft = [t.latency_ms.get("speech_end_to_first_token") for t in completed]
    return {
        "mode": mode, "streams": streams, "duration_s": run.get("duration_s"), "elapsed_s": round(elapsed, 2),
        "turns": len(counted), "on_time": len(on_time), "completed": len(completed),
        "cut": len([t for t in turns if t.done is None]),
        "streams_replied": len({t.stream for t in completed}),
        "client_committed": len([t for t in turns if t.committed_by_client]),
        "first_token_from_engine": len([t for t in turns if t.first_token_from_engine]),
        # counted turns whose first token is not known: no text delta and no response.done by the end (late)
        "first_token_unknown": len([t for t in counted if t.first_token is None]),
        "e2ft_ms": {"p50": pct([t.e2ft_ms for t in counted], 50), "p99": pct([t.e2ft_ms for t in counted], 99),
                    "n": len([t for t in counted if t.e2ft_ms is not None])},
        "engine_e2ft_ms": {"p50": pct(engine_e2ft, 50), "p99": pct(engine_e2ft, 99),
                           "n": len([v for v in engine_e2ft if v is not None])},
        "session_tok_s": {"p50": pct(rates, 50), "min": min(rates) if rates else None, "n": len(rates)},
        "output_tokens": tokens,
        "decoding_s": decoding,
        "agg_tok_s_decoding": tokens / decoding if decoding > 0 else None,
        "agg_tok_s_run": tokens / elapsed if elapsed > 0 else None,
        "encoder_s": encoder_s, "audio_s": audio_s,
        "encoder_rtf": encoder_s / audio_s if encoder_s is not None and audio_s else None,
        "engine_busy": busy_s / elapsed if busy_s is not None and elapsed > 0 else None,
        "encoder_share": tick_encoder_s / busy_s if tick_encoder_s is not None and busy_s else None,
        "llm_share": llm_s / busy_s if llm_s is not None and busy_s else None,  # batched LLM forwards' share
        "client_lag_ms_p99": pct(run["client_lag_ms"], 99),
        "errors": run["errors"][:20], "error_count": len(run["errors"]),
        "replies": [{"stream": t.stream, "text": t.text, "deltas": "".join(t.deltas), "n_deltas": len(t.deltas),
                     "output_tokens": t.output_tokens, "status": t.status, "e2ft_ms": t.e2ft_ms,
                     "latency_ms": t.latency_ms} for t in completed],
    }


def run_one(model, tokenizer, streamer, utterances, note, *, mode: str, streams: int, duration: float,
            budget_ms: float, silence_ms: int, max_batch: Optional[int], max_tokens: int,
            instructions: Optional[str], max_positions: Optional[int] = None, reply_tok_s: float = 0.0,
            verbose: bool = True) -> Optional[dict]:
    """One engine, one mode, `streams` streams; None if this Engine has no such mode."""
    from agent.realtime.engine import Engine

    kwargs = engine_kwargs(Engine, mode, streams, max_batch, max_positions, reply_tok_s)
    if kwargs is None:
        return None
    if "offered_chunk_ms" in inspect.signature(Engine.__init__).parameters:
        # every stream uses the default chunk: building the other sizes' streamers per engine is wasted start-up
        kwargs["offered_chunk_ms"] = (int(round(streamer.chunk_ms)),)
    engine = Engine(model, tokenizer, streamer, **kwargs)
    clock = EncoderClock()
    ticks = TickClock(engine)
    clock.wrap(streamer)
    engine.start()

    def on_start(t0: float, t1: float) -> None:
        ticks.window = clock.window = (t0, t1)
        for s in list(getattr(engine, "streamers", {}).values()):  # streamers the engine built itself
            clock.wrap(s)

    label = f"[{mode} N={streams}]"

    def progress(seconds: float, turns: List[TurnRecord]) -> None:
        if verbose:
            replied = [t for t in turns if t.done is not None]
            late = [t.e2ft_ms for t in turns if t.e2ft_ms is not None]
            print(f"  {label} {seconds:4.0f} s: {len(turns)} turns, {len(replied)} replies, "
                  f"{sum(t.output_tokens for t in replied)} tokens, e2ft p50 "
                  f"{_f(pct(late, 50))} ms", flush=True)

    if verbose:
        print(f"{label} {duration:g} s ...", flush=True)
    try:
        run = asyncio.run(run_streams(engine, utterances, streams, duration, budget_ms=budget_ms,
                                      silence_ms=silence_ms, client_commit=note is not None,
                                      instructions=instructions, max_tokens=max_tokens, progress=progress,
                                      on_start=on_start))
    finally:
        engine.stop()
        clock.unwrap()
    stats = getattr(engine, "stats", {}) or {}
    in_run = {k: v - run["stats_start"].get(k, 0) for k, v in run["stats_end"].items()}  # the run's window
    if "encoder_seconds" in in_run and "audio_seconds" in in_run:  # the engine's own figures, if it keeps them
        encoder_s, audio_s, source = float(in_run["encoder_seconds"]), float(in_run["audio_seconds"]), "engine"
    elif clock.calls:
        encoder_s, audio_s, source = clock.seconds, clock.samples / SR, "bench"
    else:
        encoder_s = audio_s = source = None
    result = summarize(run, mode=mode, streams=streams, budget_ms=budget_ms, silence_ms=silence_ms,
                       encoder_s=encoder_s, audio_s=audio_s, busy_s=ticks.busy_s,
                       tick_encoder_s=encoder_s, llm_s=in_run.get("llm_seconds") if mode == "batched" else None)
    result["encoder_time_from"] = source
    result["engine_kwargs"] = {k: v for k, v in kwargs.items()}
    result["engine_stats_in_run"] = in_run
    result["engine_stats"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in stats.items()
                              if isinstance(v, (int, float, dict))}
    if verbose:
        print(f"  {label} done: {format_row(result)}", flush=True)
    return result


def warm_up(model, tokenizer, streamer, utterances, note, silence_ms: int, max_tokens: int,
            modes: Sequence[str], max_positions: Optional[int] = None) -> None:
    """One turn per mode through a throwaway engine: allocations, kernel selection, VAD load."""
    for mode in modes:
        run_one(model, tokenizer, streamer, utterances[:1], note, mode=mode, streams=1,
                duration=utterances[0].size / SR + silence_ms / 1000 + 3.0, budget_ms=2000, silence_ms=silence_ms,
                max_batch=None, max_tokens=min(8, max_tokens), instructions=None, max_positions=max_positions,
                verbose=False)


# -- the table -------------------------------------------------------------------------------
def _f(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


COLUMNS = ("mode", "N", "turns", "on time", "e2ft p50", "e2ft p99", "eng p50", "eng p99", "tok/s/sess",
           "agg tok/s", "tok/s run", "enc RTF", "busy", "enc%", "llm%", "lag p99")


def format_row(r: dict) -> str:
    return " | ".join(_row(r))


def _row(r: dict) -> List[str]:
    return [r["mode"], str(r["streams"]), str(r["turns"]), f"{r['on_time']}/{r['turns']}",
            _f(r["e2ft_ms"]["p50"]), _f(r["e2ft_ms"]["p99"]), _f(r["engine_e2ft_ms"]["p50"]),
            _f(r["engine_e2ft_ms"]["p99"]), _f(r["session_tok_s"]["p50"], 1), _f(r["agg_tok_s_decoding"], 1),
            _f(r["agg_tok_s_run"], 1), _f(r["encoder_rtf"], 3), _f(None if r["engine_busy"] is None else
                                                                   100 * r["engine_busy"]) + "%",
            _f(None if r["encoder_share"] is None else 100 * r["encoder_share"]) + "%",
            _f(None if r.get("llm_share") is None else 100 * r["llm_share"]) + "%", _f(r["client_lag_ms_p99"])]


def format_table(results: Sequence[dict]) -> str:
    rows = [list(COLUMNS)] + [_row(r) for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(results: Sequence[dict]) -> Dict[int, Optional[float]]:
    """Per N: batched / round-robin aggregate tokens/s (while decoding)."""
    by = {(r["mode"], r["streams"]): r for r in results}
    out = {}
    for n in sorted({r["streams"] for r in results}):
        b, rr = by.get(("batched", n)), by.get(("round-robin", n))
        if b and rr and b["agg_tok_s_decoding"] and rr["agg_tok_s_decoding"]:
            out[n] = b["agg_tok_s_decoding"] / rr["agg_tok_s_decoding"]
        else:
            out[n] = None
    return out


# -- entry points ------------------------------------------------------------------------------
def run_load(model, tokenizer, streamer, *, streams: Sequence[int], duration: float,
             modes: Sequence[str] = MODES, budget_ms: float = 1000.0, silence_ms: int = 500,
             max_batch: Optional[int] = None, max_tokens: int = 64, instructions: Optional[str] = None,
             max_positions: Optional[int] = None, reply_tok_s: float = 0.0, utterances=None, warm: bool = True,
             verbose: bool = True) -> dict:
    """The whole benchmark on a model already built; returns the report dict
    (results per mode and N, ratios, notes)."""
    from agent.realtime.engine import Engine

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    notes = []
    note = None
    if utterances is None:
        utterances, note = synthesize_utterances()
        if note:
            notes.append(note)
            if verbose:
                print(f"NOTE: {note}", flush=True)
    if "batched" in modes and engine_kwargs(Engine, "batched", 1, max_batch) is None:
        notes.append("this Engine has no llm_batching switch (only its round-robin LLM path): batched mode skipped")
        if verbose:
            print(f"NOTE: {notes[-1]}", flush=True)
    if warm:
        warm_up(model, tokenizer, streamer, utterances, note, silence_ms, max_tokens, modes, max_positions)
    results = []
    for n in streams:
        for mode in modes:
            r = run_one(model, tokenizer, streamer, utterances, note, mode=mode, streams=n, duration=duration,
                        budget_ms=budget_ms, silence_ms=silence_ms, max_batch=max_batch, max_tokens=max_tokens,
                        instructions=instructions, max_positions=max_positions, reply_tok_s=reply_tok_s,
                        verbose=verbose)
            if r is not None:
                results.append(r)
    return {"streams": list(streams), "duration_s": duration, "modes": [r for r in modes], "budget_ms": budget_ms,
            "silence_ms": silence_ms, "max_tokens": max_tokens, "reply_tok_s": reply_tok_s, "utterance_s": [round(u.size / SR, 2) for u in utterances],
            "speech": "espeak-ng" if note is None else "speech_like", "notes": notes,
            "results": results, "ratios": {str(k): v for k, v in ratios(results).items()}}


def load(args) -> dict:
    """`python -m agent.bench load`."""
    from agent.bench import build_streaming, describe_device

    streams = [int(s) for s in str(args.streams).split(",") if s.strip()]
    if not streams or min(streams) < 1:
        raise SystemExit(f"--streams: positive integers, comma separated; got {args.streams!r}")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--mode: choose from {','.join(MODES)}; got {bad}")
    if args.duration <= 0:
        raise SystemExit("--duration must be > 0 seconds")
    if args.reply_tok_s < 0:
        raise SystemExit(f"--reply-tok-s must be >= 0 (0: unpaced); got {args.reply_tok_s:g}")
    inference, tokenizer, streamer, params = build_streaming(args)
    print(f"NEST {args.nest} streaming ({streamer.describe()}), LLM {args.llm} ({params:.0f}M params), "
          f"{describe_device(inference.model)}, {torch.get_num_threads()} threads; streams {streams}, "
          f"{args.duration:g} s each, modes {modes}, replies "
          f"{'paced at %g tok/s' % args.reply_tok_s if args.reply_tok_s else 'unpaced'}, budget {args.budget_ms:g} ms + {args.silence_ms} ms VAD silence",
          flush=True)
    report = run_load(inference.model, tokenizer, streamer, streams=streams, duration=args.duration, modes=modes,
                      budget_ms=args.budget_ms, silence_ms=args.silence_ms, max_batch=args.max_batch,
                      max_tokens=args.max_tokens, max_positions=args.max_positions, reply_tok_s=args.reply_tok_s,
                      warm=not args.no_warm_up)
    report.update({"nest": args.nest, "llm": args.llm, "device": args.device, "dtype": args.dtype,
                   "chunk_ms": int(round(streamer.chunk_ms)), "threads": torch.get_num_threads()})
    print("\n" + format_table(report["results"]))
    for n, ratio in report["ratios"].items():
        if ratio is not None:
            print(f"N={n}: batched / round-robin aggregate tok/s (while decoding) = {ratio:.2f}x")
    print(f"on time: first text delta within {args.silence_ms} ms VAD silence + {args.budget_ms:g} ms of the last "
          f"speech packet sent. e2ft: that delay (client side, includes the silence); eng: the engine's "
          f"speech_end_to_first_token. tok/s/sess: p50 over replies; agg: all tokens / time with >= 1 reply "
          f"decoding; run: all tokens / run time. enc RTF: encoder seconds per audio second; busy: engine "
          f"thread in working ticks / wall; enc%: the encoder's share of that; llm%: the batched LLM forwards' share "
          f"(batched mode); lag: how late the client sent packets (ms).")
    unknown = sum(r["first_token_unknown"] for r in report["results"])
    if unknown:
        print(f"NOTE: {unknown} turns had no first token by the end of their run (no text delta, no "
              f"response.done): counted as late")
    estimated = sum(r["first_token_from_engine"] for r in report["results"])
    if estimated:
        print(f"NOTE: {estimated} replies sent no text delta (their tokens decode to no text): their first token "
              f"is response.done's arrival minus the engine's first_token_to_last_token")
    for note in report["notes"]:
        print(f"NOTE: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"wrote {args.json}")
    return report


def add_arguments(p) -> None:
    p.add_argument("--streams", default="1,4,8,16", help="numbers of concurrent streams, comma separated")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per mode and N")
    p.add_argument("--mode", default="batched,round-robin", help="batched, round-robin or both (comma separated)")
    p.add_argument("--budget-ms", type=float, default=1000.0, help="on time: first token within VAD silence + this")
    p.add_argument("--silence-ms", type=int, default=500, help="the server VAD's silence_duration_ms")
    p.add_argument("--max-tokens", type=int, default=64, help="max_output_tokens per reply")
    p.add_argument("--max-batch", type=int, default=None, help="Engine max_batch (default: N)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="each session's LLM context (Engine max_positions; default: the engine's)")
    p.add_argument("--reply-tok-s", type=float, default=0.0,
                   help="Engine reply_tok_s: pace replies while another stream's turn is open (serve.py's default "
                        "is 15; default here 0, unpaced, so the decode throughput is what is measured)")
    p.add_argument("--no-warm-up", action="store_true", help="skip the one-turn warm-up before the runs")
    p.add_argument("--json", default=None, help="write the report here")
