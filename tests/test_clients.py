"""clients/: file streamer, profiler, load generator and mic client against the real
server (serve.build_server with no --model: the embedded demo model) on loopback,
in the server's default dialect (OpenAI Realtime GA).

The servers run in a background thread with their own event loop, so the clients
under test (in-process on pytest-asyncio's loop, or as subprocesses) talk to them
over a real websocket. Timing numbers are only checked for order and presence,
never against thresholds.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clients import common, mic  # noqa: E402
from clients.file import send_text, stream_file  # noqa: E402
from clients.load import run_load  # noqa: E402
from conftest import ServerThread  # noqa: E402

TOKEN = "s3cret"
STAGES = ("speech_end_to_encoder_done", "speech_end_to_first_token", "first_token_to_last_token",
          "speech_end_to_last_token")


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(["--port", "0"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_server():
    """max_sessions=2 and a bearer token: refusals and auth."""
    srv = ServerThread(["--port", "0", "--max-sessions", "2", "--auth-token", TOKEN]).start()
    yield srv
    srv.stop()


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_latency(latency_ms):
    assert set(STAGES) <= set(latency_ms), latency_ms
    for stage in STAGES:
        assert isinstance(latency_ms[stage], (int, float)) and latency_ms[stage] >= 0, (stage, latency_ms)
    assert latency_ms["speech_end_to_encoder_done"] <= latency_ms["speech_end_to_first_token"] \
        <= latency_ms["speech_end_to_last_token"]


# -- the GA session object --------------------------------------------------------------
def test_session_update_builds_ga_session_objects():
    assert common.session_update() == {"type": "realtime"}
    assert common.session_update(rate=16000, manual=True, chunk_ms=320, temperature=0.7, instructions=None) == {
        "type": "realtime", "instructions": None, "nestvox": {"chunk_ms": 320, "temperature": 0.7},
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}
    assert common.session_update(turn_detection={"type": "server_vad", "silence_duration_ms": 400},
                                 max_output_tokens=20, top_p=0.9, max_turn_seconds=30) == {
        "type": "realtime", "max_output_tokens": 20, "nestvox": {"top_p": 0.9, "max_turn_seconds": 30},
        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}}
    assert common.session_update(manual=False)["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    session = {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 48000},
                                                       "turn_detection": None}},
               "nestvox": {"chunk_ms": 160, "algorithmic_latency_ms": 200.0}}
    assert common.session_rate(session) == 48000 and common.session_turn_detection(session) is None
    assert common.describe_session(session) == \
        "chunk 160 ms (algorithmic latency 200.0 ms), input 48000 Hz, manual commit"
    err = common.error_of({"type": "error", "error": {"type": "invalid_request_error", "code": "x", "message": "m",
                                                      "param": "session.audio", "event_id": "e1"}})
    assert err == {"type": "invalid_request_error", "code": "x", "message": "m", "param": "session.audio",
                   "event_id": "e1"}
    assert common.describe_error(err) == "x: m (param session.audio)"


def check_ga_events(events):
    """Every server event has an event_id; a response's events come in GA order and agree."""
    assert all(isinstance(e.get("event_id"), str) and e["event_id"] for e in events), events
    kinds = [e["type"] for e in events]
    order = ["response.created", "response.output_item.added", "response.content_part.added",
             "response.output_text.delta", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert "response.text.delta" not in kinds and "error" not in kinds
    response = events[-1]["response"]
    assert events[-1]["type"] == "response.done" and response["object"] == "realtime.response"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done_text = next(e["text"] for e in events if e["type"] == "response.output_text.done")
    item = response["output"][0]
    assert item["role"] == "assistant" and item["content"][0]["type"] == "output_text"
    assert deltas == done_text == item["content"][0]["text"]
    usage = response["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] >= 1
    # the assistant item: added (in progress) and done (with the reply), as conversation items too
    items = [e["item"] for e in events if e["type"] in ("conversation.item.added", "conversation.item.done")
             and e["item"]["role"] == "assistant"]
    assert [i["id"] for i in items] == [item["id"]] * 2 and items[1]["content"][0]["text"] == deltas
    return deltas


# -- file.py ----------------------------------------------------------------------------
async def test_stream_file_server_vad(server, speech_wav):
    result = await stream_file(server.url, speech_wav, speed=0)
    kinds = [e["type"] for e in result.events]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added", "response.created",
             "response.output_text.delta", "response.output_text.done", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert result.done["type"] == "response.done" and kinds[-1] == "response.done"
    response = result.done["response"]
    assert response["status"] in ("completed", "incomplete") and result.status == response["status"]
    assert response["usage"]["output_tokens"] >= 1 and result.usage == response["usage"]
    check_latency(result.latency_ms)
    # the reply: deltas, output_text.done and response.done all agree
    deltas = check_ga_events(result.events)
    assert result.text and result.text == deltas
    assert result.response_id == response["id"]
    # the user's audio item: committed, then added to the conversation before the reply
    committed = next(e for e in result.events if e["type"] == "input_audio_buffer.committed")
    user = next(e["item"] for e in result.events if e["type"] == "conversation.item.added")
    assert result.user_item_id == committed["item_id"] == user["id"]
    assert user["role"] == "user" and user["content"][0]["type"] == "input_audio"
    # the VAD ended the turn inside the utterance's trailing part, not in our padding
    stopped = next(e for e in result.events if e["type"] == "input_audio_buffer.speech_stopped")
    assert 1000 < stopped["audio_end_ms"] <= result.audio_ms + 50
    c = result.client_ms
    assert c["end_to_speech_stopped"] <= c["end_to_created"] <= c["end_to_first_delta"] <= c["end_to_done"]
    assert c["speech_stopped_to_first_delta"] >= 0


async def test_stream_file_manual_resampled(server, speech_wav, tmp_path):
    """A 44.1 kHz stereo file, sent at 48 kHz (session.update), with manual commit."""
    import soundfile as sf

    data, rate = sf.read(speech_wav, dtype="float32")
    import soxr

    stereo = np.stack([soxr.resample(data, rate, 44100)] * 2, axis=1) * np.array([1.0, 0.5], dtype=np.float32)
    path = str(tmp_path / "stereo44.wav")
    sf.write(path, stereo, 44100)
    seen = []
    result = await stream_file(server.url, path, speed=0, manual=True, rate=48000, chunk_ms=320, on_event=seen.append)
    updated = next(e for e in seen if e["type"] == "session.updated")["session"]
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 48000}
    assert updated["nestvox"]["chunk_ms"] == 320 and updated["audio"]["input"]["turn_detection"] is None
    kinds = [e["type"] for e in result.events]
    assert "input_audio_buffer.speech_started" not in kinds  # manual: no VAD events
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created") < kinds.index("response.done")
    check_latency(result.latency_ms)
    assert abs(result.audio_ms - 1000 * data.size / rate) < 5
    assert result.client_ms["end_to_speech_stopped"] is None and result.client_ms["end_to_first_delta"] > 0


async def test_stream_file_at_the_ga_rate_sends_no_update(server, speech_wav):
    """rate=None: the audio goes at the GA session's own 24 kHz, no session.update."""
    seen = []
    result = await stream_file(server.url, speech_wav, speed=0, manual=False, rate=None, on_event=seen.append)
    assert "session.updated" not in [e["type"] for e in seen]
    assert seen[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    check_ga_events(result.events)
    stopped = next(e for e in result.events if e["type"] == "input_audio_buffer.speech_stopped")
    assert 1000 < stopped["audio_end_ms"] <= result.audio_ms + 50  # 24 kHz audio, server times in ms


async def test_typed_turn(server):
    """send_text / file.py --text: conversation.item.create (input_text) + response.create."""
    result = await send_text(server.url, "turn on the lights in the kitchen", max_output_tokens=8)
    deltas = check_ga_events(result.events)
    assert result.text == deltas and result.text
    user = next(e["item"] for e in result.events if e["type"] == "conversation.item.added")
    assert user["role"] == "user" and user["content"] == [{"type": "input_text",
                                                           "text": "turn on the lights in the kitchen"}]
    assert result.usage["output_tokens"] <= 8
    c = result.client_ms
    assert c["end_to_created"] <= c["end_to_first_delta"] <= c["end_to_done"]
    proc = await asyncio.to_thread(run_cli, "clients/file.py", "--text", "turn on the lights in the kitchen",
                                   server.url, "--max-output-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "assistant: " + common.printable(result.text) in proc.stdout.splitlines()  # temperature 0
    proc = await asyncio.to_thread(run_cli, "clients/file.py", "--url", server.url)
    assert proc.returncode == 2 and "--text" in proc.stderr


async def test_refused_update_parses_the_ga_error(server):
    conn = await common.connect(server.url)
    async with conn:
        with pytest.raises(common.UpdateRefused) as err:
            await conn.update(chunk_ms=100)
        exc = err.value
        assert exc.code == "invalid_session_config" and exc.error["type"] == "invalid_request_error"
        assert "chunk_ms" in (exc.param or "") and "multiple of 80" in str(exc)
        assert exc.error["event_id"].startswith("evt_client_")  # the session.update it answers
        assert conn.session["nestvox"]["chunk_ms"] != 100  # nothing changed
        session = await conn.update(rate=16000, manual=True, instructions="Answer briefly.")
        assert conn.rate == 16000 and conn.manual and session["instructions"] == "Answer briefly."


async def test_file_cli_prints_reply(server, speech_wav):
    expected = (await stream_file(server.url, speech_wav, speed=0)).text
    proc = await asyncio.to_thread(run_cli, "clients/file.py", speech_wav, "--url", server.url, "--speed", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    reply_line = next(line for line in out.splitlines() if line.startswith("assistant: "))
    assert reply_line == "assistant: " + common.printable(expected)  # temperature 0: the same reply
    rows = {line.split("  ")[0].strip(): line.split()[-1] for line in out.splitlines()
            if line.startswith(("server ", "client "))}
    assert float(rows["server speech_end_to_first_token"]) >= 0
    assert float(rows["client end_to_first_delta"]) >= float(rows["client end_to_speech_stopped"])


# Spoken in reserved voices (never heard in training), chosen before the demo model was trained:
# one request per intent plus a held-out (device, room) combination. The model scores 89.8% on
# the reserved-voice test split, and two of these are among its misses (whole-file turns):
# en-029's "bedroom" comes back "living room", and the held-out "tv in the kitchen" comes back
# "heater in the kitchen" (the README's results table has the error analysis).
DEMO_REQUESTS = [
    ("en-029", "turn off the fan in the bedroom", "Turning off the fan in the bedroom."),
    ("en-gb-scotland", "turn on the tv in the kitchen", "Turning on the tv in the kitchen."),  # held-out combo
    ("en-us+linda", "set a timer for twelve minutes", "Timer set for 12 minutes."),
    ("en-gb-x-rp+m6", "what is seven times eight", "7 times 8 is 56."),
]
REPLY_FORMS = {"Turning": r"Turning (on|off) the [a-z]+ in the [a-z ]+\.", "Timer": r"Timer set for \d+ minutes?\.",
               "7": r"-?\d+ (plus|minus|times) -?\d+ is -?\d+\."}


async def test_default_server_serves_the_trained_demo_model(server, tmp_path):
    """`python serve.py` with no --model serves agent/assets/demo_model, which understands speech."""
    import re

    import serve

    from agent.training.voices import is_reserved
    from conftest import synthesize

    assert serve.parse_args([]).model is None and serve.default_model() == serve.DEMO_MODEL
    right = 0
    for voice, text, answer in DEMO_REQUESTS:
        assert is_reserved(voice)
        wav = synthesize(text, str(tmp_path / f"{voice}.wav"), voice=voice)
        # --manual: the turn is the whole file. With server VAD at --speed 0 the turn's extent
        # (and so a marginal reply) can depend on how the packets fall into engine ticks.
        proc = await asyncio.to_thread(run_cli, "clients/file.py", wav, "--url", server.url, "--speed", "0",
                                       "--manual")
        assert proc.returncode == 0, proc.stderr
        replies = [line[len("assistant: "):] for line in proc.stdout.splitlines() if line.startswith("assistant: ")]
        assert len(replies) == 1, proc.stdout
        # every reply is a well-formed answer of the spoken intent; most are exactly right
        assert re.fullmatch(REPLY_FORMS[answer.split()[0]], replies[0]), (voice, text, replies)
        right += replies[0] == answer
    assert right >= 2, right


async def test_score_cli_streams_a_manifest_and_scores_the_replies(server, tmp_path):
    """clients/score.py: every manifest utterance through the server, exact match per intent."""
    from conftest import synthesize

    wav = synthesize("set a timer for twelve minutes", str(tmp_path / "timer.wav"), voice="en-us+linda")
    manifest = tmp_path / "m.jsonl"
    lines = [{"audio_filepath": wav, "answer": "Timer set for 12 minutes.", "intent": "timer", "text": "a"},
             {"audio_filepath": wav, "answer": "Not this.", "intent": "timer", "text": "b"}]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "score.json"
    proc = await asyncio.to_thread(run_cli, "clients/score.py", str(manifest), "--url", server.url, "--manual",
                                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    first, second = result["records"]
    assert first["prediction"] == second["prediction"] and first["prediction"]  # same file, same turn
    right = int(first["prediction"] == "Timer set for 12 minutes.")
    assert result["table"]["timer"] == {"n": 2, "correct": right, "accuracy": right / 2}
    assert "| timer | 2 |" in proc.stdout and "expected 'Not this.'" in proc.stdout
    proc = await asyncio.to_thread(run_cli, "clients/score.py", str(tmp_path / "missing.jsonl"), "--url", server.url)
    assert proc.returncode == 1 and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr


async def test_unreachable_server_message(speech_wav):
    url = f"ws://127.0.0.1:{free_port()}/v1/realtime"
    with pytest.raises(common.ServerUnreachable) as err:
        await common.connect(url)
    assert url in str(err.value) and "python serve.py" in str(err.value)
    proc = await asyncio.to_thread(run_cli, "clients/file.py", speech_wav, url)
    assert proc.returncode == 1
    assert url in proc.stderr and "python serve.py" in proc.stderr and "Traceback" not in proc.stderr


# -- load.py ----------------------------------------------------------------------------
async def test_auth(small_server):
    with pytest.raises(common.ServerRefused) as err:
        await common.connect(small_server.url)
    assert err.value.code == "unauthorized"
    conn = await common.connect(small_server.url, token=TOKEN)
    async with conn:
        session = conn.session
        assert session["type"] == "realtime" and session["object"] == "realtime.session"
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000} and conn.rate == 24000
        assert 16000 in session["nestvox"]["input_rates"] and not conn.manual


async def test_load_refuses_third_caller(small_server, speech_wav):
    for _ in range(100):  # let the auth test's connection go
        if small_server.connections() == 0:
            break
        await asyncio.sleep(0.05)
    report = await run_load(small_server.url, callers=3, duration=6, wav=speech_wav, token=TOKEN, budget_ms=1000)
    assert report["refused"] == 1, report
    assert report["refusals"][0]["code"] == "server_full"
    assert report["errors"] == 0, report["error_list"]
    assert report["connected"] == 2
    statuses = sorted(c["status"] for c in report["per_caller"])
    assert statuses.count("refused") == 1
    assert all(s in ("sustained", "late") for s in statuses if s != "refused"), statuses
    assert report["turns"]["completed"] >= 2 and report["turns"]["failed"] == 0
    e2ft = report["latency_ms"]["server e2ft"]
    assert e2ft["n"] == report["turns"]["completed"]
    assert 0 <= e2ft["p50"] <= e2ft["p90"] <= e2ft["p99"]
    client = report["latency_ms"]["client speech end -> 1st delta"]
    assert client["p50"] >= report["silence_ms"] * 0.9  # it includes the VAD silence window
    assert report["elapsed_s"] <= 6 + 1.0
    engine = report["engine"]  # the server's own time split over the run, from /healthz
    assert 0 < engine["busy_pct"] <= 100 and 0 < engine["encoder_pct"] <= engine["busy_pct"]
    assert engine["llm_pct"] > 0 and engine["encoder_rtf"] > 0
    speed = report["reply_tok_s"]  # every multi-token reply has a decode speed
    assert 1 <= speed["n"] <= report["turns"]["completed"] and 0 < speed["min"] <= speed["p50"] <= speed["p90"]


async def test_load_refuses_remote_and_bounds():
    with pytest.raises(common.ClientError, match="only targets a server on this machine"):
        await run_load("ws://192.0.2.1:8765/v1/realtime", callers=1, duration=1)
    with pytest.raises(common.ClientError, match="between 1 and 64"):
        await run_load("ws://127.0.0.1:8765/v1/realtime", callers=65, duration=1)
    proc = await asyncio.to_thread(run_cli, "clients/load.py", "--url", "ws://example.com:8765")
    assert proc.returncode == 2 and "only targets" in proc.stderr and "Traceback" not in proc.stderr


# -- mic.py -----------------------------------------------------------------------------
def test_mic_no_input_device_exit_code(monkeypatch, capsys):
    import sounddevice

    def no_device(*args, **kwargs):
        raise sounddevice.PortAudioError("Error querying device -1")

    monkeypatch.setattr(sounddevice, "query_devices", no_device)
    assert mic.main(["--url", "ws://127.0.0.1:1/v1/realtime"]) == 2
    err = capsys.readouterr().err
    assert "no microphone" in err and "default input device" in err and "--list-devices" in err


def test_mic_without_portaudio_subprocess(tmp_path):
    """sounddevice raises OSError('PortAudio library not found') at import when PortAudio is missing."""
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    proc = run_cli("clients/mic.py", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "PortAudio is not available" in proc.stderr and "Traceback" not in proc.stderr


class FakeSoundDevice:
    """Plays a recording through mic.py's InputStream callback, as PortAudio's thread would."""

    PortAudioError = RuntimeError

    def __init__(self, samples: np.ndarray):
        self.samples = samples
        self.opened = {}

    def query_devices(self, device=None, kind=None):
        return {"name": "fake", "max_input_channels": 1}

    def InputStream(self, samplerate, channels, dtype, device, callback, blocksize):
        self.opened = dict(samplerate=samplerate, channels=channels, dtype=dtype, blocksize=blocksize)
        fake = self

        class Stream:
            def __enter__(self):
                self.stop = threading.Event()
                self.thread = threading.Thread(target=self.run, daemon=True)
                self.thread.start()
                return self

            def run(self):
                pcm = (np.clip(fake.samples, -1, 1) * 32767).astype(np.int16)[:, None]
                for i in range(0, len(pcm), blocksize):
                    if self.stop.is_set():
                        return
                    callback(pcm[i:i + blocksize], blocksize, None, None)
                    time.sleep(0.002)  # 10x real time

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join(5)

        return Stream()


async def test_mic_streams_a_turn(server, speech, capsys):
    fake = FakeSoundDevice(np.concatenate([speech, np.zeros(16000, np.float32)]))
    turns = await mic.run_mic(server.url, sd=fake, max_turns=1, seconds=30)
    assert fake.opened == dict(samplerate=16000, channels=1, dtype="int16", blocksize=320)
    assert len(turns) == 1
    check_latency(turns[0].latency_ms)
    assert turns[0].text
    out = capsys.readouterr().out
    assert "[listening]" in out and "assistant: " + common.printable(turns[0].text) in out
    assert "end of speech -> first token" in out
