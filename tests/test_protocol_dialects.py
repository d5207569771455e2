"""The protocol with clients nobody here wrote: the official `openai` SDK's GA
(`client.realtime`) and beta (`client.beta.realtime`) connections against a real
server on loopback, plus the GA features the SDK tests do not reach (typed turns,
per-response settings, item deletion, G.711, the beta dialect by query)."""
import asyncio
import base64
import json

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI
from pydantic import TypeAdapter
from websockets.asyncio.client import connect

from agent.realtime.connection import Resampler
from server_helpers import SYSTEM, recv_until, start, update, with_silence

SR = 16000
GA_RATE = 24000
PACKET_MS = 40


@pytest.fixture()
async def server(inference):
    srv = await start(inference, max_sessions=6)
    yield srv
    await srv.stop()


def client(srv) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{srv.config.port}/v1")


def speech24(trimmed_speech) -> np.ndarray:
    return soxr.resample(with_silence(trimmed_speech), SR, GA_RATE).astype(np.float32)


def packets(audio: np.ndarray, rate: int):
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = rate * PACKET_MS // 1000 * 2
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


def heard_by_server(chunks, rate: int) -> np.ndarray:
    """The 16 kHz audio the server's streaming resampler makes of these packets."""
    resample = Resampler(rate)
    return np.concatenate([resample(np.frombuffer(c, "<i2").astype(np.float32) / 32768) for c in chunks])


SERVER_EVENT = None


def strict_ga(raw: bytes):
    """Validate a GA server event with the SDK's own pydantic models (not the
    lenient construct the SDK uses when receiving)."""
    global SERVER_EVENT
    from openai.types.realtime import RealtimeServerEvent

    SERVER_EVENT = SERVER_EVENT or TypeAdapter(RealtimeServerEvent)
    return SERVER_EVENT.validate_json(raw)


async def ga_events_until(conn, kind, timeout=60):
    """Raw events until `kind`, each one validated strictly and parsed by the SDK."""
    events = []
    while True:
        raw = await asyncio.wait_for(conn.recv_bytes(), timeout)
        strict_ga(raw)
        parsed = conn.parse_event(raw)
        events.append(parsed)
        if parsed.type == kind:
            return events


def text_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def expected_reply(inference, heard: np.ndarray, events) -> str:
    start = next(e for e in events if e.type == "input_audio_buffer.speech_started").audio_start_ms
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    begin = next(e for e in events if e.type == "input_audio_buffer.speech_started").model_extra["audio_start_sample"]
    end = stopped.model_extra["turn_end_sample"]
    assert abs(begin * 1000 // SR - start) <= 1
    return inference.generate("", audio=heard[begin:end], system_prompt=SYSTEM, max_new_tokens=10)


# -- the official SDK, GA ----------------------------------------------------------------

async def test_sdk_ga_spoken_turn_with_server_vad_at_24khz(server, inference, trimmed_speech):
    chunks = packets(speech24(trimmed_speech), GA_RATE)
    async with client(server).realtime.connect(model="nestvox") as conn:
        created = await ga_events_until(conn, "session.created")
        session = created[-1].session
        assert session.type == "realtime" and session.audio.input.format.rate == GA_RATE
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["text"], "instructions": SYSTEM,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": GA_RATE},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        updated = (await ga_events_until(conn, "session.updated"))[-1].session
        assert updated.instructions == SYSTEM and updated.audio.input.turn_detection.silence_duration_ms == 500
        for chunk in chunks:
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        events = await ga_events_until(conn, "response.done")
    kinds = [e.type for e in events]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "response.created", "response.output_item.added", "response.content_part.added",
             "response.output_text.delta", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.done"]
    assert [k for k in kinds if k in order] == sorted([k for k in kinds if k in order], key=order.index)
    done = events[-1].response
    text = text_of(events)
    assert text and text == expected_reply(inference, heard_by_server(chunks, GA_RATE), events)
    assert done.output[0].content[0].text == text and done.output[0].role == "assistant"
    assert done.usage.output_tokens >= 1 and done.usage.input_token_details.audio_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.model_extra["latency_ms"]["speech_end_to_first_token"] >= 0
    # every item event chains to the one before; the speech events name the user item
    user = next(e for e in events if e.type == "input_audio_buffer.committed").item_id
    assert next(e for e in events if e.type == "input_audio_buffer.speech_started").item_id == user
    added = [e for e in events if e.type == "conversation.item.added"]
    assert [a.item.id for a in added][0] == user and added[1].previous_item_id == user
    assert len({e.event_id for e in events}) == len(events)


async def test_sdk_ga_manual_commit_typed_turn_cancel_and_errors(server, inference, trimmed_speech):
    chunks = packets(speech24(trimmed_speech), GA_RATE)
    async with client(server).realtime.connect(model="nestvox") as conn:
        await ga_events_until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "instructions": SYSTEM,
                                           "audio": {"input": {"turn_detection": None}}})
        await ga_events_until(conn, "session.updated")
        for chunk in chunks:
            await conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        events = await ga_events_until(conn, "response.done")
        heard = heard_by_server(chunks, GA_RATE)
        assert text_of(events) == inference.generate("", audio=heard, system_prompt=SYSTEM, max_new_tokens=10)
        first_reply = text_of(events)

        # a typed turn: answered by the same conversation (its KV cache)
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "and the kitchen?"}]})
        added = await ga_events_until(conn, "conversation.item.done")
        assert added[-1].item.content[0].text == "and the kitchen?"
        await conn.response.create(response={"max_output_tokens": 4})
        events = await ga_events_until(conn, "response.done")
        messages = [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": first_reply},
                    {"role": "user", "content": "and the kitchen?"}]
        assert text_of(events) == inference.generate(messages, audio=[heard], system_prompt=SYSTEM, max_new_tokens=4)
        assert events[-1].response.usage.output_tokens <= 4

        # cancel: a long reply, cancelled by the client
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "tell me more"}]})
        await conn.response.create(response={"max_output_tokens": 4000})
        await conn.response.cancel()  # at once: the tiny model decodes thousands of tokens a second
        done = (await ga_events_until(conn, "response.done"))[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled", (done.status_details, done.usage)

        # errors parse with the SDK's own models, with type, code, param and the client's event_id
        await conn.send({"type": "session.update", "event_id": "evt_bad", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 12345}}}}})
        error = (await ga_events_until(conn, "error"))[-1]
        assert error.error.type == "invalid_request_error" and error.error.code == "invalid_session_config"
        assert error.error.param == "session.audio.input.format.rate" and error.error.event_id == "evt_bad"
        await conn.send({"type": "session.update", "event_id": "evt_stt", "session": {
            "type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}})
        error = (await ga_events_until(conn, "error"))[-1].error
        assert error.param == "session.audio.input.transcription" and "not supported" in error.message
        await conn.response.cancel(event_id="evt_cancel")
        error = (await ga_events_until(conn, "error"))[-1].error
        assert error.code == "response_cancel_not_active" and error.event_id == "evt_cancel"


# -- the official SDK, beta -----------------------------------------------------------------

async def test_sdk_beta_spoken_turn_at_24khz(server, inference, trimmed_speech):
    chunks = packets(speech24(trimmed_speech), GA_RATE)
    async with client(server).beta.realtime.connect(model="nestvox") as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.input_audio_format == "pcm16"
        await conn.session.update(session={"instructions": SYSTEM, "modalities": ["text"],
                                           "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}})
        while (event := await conn.recv()).type != "session.updated":
            pass
        for chunk in chunks:
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        events = []
        while (event := await conn.recv()).type != "response.done":
            events.append(event)
        events.append(event)
    text = "".join(e.delta for e in events if e.type == "response.text.delta")
    assert text and text == expected_reply(inference, heard_by_server(chunks, GA_RATE), events)
    assert next(e for e in events if e.type == "response.text.done").text == text


async def test_sdk_beta_manual_commit_typed_turn_cancel_and_errors(server, inference, trimmed_speech):
    chunks = packets(speech24(trimmed_speech), GA_RATE)
    async with client(server).beta.realtime.connect(model="nestvox") as conn:

        async def until(kind):
            events = []
            while (event := await asyncio.wait_for(conn.recv(), 60)).type != kind:
                events.append(event)
            return events + [event]

        await until("session.created")
        await conn.session.update(session={"instructions": SYSTEM, "turn_detection": None})
        assert (await until("session.updated"))[-1].session.turn_detection is None
        for chunk in chunks:
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        events = await until("response.done")
        heard = heard_by_server(chunks, GA_RATE)
        first = "".join(e.delta for e in events if e.type == "response.text.delta")
        assert first == inference.generate("", audio=heard, system_prompt=SYSTEM, max_new_tokens=10)
        # a typed turn
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "and the kitchen?"}]})
        created = (await until("conversation.item.created"))[-1]
        assert created.item.content[0].text == "and the kitchen?"
        await conn.response.create(response={"max_response_output_tokens": 4})
        events = await until("response.done")
        messages = [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and the kitchen?"}]
        assert "".join(e.delta for e in events if e.type == "response.text.delta") == inference.generate(
            messages, audio=[heard], system_prompt=SYSTEM, max_new_tokens=4)
        # cancel, at once
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "tell me more"}]})
        await conn.response.create(response={"max_response_output_tokens": 4000})
        await conn.response.cancel()
        done = (await until("response.done"))[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
        # an error, parsed by the SDK's beta models
        await conn.send({"type": "session.update", "event_id": "evt_beta",
                         "session": {"input_audio_format": "pcm16", "input_sample_rate": 12345}})
        error = (await until("error"))[-1].error
        assert error.code == "invalid_session_config" and error.param == "session.input_sample_rate"
        assert error.event_id == "evt_beta" and error.type == "invalid_request_error"


# -- GA features on a plain websocket ---------------------------------------------------------

async def test_per_response_instructions_apply_to_that_response_only(server, inference):
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")

        async def turn(text, **response):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
            await recv_until(ws, "conversation.item.done")
            await ws.send(json.dumps({"type": "response.create", "response": response}))
            events = await recv_until(ws, "response.done")
            return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")

        first = await turn("set a timer", instructions="Answer in French.", max_output_tokens=6)
        second = await turn("what time is it", max_output_tokens=6)
    expected_first = inference.generate([{"role": "user", "content": "set a timer"},
                                         {"role": "system", "content": "Answer in French."}],
                                        system_prompt=SYSTEM, max_new_tokens=6)
    # the instructions left the context after their reply: the second turn sees none of them
    expected_second = inference.generate([{"role": "user", "content": "set a timer"},
                                          {"role": "assistant", "content": first},
                                          {"role": "user", "content": "what time is it"}],
                                         system_prompt=SYSTEM, max_new_tokens=6)
    assert (first, second) == (expected_first, expected_second)


async def test_delete_the_latest_reply_and_regenerate(server, inference):
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}}))
        user = (await recv_until(ws, "conversation.item.done"))[-1]["item"]["id"]
        await ws.send(json.dumps({"type": "response.create"}))
        events = await recv_until(ws, "response.done")
        reply = events[-1]["response"]["output"][0]
        # an older item cannot go: later turns were computed on it
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": user}))
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "item_delete_not_supported" and error["param"] == "item_id"
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": reply["id"]}))
        assert (await recv_until(ws, "conversation.item.deleted"))[-1]["item_id"] == reply["id"]
        await ws.send(json.dumps({"type": "response.create"}))  # the same context: the same greedy reply
        again = await recv_until(ws, "response.done")
        assert again[-1]["response"]["output"][0]["content"][0]["text"] == reply["content"][0]["text"]
        added = [e for e in again if e["type"] == "conversation.item.added"]
        assert added[0]["previous_item_id"] == user
        # then the reply and the message both go, newest first: the conversation is empty again
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": added[0]["item"]["id"]}))
        await recv_until(ws, "conversation.item.deleted")
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": user}))
        await recv_until(ws, "conversation.item.deleted")
        await ws.send(json.dumps({"type": "response.create"}))
        assert (await recv_until(ws, "error"))[-1]["error"]["code"] == "response_not_possible"


async def test_g711_mu_law_input(server, inference, trimmed_speech):
    import audioop  # the standard library's codec, deprecated but present in 3.11: the reference here

    audio8 = soxr.resample(with_silence(trimmed_speech), SR, 8000).astype(np.float32)
    pcm = (np.clip(audio8, -1, 1) * 32767).astype("<i2").tobytes()
    ulaw = audioop.lin2ulaw(pcm, 2)
    async with connect(server.url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(update(audio={"input": {"format": {"type": "audio/pcmu"}}}))
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        chunks = [ulaw[i:i + 320] for i in range(0, len(ulaw), 320)]
        for c in chunks:
            await ws.send(c)
        events = await recv_until(ws, "response.done")
    decoded = [np.frombuffer(audioop.ulaw2lin(c, 2), "<i2").astype(np.float32) / 32768 for c in chunks]
    resample = Resampler(8000)
    heard = np.concatenate([resample(d) for d in decoded])
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == inference.generate("", audio=heard[start:end], system_prompt=SYSTEM, max_new_tokens=10)


def test_g711_tables_match_the_standard_codec():
    import audioop

    from agent.realtime.protocol import decode_audio

    every = bytes(range(256))
    for fmt, decode in (("pcmu", audioop.ulaw2lin), ("pcma", audioop.alaw2lin)):
        reference = np.frombuffer(decode(every, 2), "<i2").astype(np.float32) / 32768
        np.testing.assert_array_equal(decode_audio(every, fmt), reference)


async def test_beta_dialect_by_query_parameter(server):
    async with connect(server.url + "?dialect=beta") as ws:
        created = (await recv_until(ws, "session.created"))[-1]
        assert created["session"]["input_audio_format"] == "pcm16" and "audio" not in created["session"]
        await ws.send(json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000,
                                                                       "chunk_ms": 320}}))
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["input_sample_rate"] == 16000 and session["chunk_ms"] == 320
        await ws.send(json.dumps({"type": "session.update", "session": {"nestvox": {"chunk_ms": 320}}}))
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "invalid_session_config" and error["param"] == "session.nestvox"


def test_pcm_rates_in_and_out_are_checked_separately():
    """Input takes every listed rate (resampled); output only the rates the TTS path writes."""
    import pydantic

    from agent.realtime.schema import INPUT_RATES, OUTPUT_RATES, OutputPCMFormat, PCMFormat

    assert PCMFormat(rate=32000).rate == 32000 and OutputPCMFormat(rate=48000).rate == 48000
    assert PCMFormat().rate == OutputPCMFormat().rate == 24000
    for rate in set(INPUT_RATES) - set(OUTPUT_RATES):  # 11025, 32000: in only
        with pytest.raises(pydantic.ValidationError):
            OutputPCMFormat(rate=rate)
    with pytest.raises(pydantic.ValidationError):
        PCMFormat(rate=12345)
