"""One spoken turn through a voice-agent framework's OpenAI Realtime integration:
LiveKit Agents (`livekit-plugins-openai`'s `RealtimeModel` / `RealtimeSession`,
the object an `AgentSession(llm=...)` drives), pointed at a real nestvox server
on loopback. No LiveKit room or server is needed: the session is driven the way
`AgentSession` drives it, with `push_audio` (24 kHz `rtc.AudioFrame`s) and
either `commit_audio` + `generate_reply` (the framework's own turn detection) or
the server's VAD.

The framework must get the text reply, and it must equal what the same server
answers a plain websocket client that sends the same 24 kHz audio, and what the
offline model answers the same audio resampled to 16 kHz (as the server does).

pipecat was tried too: `pip install "pipecat-ai[openai]"` downgrades protobuf (7 -> 6), soxr
and soundfile in the project's environment, so it is not a dev dependency.
"""
import asyncio
import base64
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

lk_realtime = pytest.importorskip("livekit.plugins.openai.realtime",
                                  reason="LiveKit Agents is a dev dependency: pip install -e '.[dev]'")
from livekit import rtc  # noqa: E402
from livekit.agents import llm as lk_llm  # noqa: E402
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad  # noqa: E402

from agent.realtime.config import SessionConfig  # noqa: E402
from server_helpers import recv_until, start  # noqa: E402

RATE = 24000  # LiveKit's (and GA's) PCM rate
SR = 16000  # the model's
SYSTEM = "Answer briefly."
MAX_TOKENS = 10
FRAME = RATE // 50  # 20 ms frames, as a LiveKit room track delivers them


@pytest.fixture(scope="module")
def speech24(tmp_path_factory) -> np.ndarray:
    """espeak-ng speech at 24 kHz, PCM16-quantized, trimmed of its padding silence."""
    from conftest import read_wav, synthesize

    audio, rate = read_wav(synthesize("turn on the lights in the kitchen",
                                      str(tmp_path_factory.mktemp("lk") / "lights24.wav"), rate=RATE))
    assert rate == RATE
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    return pcm16_array(audio[loud[0]: loud[-1] + 1])


def pcm16_array(audio) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2")


def with_silence(samples: np.ndarray, seconds: float = 1.0) -> np.ndarray:
    return np.concatenate([np.zeros(int(0.2 * RATE), "<i2"), samples, np.zeros(int(seconds * RATE), "<i2")])


@pytest.fixture()
async def server(inference):
    srv = await start(inference, session=SessionConfig(instructions=SYSTEM, max_response_output_tokens=MAX_TOKENS))
    yield srv
    await srv.stop()


def http_base(ws_url: str) -> str:
    """ws://host:port/v1/realtime -> http://host:port/v1, the base_url a LiveKit user writes."""
    return ws_url.replace("ws://", "http://", 1).rsplit("/realtime", 1)[0]


async def livekit_turn(url: str, samples: np.ndarray, server_vad: bool):
    """One turn through LiveKit's RealtimeSession; returns (reply text, client events, server events)."""
    model = lk_realtime.RealtimeModel(
        base_url=http_base(url), api_key="unused", model="nestvox", modalities=["text"],
        # LiveKit's defaults ask for semantic VAD and gpt-4o-mini-transcribe input transcription
        turn_detection=ServerVad(type="server_vad", create_response=True, interrupt_response=True)
        if server_vad else None,
        input_audio_transcription=None)
    model.update_options(max_response_output_tokens=MAX_TOKENS)  # LiveKit sends "inf" otherwise
    session = model.session()
    sent, received, errors = [], [], []
    session.on("openai_client_event_queued", sent.append)
    session.on("openai_server_event_received", received.append)
    session.on("error", errors.append)
    created = asyncio.get_running_loop().create_future()
    session.on("generation_created", lambda ev: created.done() or created.set_result(ev))
    try:
        for i in range(0, len(samples), FRAME):
            chunk = samples[i:i + FRAME]
            session.push_audio(rtc.AudioFrame(data=chunk.tobytes(), sample_rate=RATE, num_channels=1,
                                              samples_per_channel=len(chunk)))
        if server_vad:
            generation = await asyncio.wait_for(created, 60)
        else:
            session.commit_audio()
            try:
                generation = await asyncio.wait_for(session.generate_reply(), 60)
            except lk_llm.RealtimeError as e:  # LiveKit gives up after 10 s
                created_events = [ev for ev in received if ev["type"] == "response.created"]
                raise AssertionError(
                    f"{e}: LiveKit pairs generate_reply() with the response.created whose "
                    f"response.metadata.client_event_id is the one its response.create sent; "
                    f"response.created got: {created_events}") from e
        text = ""

        async def collect():
            nonlocal text
            async for message in generation.message_stream:
                async for delta in message.text_stream:
                    text += delta

        await asyncio.wait_for(collect(), 60)
    finally:
        await session.aclose()
        await model.aclose()
    assert not errors, errors
    return text, [e for e in sent if e.get("type") != "input_audio_buffer.append"], received


async def plain_turn(url: str, samples: np.ndarray, turn_detection) -> list:
    """The same turn from a plain websocket client writing its own GA events."""
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "max_output_tokens": MAX_TOKENS,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": turn_detection}}}}))
        await recv_until(ws, "session.updated")
        data = samples.tobytes()
        for i in range(0, len(data), 9600):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(data[i:i + 9600]).decode()}))
        if turn_detection is None:
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
        return await recv_until(ws, "response.done")


def offline_reply(inference, samples: np.ndarray, start: int = 0, end=None) -> str:
    """The offline model on the audio resampled to 16 kHz as the server does it (one soxr stream)."""
    import soxr

    audio16 = soxr.ResampleStream(RATE, SR, 1, dtype="float32", quality="HQ").resample_chunk(
        samples.astype(np.float32) / 32768.0)
    return inference.generate("", audio=audio16[start:end], system_prompt=SYSTEM, max_new_tokens=MAX_TOKENS)


def reply_text(events) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


# LiveKit's generate_reply() finds its response by the metadata of its response.create, which the
# server echoes in response.created / response.done.
async def test_livekit_realtime_manual_turn(server, inference, speech24):
    """push_audio + commit_audio + generate_reply: LiveKit's own turn detection, the server's off."""
    text, sent, received = await livekit_turn(server.url, speech24, server_vad=False)
    # what LiveKit sent: a GA session.update at 24 kHz, with turn detection off
    update = next(e for e in sent if e["type"] == "session.update")["session"]
    assert update["type"] == "realtime" and update["output_modalities"] == ["text"]
    assert update["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    assert update["audio"]["input"]["turn_detection"] is None
    assert [e["type"] for e in sent][-2:] == ["input_audio_buffer.commit", "response.create"]
    # what it got back, and that the server took its settings
    types = [e["type"] for e in received]
    assert "error" not in types, [e for e in received if e["type"] == "error"]
    updated = next(e for e in received if e["type"] == "session.updated")["session"]
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    assert updated["max_output_tokens"] == MAX_TOKENS
    assert types[-1] == "response.done" and received[-1]["response"]["status"] in ("completed", "incomplete")
    assert text == reply_text(received) != ""

    plain = await plain_turn(server.url, speech24, None)
    assert text == reply_text(plain)
    assert text == offline_reply(inference, speech24)


async def test_livekit_realtime_server_vad_turn(server, speech24):
    """push_audio only: the server's VAD ends the turn and answers it (LiveKit's generation_created)."""
    audio = with_silence(speech24)
    text, sent, received = await livekit_turn(server.url, audio, server_vad=True)
    types = [e["type"] for e in received]
    assert "error" not in types, [e for e in received if e["type"] == "error"]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "response.output_item.added"):
        assert kind in types
    assert "response.create" not in [e["type"] for e in sent]
    assert text == reply_text(received) != ""

    td = next(e for e in sent if e["type"] == "session.update")["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "server_vad"
    plain = await plain_turn(server.url, audio, td)
    assert text == reply_text(plain)
