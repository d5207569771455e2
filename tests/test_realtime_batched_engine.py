"""The batched engine: every session's reply is token for token its own offline reply,
whatever the other slots are doing (different positions, turns, reply lengths,
barge-in and speculation rollback next to them)."""
import asyncio

import numpy as np
import pytest

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from engine_helpers import MANUAL, SR, SYSTEM, manual_turn, reply_text, until


@pytest.fixture(scope="module")
def engine(inference):
    from agent.nest.streaming import StreamingNestEncoder

    eng = Engine(inference.model, inference.tokenizer, StreamingNestEncoder(inference.model.audio_tower),
                 max_sessions=10).start()
    yield eng
    eng.stop()


@pytest.mark.parametrize("n", [1, 3, 8])
async def test_concurrent_sessions_each_get_their_offline_reply(engine, inference, two_phrases, n):
    """n manual sessions at once: different audio lengths, reply lengths, and for every
    other one a first turn before, so their slots sit at different positions."""
    a, b = two_phrases
    before = dict(engine.stats)

    async def caller(i):
        tokens = 4 + 3 * i
        handle = engine.open_session(config=SessionConfig(instructions=SYSTEM, turn_detection=MANUAL,
                                                          max_response_output_tokens=tokens))
        audio = np.concatenate([a, b])[: int((1.0 + 0.15 * i) * SR)]
        messages, audios = [], []
        if i % 2:
            first = await manual_turn(handle, b)
            messages += [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": first}]
            audios.append(b)
        text = await manual_turn(handle, audio, packet=640 + 320 * i)
        handle.close()
        expected = inference.generate(messages + [{"role": "user", "content": "<|audio|>"}], audio=audios + [audio],
                                      system_prompt=SYSTEM, max_new_tokens=tokens)
        return text, expected

    results = await asyncio.gather(*(caller(i) for i in range(n)))
    for i, (text, expected) in enumerate(results):
        assert text == expected, f"session {i}"
    assert len({expected for _, expected in results}) > 1 or n == 1  # the comparison tells sessions apart
    forwards = engine.stats["llm_decode_forwards"] - before["llm_decode_forwards"]
    rows = engine.stats["llm_decode_rows"] - before["llm_decode_rows"]
    if n > 1:
        assert rows > forwards  # some decode forwards served several sessions at once


async def test_barge_in_and_speculation_rollback_next_to_decoding_slots(engine, inference, two_phrases):
    """While three sessions decode long replies, one session is interrupted mid-reply
    and another's pause triggers a speculative end of turn that is rolled back: all
    replies stay exact."""
    a, b = two_phrases
    before = dict(engine.stats)
    long_tokens = 300
    decoding = [asyncio.Event() for _ in range(3)]

    async def decoder(i):
        handle = engine.open_session(config=SessionConfig(instructions=SYSTEM, turn_detection=MANUAL,
                                                          max_response_output_tokens=long_tokens - i))
        audio = np.concatenate([b, a])[: int((1.2 + 0.2 * i) * SR)]
        handle.append_audio(audio)
        handle.commit()
        handle.create_response()
        events = await until(handle, "response.text.delta")
        decoding[i].set()
        events += await until(handle, "response.done")
        handle.close()
        return reply_text(events) == inference.generate("", audio=audio, system_prompt=SYSTEM,
                                                        max_new_tokens=long_tokens - i)

    async def barge_in():
        handle = engine.open_session(config=SessionConfig(instructions=SYSTEM, max_response_output_tokens=3000))
        utterance = np.concatenate([a, np.zeros(SR, np.float32)])
        for i in range(0, len(utterance), 1600):
            handle.append_audio(utterance[i:i + 1600])
        await until(handle, "response.text.delta")
        for i in range(0, len(utterance), 1600):  # the user talks over the reply
            handle.append_audio(utterance[i:i + 1600])
        done = (await until(handle, "response.done"))[-1]["response"]
        events = await until(handle, "response.done")  # the new turn gets its own reply
        handle.close()
        return done["status"] == "cancelled" and any(e["type"] == "input_audio_buffer.committed" for e in events)

    async def pause_then_more():
        for event in decoding:  # the others are decoding now
            await event.wait()
        handle = engine.open_session(config=SessionConfig(instructions=SYSTEM, max_response_output_tokens=8))
        # a 450 ms pause: past the 150 ms at which the engine speculates, short of the 500 ms that end the turn
        utterance = np.concatenate([a, np.zeros(int(0.45 * SR), np.float32), b, np.zeros(SR, np.float32)])
        for i in range(0, len(utterance), 640):  # real time: the pause is seen as it happens
            handle.append_audio(utterance[i:i + 640])
            await asyncio.sleep(0.04)
        events = await until(handle, "response.done")
        handle.close()
        start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
        end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
        return reply_text(events) == inference.generate("", audio=utterance[start:end], system_prompt=SYSTEM,
                                                        max_new_tokens=8)

    results = await asyncio.gather(*(decoder(i) for i in range(3)), barge_in(), pause_then_more())
    assert results == [True] * 5
    assert engine.stats["speculation_rollbacks"] > before["speculation_rollbacks"]
    assert engine.stats["llm_decode_rows"] - before["llm_decode_rows"] > \
        engine.stats["llm_decode_forwards"] - before["llm_decode_forwards"]


def test_phase_machine_refuses_a_transition_it_does_not_allow(engine):
    from agent.realtime.live_session import LiveSession, Phase
    from agent.realtime.session import Session

    live = LiveSession("s", SessionConfig(), lambda e: None, Session(engine.model, engine.tokenizer),
                       engine.streamer_for, engine.vad(), dict(engine.stats))
    assert live.phase is Phase.IDLE
    with pytest.raises(RuntimeError, match="idle -> replying"):
        live._enter(Phase.REPLYING)
    live.request_reply()  # nothing to answer: an error event, no change
    assert live.phase is Phase.IDLE


def test_stats_stay_bounded(engine):
    stats = engine.stats
    assert all(isinstance(v, (int, float)) for k, v in stats.items() if k != "encoder_batch_hist")
    assert len(stats["encoder_batch_hist"]) <= engine.max_batch
