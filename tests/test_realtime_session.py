"""Session: streamed pre-fill gives exactly the offline model's reply, on its own
LLMState and on a slot of the engine's BatchedLLM alike."""
import numpy as np
import pytest
import torch

from agent.realtime.sampling import GenerationSettings
from agent.realtime.llm_batch import BatchedLLM
from agent.realtime.session import Session
from agent.realtime.single_stream import SingleStream

SYSTEM = "You are a helpful voice assistant. Answer briefly."


@pytest.fixture(scope="module")
def inference(streaming_inference):
    return streaming_inference


@pytest.fixture(params=["own_cache", "batched_slot"])
def make_session(request, inference):
    def make(inference, **kwargs):
        llm = None
        if request.param == "batched_slot":  # slot 1 of 3, so the slot index matters
            batch = BatchedLLM(inference.model.language_model, slots=3, max_positions=kwargs.get("max_positions"))
            batch.open()
            llm = batch.open()
        return Session(inference.model, inference.tokenizer, llm=llm, **kwargs)

    return make


def feed_randomly(session, audio, seed):
    from agent.nest.streaming import StreamingNestEncoder

    stream = SingleStream(session, StreamingNestEncoder(session.model.audio_tower))
    rng = np.random.default_rng(seed)
    wave = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    session.start_turn()
    i = 0
    while i < wave.numel():
        n = int(rng.integers(1, 9000))
        stream.feed(wave[i:i + n])
        i += n
    stream.end_turn()


def test_streamed_reply_equals_offline_generate(make_session, inference, speech):
    session = make_session(inference, system_prompt=SYSTEM, settings=GenerationSettings(max_new_tokens=12))
    feed_randomly(session, speech, seed=0)
    deltas = list(session.reply())
    reply = session.last_reply
    offline = inference.generate_ids("", audio=speech, system_prompt=SYSTEM, max_new_tokens=12).tolist()
    assert reply.token_ids == offline
    assert len(set(offline)) >= 3  # a reply that varies, so the comparison means something
    assert "".join(deltas) == reply.text == inference.tokenizer.decode(offline, skip_special_tokens=True)
    # the audio was pre-filled while it arrived: as many positions as the processor expands
    assert session.turn.audio_positions == inference.processor.audio_token_count(len(speech))
    times = session.turn.times.latency_ms()
    assert times["speech_end_to_first_token"] >= times["speech_end_to_encoder_done"] >= 0


def test_second_turn_equals_offline_two_turn_conversation(make_session, inference, speech):
    session = make_session(inference, system_prompt=SYSTEM, settings=GenerationSettings(max_new_tokens=10))
    second = np.concatenate([speech[len(speech) // 3:], speech[: len(speech) // 3]])  # different audio
    feed_randomly(session, speech, seed=1)
    list(session.reply())
    first_text = session.last_reply.text
    positions_after_turn_1 = session.llm.positions
    feed_randomly(session, second, seed=2)
    list(session.reply())
    messages = [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": first_text},
                {"role": "user", "content": "<|audio|>"}]
    offline = inference.generate_ids(messages, audio=[speech, second], system_prompt=SYSTEM,
                                     max_new_tokens=10).tolist()
    assert session.last_reply.token_ids == offline
    assert positions_after_turn_1 > 0 and len(session.history) == 4


def test_cancel_stops_the_reply_and_keeps_what_was_said(make_session, inference, speech):
    session = make_session(inference, settings=GenerationSettings(max_new_tokens=40))
    feed_randomly(session, speech, seed=3)
    reply = session.reply()
    next(reply)
    session.cancel()
    rest = list(reply)
    assert session.last_reply.status == "cancelled"
    assert len(session.last_reply.token_ids) < 40
    assert session.history[-1] == {"role": "assistant", "content": session.last_reply.text}
    assert isinstance(rest, list)


def test_context_budget_restarts_the_conversation(make_session, inference, speech):
    n_audio = inference.processor.audio_token_count(len(speech))
    probe = make_session(inference, settings=GenerationSettings(max_new_tokens=8))
    feed_randomly(probe, speech, seed=4)
    list(probe.reply())
    used = probe.llm.positions  # one whole turn with its reply
    assert used > n_audio
    session = make_session(inference, settings=GenerationSettings(max_new_tokens=8), max_positions=used + used // 2)
    feed_randomly(session, speech, seed=4)
    list(session.reply())
    assert session.llm.positions == used
    feed_randomly(session, speech, seed=5)  # would not fit after the first turn
    list(session.reply())
    assert session.llm.positions < 2 * used  # the first turn was dropped
    assert session.llm.positions == used  # and the restarted turn holds each audio group once
    assert session.history[0]["role"] == "user" and len(session.history) == 2
    small = make_session(inference, max_positions=n_audio // 2)
    with pytest.raises(Exception, match="context budget|positions"):
        feed_randomly(small, speech, seed=6)
