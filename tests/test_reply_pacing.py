"""Reply pacing (Engine reply_tok_s / serve.py --reply-tok-s): while another caller's
turn is open, replies decode at about the paced rate instead of flat out, with the
same words; with nobody else talking they run unpaced."""
import asyncio
import time

import pytest

from agent.realtime.config import SessionConfig
from agent.realtime.engine import Engine
from engine_helpers import MANUAL, SYSTEM, to_wire
PACE = 25.0
TOKENS = 30


@pytest.fixture(scope="module")
def engine(streaming_inference):
    from agent.nest.streaming import StreamingNestEncoder

    eng = Engine(streaming_inference.model, streaming_inference.tokenizer,
                 StreamingNestEncoder(streaming_inference.model.audio_tower), max_sessions=4,
                 reply_tok_s=PACE).start()
    yield eng
    eng.stop()


async def timed_reply(engine, audio):
    """One manual turn; returns (text, output tokens, seconds from the first delta to done)."""
    handle = engine.open_session(config=SessionConfig(instructions=SYSTEM, turn_detection=MANUAL,
                                                      max_response_output_tokens=TOKENS))
    handle.append_audio(audio)
    handle.commit()
    handle.create_response()
    text, first = "", None
    while True:
        for event in to_wire(await handle.next_event(120)):
            if event["type"] == "response.text.delta":
                first = first or time.perf_counter()
                text += event["delta"]
            elif event["type"] == "response.done":
                handle.close()
                return text, event["response"]["usage"]["output_tokens"], time.perf_counter() - first


async def test_replies_are_paced_only_while_another_turn_is_open(engine, streaming_inference, two_phrases):
    a, b = two_phrases
    expected = streaming_inference.generate("", audio=a, system_prompt=SYSTEM, max_new_tokens=TOKENS)

    # Alone: unpaced (nobody's turn is at stake).
    text, tokens, seconds = await timed_reply(engine, a)
    assert text == expected
    assert tokens >= 10, "the check needs a reply of several tokens"
    alone = (tokens - 1) / seconds

    # Next to a caller who is talking (a manual turn kept open by audio arriving).
    talker = engine.open_session(config=SessionConfig(instructions=SYSTEM, turn_detection=MANUAL))
    stop = asyncio.Event()

    async def talk():
        while not stop.is_set():
            talker.append_audio(b[:640])
            await asyncio.sleep(0.04)

    talking = asyncio.create_task(talk())
    await asyncio.sleep(0.2)
    before = engine.stats["paced_ticks"]
    try:
        text, tokens, seconds = await timed_reply(engine, a)
    finally:
        stop.set()
        await talking
        talker.close()
    paced = (tokens - 1) / seconds
    assert text == expected  # pacing changes when tokens come, never which
    assert engine.stats["paced_ticks"] > before
    assert 0.6 * PACE <= paced <= 1.3 * PACE, f"paced reply ran at {paced:.1f} tok/s"
    assert alone > 2 * paced, f"alone {alone:.1f} tok/s vs paced {paced:.1f}"


def test_a_negative_pace_is_refused(streaming_inference):
    from agent.nest.streaming import StreamingNestEncoder

    with pytest.raises(ValueError, match="reply_tok_s must be >= 0"):
        Engine(streaming_inference.model, streaming_inference.tokenizer,
               StreamingNestEncoder(streaming_inference.model.audio_tower), reply_tok_s=-1)
