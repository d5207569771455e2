"""semantic_vad over the wire: the pause a turn needs comes from the LLM's own
end-of-turn probability, read at the pause in the engine's batched forward."""
import asyncio

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from agent.realtime.turns import semantic_silence_ms
from server_helpers import SYSTEM, opened, pcm16, recv_until, start, update

SR = 16000


@pytest.fixture()
async def server(inference):
    srv = await start(inference, max_sessions=4)
    yield srv
    await srv.stop()


def reference_p_done(inference, audio: np.ndarray) -> float:
    """The same probability from a private (eager) LLM state: the turn streamed alone."""
    from agent.nest.streaming import StreamingNestEncoder
    from agent.realtime.session import Session
    from agent.realtime.single_stream import SingleStream

    session = Session(inference.model, inference.tokenizer, system_prompt=SYSTEM)
    stream = SingleStream(session, StreamingNestEncoder(inference.model.audio_tower))
    stream.feed(torch.from_numpy(audio))
    stream.end_turn(probe=True)
    return session.end_of_turn_probability()


async def paced(ws, audio: np.ndarray, packet_ms=40, speedup=4.0):
    """Send faster than real time but paced, so the engine sees the pause arrive."""
    data = pcm16(audio)
    step = SR * packet_ms // 1000 * 2
    for i in range(0, len(data), step):
        await ws.send(data[i:i + step])
        await asyncio.sleep(packet_ms / 1000 / speedup)


@pytest.mark.parametrize("eagerness", ["high"])
async def test_semantic_vad_ends_the_turn_after_the_pause_the_model_asks_for(server, inference, trimmed_speech, eagerness):
    audio = np.concatenate([np.zeros(SR // 5, np.float32), trimmed_speech, np.zeros(int(2.6 * SR), np.float32)])
    async with connect(server.url) as ws:
        await opened(ws)
        await ws.send(update(audio={"input": {"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}}}))
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        await paced(ws, audio)
        events = await recv_until(ws, "response.done")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    p = stopped["end_of_turn_probability"]
    assert p is not None and 0.0 <= p <= 1.0
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    quantized = np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768
    turn = quantized[started["audio_start_sample"]: stopped["turn_end_sample"]]
    # the batched forward's probe is the eager state's probability on the same turn audio
    assert p == pytest.approx(reference_p_done(inference, turn), rel=1e-3, abs=1e-6)
    # the turn ended once the pause had lasted what that probability asks for (to a VAD window),
    # or at once if the pause had already lasted longer when the probability came
    needed = semantic_silence_ms(p, eagerness)
    assert stopped["silence_ms"] >= min(needed, 200) and (stopped["silence_ms"] <= needed + 64 or needed < 400)
    reply = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert reply == inference.generate("", audio=turn, system_prompt=SYSTEM, max_new_tokens=10)
