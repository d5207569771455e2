"""Engine: one compute thread serving sessions over an asyncio interface."""
import asyncio

import numpy as np
import pytest

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from agent.realtime.turns import TurnDetectionSettings
from engine_helpers import SR, to_wire, until


@pytest.fixture()
def engine(inference):
    from agent.nest.streaming import StreamingNestEncoder

    eng = Engine(inference.model, inference.tokenizer, StreamingNestEncoder(inference.model.audio_tower)).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def utterance(two_phrases):
    """Speech, a 300 ms pause, more speech, then 1 s of silence."""
    a, b = two_phrases
    gap = np.zeros(int(0.3 * SR), dtype=np.float32)
    return np.concatenate([a, gap, b, np.zeros(SR, dtype=np.float32)]).astype(np.float32)


def send_in_packets(handle, audio, seed):
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(audio):
        n = int(rng.integers(160, 6000))
        handle.append_audio(audio[i:i + n])
        i += n


async def next_wire(handle, timeout):
    """The next engine event as its protocol JSON (the last one, for a response's two)."""
    return to_wire(await handle.next_event(timeout))[-1]


def config(**kw):
    base = dict(instructions="Answer briefly.", max_response_output_tokens=12)
    base.update(kw)
    return SessionConfig(**base)


async def test_server_vad_turn_gets_the_offline_reply(engine, inference, utterance):
    handle = engine.open_session(config=config())
    send_in_packets(handle, utterance, seed=0)
    events = await until(handle, "response.done")
    types = [e["type"] for e in events]
    assert types.count("input_audio_buffer.speech_started") == 1  # the 300 ms pause did not end the turn
    assert types.count("input_audio_buffer.speech_stopped") == 1
    assert types.index("input_audio_buffer.committed") < types.index("response.created")
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
    assert end - start > 1.5 * SR
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    done = events[-1]["response"]
    expected = inference.generate(
        "", audio=utterance[start:end], system_prompt="Answer briefly.", max_new_tokens=12)
    assert text == done["output"][0]["content"][0]["text"] == expected
    latency = done["latency_ms"]
    assert latency["speech_end_to_first_token"] >= latency["speech_end_to_encoder_done"] >= 0
    assert done["usage"]["output_tokens"] >= 1
    handle.close()


async def test_manual_commit_then_response_create(engine, inference, utterance):
    handle = engine.open_session(config=config(turn_detection=TurnDetectionSettings(mode="manual")))
    audio = utterance[: int(2.5 * SR)]
    send_in_packets(handle, audio, seed=1)
    handle.commit()
    events = await until(handle, "input_audio_buffer.committed")
    assert not any(e["type"].startswith("response") for e in events)
    with pytest.raises(asyncio.TimeoutError):
        await handle.next_event(0.3)  # nothing happens until the client asks
    handle.create_response()
    events = await until(handle, "response.done")
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    assert text == inference.generate("", audio=audio, system_prompt="Answer briefly.", max_new_tokens=12)
    handle.commit()  # nothing new to commit
    event = await next_wire(handle, 5)
    assert event["type"] == "error" and event["error"]["code"] == "input_audio_buffer_commit_empty"
    handle.close()


async def test_barge_in_cancels_the_running_reply(engine, utterance):
    handle = engine.open_session(config=config(max_response_output_tokens=3000))
    send_in_packets(handle, utterance, seed=2)
    await until(handle, "response.text.delta")
    send_in_packets(handle, utterance, seed=3)  # the user talks over the reply
    events = await until(handle, "response.done")
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["usage"]["output_tokens"] < 3000
    assert any(e["type"] == "input_audio_buffer.speech_started" for e in events)
    # the new turn proceeds to its own reply
    events = await until(handle, "response.done")
    assert any(e["type"] == "input_audio_buffer.committed" for e in events)
    handle.close()


async def three_interleaved_callers(engine, inference, utterance):
    """Three manual-mode sessions whose audio arrives interleaved, as concurrent callers'
    would; each must get exactly the offline reply."""
    handles = [engine.open_session(config=config(turn_detection=TurnDetectionSettings(mode="manual")))
               for _ in range(3)]
    audio = utterance[: 2 * SR]
    for k in range(0, len(audio), 1280):
        for h in handles:
            h.append_audio(audio[k:k + 1280])
    for h in handles:
        h.commit()
        h.create_response()
    expected = inference.generate("", audio=audio, system_prompt="Answer briefly.", max_new_tokens=12)
    for h in handles:
        events = await until(h, "response.done")
        assert "".join(e["delta"] for e in events if e["type"] == "response.text.delta") == expected
        h.close()


async def test_concurrent_sessions_share_encoder_calls(engine, inference, utterance):
    await three_interleaved_callers(engine, inference, utterance)
    assert engine.stats["encoder_batch_max"] >= 2


async def test_speculative_end_of_turn_is_rolled_back_in_a_pause_and_confirmed_at_the_end(engine, inference,
                                                                                         utterance):
    """Audio at 2x real time: the 300 ms pause starts a speculative end of turn that
    is undone when speech resumes; the final silence's speculation is confirmed, and
    the reply is still exactly the offline one."""
    handle = engine.open_session(config=config())
    before = dict(engine.stats)
    packet = 640  # 40 ms
    for i in range(0, len(utterance), packet):
        handle.append_audio(utterance[i:i + packet])
        await asyncio.sleep(0.02)
    events = await until(handle, "response.done")
    assert engine.stats["speculation_rollbacks"] - before["speculation_rollbacks"] >= 1
    assert engine.stats["speculation_hits"] - before["speculation_hits"] == 1
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    assert text == inference.generate("", audio=utterance[start:end], system_prompt="Answer briefly.",
                                      max_new_tokens=12)
    latency = events[-1]["response"]["latency_ms"]
    assert latency["speech_end_to_encoder_done"] < 5  # the flush had already run in the silence
    handle.close()


async def test_without_batching_every_session_is_still_served(inference, utterance):
    from agent.nest.streaming import StreamingNestEncoder

    eng = Engine(inference.model, inference.tokenizer, StreamingNestEncoder(inference.model.audio_tower),
                 max_batch=1).start()
    try:
        await three_interleaved_callers(eng, inference, utterance)
        assert eng.stats["encoder_batch_max"] == 1
    finally:
        eng.stop()


async def test_audio_arriving_during_a_reply_starts_the_next_turn_after_it(engine, inference, utterance):
    """Manual mode: the client keeps talking (and commits) while the reply runs; the
    new turn waits for the reply instead of corrupting its cache."""
    handle = engine.open_session(config=config(turn_detection=TurnDetectionSettings(mode="manual"),
                                               max_response_output_tokens=40))
    first, second = utterance[: 2 * SR], utterance[2 * SR:]
    handle.append_audio(first)
    handle.commit()
    handle.create_response()
    await until(handle, "response.created")
    handle.append_audio(second)
    handle.commit()
    events = await until(handle, "response.done")
    reply1 = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    await until(handle, "input_audio_buffer.committed")
    handle.create_response()
    events = await until(handle, "response.done")
    reply2 = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    messages = [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": reply1},
                {"role": "user", "content": "<|audio|>"}]
    assert reply2 == inference.generate(messages, audio=[first, second], system_prompt="Answer briefly.",
                                        max_new_tokens=40)
    handle.close()


async def test_an_encoder_failure_drops_the_turn_and_the_engine_goes_on(engine, inference, utterance, monkeypatch):
    handle = engine.open_session(config=config(turn_detection=TurnDetectionSettings(mode="manual")))
    calls = {"n": 0}
    original = type(engine.streamer).step

    def failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated encoder fault")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(engine.streamer), "step", failing_once)
    handle.append_audio(utterance[: SR])
    event = await next_wire(handle, 10)
    assert event["type"] == "error" and "simulated encoder fault" in event["error"]["message"]
    audio = utterance[: 2 * SR]  # the session still works
    handle.append_audio(audio)
    handle.commit()
    handle.create_response()
    events = await until(handle, "response.done")
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    assert text == inference.generate("", audio=audio, system_prompt="Answer briefly.", max_new_tokens=12)
    handle.close()
