"""Load generator: N simulated callers talking to a nestvox server on THIS machine.

    python clients/load.py --callers 8 --duration 30
    python clients/load.py --url ws://127.0.0.1:9000/v1/realtime --callers 32 --duration 60 --budget-ms 1000 --json
    python clients/load.py --callers 8 --duration 30 --audio             # every caller asks for spoken replies
    python clients/load.py --callers 8 --duration 30 --audio-callers 4   # 4 spoken, 4 written: compare the two

Each caller opens one conversation (server VAD, the server's defaults; its GA
session.update declares 16 kHz audio, the model's rate) and, in a loop,
streams the same utterance (--wav, or a sentence spoken by espeak-ng) at real
time in --packet-ms packets, then silence until the server's VAD ends the
turn, and waits for response.done before speaking again (it sends nothing
while the reply runs). Caller starts are staggered over one utterance so their
turns do not all end in the same instant.

The run is bounded: no caller starts a turn that cannot finish before
--duration (audio + trailing silence + budget), each turn has --turn-timeout,
and whatever is still running at --duration is cancelled and counted as cut.
Only loopback servers (127.0.0.0/8, ::1, localhost) are accepted: this tool
generates load; pointing it at someone else's server is refused.

--audio: every caller asks for spoken replies (session.update output_modalities
["audio"], 24 kHz PCM16, --voice); --audio-callers K: only the first K do, the
others stay text-only, so one run shows the text sessions' decoding next to the
spoken ones. A spoken caller receives (and decodes) the whole reply audio but does
not wait for it to play: it speaks again at response.done, as a text caller does,
so both modes put the same turn rate on the engine. Decode speed (tok/s) and
first-token latency are read from response.done (latency_ms) in both modes, the
same way; spoken turns add first-audio latency.

Reported:
  sustained   callers that completed at least one turn, every completed turn on
              time, and no failed turn. On time: the first text delta (spoken
              replies: the first audio delta) arrived within silence_duration_ms
              + --budget-ms of the moment the caller sent the audio where its
              speech ended (the VAD silence window is inherent to server-VAD
              turns; the budget is what the server adds).
  refused     connections the server turned away: server_full error events,
              close code 1013, HTTP 429/503 (a refused caller does not retry).
  errors      everything else: unreachable, error events, dropped connections,
              turn timeouts.
  latency     p50/p90/p99 over all completed turns of: server end of speech ->
              first token and -> encoder done (response.done latency_ms); client
              speech end sent -> first delta (includes the silence window) and
              speech_stopped received -> first delta; with spoken replies also
              server end of speech -> first audio (speech_end_to_first_audio)
              and client speech end sent -> first audio delta.
  reply speed (output tokens - 1) / first token -> last token, per reply.
  by mode     with --audio-callers: all of the above per mode (text / audio).

Importable: `report = await run_load(url, callers=4, duration=20)` (a dict; see
run_load) and `print(format_report(report))`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as `python clients/load.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    MODEL_RATE,
    ClientError,
    ServerRefused,
    TurnFailed,
    add_connection_args,
    connect,
    fmt,
    format_table,
    is_loopback,
    percentile,
    read_audio,
    reply_audio,
    run_turn,
    setup_stdout,
    synthesize_speech,
    token_from,
    with_path,
)

MAX_CALLERS = 64
DEFAULT_TEXT = "what is the weather like in paris tomorrow"
LATENCY_KEYS = (  # report key, (source, key) in a turn
    ("server e2ft", "server", "speech_end_to_first_token"),
    ("server flush", "server", "speech_end_to_encoder_done"),
    ("client speech end -> 1st delta", "client", "end_to_first_delta"),
    ("client speech_stopped -> 1st delta", "client", "speech_stopped_to_first_delta"),
)
AUDIO_LATENCY_KEYS = (
    ("server e2fa", "server", "speech_end_to_first_audio"),
    ("client speech end -> 1st audio", "client", "end_to_first_audio"),
    ("client speech_stopped -> 1st audio", "client", "speech_stopped_to_first_audio"),
)


def check_target(url: str, callers: int, duration: float) -> str:
    url = with_path(url)
    if not is_loopback(url):
        raise ClientError(f"the load generator only targets a server on this machine (127.0.0.1, ::1 or localhost); "
                          f"refusing {url}")
    if not 1 <= callers <= MAX_CALLERS:
        raise ClientError(f"callers must be between 1 and {MAX_CALLERS}, got {callers}")
    if not 0 < duration <= 3600:
        raise ClientError(f"duration must be in (0, 3600] seconds, got {duration}")
    return url


async def run_load(url: str, callers: int, duration: float, *, wav: Optional[str] = None,
                   token: Optional[str] = None, turn_timeout: float = 30.0, packet_ms: float = 20.0,
                   budget_ms: float = 1500.0, speed: float = 1.0, text: str = DEFAULT_TEXT,
                   audio: bool = False, audio_callers: Optional[int] = None, voice: Optional[str] = None,
                   progress=None) -> dict:
    """Run `callers` concurrent callers for at most `duration` seconds; returns the report dict:
    callers, duration_s, elapsed_s, audio_s, budget_ms, connected, sustained, refused, errors,
    refusals [{caller, code, message}], error_list [{caller, code, message}],
    turns {completed, on_time, late, failed, cut}, latency_ms {name: {n, p50, p90, p99}},
    reply_tok_s {n, min, p10, p50, p90}, per_caller [{caller, mode, status, turns, on_time}],
    audio_callers, reply_audio_s {n, p50} and by_mode {"text"/"audio": {turns, on_time,
    latency_ms, reply_tok_s}} (the same figures per mode).
    `audio`: every caller asks for spoken replies; `audio_callers`: only the first that many."""
    url = check_target(url, callers, duration)
    n_audio = callers if audio and audio_callers is None else min(max(int(audio_callers or 0), 0), callers)
    # spoken callers spread evenly over the staggered starts (caller i speaks when its share rounds up)
    if speed <= 0:
        raise ClientError("speed must be > 0 for a load test (callers talk in real time)")
    with tempfile.TemporaryDirectory(prefix="nestvox-load-") as tmp:
        audio = read_audio(wav or synthesize_speech(text, tmp), MODEL_RATE)
    audio_s = audio.size / MODEL_RATE
    engine_before = await asyncio.to_thread(engine_counters, url, token)
    t0 = time.monotonic()
    deadline = t0 + duration
    stagger = min(audio_s, 2.0) / callers
    turns: List[dict] = []
    callers_out: List[dict] = [{"caller": i, "mode": "audio" if (i * n_audio) % callers < n_audio else "text",
                                "status": "not started", "turns": 0, "on_time": 0, "cut": 0}
                               for i in range(callers)]
    refusals: List[dict] = []
    errors: List[dict] = []
    sample = {"silence_ms": 500}

    async def caller(i: int) -> None:
        me = callers_out[i]
        await asyncio.sleep(i * stagger)
        try:
            conn = await connect(url, token, open_timeout=min(10.0, max(1.0, deadline - time.monotonic())))
        except ServerRefused as exc:
            me["status"] = "refused"
            refusals.append({"caller": i, "code": exc.code, "message": str(exc)})
            return
        except ClientError as exc:
            me["status"] = "error"
            errors.append({"caller": i, "code": getattr(exc, "code", "error"), "message": str(exc)})
            return
        me["status"] = "connected"
        spoken = me["mode"] == "audio"
        try:
            fields = {"rate": MODEL_RATE} if conn.rate != MODEL_RATE else {}  # the GA default is 24 kHz: declare ours
            if spoken:
                fields.update({k: v for k, v in reply_audio(voice=voice).items() if v is not None})
            if fields:
                await conn.update(timeout=min(10.0, max(1.0, deadline - time.monotonic())), **fields)
        except ServerRefused as exc:
            me["status"] = "refused"
            refusals.append({"caller": i, "code": exc.code, "message": str(exc)})
            await conn.close()
            return
        except ClientError as exc:
            me["status"] = "error"
            errors.append({"caller": i, "code": getattr(exc, "code", "error"), "message": str(exc)})
            await conn.close()
            return
        pcm_audio = audio
        silence_ms = conn.silence_ms if conn.silence_ms is not None else 500
        sample["silence_ms"] = silence_ms
        trailing_ms = silence_ms + 300
        need_s = (audio_s + trailing_ms / 1000) / speed + budget_ms / 1000
        async with conn:
            while True:
                left = deadline - time.monotonic()
                if left < need_s:
                    break
                try:
                    me["in_turn"] = True
                    result = await run_turn(conn, pcm_audio, packet_ms=packet_ms, speed=speed,
                                            trailing_silence_ms=trailing_ms, timeout=min(turn_timeout, left))
                except ServerRefused as exc:
                    me["status"] = "refused"
                    refusals.append({"caller": i, "code": exc.code, "message": str(exc)})
                    return
                except TurnFailed as exc:
                    me["in_turn"] = False
                    if exc.code == "timeout" and turn_timeout > left:
                        me["cut"] += 1  # the run's end came first
                    else:
                        me["failed"] = me.get("failed", 0) + 1
                        errors.append({"caller": i, "code": exc.code, "message": str(exc)})
                    return
                finally:
                    me["in_turn"] = False
                first = result.client_ms.get("end_to_first_audio" if spoken else "end_to_first_delta")
                on_time = first is not None and first <= silence_ms + budget_ms
                turns.append({"caller": i, "mode": me["mode"], "on_time": on_time, "status": result.status,
                              "server": result.latency_ms, "client": result.client_ms,
                              "reply_tok_s": reply_speed(result),
                              "reply_audio_s": round(result.audio_seconds, 3) if spoken else None})
                me["turns"] += 1
                me["on_time"] += on_time
                if progress is not None:
                    progress(i, result, on_time)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + 0.5)
    for task in pending:  # still in a turn at the deadline: cut
        task.cancel()
    for i, task in enumerate(tasks):
        if task in pending:
            if callers_out[i].get("in_turn"):
                callers_out[i]["cut"] += 1
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        elif task.exception() is not None:  # a bug, not a server problem: report it, do not hide it
            exc = task.exception()
            errors.append({"caller": i, "code": "client_exception", "message": f"{type(exc).__name__}: {exc}"})
            callers_out[i]["failed"] = callers_out[i].get("failed", 0) + 1
    elapsed = time.monotonic() - t0
    engine_after = await asyncio.to_thread(engine_counters, url, token)

    for me in callers_out:
        me.pop("in_turn", None)
        failed = me["failed"] = me.get("failed", 0)
        if me["status"] == "connected":
            if failed:
                me["status"] = "failed"
            elif me["turns"] == 0:
                me["status"] = "no turn completed"
            elif me["on_time"] == me["turns"]:
                me["status"] = "sustained"
            else:
                me["status"] = "late"

    keys = LATENCY_KEYS + (AUDIO_LATENCY_KEYS if n_audio else ())
    modes = [m for m in ("text", "audio") if any(c["mode"] == m for c in callers_out)]
    by_mode = {m: {"callers": sum(c["mode"] == m for c in callers_out),
                   "turns": {"completed": sum(t["mode"] == m for t in turns),
                             "on_time": sum(t["on_time"] for t in turns if t["mode"] == m)},
                   **turn_figures([t for t in turns if t["mode"] == m], keys)} for m in modes}
    reply_audio_s = [t["reply_audio_s"] for t in turns if t["reply_audio_s"] is not None]
    return {
        "url": url, "callers": callers, "duration_s": duration, "elapsed_s": round(elapsed, 2),
        "audio_s": round(audio_s, 2), "budget_ms": budget_ms, "silence_ms": sample["silence_ms"],
        "connected": sum(1 for c in callers_out if c["status"] not in ("refused", "error", "not started")),
        "sustained": sum(1 for c in callers_out if c["status"] == "sustained"),
        "refused": len(refusals), "errors": len(errors), "refusals": refusals, "error_list": errors,
        "turns": {"completed": len(turns), "on_time": sum(t["on_time"] for t in turns),
                  "late": sum(not t["on_time"] for t in turns),
                  "failed": sum(c["failed"] for c in callers_out),
                  "cut": sum(c["cut"] for c in callers_out)},
        **turn_figures(turns, keys), "per_caller": callers_out,
        "audio_callers": n_audio, "by_mode": by_mode,
        "reply_audio_s": {"n": len(reply_audio_s), "p50": percentile(reply_audio_s, 50)},
        "engine": engine_split(engine_before, engine_after, elapsed),
    }


def turn_figures(turns: List[dict], keys=LATENCY_KEYS) -> dict:
    """latency_ms {name: {n, p50, p90, p99}} and reply_tok_s {n, min, p10, p50, p90} of some turns."""
    latency: Dict[str, dict] = {}
    for name, source, key in keys:
        values = [t[source].get(key) for t in turns if t[source].get(key) is not None]
        latency[name] = {"n": len(values), **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}
    # decode speed each caller saw: (output tokens - 1) / (first token -> last token)
    speeds = [t["reply_tok_s"] for t in turns if t["reply_tok_s"] is not None]
    return {"latency_ms": latency,
            "reply_tok_s": {"n": len(speeds), **{f"p{q}": percentile(speeds, q) for q in (10, 50, 90)},
                            "min": round(min(speeds), 2) if speeds else None}}


def engine_counters(url: str, token: Optional[str]) -> Optional[dict]:
    """The server's engine counters from GET /healthz (None if it does not report them)."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    request = urllib.request.Request(f"{scheme}://{parts.netloc}/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read()).get("engine")
    except Exception:
        return None


def engine_split(before: Optional[dict], after: Optional[dict], elapsed: float) -> Optional[dict]:
    """Where the engine thread's time went during the run: the stage that limits it."""
    if not before or not after or elapsed <= 0:
        return None
    d = {k: after[k] - before[k] for k in after if k in before}
    share = {f"{k}_pct": round(100 * d[f"{k}_seconds"] / elapsed, 1) for k in ("busy", "encoder", "llm", "vad")}
    return {**share,
            "encoder_rtf": round(d["encoder_seconds"] / d["audio_seconds"], 3) if d["audio_seconds"] else None,
            "llm_rows_per_forward": round(d["llm_rows"] / d["llm_forwards"], 1) if d["llm_forwards"] else None,
            "command_lag_ms": round(1000 * d["command_lag_seconds"] / d["commands"], 1) if d["commands"] else None,
            "speculation_hits": d["speculation_hits"]}


def reply_speed(result) -> Optional[float]:
    """Tokens per second of one reply, from its response.done (None for a one-token reply)."""
    if not result.done:
        return None
    tokens = (result.done["response"].get("usage") or {}).get("output_tokens") or 0
    span = result.latency_ms.get("first_token_to_last_token")
    if tokens < 2 or not span:
        return None
    return round((tokens - 1) / (span / 1000.0), 2)


def replies_label(spoken: int, callers: int) -> str:
    if not spoken:
        return "text"
    return "spoken" if spoken == callers else f"{spoken} spoken, {callers - spoken} text"


def format_report(report: dict) -> str:
    t = report["turns"]
    head = format_table(("load", "value"), [
        ("callers", report["callers"]),
        ("replies", replies_label(report.get("audio_callers", 0), report["callers"])),
        ("connected", report["connected"]),
        ("sustained (all turns on time)", report["sustained"]),
        ("refused", report["refused"]),
        ("errors", report["errors"]),
        ("turns completed", t["completed"]),
        ("turns on time / late", f"{t['on_time']} / {t['late']}"),
        ("turns cut by --duration", t["cut"]),
        ("utterance (s)", report["audio_s"]),
        ("on-time limit (ms)", f"{report['silence_ms']} silence + {report['budget_ms']:g} budget"),
        ("elapsed (s)", report["elapsed_s"]),
    ])
    lines = [head, ""]
    by_mode = report.get("by_mode") or {}
    sections = [("", report)] if len(by_mode) < 2 else [("", report)] + [(f"{m} callers: ", by_mode[m])
                                                                          for m in ("text", "audio")]
    for prefix, figures in sections:
        lat = format_table((f"{prefix}latency (ms)", "n", "p50", "p90", "p99"),
                           [(name, v["n"], v["p50"], v["p90"], v["p99"]) for name, v in figures["latency_ms"].items()])
        speed = figures["reply_tok_s"]
        lat += "\n" + format_table((f"{prefix}reply speed (tok/s)", "n", "min", "p10", "p50", "p90"),
                                   [("per reply", speed["n"], speed["min"], speed["p10"], speed["p50"],
                                     speed["p90"])])
        lines += [lat, ""]
    if report.get("audio_callers"):
        lines.append(f"spoken reply length: p50 {fmt(report['reply_audio_s']['p50'], 2)} s over "
                     f"{report['reply_audio_s']['n']} replies")
    e = report.get("engine")
    if e:
        lines.append(f"engine thread: busy {e['busy_pct']}% (encoder {e['encoder_pct']}%, LLM {e['llm_pct']}%, "
                     f"VAD {e['vad_pct']}%), encoder RTF {e['encoder_rtf']}, LLM rows/forward "
                     f"{e['llm_rows_per_forward']}, audio waited {e['command_lag_ms']} ms for the engine, "
                     f"speculation hits {e['speculation_hits']}")
    for kind, items in (("refused", report["refusals"]), ("error", report["error_list"])):
        for item in items:
            lines.append(f"{kind}: caller {item['caller']}: {item['code']}: {item['message']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--callers", type=int, default=4, help=f"concurrent callers, 1..{MAX_CALLERS} (default 4)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds the whole run may take (default 20)")
    p.add_argument("--turn-timeout", type=float, default=30.0, help="seconds one turn may take (default 30)")
    p.add_argument("--budget-ms", type=float, default=1500.0,
                   help="on-time limit for the first delta beyond the VAD silence window (default 1500)")
    p.add_argument("--wav", default=None, help="utterance to send (default: espeak-ng speaks --text)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="sentence for espeak-ng when no --wav is given")
    p.add_argument("--packet-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--speed", type=float, default=1.0, help="x real time (default 1.0; must be > 0)")
    p.add_argument("--audio", action="store_true", help="callers ask for spoken replies (output_modalities "
                   "[\"audio\"], 24 kHz PCM16)")
    p.add_argument("--audio-callers", type=int, default=None,
                   help="only this many callers ask for spoken replies; the others stay text-only")
    p.add_argument("--voice", default=None, help="voice of the spoken replies (default: the server's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per completed turn (stderr)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    try:
        check_target(args.url, args.callers, args.duration)
        if args.wav and not os.path.isfile(args.wav):
            raise ClientError(f"no such file: {args.wav}")
    except ClientError as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 2

    def progress(i, result, on_time):
        if args.verbose:
            first = (f"first audio {result.client_ms.get('end_to_first_audio')} ms" if result.spoken else
                     f"first delta {result.client_ms.get('end_to_first_delta')} ms")
            print(f"  caller {i}: e2ft {result.latency_ms.get('speech_end_to_first_token')} ms, {first} "
                  f"{'on time' if on_time else 'LATE'}",
                  file=sys.stderr, flush=True)

    if not args.json:
        print(f"load: {args.callers} callers for {args.duration:g} s against {args.url}", flush=True)
    try:
        report = asyncio.run(run_load(args.url, args.callers, args.duration, wav=args.wav, token=token_from(args),
                                      turn_timeout=args.turn_timeout, packet_ms=args.packet_ms,
                                      budget_ms=args.budget_ms, speed=args.speed, text=args.text,
                                      audio=args.audio or args.audio_callers is not None,
                                      audio_callers=args.audio_callers, voice=args.voice, progress=progress))
    except ClientError as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    if report["connected"] == 0 and report["errors"]:
        return 1  # nothing reached the server (unreachable): the message above says why
    return 0


if __name__ == "__main__":
    sys.exit(main())
