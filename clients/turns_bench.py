"""Turn-end benchmark: server_vad against semantic_vad, with callers who pause mid-sentence.

    python clients/turns_bench.py .cache/data/home/test.jsonl --limit 24 \
        --modes server_vad:500,semantic_vad:auto [--url ws://127.0.0.1:8765/v1/realtime] [--json]

Each manifest line (NeMo-style, with `text`, `answer`, and the `voice`, `speed`, `pitch` it was
synthesized with: agent.training.synth writes them) is spoken by espeak-ng twice: as it is, and
with a pause of 300-600 ms inserted at a random word boundary (SSML `<break>`, seeded). Every
utterance is streamed in real time (20 ms packets) on a fresh connection, followed by silence
until the reply is done, so the caller behaves like a person who stops talking and waits.

Per mode and kind of caller it reports:
- felt latency: from the end of the caller's speech audio (the last voiced sample, before the
  silence) to the first text delta of the reply to the whole utterance, p50/p90 (client clock);
- cut-in rate: turns the server ended before the caller had finished (its speech_stopped falls
  more than 100 ms before the end of the speech, i.e. in the inserted pause);
- accuracy: the reply to the whole utterance equals the manifest's `answer` (exact match, as
  clients/score.py);
- for semantic_vad, the silence the server chose and its end-of-turn probability.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

if __package__ in (None, ""):  # `python clients/turns_bench.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import DEFAULT_URL, ClientError, float_to_pcm16, read_audio, with_path  # noqa: E402

SR = 16000
PACKET_MS = 20
CUT_TOLERANCE_MS = 100
TAIL_S = 9.0  # the most silence sent after the speech (semantic_vad low waits up to 8 s)


@dataclass
class Utterance:
    text: str
    answer: str
    intent: str
    audio: np.ndarray  # 16 kHz, with 200 ms of silence before the speech
    speech_end_ms: float  # the last voiced sample, in the utterance's time
    pause_at: Optional[int] = None  # word index the pause follows (None: no pause)
    pause_ms: int = 0


@dataclass
class TurnResult:
    cut_in: bool
    felt_ms: Optional[float]
    correct: bool
    reply: str
    silence_ms: Optional[int] = None
    p_done: Optional[float] = None
    turns: int = 1


def speak(text: str, voice: str, speed: int, pitch: int, folder: str, pause: Optional[tuple] = None) -> str:
    """espeak-ng -> wav; `pause`: (after word k, ms) inserted as an SSML break."""
    words = text.split()
    if pause is not None:
        k, ms = pause
        text = " ".join(words[: k + 1]) + f' <break time="{ms}ms"/> ' + " ".join(words[k + 1:])
    path = os.path.join(folder, f"u{abs(hash((text, voice, speed, pitch))) % 10**10}.wav")
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path]
    cmd += (["-m", f"<speak>{text}</speak>"] if pause is not None else [text])
    subprocess.run(cmd, check=True, capture_output=True)
    return path


def load_utterances(manifest: str, limit: int, seed: int, folder: str) -> List[Utterance]:
    if shutil.which("espeak-ng") is None:
        raise ClientError("espeak-ng is not installed (apt-get install espeak-ng)")
    rng = random.Random(seed)
    out: List[Utterance] = []
    with open(manifest, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("answer") and r.get("text") and len(r["text"].split()) >= 3][:limit]
    if not rows:
        raise ClientError(f"{manifest}: no lines with text (3+ words) and answer")
    for r in rows:
        voice, speed, pitch = r.get("voice", "en-us"), int(r.get("speed", 175)), int(r.get("pitch", 50))
        words = r["text"].split()
        for pause in (None, (rng.randrange(0, len(words) - 1), rng.randrange(300, 601))):
            audio = read_audio(speak(r["text"], voice, speed, pitch, folder, pause), SR)
            voiced = np.flatnonzero(np.abs(audio) > 0.01)
            audio = audio[voiced[0]: voiced[-1] + 1]
            lead = np.zeros(SR // 5, np.float32)
            out.append(Utterance(r["text"], r["answer"], r.get("intent", "?"), np.concatenate([lead, audio]),
                                 1000.0 * (len(lead) + len(audio)) / SR,
                                 None if pause is None else pause[0], 0 if pause is None else pause[1]))
    return out


def turn_detection(mode: str) -> Optional[dict]:
    kind, _, arg = mode.partition(":")
    if kind == "server_vad":
        return {"type": "server_vad", "silence_duration_ms": int(arg or 500)}
    if kind == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": arg or "auto"}
    raise ClientError(f"mode {mode!r}: server_vad[:SILENCE_MS] or semantic_vad[:EAGERNESS]")


async def run_one(url: str, mode: str, u: Utterance, timeout: float) -> TurnResult:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": SR}, "turn_detection": turn_detection(mode)}}}}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if event["type"] == "session.updated":
                break
            if event["type"] == "error":
                raise ClientError(f"{mode}: the server refused the session: {event['error']['message']}")
        pcm = float_to_pcm16(np.concatenate([u.audio, np.zeros(int(TAIL_S * SR), np.float32)]))
        step = SR * PACKET_MS // 1000 * 2
        t0 = time.perf_counter()
        sent_end: Dict[str, float] = {}
        done = asyncio.Event()

        async def sender():
            for k, i in enumerate(range(0, len(pcm), step)):
                if done.is_set():
                    return
                await asyncio.sleep(max(0.0, t0 + k * PACKET_MS / 1000 - time.perf_counter()))
                await ws.send(pcm[i:i + step])
                if "t" not in sent_end and (i + step) / 2 / SR * 1000 >= u.speech_end_ms:
                    sent_end["t"] = time.perf_counter()

        task = asyncio.create_task(sender())
        stops, replies, current, first_delta = [], [], [], {}
        try:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                kind = event["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    stops.append(event)
                elif kind == "response.output_text.delta":
                    current.append(event["delta"])
                    first_delta.setdefault(event["response_id"], time.perf_counter())
                elif kind == "response.done":
                    replies.append((event["response"]["id"], "".join(current)))
                    current = []
                    last_stop_ms = stops[-1]["audio_end_ms"] if stops else 0
                    if last_stop_ms >= u.speech_end_ms - CUT_TOLERANCE_MS:  # the reply to the whole utterance
                        break
                elif kind == "error" and event["error"]["code"] not in ("response_cancel_not_active",):
                    raise ClientError(f"{mode}: {event['error']['code']}: {event['error']['message']}")
        finally:
            done.set()
            await task
    first = stops[0]
    cut = first["audio_end_ms"] < u.speech_end_ms - CUT_TOLERANCE_MS
    response_id, reply = replies[-1]
    t_first = first_delta.get(response_id)
    felt = None if t_first is None or "t" not in sent_end else 1000.0 * (t_first - sent_end["t"])
    return TurnResult(cut, felt, reply.strip() == u.answer.strip(), reply, stops[-1].get("silence_ms"),
                      stops[-1].get("end_of_turn_probability"), len(stops))


def pct(values, q) -> Optional[float]:
    return None if not values else round(float(np.percentile(values, q)), 1)


def summarize(results: List[TurnResult]) -> dict:
    felt = [r.felt_ms for r in results if r.felt_ms is not None]
    chosen = [r.silence_ms for r in results if r.silence_ms is not None]
    return {"n": len(results), "felt_p50_ms": pct(felt, 50), "felt_p90_ms": pct(felt, 90),
            "cut_in_rate": round(sum(r.cut_in for r in results) / max(len(results), 1), 3),
            "accuracy": round(sum(r.correct for r in results) / max(len(results), 1), 3),
            "silence_p50_ms": pct(chosen, 50), "silence_p90_ms": pct(chosen, 90)}


async def main_async(args) -> dict:
    url = with_path(args.url)
    folder = tempfile.mkdtemp(prefix="nestvox_turns_")
    utterances = load_utterances(args.manifest, args.limit, args.seed, folder)
    report: Dict[str, dict] = {}
    for mode in args.modes.split(","):
        by_kind: Dict[str, List[TurnResult]] = {"no pause": [], "pause": []}
        for i, u in enumerate(utterances):
            result = await run_one(url, mode, u, args.timeout)
            by_kind["pause" if u.pause_at is not None else "no pause"].append(result)
            if args.verbose:
                print(f"{mode} {i}: {'pause' if u.pause_at is not None else 'plain'} cut={result.cut_in} "
                      f"felt={result.felt_ms} ok={result.correct} silence={result.silence_ms} p={result.p_done} "
                      f"{result.reply!r}", file=sys.stderr)
        report[mode] = {kind: summarize(rs) for kind, rs in by_kind.items()}
        report[mode]["all"] = summarize(by_kind["no pause"] + by_kind["pause"])
    return report


def print_table(report: dict) -> None:
    print("| mode | callers | felt p50 / p90 (ms) | cut-in | accuracy | chosen silence p50 / p90 (ms) |")
    print("|---|---|---|---|---|---|")
    for mode, kinds in report.items():
        for kind, s in kinds.items():
            silence = "" if s["silence_p50_ms"] is None else f"{s['silence_p50_ms']} / {s['silence_p90_ms']}"
            print(f"| {mode} | {kind} (n={s['n']}) | {s['felt_p50_ms']} / {s['felt_p90_ms']} | "
                  f"{100 * s['cut_in_rate']:.0f}% | {100 * s['accuracy']:.0f}% | {silence} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", help="NeMo-style JSONL with text, answer, voice, speed, pitch")
    p.add_argument("--url", default=os.environ.get("NESTVOX_URL", DEFAULT_URL))
    p.add_argument("--modes", default="server_vad:500,semantic_vad:auto",
                   help="comma-separated: server_vad[:SILENCE_MS], semantic_vad[:low|medium|high|auto]")
    p.add_argument("--limit", type=int, default=24, help="manifest lines (each spoken with and without a pause)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    try:
        report = asyncio.run(main_async(args))
    except (ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
