"""Spoken replies over the wire: GA's response.output_audio.* from the TTS stage,
barge-in and conversation.item.truncate, a failing TTS engine."""
import base64
import math
import json
import subprocess

import numpy as np
import pytest
from websockets.asyncio.client import connect

from server_helpers import SYSTEM, recv_until, start, update

OUT_RATE = 24000
AUDIO = {"output_modalities": ["audio"],
         "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUT_RATE}, "voice": "en-us"}}}


@pytest.fixture()
async def server(inference):
    srv = await start(inference, max_sessions=4)
    yield srv
    await srv.stop()


async def typed(ws, text, **response):
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await recv_until(ws, "conversation.item.done")
    await ws.send(json.dumps({"type": "response.create", "response": response}))


def audio_of(events) -> np.ndarray:
    pcm = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def transcript_of(events) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")


def espeak_seconds(text: str, tmp_path) -> float:
    import soundfile as sf

    path = str(tmp_path / "ref.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", path, text], check=True, capture_output=True)
    info = sf.info(path)
    return info.frames / info.samplerate


async def test_spoken_reply_audio_matches_its_transcript_and_the_text_reply(server, inference, tmp_path):
    async with connect(server.url) as ws:  # the same typed turn, text then audio, fresh conversations
        await recv_until(ws, "session.created")
        await typed(ws, "turn on the lights", max_output_tokens=12)
        text_reply = (await recv_until(ws, "response.done"))[-1]["response"]["output"][0]["content"][0]["text"]
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(**AUDIO))
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["output_modalities"] == ["audio"] and session["audio"]["output"]["voice"] == "en-us"
        await typed(ws, "turn on the lights", max_output_tokens=12)
        events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "response.output_text.delta" not in kinds
    part = next(e for e in events if e["type"] == "response.content_part.added")["part"]
    assert part == {"type": "audio", "transcript": ""}
    assert kinds.index("response.output_audio.delta") < kinds.index("response.output_audio.done") \
        < kinds.index("response.output_audio_transcript.done") < kinds.index("response.done")
    transcript = transcript_of(events)
    done = events[-1]["response"]
    assert transcript == text_reply == inference.generate([{"role": "user", "content": "turn on the lights"}],
                                                          system_prompt=SYSTEM, max_new_tokens=12)
    assert next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"] == transcript
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": transcript}]
    audio = audio_of(events)
    seconds = len(audio) / OUT_RATE
    assert np.sqrt(np.mean(audio ** 2)) > 0.02  # speech, not silence
    if transcript.strip(" .,!?"):
        assert abs(seconds - espeak_seconds(transcript, tmp_path)) < 0.2 * espeak_seconds(transcript, tmp_path) + 0.15
    first_audio = done["latency_ms"]["speech_end_to_first_audio"]
    assert first_audio is not None and first_audio >= done["latency_ms"]["speech_end_to_first_token"]


async def test_barge_in_truncate_puts_only_what_was_heard_into_the_context(server, inference):
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(output_modalities=["audio"], audio={
            "output": {"format": {"type": "audio/pcm", "rate": OUT_RATE}}, "input": {"turn_detection": None}}))
        await recv_until(ws, "session.updated")
        await typed(ws, "set a timer", max_output_tokens=200)  # the random model has no commas: cut at length
        events = await recv_until(ws, "response.done")
        item = events[-1]["response"]["output"][0]
        full = item["content"][0]["transcript"]
        starts, at = [], 0.0  # when each transcript piece starts in the audio
        for e in events:
            if e["type"] == "response.output_audio_transcript.delta":
                starts.append((at, e["delta"]))
            elif e["type"] == "response.output_audio.delta":
                at += len(base64.b64decode(e["delta"])) / 2 / OUT_RATE * 1000
        assert len(starts) >= 2, "the reply should be spoken in several pieces"
        played_ms = math.ceil(starts[1][0])  # the user barged in as the second piece began
        heard = starts[0][1]
        await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item["id"],
                                  "content_index": 0, "audio_end_ms": played_ms}))
        truncated = (await recv_until(ws, "conversation.item.truncated"))[-1]
        assert truncated == {**truncated, "item_id": item["id"], "audio_end_ms": played_ms, "content_index": 0}
        await typed(ws, "and then", max_output_tokens=8)
        after = await recv_until(ws, "response.done")
    expected = inference.generate([{"role": "user", "content": "set a timer"},
                                   {"role": "assistant", "content": heard},
                                   {"role": "user", "content": "and then"}], system_prompt=SYSTEM, max_new_tokens=8)
    assert heard != full and transcript_of(after) == expected


class FailingEngine:
    name, sample_rate, default_voice = "failing", 16000, None

    def synthesize(self, text, voice=None, speed=1.0):
        raise RuntimeError("the synthesizer is broken")

    def check_voice(self, voice):
        pass

    def close(self):
        pass


async def test_a_failing_tts_engine_gives_an_error_and_the_reply_still_arrives(server, inference):
    from agent.tts import TTSWorker

    server.tts.close()
    server.tts = TTSWorker(FailingEngine(), warmup=False)
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(output_modalities=["audio"]))
        await recv_until(ws, "session.updated")
        await typed(ws, "turn on the lights", max_output_tokens=12)
        events = await recv_until(ws, "response.done")
    error = next(e for e in events if e["type"] == "error")["error"]
    assert error["code"] == "tts_failed" and "broken" in error["message"]
    expected = inference.generate([{"role": "user", "content": "turn on the lights"}], system_prompt=SYSTEM,
                                  max_new_tokens=12)
    assert transcript_of(events) == expected == events[-1]["response"]["output"][0]["content"][0]["transcript"]
    assert events[-1]["response"]["status"] in ("completed", "incomplete")


async def test_voice_and_dialect_checks(server):
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(audio={"output": {"voice": "zzq-nope"}}))
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "invalid_session_config" and error["param"] == "session.audio.output.voice"
        await ws.send(update(audio={"output": {"voice": "marin", "speed": 1.2}}))  # OpenAI's names: the default
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["output"] == {**session["audio"]["output"], "voice": "marin", "speed": 1.2}
        await ws.send(json.dumps({"type": "output_audio_buffer.clear"}))
        assert (await recv_until(ws, "error"))[-1]["error"]["code"] == "invalid_event"
    async with connect(server.url + "?dialect=beta") as ws:
        await recv_until(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"modalities": ["audio", "text"]}}))
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert "GA dialect" in error["message"]


async def test_speech_during_a_spoken_reply_cancels_it_and_its_audio(server, trimmed_speech):
    from server_helpers import RATE16, send_audio, with_silence

    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(output_modalities=["audio"], **RATE16))
        await recv_until(ws, "session.updated")
        await typed(ws, "tell me a story", max_output_tokens=3000)
        first = await recv_until(ws, "response.output_audio.delta")
        await send_audio(ws, with_silence(trimmed_speech))  # the user talks over the reply
        events = first + await recv_until(ws, "response.done")
        kinds = [e["type"] for e in events]
        done = events[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
        # no audio of the cancelled reply after the server heard the user
        assert "response.output_audio.delta" not in kinds[kinds.index("input_audio_buffer.speech_started"):]
        # the item holds what was spoken (sent), not the whole decoded text
        assert done["output"][0]["content"][0]["transcript"] == transcript_of(events) != ""
        # the barge-in turn gets its own (spoken) reply
        nxt = await recv_until(ws, "response.done")
        assert "response.output_audio.delta" in [e["type"] for e in nxt]


def test_heard_text_is_whole_pieces_then_whole_words_of_the_one_playing():
    from agent.realtime.speech_out import SpokenReply

    reply = SpokenReply("resp_1", stream=None, timeline=[(0.0, "Turning on the lights, "), (1000.0, "in the kitchen.")],
                        audio_ms=1800.0)
    assert reply.heard(0) == ""
    assert reply.heard(500) == "Turning on "  # 11 of 23 characters played: the words finished by then
    assert reply.heard(999.5) == "Turning on the lights, "
    assert reply.heard(1400) == "Turning on the lights, in the "
    assert reply.heard(5000) == reply.transcript == "Turning on the lights, in the kitchen."
