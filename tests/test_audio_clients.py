"""Spoken replies from the client side: file.py --audio / --save-reply, mic.py's playback,
half duplex and barge-in (conversation.item.truncate), load.py --audio, against the real
server (serve.build_server, the embedded demo model, espeak-ng TTS) on loopback.

The reply's audio is checked against espeak-ng itself: the transcript, synthesized with
`espeak-ng -w` (the server's engine and default voice, en-us at 175 wpm), lasts as long
as the audio deltas (within 15%), and the audio is speech, not silence.
"""
import asyncio
import os
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
from clients.load import format_report, run_load  # noqa: E402
from test_clients import FakeSoundDevice, ServerThread, check_latency, run_cli  # noqa: E402

OUT_RATE = 24000


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(["--port", "0"]).start()
    yield srv
    srv.stop()


def espeak_seconds(text: str, folder, voice: str = "en-us", wpm: int = 175) -> float:
    """How long espeak-ng speaks `text` (its own wav, its own rate)."""
    import soundfile as sf

    path = os.path.join(str(folder), "espeak_ref.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", path, text], check=True, capture_output=True)
    info = sf.info(path)
    return info.frames / info.samplerate


def check_spoken(result: common.TurnResult, folder, wpm: int = 175) -> np.ndarray:
    """The spoken reply: GA events in order, audio that is speech and as long as espeak-ng's
    synthesis of the transcript, the transcript in deltas, done, content part and item."""
    kinds = [e["type"] for e in result.events]
    order = ["response.created", "response.output_item.added", "response.content_part.added",
             "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert "response.output_audio_transcript.delta" in kinds and "error" not in kinds
    assert "response.output_text.delta" not in kinds  # audio replies carry their text as the transcript
    part = next(e["part"] for e in result.events if e["type"] == "response.content_part.added")
    assert part["type"] == "audio"
    # every audio delta names the reply's item; the decoded PCM16 is speech at the output rate
    deltas = [e for e in result.events if e["type"] == "response.output_audio.delta"]
    assert {e["item_id"] for e in deltas} == {result.item_id} and result.item_id
    assert {e.get("response_id") for e in deltas} == {result.response_id}
    assert result.output_rate == OUT_RATE and len(result.audio_chunks) == len(deltas)
    pcm = common.pcm16_to_float(result.audio_pcm)
    assert pcm.size == sum(len(c) for c in result.audio_chunks) // 2
    rms = float(np.sqrt(np.mean(pcm ** 2)))
    assert rms > 0.01 and np.abs(pcm).max() > 0.1, rms  # speech, not silence
    loud = np.mean(np.abs(pcm) > 0.01)
    assert loud > 0.3, loud  # mostly voiced, not a click in silence
    # the transcript: deltas == done == content part == item == the result's text
    transcript = "".join(result.transcript_deltas)
    assert transcript and transcript == result.transcript == result.text
    assert next(e["part"]["transcript"] for e in result.events
                if e["type"] == "response.content_part.done") == transcript
    item = result.response["output"][0]
    assert item["content"][0] == {"type": "output_audio", "transcript": transcript}
    # as long as espeak-ng speaking the transcript in one go
    ref = espeak_seconds(transcript, folder, wpm=wpm)
    assert abs(result.audio_seconds - ref) <= 0.15 * ref, (result.audio_seconds, ref, transcript)
    # first audio: after the first token, before response.done, on both clocks
    lat, cli = result.latency_ms, result.client_ms
    assert lat["speech_end_to_first_token"] <= lat["speech_end_to_first_audio"], lat
    assert 0 < cli["end_to_first_audio"] <= cli["end_to_done"], cli
    return pcm


def test_reply_audio_session_fields():
    assert common.reply_audio() == {"output_modalities": ["audio"], "output_rate": 24000, "voice": None,
                                    "voice_speed": None}
    assert common.session_update(rate=16000, **common.reply_audio(voice="en-gb", speed=1.2)) == {
        "type": "realtime", "output_modalities": ["audio"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "en-gb", "speed": 1.2}}}
    assert common.session_update(**common.reply_audio(False)) == {"type": "realtime", "output_modalities": ["text"]}
    session = {"type": "realtime", "output_modalities": ["audio"],
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None},
                         "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "en-us", "speed": 1.0}},
               "nestvox": {"chunk_ms": 160, "algorithmic_latency_ms": 200.0}}
    assert common.session_speaks(session) and common.session_output_rate(session) == 24000
    assert common.describe_session(session).endswith(", spoken replies (voice en-us, speed 1.00, 24000 Hz)")
    # TurnResult decodes audio deltas and keeps the base64 out of its event list
    import base64

    r = common.TurnResult()
    pcm = np.arange(480, dtype="<i2").tobytes()
    assert r.observe({"type": "response.output_audio.delta", "item_id": "item_9", "delta":
                      base64.b64encode(pcm).decode()}) == "audio"
    assert r.audio_pcm == pcm and r.item_id == "item_9" and "delta" not in r.events[0]
    assert r.audio_seconds == pytest.approx(0.02) and "first_audio" in r.stamps


async def test_spoken_reply_of_a_file_turn(server, speech_wav, tmp_path):
    """file.py's stream_file(audio=True): a spoken turn answered in speech whose transcript is
    the written reply the same turn gets in text mode (temperature 0)."""
    text = await stream_file(server.url, speech_wav, speed=0, manual=True)
    seen = []
    spoken = await stream_file(server.url, speech_wav, speed=0, manual=True, audio=True, voice="en-us",
                               on_event=seen.append)
    updated = next(e for e in seen if e["type"] == "session.updated")["session"]
    assert updated["output_modalities"] == ["audio"]
    assert updated["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": OUT_RATE}
    assert updated["audio"]["output"]["voice"] == "en-us"
    check_spoken(spoken, tmp_path)
    check_latency(spoken.latency_ms)
    assert spoken.transcript == text.text and not text.spoken  # the same reply, spoken
    assert text.latency_ms.get("speech_end_to_first_audio") is None  # text replies have no first audio
    assert spoken.usage["output_tokens"] == text.usage["output_tokens"]


async def test_spoken_reply_of_a_typed_turn_voice_and_speed(server, tmp_path):
    """A typed turn answered in speech; --voice-speed 1.5 speaks the same words faster."""
    normal = await send_text(server.url, "set a timer for twelve minutes", audio=True)
    check_spoken(normal, tmp_path)
    fast = await send_text(server.url, "set a timer for twelve minutes", audio=True, voice_speed=1.5)
    assert fast.transcript == normal.transcript
    check_spoken(fast, tmp_path, wpm=round(175 * 1.5))
    assert fast.audio_seconds < 0.85 * normal.audio_seconds, (fast.audio_seconds, normal.audio_seconds)
    gb = await send_text(server.url, "set a timer for twelve minutes", audio=True, voice="en-gb")
    assert gb.transcript == normal.transcript and gb.audio_pcm != normal.audio_pcm  # another voice


async def test_file_cli_save_reply_writes_a_wav(server, speech_wav, tmp_path):
    import soundfile as sf

    out = tmp_path / "reply.wav"
    proc = await asyncio.to_thread(run_cli, "clients/file.py", speech_wav, "--url", server.url, "--speed", "0",
                                   "--manual", "--save-reply", str(out))
    assert proc.returncode == 0, proc.stderr
    data, rate = sf.read(str(out), dtype="float32")
    assert rate == OUT_RATE and data.ndim == 1 and np.sqrt(np.mean(data ** 2)) > 0.01
    reply = next(line[len("assistant: "):] for line in proc.stdout.splitlines() if line.startswith("assistant: "))
    ref = espeak_seconds(reply, tmp_path)
    assert abs(data.size / rate - ref) <= 0.15 * ref
    assert f"[spoken reply: {data.size / rate:.2f} s of audio at 24000 Hz" in proc.stdout
    assert f"written to {out}]" in proc.stdout
    rows = {line.split("  ")[0].strip(): line.split()[-1] for line in proc.stdout.splitlines()
            if line.startswith(("server ", "client "))}
    assert float(rows["server speech_end_to_first_audio"]) >= float(rows["server speech_end_to_first_token"])
    assert float(rows["client end_to_first_audio"]) > 0
    # --json: the summary carries the reply's audio facts; a reply with no audio cannot be saved
    proc = await asyncio.to_thread(run_cli, "clients/file.py", "--text", "what is seven times eight", server.url,
                                   "--audio", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["type"] == "client.summary" and summary["transcript"] == summary["text"]
    assert summary["reply_audio_s"] > 0.5 and summary["output_rate"] == OUT_RATE
    assert summary["latency_ms"]["speech_end_to_first_audio"] is not None
    proc = await asyncio.to_thread(run_cli, "clients/file.py", speech_wav, server.url, "--save-reply",
                                   str(tmp_path / "no" / "such" / "dir.wav"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr


# -- mic.py -----------------------------------------------------------------------------
class FakeDuplexDevice(FakeSoundDevice):
    """A microphone playing a recording at real time, and a speaker whose callback PortAudio
    would call at real time: what mic.py plays is recorded in `played`."""

    def __init__(self, samples: np.ndarray, pace: float = 1.0):
        super().__init__(samples)
        self.pace = pace
        self.played = []
        self.output_opened = {}

    def query_devices(self, device=None, kind=None):
        return {"name": "fake", "max_input_channels": 1, "max_output_channels": 1}

    def InputStream(self, samplerate, channels, dtype, device, callback, blocksize):
        self.opened = dict(samplerate=samplerate, channels=channels, dtype=dtype, blocksize=blocksize)
        return self._stream(lambda i, n: callback(self._mic[i:i + n], n, None, None), blocksize, samplerate,
                            len(self.samples))

    def OutputStream(self, samplerate, channels, dtype, device, callback, blocksize):
        self.output_opened = dict(samplerate=samplerate, channels=channels, dtype=dtype, blocksize=blocksize)

        def play(i, n):
            out = np.full((n, channels), 7, np.int16)  # garbage: the callback must overwrite all of it
            callback(out, n, None, None)
            self.played.append(out[:, 0].copy())

        return self._stream(play, blocksize, samplerate, None)

    @property
    def _mic(self):
        if not hasattr(self, "_pcm"):
            self._pcm = (np.clip(self.samples, -1, 1) * 32767).astype(np.int16)[:, None]
        return self._pcm

    def _stream(self, step, blocksize, rate, total):
        pace = self.pace

        class Stream:
            def __enter__(self):
                self.stop = threading.Event()
                self.thread = threading.Thread(target=self.run, daemon=True)
                self.thread.start()
                return self

            def run(self):
                start, i = time.perf_counter(), 0
                while not self.stop.is_set() and (total is None or i < total):
                    step(i, blocksize)
                    i += blocksize
                    delay = start + i / rate / pace - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join(5)

        return Stream()


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """Whether `needle` occurs in `haystack` as a contiguous run."""
    loud = np.flatnonzero(needle)
    if loud.size == 0:
        return True
    k = loud[0]
    for p in np.flatnonzero(haystack == needle[k]):
        start = p - k
        if start >= 0 and np.array_equal(haystack[start:start + needle.size], needle):
            return True
    return False


def two_utterances(speech: np.ndarray, gap_s: float, tail_s: float = 3.0) -> np.ndarray:
    """speech, `gap_s` of silence (the VAD ends the turn, the reply starts playing), the speech
    again (over the reply), then silence."""
    z = lambda s: np.zeros(int(16000 * s), np.float32)  # noqa: E731
    return np.concatenate([z(0.3), speech, z(gap_s), speech, z(tail_s)])


async def test_mic_plays_the_reply_and_barge_in_truncates_it(server, speech, capsys):
    """Full duplex: the second utterance starts while the first reply plays; playback stops at
    once and conversation.item.truncate says how much was played; the server confirms."""
    fake = FakeDuplexDevice(two_utterances(speech, gap_s=1.1))
    barge_ins, stats = [], {}
    turns = await mic.run_mic(server.url, sd=fake, audio=True, full_duplex=True, max_turns=2, seconds=25,
                              barge_ins=barge_ins, stats=stats)
    assert fake.output_opened == dict(samplerate=OUT_RATE, channels=1, dtype="int16", blocksize=480)
    assert len(turns) == 2 and all(t.spoken for t in turns), [t.status for t in turns]
    first, second = turns
    assert first.transcript and second.transcript
    out = capsys.readouterr().out
    assert "replies spoken (full duplex" in out and "first audio" in out
    assert len(barge_ins) == 1, (barge_ins, out)
    cut = barge_ins[0]
    assert cut["item_id"] == first.item_id
    total_ms = 1000 * first.audio_seconds
    assert 0 < cut["audio_end_ms"] < total_ms, (cut, total_ms)
    assert f"[barge-in: reply stopped after {cut['audio_end_ms']:.0f} ms of audio]" in out
    # the server's answer: conversation.item.truncated with what we asked
    assert cut["truncated"] is not None, cut
    assert cut["truncated"]["item_id"] == first.item_id and cut["truncated"]["audio_end_ms"] == cut["audio_end_ms"]
    assert cut["truncated"]["content_index"] == 0
    # playback stopped at once: nothing of the first reply played after the cut
    player = stats["player"]
    assert abs(player.played_ms(first.item_id) - cut["audio_end_ms"]) <= 1, player.played_ms(first.item_id)
    # the second reply played whole; the speaker got exactly the audio played (then silence)
    assert player.played_ms(second.item_id) == pytest.approx(1000 * second.audio_seconds, abs=1)
    played = np.concatenate(fake.played)
    n1 = int(round(cut["audio_end_ms"] * OUT_RATE / 1000))
    assert contains(played, np.frombuffer(first.audio_pcm, "<i2")[:n1])
    assert not contains(played, np.frombuffer(first.audio_pcm, "<i2")[:n1 + 2 * 480])  # not a block more
    assert contains(played, np.frombuffer(second.audio_pcm, "<i2"))
    sevens = lambda x: int(np.sum(np.frombuffer(x, "<i2") == 7) if isinstance(x, bytes) else np.sum(x == 7))  # noqa
    assert sevens(played) <= sevens(first.audio_pcm) + sevens(second.audio_pcm)  # every block written over
    assert stats["muted_blocks"] == 0


async def test_mic_half_duplex_mutes_the_microphone_while_the_reply_plays(server, speech, capsys):
    """Half duplex (the default): the same talk-over reaches the server as silence, so the reply
    plays to its end and nothing is truncated."""
    fake = FakeDuplexDevice(two_utterances(speech, gap_s=1.1, tail_s=3.0))
    barge_ins, stats = [], {}
    turns = await mic.run_mic(server.url, sd=fake, audio=True, seconds=9, barge_ins=barge_ins, stats=stats)
    assert turns and turns[0].spoken
    assert "replies spoken (half duplex" in capsys.readouterr().out
    assert barge_ins == []  # the talk-over was sent as silence
    first = turns[0]
    # at least the reply's length of microphone blocks (20 ms each) went out as silence
    assert stats["muted_blocks"] * 20 >= 1000 * first.audio_seconds, (stats["muted_blocks"], first.audio_seconds)
    player = stats["player"]
    assert player.played_ms(first.item_id) == pytest.approx(1000 * first.audio_seconds, abs=1)  # heard whole


def test_mic_audio_without_a_speaker_exit_code(monkeypatch, capsys):
    """--audio with no output device: exit code 2 and what to do; by default: text replies."""
    import sounddevice

    def devices(device=None, kind=None):
        if kind == "output":
            raise sounddevice.PortAudioError("Error querying device -1")
        return {"name": "mic", "max_input_channels": 1, "max_output_channels": 0}

    monkeypatch.setattr(sounddevice, "query_devices", devices)
    assert mic.main(["--url", "ws://127.0.0.1:1/v1/realtime", "--audio"]) == 2
    err = capsys.readouterr().err
    assert "no speaker" in err and "--text-only" in err and "Traceback" not in err
    # without --audio: a note, then on to the server (unreachable here: exit 1)
    assert mic.main(["--url", "ws://127.0.0.1:1/v1/realtime"]) == 1
    err = capsys.readouterr().err
    assert "no speaker" in err and "replies are written only" in err and "cannot reach" in err


# -- load.py ----------------------------------------------------------------------------
async def test_load_with_spoken_and_written_callers(server, speech_wav):
    """--audio-callers 1 of 2: the same figures per mode, plus first audio for the spoken one."""
    report = await run_load(server.url, callers=2, duration=9, wav=speech_wav, audio_callers=1, budget_ms=3000)
    assert report["errors"] == 0, report["error_list"]
    assert report["audio_callers"] == 1
    assert sorted(c["mode"] for c in report["per_caller"]) == ["audio", "text"]
    by_mode = report["by_mode"]
    assert set(by_mode) == {"text", "audio"}
    for mode in ("text", "audio"):
        figures = by_mode[mode]
        assert figures["turns"]["completed"] >= 1, (mode, report)
        e2ft = figures["latency_ms"]["server e2ft"]
        assert e2ft["n"] == figures["turns"]["completed"] and e2ft["p50"] >= 0
        assert figures["reply_tok_s"]["n"] >= 1 and figures["reply_tok_s"]["p50"] > 0
    audio = by_mode["audio"]["latency_ms"]
    assert audio["server e2fa"]["n"] == by_mode["audio"]["turns"]["completed"]
    assert audio["server e2fa"]["p50"] >= audio["server e2ft"]["p50"]
    assert audio["client speech end -> 1st audio"]["p99"] >= audio["client speech end -> 1st audio"]["p50"] > 0
    assert by_mode["text"]["latency_ms"]["server e2fa"]["n"] == 0
    assert by_mode["audio"]["latency_ms"]["client speech end -> 1st delta"]["n"] == 0  # no text deltas
    assert report["reply_audio_s"]["n"] >= 1 and report["reply_audio_s"]["p50"] > 0.5
    text = format_report(report)
    assert "1 spoken, 1 text" in text and "audio callers: latency (ms)" in text and "server e2fa" in text
    assert "spoken reply length: p50" in text


async def test_truncate_shortens_what_the_next_turn_hears(server, tmp_path):
    """Connection.truncate after a spoken reply: the server answers conversation.item.truncated,
    and the next turn is decoded from a shorter context than without the truncate."""
    contexts = {}
    for cut in (False, True):
        conn = await common.connect(server.url)
        async with conn:
            await conn.update(**common.reply_audio())
            first = await common.run_text_turn(conn, "set a timer for twelve minutes")
            assert first.spoken and first.audio_seconds > 1.0
            if cut:
                truncated = await conn.truncate(first.item_id, 400)
                assert truncated["item_id"] == first.item_id and truncated["audio_end_ms"] == 400
                assert truncated["content_index"] == 0
            second = await common.run_text_turn(conn, "what is seven times eight")
            assert second.spoken
            contexts[cut] = second.usage["input_tokens"]
    assert contexts[True] < contexts[False], contexts  # the unheard part of the reply left the context
    # truncating an item that does not exist is refused with an error event
    conn = await common.connect(server.url)
    async with conn:
        with pytest.raises(common.TurnFailed) as err:
            await conn.truncate("item_nope", 100, timeout=5)
        assert err.value.code and err.value.error["event_id"]
