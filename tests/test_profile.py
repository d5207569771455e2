"""clients/profile.py against the real server (serve.build_server with no --model: the
embedded demo model) on loopback: real-time pacing, accuracy equal to clients/score.py on the
same manifest and chunk size, compute from /metrics, the plot and the JSON, clear errors.

One real-time profile (2 chunk sizes x 2 turn modes x 2 espeak-ng utterances, plus 2
concurrent callers) is shared by the tests of this module. Timing numbers are checked for
order and presence (and pacing against the clock), never against latency thresholds.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clients import common  # noqa: E402
from clients import profile as prof  # noqa: E402
from clients.score import read_items  # noqa: E402
from conftest import ServerThread  # noqa: E402

CHUNKS = (160, 320)
UTTERANCES = [  # reserved voices (never trained on), one request per intent
    ("en-us+linda", "set a timer for twelve minutes", "Timer set for 12 minutes.", "timer"),
    ("en-gb-x-rp+m6", "what is seven times eight", "7 times 8 is 56.", "arithmetic"),
]
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex("\n{") + 1:])


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(["--port", "0"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from conftest import synthesize

    d = tmp_path_factory.mktemp("profile_manifest")
    lines = []
    for i, (voice, text, answer, intent) in enumerate(UTTERANCES):
        wav = synthesize(text, str(d / f"u{i}.wav"), voice=voice)
        lines.append({"audio_filepath": os.path.basename(wav), "text": text, "answer": answer, "intent": intent,
                      "voice": voice})
    path = d / "m.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def profiled(server, manifest):
    """One real-time profile, every audio packet's send time logged per connection."""
    sends = []  # one list per connection: [(perf_counter when sent, bytes)]
    original = common.Connection.send_audio

    async def logged(self, pcm, as_json=False):
        if "_test_sends" not in self.__dict__:
            self._test_sends = []
            sends.append(self._test_sends)
        self._test_sends.append((time.perf_counter(), len(pcm)))
        await original(self, pcm, as_json)

    common.Connection.send_audio = logged
    try:
        items = read_items(manifest)
        t0 = time.perf_counter()
        report = asyncio.run(prof.profile(server.url, chunks=CHUNKS, items=items, turns=("manual", "vad"),
                                          callers=2, load_turns=1))
        elapsed = time.perf_counter() - t0
    finally:
        common.Connection.send_audio = original
    return {"report": report, "elapsed": elapsed, "sends": sends, "items": items}


# -- pure functions ---------------------------------------------------------------------
def test_pareto_frontier():
    points = [(100, 80), (200, 90), (150, 70), (300, 90), (90, 60), (100, 80)]
    assert prof.pareto(points) == [(90, 60), (100, 80), (100, 80), (200, 90)]


def test_pacing_measures_how_far_ahead_packets_left():
    # 20 ms packets due at 0, 20, 40 ms after the start; the third left 5 ms early
    log = [(20.0, 10.000), (40.0, 10.021), (60.0, 10.035)]
    paced = prof.pacing(log, 0, 10.0, 0.0, 1.0)
    assert paced["ahead_ms"] == pytest.approx(5.0, abs=1e-6) and paced["send_s"] == pytest.approx(0.035)
    assert prof.pacing(log, 0, 10.0, 0.0, 2.0)["ahead_ms"] == pytest.approx(0.0, abs=1e-6)  # 2x: due at 0, 10, 20


def test_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_filepath": "a.wav", "answer": "x"}\n{"answer": "no audio"}\n')
    with pytest.raises(common.ClientError, match=r"bad.jsonl:2: the line has no audio_filepath"):
        read_items(str(bad))
    asr = tmp_path / "asr.jsonl"
    asr.write_text('{"audio_filepath": "a.wav", "text": "hello"}\n')
    item, = read_items(str(asr))  # NeMo ASR style: the reply is compared with `text`
    assert item["answer"] == "hello" and item["intent"] == "all" and item["audio_filepath"] == str(tmp_path / "a.wav")


# -- against the server -----------------------------------------------------------------
def test_real_time_pacing_is_respected(profiled):
    report, sends = profiled["report"], profiled["sends"]
    # every sequential turn streams its audio in real time: the run takes at least all of it
    speech = report["speech_s"] * len(CHUNKS) * len(report["turn_modes"])
    assert profiled["elapsed"] >= speech
    # packets never leave faster than real time: by each packet's send time, the audio sent
    # before it is no more than the time since the connection's first packet
    turns = 0
    for log in sends:
        t_first, sent_bytes = log[0][0], 0
        for t, size in log:
            assert sent_bytes / 2 / common.MODEL_RATE <= (t - t_first) + 0.002, (sent_bytes, t - t_first)
            sent_bytes += size
        turns += 1
    assert turns == len(CHUNKS) * (2 * len(profiled["items"]) + 2)  # sequential turns + 2 callers x 1 turn
    for row in report["rows"]:
        for mode, m in row["modes"].items():
            for t in m["turns"]:
                assert t["ahead_ms"] <= 1.0, (row["chunk_ms"], mode, t)  # the profiler's own check agrees
                assert t["send_s"] >= t["audio_s"] - 0.03  # the speech took its own duration to send


async def test_accuracy_equals_score_py(server, manifest, profiled, tmp_path):
    report = profiled["report"]
    for row in report["rows"]:
        out = tmp_path / f"score_{row['chunk_ms']}.json"
        proc = await asyncio.to_thread(run_cli, "clients/score.py", manifest, "--url", server.url, "--manual",
                                       "--chunk-ms", str(row["chunk_ms"]), "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        scored = json.loads(out.read_text())
        manual = row["modes"]["manual"]
        assert manual["table"] == scored["table"], (row["chunk_ms"], manual["table"], scored["table"])
        assert manual["accuracy"] == scored["table"]["overall"]["accuracy"]
        assert [t["prediction"] for t in manual["turns"]] == [r["prediction"] for r in scored["records"]]
    # server VAD turns: score.py's path at the same (real-time) pace
    from clients.score import score_server
    from agent.training.evaluate import score

    chunk = report["rows"][0]["chunk_ms"]
    records = await score_server(server.url, profiled["items"], speed=1.0, chunk_ms=chunk, progress=False)
    assert report["rows"][0]["modes"]["vad"]["table"] == dict(score(records))


async def test_report_json_compute_and_plot(server, profiled, tmp_path):
    report = json.loads(json.dumps(profiled["report"]))  # the --json output is exactly this object
    assert {"url", "model", "speed", "turn_modes", "callers", "utterances", "speech_s", "rows"} <= set(report)
    assert report["speed"] == 1.0 and report["turn_modes"] == ["manual", "vad"] and report["utterances"] == 2
    assert report["model"] and "demo_model" in report["model"]
    assert [r["chunk_ms"] for r in report["rows"]] == list(CHUNKS)
    for row in report["rows"]:
        # the algorithmic latency is the server's, as its session.updated states it
        async with await common.connect(server.url) as conn:
            session = await conn.update(chunk_ms=row["chunk_ms"])
        assert row["error"] is None
        assert row["algorithmic_latency_ms"] == session["nestvox"]["algorithmic_latency_ms"] > row["chunk_ms"]
        for mode in ("manual", "vad"):
            m = row["modes"][mode]
            assert m["n"] == 2 and m["failed"] == 0 and 0.0 <= m["accuracy"] <= 1.0 and m["scored"] == 2
            assert 0 <= m["e2ft"]["p50"] <= m["e2ft"]["p90"]
            assert m["created"]["p50"] <= m["first_delta"]["p50"] <= m["first_delta"]["p90"]
        # the client's vad figure includes the VAD's silence window (500 ms by default)
        assert row["modes"]["vad"]["first_delta"]["p50"] > row["modes"]["manual"]["first_delta"]["p50"]
        b1 = row["compute"]["batch1"]
        assert b1["rtf"] > 0 and b1["audio_s"] >= 2 * report["speech_s"] * 0.9 and b1["steps"] > 0
        assert b1["mean_batch"] == pytest.approx(1.0)  # one caller at a time
        load = row["compute"]["load"]
        assert load["callers"] == 2 and load["turns"] == 2 and load["errors"] == []
        assert load["compute"]["rtf"] > 0 and load["compute"]["mean_batch"] >= 1.0
    assert report["rows"][0]["algorithmic_latency_ms"] < report["rows"][1]["algorithmic_latency_ms"]
    text = prof.table(profiled["report"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["chunk", "ms", "turns", "n"] and "RTF@2" in lines[0]
    assert [line.split()[:2] for line in lines[2:6]] == [["160", "manual"], ["160", "vad"], ["320", "manual"],
                                                         ["320", "vad"]]
    png = tmp_path / "profile.png"
    prof.plot(profiled["report"], str(png))
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10000


async def test_cli_json_plot_and_errors(server, manifest, tmp_path):
    png = tmp_path / "cli.png"
    # the whole command line, fast (--speed 0, one mode, one chunk size) plus a chunk size the server refuses
    proc = await asyncio.to_thread(run_cli, "clients/profile.py", "--url", server.url, "--chunks", "160,100",
                                   "--manifest", manifest, "--turns", "manual", "--speed", "0", "--plot", str(png),
                                   "--json")
    assert proc.returncode == 0, proc.stderr
    report = last_json(proc.stdout)
    ok, refused = report["rows"]
    assert ok["chunk_ms"] == 160 and ok["modes"]["manual"]["n"] == 2 and ok["compute"]["batch1"]["rtf"] > 0
    assert refused["modes"] == {} and "multiple of 80" in refused["error"]  # the server's own message
    assert "chunk 100 ms: the server refused" in proc.stdout and "| overall | 2 |" in proc.stdout
    assert png.read_bytes()[:8] == PNG
    # nothing listens: one clear line, no traceback
    url = f"ws://127.0.0.1:{free_port()}/v1/realtime"
    proc = await asyncio.to_thread(run_cli, "clients/profile.py", "--url", url, "--manifest", manifest, "--plot", "")
    assert proc.returncode == 1 and "python serve.py" in proc.stderr and "Traceback" not in proc.stderr
    # a manifest line without audio
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "Timer set for 12 minutes."}\n')
    proc = await asyncio.to_thread(run_cli, "clients/profile.py", "--url", server.url, "--manifest", str(bad),
                                   "--plot", "")
    assert proc.returncode == 1 and "bad.jsonl:1: the line has no audio_filepath" in proc.stderr
    assert "Traceback" not in proc.stderr
