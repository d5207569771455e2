"""Score a running nestvox server end to end: stream every utterance of a manifest
through the websocket, exactly as a caller would, and compare each reply with the
manifest's `answer` (exact match, per intent, as `python -m agent.training.evaluate`).

    python serve.py &                                                   # the demo model
    python clients/score.py .cache/data/home/val.jsonl --limit 100      # server VAD ends each turn
    python clients/score.py .cache/data/home/val.jsonl --limit 100 --manual   # the turn is the whole file
    python clients/score.py .cache/data/home/val.jsonl --manual --chunk-ms 320  # the encoder chunk to ask for

`agent.training.evaluate` scores the model on whole files (offline and through a
streaming Session); this tool adds what only the server does: VAD turn ends
(`suffix_padding_ms` and the other `turn_detection` settings), resampling,
packetization. Audio is sent at --speed x real time (0 = as fast as possible),
one utterance at a time, at --rate (16 kHz by default, declared in the GA
session.update). Prints the table, then the replies that differ from the
answer; --json PATH writes every reply.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python clients/score.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.training.evaluate import exact_match, format_table, score  # noqa: E402
from clients.common import MODEL_RATE, ClientError, add_connection_args, setup_stdout, token_from  # noqa: E402
from clients.file import stream_file  # noqa: E402


def read_items(manifest: str, limit: Optional[int] = None) -> List[dict]:
    """A NeMo-style JSONL manifest -> its items (the first `limit`). Each line needs
    `audio_filepath` (relative paths are taken from the manifest's folder) and the expected
    reply, `answer` (or, failing that, `text`: an ASR-style manifest where the reply is the
    transcript); `intent` is optional ("all"). ClientError names the line that lacks one."""
    items = []
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ClientError(f"{manifest}:{number}: not a JSON line ({exc})") from None
            if not isinstance(item, dict) or not item.get("audio_filepath"):
                raise ClientError(f"{manifest}:{number}: the line has no audio_filepath")
            if item.get("answer") is None and item.get("text") is None:
                raise ClientError(f"{manifest}:{number}: the line has neither an answer nor a text to compare "
                                  f"the reply with")
            item = dict(item)
            if not os.path.isabs(item["audio_filepath"]):
                item["audio_filepath"] = os.path.join(base, item["audio_filepath"])
            if item.get("answer") is None:
                item["answer"] = item["text"]
            item.setdefault("intent", "all")
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ClientError(f"{manifest}: expected JSONL lines with audio_filepath and answer (no lines)")
    return items


def record_of(item: dict, prediction: str) -> dict:
    """One scored reply, as `agent.training.evaluate.score` reads it (clients/profile.py scores
    through this too, so both tools agree)."""
    return {"intent": item["intent"], "answer": item["answer"], "prediction": prediction,
            "held_out": bool(item.get("held_out")), "text": item.get("text"), "voice": item.get("voice")}


async def score_server(url: str, items: List[dict], *, token: Optional[str] = None, manual: bool = False,
                       speed: float = 0.0, rate: int = MODEL_RATE, chunk_ms: Optional[int] = None,
                       progress: bool = True) -> List[dict]:
    """Every item through the server, one fresh conversation each; `chunk_ms`: the encoder
    chunk each session asks for (nestvox.chunk_ms; None: the server's default)."""
    records, right = [], 0
    for i, item in enumerate(items):
        result = await stream_file(url, item["audio_filepath"], token=token, manual=manual, speed=speed, rate=rate,
                                   chunk_ms=chunk_ms)
        records.append(record_of(item, result.text))
        right += exact_match(result.text, item["answer"])
        if progress:
            print(f"\r{i + 1}/{len(items)} utterances, {right} exact", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return records


def main(argv=None) -> int:
    setup_stdout()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="JSONL manifest (audio_filepath, answer, intent[, held_out])")
    add_connection_args(p)
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--manual", action="store_true", help="manual turns (commit + response.create), no server VAD")
    p.add_argument("--speed", type=float, default=0.0, help="x real time; 0 = as fast as possible (default)")
    p.add_argument("--rate", type=int, default=MODEL_RATE,
                   help=f"send the audio at this rate (default {MODEL_RATE}: the server does not resample; "
                   "24000: GA's PCM rate, resampled by the server)")
    p.add_argument("--chunk-ms", type=int, default=None,
                   help="encoder chunk each session asks for (nestvox.chunk_ms; default: the server's)")
    p.add_argument("--json", default=None, help="write the table and every reply here")
    args = p.parse_args(argv)
    try:
        items = read_items(args.manifest, args.limit)
        records = asyncio.run(score_server(args.url, items, token=token_from(args), manual=args.manual,
                                           speed=args.speed, rate=args.rate, chunk_ms=args.chunk_ms))
    except (ClientError, OSError) as exc:
        print(f"score.py: {exc}", file=sys.stderr)
        return 1
    path = ("manual turns" if args.manual else "server VAD") + (f", chunk {args.chunk_ms} ms" if args.chunk_ms else "")
    table = score(records)
    print(format_table({f"server ({path})": table}))
    for r in records:
        if not exact_match(r["prediction"], r["answer"]):
            print(f"  {r['text']!r} ({r['voice']}): {r['prediction']!r}, expected {r['answer']!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
