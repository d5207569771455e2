"""clients/turns_bench.py: callers who pause mid-sentence, against a real server."""
import json

import numpy as np

from clients import turns_bench
from server_helpers import start


def manifest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"text": "turn on the lights in the kitchen", "answer": "Turning on the lights.",
                                "intent": "device", "voice": "en-us", "speed": 175, "pitch": 50}) + "\n")
    return str(path)


def test_the_paused_version_is_longer_by_the_pause(tmp_path):
    plain, paused = turns_bench.load_utterances(manifest(tmp_path), limit=1, seed=3, folder=str(tmp_path))
    assert plain.pause_at is None and paused.pause_at is not None and 300 <= paused.pause_ms <= 600
    grown = paused.speech_end_ms - plain.speech_end_ms
    assert paused.pause_ms - 50 < grown < paused.pause_ms + 250  # the break, plus espeak-ng's own phrase pause
    assert plain.speech_end_ms == 1000 * len(plain.audio) / 16000


async def test_a_paused_caller_is_cut_in_by_a_short_server_vad_window(streaming_inference, tmp_path):
    srv = await start(streaming_inference)
    try:
        plain, paused = turns_bench.load_utterances(manifest(tmp_path), limit=1, seed=3, folder=str(tmp_path))
        short = await turns_bench.run_one(srv.url, "server_vad:200", paused, timeout=60)
        long = await turns_bench.run_one(srv.url, "server_vad:900", paused, timeout=60)
    finally:
        await srv.stop()
    assert short.cut_in and short.turns == 2  # ended in the pause, then the rest was a turn of its own
    assert not long.cut_in and long.turns == 1 and long.felt_ms is not None and long.felt_ms > 900
    assert not np.isnan(long.felt_ms)
