"""Chunk-size profiler: what each encoder chunk size costs in felt latency, in accuracy and in
compute, measured against a running nestvox server.

    python clients/profile.py --chunks 80,160,320,640 --manifest test.jsonl --plot profile.png
    python clients/profile.py --chunks 160,320 --manifest test.jsonl --callers 4 --json   # + compute under load
    python clients/profile.py --chunks 160,320 --repeats 5 --wav question.wav --turns manual --audio
    python clients/profile.py --speed 0 ...                                  # as fast as possible (not felt latency)

For every chunk size, every utterance (each line of --manifest, or --repeats turns of --wav /
a sentence spoken by espeak-ng) is one turn on a FRESH connection, exactly as clients/score.py
runs it: a GA session.update (nestvox.chunk_ms, audio.input.format rate 16000, the turn mode,
with --audio output_modalities ["audio"]), then the audio at --speed x real time (1 by
default: the pace of a caller, so the encoder waits for its chunks to fill as it would in a
call) in --packet-ms packets, then the end of the turn:

  manual   input_audio_buffer.commit + response.create right after the last packet
  vad      silence (the VAD's silence_duration_ms + 300 ms) until the server's VAD ends the turn

--turns manual,vad (the default) runs both, one after the other, for each chunk size.

Latency, what a caller feels (p50 / p90 over the turns; numpy's linear interpolation):

  e2ft        server: end of speech -> first token (response.done latency_ms.speech_end_to_first_token)
  1st text    client: end of speech -> the first response.output_text.delta arrives
  1st audio   with --audio, client: end of speech -> the first response.output_audio.delta arrives
              (server: speech_end_to_first_audio, in the JSON)

"end of speech": manual turns: the server's is the commit's arrival, the client's the moment
the last audio packet left (commit and response.create follow at once), so both share a
reference point. vad turns: the server's is its VAD decision; the client's is the moment it
sent the audio where, by the server's speech_stopped.audio_end_ms, the caller stopped talking.
The client figures of vad turns therefore INCLUDE the VAD's silence window (500 ms by default):
that wait is part of what a caller of a server-VAD session feels. "algo" is the server's stated
algorithmic latency of the chunk (chunk + look-ahead, session.updated
nestvox.algorithmic_latency_ms): how far the encoder lags the audio while the caller speaks.

Accuracy (--manifest M.jsonl, NeMo-style lines with audio_filepath and answer, or text; intent
optional): the replies' exact match per intent and overall, per chunk size and turn mode,
scored by clients/score.py's code (record_of, agent.training.evaluate.score): the same figure as
`python clients/score.py M.jsonl --chunk-ms C [--manual]` on the same manifest and chunk size.

Compute (the server's /metrics, read before and after each chunk size's turns):
  RTF@1       encoder seconds per second of audio encoded at that chunk size
              (nestvox_encoder_seconds_total / nestvox_encoder_audio_seconds_total), one caller
  batch@1     mean encoder batch size (nestvox_encoder_batch_size _sum / _count)
  RTF@N, batch@N, e2ft@N   with --callers N (N > 1): N concurrent real-time callers (loopback
              only, as clients/load.py), each --load-turns turns at that chunk size
              (server VAD when --turns has vad, else manual), staggered over one utterance

The table has one row per chunk size and turn mode; --manifest adds the per-intent accuracy
table; --plot PATH (PNG) draws felt latency (client end of speech -> first text delta, or first
audio with --audio; p50 marker, whisker to p90) against accuracy: each chunk size a point
labelled with its ms, one marker shape per turn mode, the Pareto frontier of each mode (lower
latency and higher accuracy) drawn, the colour the encoder's RTF at batch 1. Without --manifest
the plot is latency against chunk size. --json prints the whole report (rows, per-turn figures,
accuracy tables, compute) as one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as `python clients/profile.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    MODEL_RATE,
    ClientError,
    ServerRefused,
    ServerUnreachable,
    TurnFailed,
    TurnResult,
    UpdateRefused,
    add_connection_args,
    connect,
    format_table,
    http_get,
    metric_value,
    parse_metrics,
    percentile,
    read_audio,
    reply_audio,
    run_turn,
    setup_stdout,
    synthesize_speech,
    token_from,
)

DEFAULT_CHUNKS = (80, 160, 320, 640, 1280)
DEFAULT_TEXT = "please turn on the lights in the kitchen and set a timer for ten minutes"
TURN_MODES = ("manual", "vad")
FIGURES = (  # key in a turn, label, where it comes from
    ("e2ft", "end of speech -> first token (server)", "server"),
    ("flush", "end of speech -> encoder done (server)", "server"),
    ("e2fa", "end of speech -> first audio (server)", "server"),
    ("created", "end of speech -> response.created (client)", "client"),
    ("first_delta", "end of speech -> first text delta (client)", "client"),
    ("first_audio", "end of speech -> first audio delta (client)", "client"),
)
SECONDS = "nestvox_encoder_seconds_total"
AUDIO_SECONDS = "nestvox_encoder_audio_seconds_total"
BATCH = "nestvox_encoder_batch_size"


# -- one turn ---------------------------------------------------------------------------
def turn_figures(result: TurnResult) -> Dict[str, Optional[float]]:
    lat, cli = result.latency_ms, result.client_ms
    return {"e2ft": lat.get("speech_end_to_first_token"), "flush": lat.get("speech_end_to_encoder_done"),
            "e2fa": lat.get("speech_end_to_first_audio"), "created": cli.get("end_to_created"),
            "first_delta": cli.get("end_to_first_delta"), "first_audio": cli.get("end_to_first_audio")}


def pacing(send_log: Sequence[tuple], first: int, start: float, start_ms: float, speed: float) -> Dict[str, float]:
    """How the turn's packets (send_log[first:]: (stream ms at a packet's end, perf_counter when
    sent)) kept to the schedule. ahead_ms: the most any packet left before its audio was due
    (its first sample's time / speed after `start`; <= 0: never faster than real time);
    send_s: first packet to last."""
    ahead, prev = -math.inf, start_ms
    log = list(send_log[first:])
    for stream_ms, sent in log:
        if speed > 0:
            ahead = max(ahead, 1000.0 * (start + (prev - start_ms) / 1000.0 / speed - sent))
        prev = stream_ms
    return {"ahead_ms": round(ahead, 3) if log and speed > 0 else None,
            "send_s": round(log[-1][1] - start, 4) if log else 0.0}


async def run_one(url: str, token: Optional[str], chunk: int, mode: str, path: str, *, speed: float,
                  packet_ms: float, fields: dict, timeout: float, audio_cache: dict) -> tuple:
    """One turn on a fresh connection -> (TurnResult, session, pacing). UpdateRefused when the
    server does not run `chunk` (or the other fields)."""
    async with await connect(url, token) as conn:
        await conn.update(chunk_ms=chunk, rate=MODEL_RATE, manual=mode == "manual", **fields)
        key = (path, conn.rate)
        if key not in audio_cache:
            audio_cache[key] = read_audio(path, conn.rate)
        first, start_ms = len(conn.send_log), conn.sent_ms
        start = time.perf_counter()
        result = await run_turn(conn, audio_cache[key], packet_ms=packet_ms, speed=speed, timeout=timeout)
        return result, conn.session, pacing(conn.send_log, first, result.stamps.get("start", start), start_ms,
                                            speed)


# -- compute: /metrics ------------------------------------------------------------------
def read_counters(url: str, token: Optional[str], chunk: int) -> Optional[dict]:
    """The encoder's counters for one chunk size from /metrics (0 before its first encoder step;
    `exported`: whether the server exports them at all). None: the server has no /metrics."""
    try:
        metrics = parse_metrics(http_get(url, "/metrics", token))
    except ServerRefused:  # no /metrics on this server (HTTP 404, ...): no compute figures
        return None
    label = {"chunk_ms": str(chunk)}
    return {"exported": SECONDS in metrics,
            "seconds": metric_value(metrics, SECONDS, **label) or 0.0,
            "audio_seconds": metric_value(metrics, AUDIO_SECONDS, **label) or 0.0,
            "batch_sum": metric_value(metrics, BATCH + "_sum", **label) or 0.0,
            "batch_count": metric_value(metrics, BATCH + "_count", **label) or 0.0}


def compute_between(before: Optional[dict], after: Optional[dict], wall_s: float) -> Optional[dict]:
    """Encoder seconds per second of audio (rtf) and mean batch size between two readings
    (None when the server does not export the encoder's counters)."""
    if before is None or after is None or not after["exported"]:
        return None
    d = {k: after[k] - before[k] for k in before if k != "exported"}
    return {"encoder_s": round(d["seconds"], 4), "audio_s": round(d["audio_seconds"], 3),
            "rtf": round(d["seconds"] / d["audio_seconds"], 5) if d["audio_seconds"] > 0 else None,
            "steps": int(d["batch_count"]),
            "mean_batch": round(d["batch_sum"] / d["batch_count"], 3) if d["batch_count"] > 0 else None,
            "wall_s": round(wall_s, 2)}


def server_model(url: str, token: Optional[str]) -> Optional[str]:
    """The model the server serves (/healthz); ServerUnreachable when nothing listens."""
    try:
        return json.loads(http_get(url, "/healthz", token)).get("model")
    except ServerUnreachable:
        raise
    except (ClientError, ValueError, AttributeError):
        return None


# -- the sweep --------------------------------------------------------------------------
def summarize(turns: List[dict]) -> Dict[str, dict]:
    return {key: {"p50": percentile([t.get(key) for t in turns], 50),
                  "p90": percentile([t.get(key) for t in turns], 90)} for key, _, _ in FIGURES}


def accuracy_of(records: List[dict]) -> Optional[dict]:
    """score.py's table of these records (agent.training.evaluate.score)."""
    if not records:
        return None
    from agent.training.evaluate import score

    return dict(score(records))


async def load_phase(url: str, token: Optional[str], chunk: int, callers: int, clips: List[str], turns: int,
                     mode: str, *, speed: float, packet_ms: float, fields: dict, timeout: float,
                     audio_cache: dict, clip_seconds: float) -> dict:
    """`callers` concurrent callers, each `turns` real-time turns (fresh connections) at `chunk`."""
    from clients.load import check_target

    check_target(url, callers, 3600)
    figures: List[dict] = []
    errors: List[dict] = []
    stagger = min(clip_seconds, 2.0) / callers

    async def caller(i: int) -> None:
        await asyncio.sleep(i * stagger)
        for k in range(turns):
            path = clips[(i + k) % len(clips)]
            try:
                result, _, _ = await run_one(url, token, chunk, mode, path, speed=speed, packet_ms=packet_ms,
                                             fields=fields, timeout=timeout, audio_cache=audio_cache)
            except (ServerRefused, TurnFailed, UpdateRefused) as exc:
                errors.append({"caller": i, "code": exc.code, "message": str(exc)})
                return
            figures.append(turn_figures(result))

    before = await asyncio.to_thread(read_counters, url, token, chunk)
    t0 = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    wall = time.monotonic() - t0
    after = await asyncio.to_thread(read_counters, url, token, chunk)
    return {"callers": callers, "turn_mode": mode, "turns": len(figures), "errors": errors,
            "compute": compute_between(before, after, wall), **summarize(figures)}


async def profile(url: str, audio_path: Optional[str] = None, chunks: Sequence[int] = DEFAULT_CHUNKS,
                  repeats: Optional[int] = None, *, items: Optional[List[dict]] = None,
                  turns: Sequence[str] = TURN_MODES, token: Optional[str] = None, speed: float = 1.0,
                  packet_ms: float = 20.0, audio: bool = False, voice: Optional[str] = None, callers: int = 1,
                  load_turns: int = 8, timeout: float = 60.0,
                  progress: Optional[Callable[..., None]] = None) -> dict:
    """The report: {url, model, speed, packet_ms, turn_modes, spoken, callers, utterances,
    speech_s, manifest, rows}. One row per chunk size: {chunk_ms, algorithmic_latency_ms,
    error, modes: {mode: {n, failed, turns: [per-turn figures, pacing, prediction],
    e2ft/flush/e2fa/created/first_delta/first_audio: {p50, p90}, accuracy, correct, scored,
    table (score.py's, per intent)}}, compute: {batch1: {encoder_s, audio_s, rtf, steps,
    mean_batch, wall_s}, load: {callers, turns, errors, compute, figures p50/p90} | None}}.
    `items` (a manifest, see clients.score.read_items) or `audio_path` x `repeats`. A chunk size
    the server refuses gets its `error` (the server's message) and no turns."""
    turns = tuple(turns)
    if not turns or any(m not in TURN_MODES for m in turns):
        raise ClientError(f"turn modes must be among {','.join(TURN_MODES)}, got {','.join(turns) or 'none'}")
    if speed < 0:
        raise ClientError(f"speed must be >= 0 (0: as fast as possible), got {speed}")
    if packet_ms <= 0:
        raise ClientError(f"packet_ms must be > 0, got {packet_ms}")
    if callers < 1 or load_turns < 1:
        raise ClientError("callers and load_turns must be >= 1")
    if callers > 1 and speed <= 0:
        raise ClientError("--callers needs real-time callers (speed > 0)")
    if items is None:
        if audio_path is None:
            raise ClientError("give a manifest (items) or an audio file")
        repeats = 3 if repeats is None else repeats
        if repeats < 1:
            raise ClientError("repeats must be >= 1")
        items = [{"audio_filepath": audio_path, "answer": None, "intent": None}] * repeats
        scored = False
    else:
        scored = True
        items = [it for _ in range(repeats or 1) for it in items]
    for it in items:
        if not os.path.isfile(it["audio_filepath"]):
            raise ClientError(f"no such audio file: {it['audio_filepath']}")
    fields = {k: v for k, v in reply_audio(voice=voice).items() if v is not None} if audio else {}
    audio_cache: dict = {}
    for it in items:  # read every file once up front: a bad file fails before any turn
        audio_cache.setdefault((it["audio_filepath"], MODEL_RATE), read_audio(it["audio_filepath"], MODEL_RATE))
    speech_s = sum(audio_cache[(it["audio_filepath"], MODEL_RATE)].size for it in items) / MODEL_RATE
    clips = list(dict.fromkeys(it["audio_filepath"] for it in items))
    clip_seconds = speech_s / len(items)
    load_mode = "vad" if "vad" in turns else "manual"
    report = {"url": url, "model": await asyncio.to_thread(server_model, url, token), "speed": speed,
              "packet_ms": packet_ms, "turn_modes": list(turns), "spoken": audio, "callers": callers,
              "load_turns": load_turns if callers > 1 else None, "load_turn_mode": load_mode if callers > 1 else None,
              "utterances": len(items), "speech_s": round(speech_s, 2), "scored": scored, "rows": []}
    if scored:
        from clients.score import record_of
    for chunk in chunks:
        row: dict = {"chunk_ms": chunk, "algorithmic_latency_ms": None, "error": None,
                     "modes": {m: {"n": 0, "failed": 0, "turns": []} for m in turns},
                     "compute": {"batch1": None, "load": None}}
        report["rows"].append(row)
        before = await asyncio.to_thread(read_counters, url, token, chunk)
        t0 = time.monotonic()
        for mode in turns:
            out = row["modes"][mode]
            records = []
            for i, it in enumerate(items):
                turn: dict = {"index": i, "audio_s": round(audio_cache[(it["audio_filepath"], MODEL_RATE)].size
                                                            / MODEL_RATE, 3)}
                try:
                    result, session, paced = await run_one(url, token, chunk, mode, it["audio_filepath"],
                                                           speed=speed, packet_ms=packet_ms, fields=fields,
                                                           timeout=timeout, audio_cache=audio_cache)
                except UpdateRefused as exc:  # a chunk size this server does not run: its own message
                    row["error"] = str(exc)
                    break
                except TurnFailed as exc:  # this turn only (a VAD that heard no end, a timeout): counted wrong
                    turn.update({"error": f"{exc.code}: {exc}", "prediction": ""})
                    out["failed"] += 1
                else:
                    row["algorithmic_latency_ms"] = (session.get("nestvox") or {}).get("algorithmic_latency_ms")
                    turn.update(turn_figures(result))
                    turn.update(paced)
                    turn["prediction"] = result.text
                    out["n"] += 1
                if scored:
                    record = record_of(it, turn["prediction"])
                    records.append(record)
                    from agent.training.evaluate import exact_match

                    turn.update({"answer": it["answer"], "intent": it["intent"],
                                 "correct": exact_match(turn["prediction"], it["answer"])})
                out["turns"].append(turn)
                if progress is not None:
                    progress(chunk, mode, i, len(items), turn)
            if row["error"]:
                break
            out.update(summarize([t for t in out["turns"] if "error" not in t]))
            table = accuracy_of(records) if scored else None
            out["table"] = table
            out["accuracy"] = table["overall"]["accuracy"] if table else None
            out["correct"] = table["overall"]["correct"] if table else None
            out["scored"] = table["overall"]["n"] if table else None
        if row["error"]:
            row["modes"] = {}
            continue
        after = await asyncio.to_thread(read_counters, url, token, chunk)
        row["compute"]["batch1"] = compute_between(before, after, time.monotonic() - t0)
        if callers > 1:
            if progress is not None:
                progress(chunk, f"load x{callers}", None, None, None)
            row["compute"]["load"] = await load_phase(
                url, token, chunk, callers, clips, load_turns, load_mode, speed=speed, packet_ms=packet_ms,
                fields=fields, timeout=timeout, audio_cache=audio_cache, clip_seconds=clip_seconds)
    return report


# -- output -----------------------------------------------------------------------------
def felt_key(report: dict) -> str:
    """The felt-latency figure of the plot: the first audio delta for spoken replies, else the first text delta."""
    return "first_audio" if report.get("spoken") else "first_delta"


def table(report: dict) -> str:
    spoken, scored = report.get("spoken"), report.get("scored")
    load_n = report.get("callers") if (report.get("callers") or 1) > 1 else None
    headers = ["chunk ms", "turns", "n", "algo", "e2ft p50", "p90", "1st text p50", "p90"]
    if spoken:
        headers += ["1st audio p50", "p90"]
    if scored:
        headers += ["exact %"]
    headers += ["RTF@1", "batch@1"]
    if load_n:
        headers += [f"RTF@{load_n}", f"batch@{load_n}", f"e2ft@{load_n} p50"]
    lines, errors = [], []
    for row in report["rows"]:
        if row["error"]:
            errors.append(f"chunk {row['chunk_ms']} ms: {row['error']}")
            continue
        b1 = row["compute"]["batch1"] or {}
        load = row["compute"]["load"] or {}
        lc = load.get("compute") or {}
        for mode, m in row["modes"].items():
            cells = [row["chunk_ms"], mode, m["n"], row["algorithmic_latency_ms"],
                     m["e2ft"]["p50"], m["e2ft"]["p90"], m["first_delta"]["p50"], m["first_delta"]["p90"]]
            if spoken:
                cells += [m["first_audio"]["p50"], m["first_audio"]["p90"]]
            if scored:
                cells += [None if m["accuracy"] is None else round(100 * m["accuracy"], 1)]
            cells += [b1.get("rtf"), b1.get("mean_batch")]
            if load_n:
                cells += [lc.get("rtf"), lc.get("mean_batch"), (load.get("e2ft") or {}).get("p50")]
            lines.append(cells)
    text = format_table(headers, [[f"{c:.3f}" if isinstance(c, float) and h.startswith(("RTF", "batch")) else c
                                   for h, c in zip(headers, r)] for r in lines])
    for row in report["rows"]:
        for mode, m in row.get("modes", {}).items():
            for t in m["turns"]:
                if "error" in t:
                    errors.append(f"chunk {row['chunk_ms']} ms {mode} turn {t['index'] + 1}: {t['error']}")
        for e in ((row["compute"].get("load") or {}).get("errors") or []):
            errors.append(f"chunk {row['chunk_ms']} ms load caller {e['caller']}: {e['code']}: {e['message']}")
    return text + ("\n" + "\n".join(errors) if errors else "")


def intent_table(report: dict) -> Optional[str]:
    """score.py's per-intent table, one column per chunk size and turn mode."""
    from agent.training.evaluate import format_table as markdown

    tables = {f"{row['chunk_ms']} ms {mode}": m["table"] for row in report["rows"] if not row["error"]
              for mode, m in row["modes"].items() if m.get("table")}
    return markdown(tables) if tables else None


def pareto(points: List[tuple]) -> List[tuple]:
    """The (latency, accuracy, ...) points no other point beats on both (lower latency, higher
    accuracy), sorted by latency."""
    front = [p for p in points if not any((q[0] <= p[0] and q[1] >= p[1]) and (q[0] < p[0] or q[1] > p[1])
                                          for q in points)]
    return sorted(front, key=lambda p: (p[0], -p[1]))


def plot(report: dict, path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    key = felt_key(report)
    rows = [r for r in report["rows"] if not r["error"] and any(m["n"] for m in r["modes"].values())]
    if not rows:
        raise ClientError("nothing to plot: no chunk size produced a turn")
    rtfs = [(r["compute"]["batch1"] or {}).get("rtf") for r in rows]
    known = [x for x in rtfs if x is not None]
    norm = matplotlib.colors.Normalize(vmin=min(known) if known else 0, vmax=max(known) if known else 1)
    if known and norm.vmin == norm.vmax:
        norm = matplotlib.colors.Normalize(vmin=norm.vmin * 0.9, vmax=norm.vmax * 1.1 + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    markers = {"manual": "o", "vad": "s"}
    styles = {"manual": "-", "vad": "--"}
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    scored = report.get("scored")
    handles = []
    span = 0.07 * max([m[key]["p90"] or 0 for r in rows for m in r["modes"].values()] + [1])  # labels stack
    for mode in report["turn_modes"]:
        points = []
        for r, rtf in zip(rows, rtfs):
            m = r["modes"].get(mode)
            if not m or m[key]["p50"] is None:
                continue
            y = 100 * m["accuracy"] if scored and m["accuracy"] is not None else None
            x50, x90 = m[key]["p50"], m[key]["p90"]
            colour = cmap(norm(rtf)) if rtf is not None else "lightgrey"
            if scored:
                ax.plot([x50, x90], [y, y], "-", color=colour, alpha=0.6, lw=2, zorder=2)
                ax.scatter([x50], [y], s=110, marker=markers[mode], color=colour, edgecolors="black", zorder=3)
                near = sum(1 for p in points if abs(p[0] - x50) < span and abs(p[1] - y) < 2)
                ax.annotate(f"{r['chunk_ms']}", (x50, y), textcoords="offset points", xytext=(7, 7 + 11 * near),
                            fontsize=9)
                points.append((x50, y))
            else:
                ax.plot([r["chunk_ms"]] * 2, [x50, x90], "-", color=colour, alpha=0.6, lw=2, zorder=2)
                ax.scatter([r["chunk_ms"]], [x50], s=110, marker=markers[mode], color=colour, edgecolors="black",
                           zorder=3)
                points.append((r["chunk_ms"], x50))
        if scored and points:
            front = pareto([p[:2] for p in points])
            ax.plot([p[0] for p in front], [p[1] for p in front], styles[mode], color="black", alpha=0.5, lw=1,
                    zorder=1)
        elif points:
            ax.plot([p[0] for p in points], [p[1] for p in points], styles[mode], color="black", alpha=0.4, lw=1)
        handles.append(Line2D([], [], marker=markers[mode], color="black", linestyle=styles[mode],
                              markerfacecolor="white", label=f"{mode} turns" + (" (Pareto frontier)" if scored else "")))
    felt = "first audio delta" if key == "first_audio" else "first text delta"
    if scored:
        ax.set_xlabel(f"felt latency: end of speech -> {felt} (client, ms; marker p50, whisker to p90)")
        ax.set_ylabel("exact match (%)")
        ax.set_xlim(left=0)
        ys = [100 * m["accuracy"] for r in rows for m in r["modes"].values() if m.get("accuracy") is not None]
        if ys:
            ax.set_ylim(max(0.0, min(ys) - 5), min(100.0, max(ys)) + 3)
    else:
        ax.set_xscale("log", base=2)
        xs = [r["chunk_ms"] for r in rows]
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("encoder chunk (ms)   (no --manifest: accuracy not measured)")
        ax.set_ylabel(f"end of speech -> {felt} (client, ms; marker p50, whisker to p90)")
        ax.set_ylim(bottom=0)
    if known:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        bar.set_label("compute: encoder s per s of audio (RTF, one caller)")
    if not title:
        model = os.path.basename(str(report.get("model") or "").rstrip("/")) or "?"
        pace = "as fast as possible" if not report.get("speed") else f"{report['speed']:g}x real time"
        title = (f"nestvox: latency vs {'accuracy' if scored else 'chunk size'} per encoder chunk (labels: chunk ms)"
                 f"\nmodel {model}, {report.get('utterances')} turns per point, {pace}")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# -- command line -----------------------------------------------------------------------
def parse_chunks(text: str) -> List[int]:
    try:
        chunks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunks must be comma-separated integers (ms), got {text!r}") from None
    if not chunks or any(c <= 0 for c in chunks):
        raise argparse.ArgumentTypeError(f"--chunks must list positive sizes in ms, got {text!r}")
    return chunks


def parse_turns(text: str) -> List[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in TURN_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"--turns lists turn modes among {','.join(TURN_MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--chunks", type=parse_chunks, default=list(DEFAULT_CHUNKS),
                   help="chunk sizes in ms (default 80,160,320,640,1280; the server offers --chunk-sizes-ms)")
    p.add_argument("--manifest", default=None,
                   help="JSONL manifest (audio_filepath, answer or text[, intent]): accuracy per chunk size")
    p.add_argument("--limit", type=int, default=None, help="first N manifest utterances only")
    p.add_argument("--repeats", type=int, default=None,
                   help="turns of --wav per chunk size and mode (default 3); with --manifest: passes (default 1)")
    p.add_argument("--wav", default=None, help="audio to send without --manifest (default: espeak-ng speaks --text)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="sentence for espeak-ng when neither --manifest nor --wav")
    p.add_argument("--turns", type=parse_turns, default=list(TURN_MODES),
                   help="turn modes, in order: manual (commit), vad (server VAD); default manual,vad")
    p.add_argument("--speed", type=float, default=1.0,
                   help="x real time (default 1: felt latency); 0 = as fast as possible")
    p.add_argument("--packet-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--audio", action="store_true", help="spoken replies: latency to the first audio delta")
    p.add_argument("--voice", default=None, help="voice of the spoken replies (default: the server's)")
    p.add_argument("--callers", type=int, default=1,
                   help="N > 1: also compute under N concurrent real-time callers per chunk size (loopback only)")
    p.add_argument("--load-turns", type=int, default=8, help="turns per caller in the --callers run (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each response.done")
    p.add_argument("--plot", default="profile.png", help="PNG plot path (default profile.png; '' for none)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON (last on stdout)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    if args.speed < 0 or (args.repeats is not None and args.repeats < 1) or args.callers < 1:
        print("profile.py: --speed must be >= 0, --repeats and --callers >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nestvox-profile-") as tmp:
        try:
            items = None
            if args.manifest:
                from clients.score import read_items

                items = read_items(args.manifest, args.limit)
                wav, source = None, f"{args.manifest} ({len(items)} utterances)"
            else:
                if args.wav and not os.path.isfile(args.wav):
                    raise ClientError(f"no such file: {args.wav}")
                wav = args.wav or synthesize_speech(args.text, tmp)
                source = os.path.basename(args.wav) if args.wav else "espeak-ng"
            pace = "as fast as possible" if args.speed == 0 else f"{args.speed:g}x real time"
            print(f"profiling {args.url}: chunks {','.join(map(str, args.chunks))} ms, {source} at {pace}, "
                  f"{'/'.join(args.turns)} turns" + (", spoken replies" if args.audio else "")
                  + (f", then {args.callers} callers" if args.callers > 1 else ""), flush=True)

            def progress(chunk, mode, i, n, turn):
                if turn is None:
                    print(f"  chunk {chunk} ms: {mode} ...", file=sys.stderr, flush=True)
                    return
                what = turn.get("error") or (f"e2ft {turn.get('e2ft')} ms, 1st text {turn.get('first_delta')} ms"
                                             + (f", exact {turn['correct']}" if "correct" in turn else ""))
                print(f"  chunk {chunk} ms {mode} {i + 1}/{n}: {what}", file=sys.stderr, flush=True)

            report = asyncio.run(profile(args.url, wav, args.chunks, args.repeats, items=items, turns=args.turns,
                                         token=token_from(args), speed=args.speed, packet_ms=args.packet_ms,
                                         audio=args.audio, voice=args.voice, callers=args.callers,
                                         load_turns=args.load_turns, timeout=args.timeout, progress=progress))
            report["manifest"] = args.manifest
        except (ClientError, OSError) as exc:
            print(f"profile.py: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    print(table(report))
    print("ms; algo: the server's algorithmic latency; e2ft: server end of speech -> first token; 1st text"
          + ("/1st audio" if args.audio else "") + ": client end of speech -> first delta (vad turns: incl. the "
          "VAD silence window); RTF: encoder s per s of audio (/metrics); batch: mean encoder batch")
    if report["scored"]:
        print(intent_table(report))
    if report["model"]:
        print(f"model: {report['model']}")
    if args.plot:
        try:
            plot(report, args.plot)
        except ClientError as exc:
            print(f"profile.py: {exc}", file=sys.stderr)
            return 1
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(report, indent=1))
    ok = any(not r["error"] for r in report["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
