"""espeak-ng through its library vs one process per sentence: first-audio latency and real-time
factor, plus the worker's first audio for a reply streamed in token-sized deltas.

    python -m agent.tts.bench [--repeats 5] [--voice en-us]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time
from typing import List, Tuple

from .espeak import EspeakEngine, rate_for_speed

SENTENCES = [
    "Hello!",
    "The kitchen lights are on now.",
    "It is twenty one degrees in the living room, and the heating is off.",
    "Your next meeting starts at half past three, in the small conference room on the second floor.",
    "I set a timer for ten minutes; I will remind you when it rings, so you can take the pasta "
    "off the stove before it overcooks.",
]


def _library_once(eng: EspeakEngine, text: str) -> Tuple[float, float, float]:
    first: List[float] = []
    t0 = time.perf_counter()
    audio = eng.synthesize(text, on_chunk=lambda _x: first or first.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return (first[0] - t0) if first else total, total, len(audio) / eng.sample_rate


def _process_once(eng: EspeakEngine, text: str, voice: str) -> Tuple[float, float, float]:
    # The engine's subprocess path reads all of stdout; here stdout is read as it comes, for
    # the first audio byte past the 44-byte WAV header.
    t0 = time.perf_counter()
    p = subprocess.Popen([eng._exe or "espeak-ng", "--stdout", "-v", voice, "-s", str(rate_for_speed(1.0))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdin.write(text.encode())
    p.stdin.close()
    got, first = 0, None
    while True:
        b = p.stdout.read1(65536)
        if not b:
            break
        got += len(b)
        if first is None and got > 44:
            first = time.perf_counter()
    p.wait()
    total = time.perf_counter() - t0
    return (first or time.perf_counter()) - t0, total, max(0, got - 44) / 2 / eng.sample_rate


def _worker_first_audio(voice: str, repeats: int) -> List[float]:
    from .worker import TTSWorker
    reply = " ".join(SENTENCES[1:4])
    out = []
    with TTSWorker(EspeakEngine(voice=voice, mode="library")) as w:
        for _ in range(repeats):
            done = threading.Event()
            s = w.open_stream(rate=24000, on_done=lambda _st: done.set())
            for i in range(0, len(reply), 4):  # ~token-sized deltas, as an LLM decodes
                s.push_text(reply[i:i + 4])
                time.sleep(0.002)
            s.finish()
            done.wait(30)
            out.append(s.stats().first_audio_s or float("nan"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--voice", default="en-us")
    args = ap.parse_args(argv)
    lib = EspeakEngine(voice=args.voice, mode="library")
    proc = EspeakEngine(voice=args.voice, mode="subprocess")
    lib.synthesize("Warm up.")
    proc.synthesize("Warm up.")
    rows = []
    for path, fn in (("library (ctypes)", lambda t: _library_once(lib, t)),
                     ("subprocess", lambda t: _process_once(proc, t, args.voice))):
        firsts, totals, audio = [], [], []
        for _ in range(args.repeats):
            for text in SENTENCES:
                f, tot, a = fn(text)
                firsts.append(f * 1000)
                totals.append(tot * 1000)
                audio.append(a)
        rows.append((path, statistics.median(firsts), max(firsts), statistics.median(totals),
                     sum(totals) / 1000 / sum(audio)))
    print(f"espeak-ng, voice {args.voice}, {len(SENTENCES)} sentences x {args.repeats} "
          f"({sum(len(s) for s in SENTENCES)} chars, engine rate {lib.sample_rate} Hz)")
    print(f"{'path':<18} {'first audio ms p50':>18} {'max':>8} {'per sentence ms p50':>20} {'RTF':>8}")
    for path, f50, fmax, t50, rtf in rows:
        print(f"{path:<18} {f50:>18.2f} {fmax:>8.2f} {t50:>20.2f} {rtf:>8.4f}")
    wf = _worker_first_audio(args.voice, args.repeats)
    print(f"worker (library, 24 kHz, reply pushed in 4-char deltas every 2 ms): first audio after "
          f"first push p50 {statistics.median(wf) * 1000:.1f} ms, max {max(wf) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
