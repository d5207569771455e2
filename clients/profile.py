"""Latency profiler: sweep encoder chunk sizes against a running nestvox server.

    python clients/profile.py                                   # 80..1280 ms, 3 repeats, real time
    python clients/profile.py --chunks 160,320 --repeats 5 --wav question.wav --plot latency.png
    python clients/profile.py --speed 0 --mode vad --json

For every chunk size, --repeats turns, each on a FRESH connection that first
sends a GA session.update (nestvox.chunk_ms, audio.input.format rate 16000:
the model's rate, where the GA default is 24000; plus audio.input.turn_detection
null in the default manual mode), then streams the same audio (--wav, or a
sentence spoken by espeak-ng into a temporary folder) at --speed x real time
in --packet-ms packets and waits for response.done.

What the table reports (p50 / p90 over the repeats; numpy's linear
interpolation, so with 3 repeats p90 lies between the two slowest turns):

  algo        the server's stated algorithmic latency for the chunk (chunk +
              look-ahead, session.updated nestvox.algorithmic_latency_ms): how far
              the encoder lags the audio WHILE the user speaks. Not a measurement, and
              not a floor for e2ft: at the end of a turn the server flushes the
              partial chunk at once instead of waiting for it to fill.
  e2ft        server: end of speech -> first token
              (response.done latency_ms.speech_end_to_first_token)
  flush       server: end of speech -> last encoder step done
              (latency_ms.speech_end_to_encoder_done): the encoder's final chunk
  created     client: end of the audio -> response.created arrives. The server
              sends response.created once it has encoded what was still pending
              (the partial last chunk, the look-ahead flush) and pre-filled the
              turn: it is the audio processing left when the user stopped, plus
              loopback transit. The server does not report a per-chunk compute
              time over the wire; this is the part a client can observe.
  1st delta   client: end of the audio -> first response.output_text.delta arrives

"end of the audio" on the client: --mode manual (default): when the last audio
packet was sent (input_audio_buffer.commit and response.create follow at once,
and the server's "end of speech" is the commit's arrival), so client and server
figures share a reference point. --mode vad: when the client sent the audio at
the point where the server's VAD says speech ended (speech_stopped.audio_end_ms),
so the client figures INCLUDE the VAD silence window (silence_duration_ms) while
the server's start at the VAD decision. At --speed 0 the whole file is sent at
once: the client figures then include the server working through that backlog.

The plot (--plot, PNG) shows the p50 (solid) and p90 (dashed) of each figure
against the chunk size.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as `python clients/profile.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    MODEL_RATE,
    ClientError,
    TurnResult,
    UpdateRefused,
    add_connection_args,
    connect,
    format_table,
    percentile,
    read_audio,
    run_turn,
    setup_stdout,
    synthesize_speech,
    token_from,
)

DEFAULT_CHUNKS = (80, 160, 320, 640, 1280)
DEFAULT_TEXT = "please turn on the lights in the kitchen and set a timer for ten minutes"
METRICS = (  # (key, label, where it comes from)
    ("e2ft", "end of speech -> first token (server)", "server"),
    ("flush", "end of speech -> encoder done (server)", "server"),
    ("created", "end of audio -> response.created (client)", "client"),
    ("first_delta", "end of audio -> first text delta (client)", "client"),
)


def turn_figures(result: TurnResult) -> Dict[str, Optional[float]]:
    lat, cli = result.latency_ms, result.client_ms
    return {"e2ft": lat.get("speech_end_to_first_token"), "flush": lat.get("speech_end_to_encoder_done"),
            "created": cli.get("end_to_created"), "first_delta": cli.get("end_to_first_delta")}


async def profile(url: str, audio_path: str, chunks: Sequence[int] = DEFAULT_CHUNKS, repeats: int = 3, *,
                  token: Optional[str] = None, speed: float = 1.0, packet_ms: float = 20.0, mode: str = "manual",
                  timeout: float = 60.0, progress=None) -> List[dict]:
    """One row per chunk size: {chunk_ms, algorithmic_latency_ms, turns: [figures], p50/p90 per figure,
    error}. A chunk size the server refuses gets its `error` and no turns."""
    if mode not in ("manual", "vad"):
        raise ClientError(f"mode must be 'manual' or 'vad', got {mode!r}")
    if repeats < 1:
        raise ClientError("repeats must be >= 1")
    audio = None
    rows = []
    for chunk in chunks:
        row = {"chunk_ms": chunk, "algorithmic_latency_ms": None, "turns": [], "error": None}
        for r in range(repeats):
            try:
                async with await connect(url, token) as conn:
                    await conn.update(chunk_ms=chunk, rate=MODEL_RATE,
                                      manual=True if mode == "manual" else None)
                    row["algorithmic_latency_ms"] = conn.nestvox.get("algorithmic_latency_ms")
                    if audio is None or audio[0] != conn.rate:
                        audio = (conn.rate, read_audio(audio_path, conn.rate))
                    result = await run_turn(conn, audio[1], packet_ms=packet_ms, speed=speed, timeout=timeout)
            except UpdateRefused as exc:  # e.g. a chunk size this server cannot run
                row["error"] = str(exc)
                break
            figures = turn_figures(result)
            row["turns"].append(figures)
            if progress is not None:
                progress(chunk, r, figures)
        for key, _, _ in METRICS:
            values = [t[key] for t in row["turns"]]
            row[key] = {"p50": percentile(values, 50), "p90": percentile(values, 90)}
        rows.append(row)
    return rows


def table(rows: List[dict]) -> str:
    headers = ["chunk ms", "n", "algo", "e2ft p50", "p90", "flush p50", "p90", "created p50", "p90",
               "1st delta p50", "p90"]
    lines = []
    for row in rows:
        if row["error"]:
            lines.append([row["chunk_ms"], 0, None] + [None] * 8)
            continue
        cells = [row["chunk_ms"], len(row["turns"]), row["algorithmic_latency_ms"]]
        for key, _, _ in METRICS:
            cells += [row[key]["p50"], row[key]["p90"]]
        lines.append(cells)
    text = format_table(headers, lines)
    errors = [f"chunk {row['chunk_ms']} ms: {row['error']}" for row in rows if row["error"]]
    return text + ("\n" + "\n".join(errors) if errors else "")


def plot(rows: List[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["turns"]]
    if not rows:
        raise ClientError("nothing to plot: no chunk size produced a turn")
    xs = [r["chunk_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    for i, (key, label, _) in enumerate(METRICS):
        color = f"C{i}"
        ax.plot(xs, [r[key]["p50"] for r in rows], "o-", color=color, label=f"{label} p50")
        ax.plot(xs, [r[key]["p90"] for r in rows], "s--", color=color, alpha=0.7, label=f"{label} p90")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("encoder chunk (ms)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or "nestvox latency vs encoder chunk size")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def parse_chunks(text: str) -> List[int]:
    try:
        chunks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunks must be comma-separated integers (ms), got {text!r}") from None
    if not chunks or any(c <= 0 for c in chunks):
        raise argparse.ArgumentTypeError(f"--chunks must list positive sizes in ms, got {text!r}")
    return chunks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--chunks", type=parse_chunks, default=list(DEFAULT_CHUNKS),
                   help="chunk sizes in ms, multiples of 80 (default 80,160,320,640,1280)")
    p.add_argument("--repeats", type=int, default=3, help="turns per chunk size, each on a fresh connection")
    p.add_argument("--wav", default=None, help="audio to send (default: espeak-ng speaks --text)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="sentence for espeak-ng when no --wav is given")
    p.add_argument("--speed", type=float, default=1.0, help="x real time; 0 = as fast as possible (default 1.0)")
    p.add_argument("--packet-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--mode", choices=("manual", "vad"), default="manual",
                   help="how turns end: manual commit (default; exact client reference point) or server VAD")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each response.done")
    p.add_argument("--plot", default="profile.png", help="PNG plot path (default profile.png; '' for none)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    if args.speed < 0 or args.repeats < 1:
        print("profile.py: --speed must be >= 0 and --repeats >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nestvox-profile-") as tmp:
        try:
            wav = args.wav or synthesize_speech(args.text, tmp)
            if args.wav and not os.path.isfile(args.wav):
                raise ClientError(f"no such file: {args.wav}")
            seconds = read_audio(wav, 16000).size / 16000
            speed = "as fast as possible" if args.speed == 0 else f"{args.speed:g}x real time"
            print(f"profiling {args.url}: chunks {','.join(map(str, args.chunks))} ms x {args.repeats} turns, "
                  f"{os.path.basename(args.wav) if args.wav else 'espeak-ng'} audio {seconds:.2f} s at {speed}, "
                  f"{args.mode} turns", flush=True)

            def progress(chunk, r, figures):
                print(f"  chunk {chunk} ms turn {r + 1}: e2ft {figures['e2ft']} ms, first delta "
                      f"{figures['first_delta']} ms", file=sys.stderr, flush=True)

            rows = asyncio.run(profile(args.url, wav, args.chunks, args.repeats, token=token_from(args),
                                       speed=args.speed, packet_ms=args.packet_ms, mode=args.mode,
                                       timeout=args.timeout, progress=progress))
        except ClientError as exc:
            print(f"profile.py: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    print(table(rows))
    print("ms; e2ft/flush: server (response.done latency_ms); created/1st delta: client clock from the end of "
          f"the audio ({'last packet + commit' if args.mode == 'manual' else 'VAD speech end, incl. silence window'})")
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.plot:
        try:
            plot(rows, args.plot, f"nestvox latency vs chunk ({args.mode} turns, {args.repeats} per chunk)")
        except ClientError as exc:
            print(f"profile.py: {exc}", file=sys.stderr)
            return 1
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
