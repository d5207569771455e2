"""Helpers for the websocket-server tests (tests/test_server.py, test_protocol_dialects.py,
test_semantic_vad.py, test_spoken_replies.py, test_turns_bench.py): a tiny-model server,
audio framing, and reading events off the wire (GA dialect)."""
import asyncio
import base64
import json

import numpy as np
from websockets.asyncio.client import connect

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from agent.realtime.server import RealtimeServer, ServerConfig

SR = 16000
SYSTEM = "Answer briefly."


def with_silence(audio, seconds=1.0):
    return np.concatenate([np.zeros(int(0.2 * SR), np.float32), audio, np.zeros(int(seconds * SR), np.float32)])


def pcm16(audio) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def send_audio(ws, audio, packet=3200):
    data = pcm16(audio)
    for i in range(0, len(data), packet):  # frames under the server's message limit
        await ws.send(data[i:i + packet])


async def start(inference, **overrides):
    from agent.nest.streaming import StreamingNestEncoder

    overrides.setdefault("session", SessionConfig(instructions=SYSTEM, max_response_output_tokens=10))
    config = ServerConfig(port=0, **overrides)
    engine = Engine(inference.model, inference.tokenizer, StreamingNestEncoder(inference.model.audio_tower))
    return await RealtimeServer(engine, config, model_name="tiny-test").start()


def update(**session) -> str:
    return json.dumps({"type": "session.update", "session": {"type": "realtime", **session}})


RATE16 = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": SR}}}}


async def opened(ws, rate=SR) -> dict:
    """session.created, then the input rate set to `rate` (GA's default is 24 kHz); session.updated."""
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    await ws.send(update(audio={"input": {"format": {"type": "audio/pcm", "rate": rate}}}))
    return (await recv_until(ws, "session.updated"))[-1]


async def recv_until(ws, kind, timeout=60):
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        events.append(event)
        if event["type"] == kind:
            return events


def reply_text(events):
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def turn_audio(events, audio):
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
    return audio[start:end]


async def spoken_turn(url, audio, inference, binary=True, packet=640):
    """One server-VAD turn; returns (events, the offline reply for the turn's audio)."""
    async with connect(url) as ws:
        await opened(ws)
        data = pcm16(audio)
        for i in range(0, len(data), packet):
            piece = data[i:i + packet]
            if binary:
                await ws.send(piece)
            else:
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(piece).decode()}))
        events = await recv_until(ws, "response.done")
    quantized = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    expected = inference.generate("", audio=turn_audio(events, quantized), system_prompt=SYSTEM, max_new_tokens=10)
    return events, expected
