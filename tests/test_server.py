"""The websocket server on loopback, driven by a real websocket client (GA dialect;
the beta dialect and the official openai SDK: tests/test_protocol_dialects.py)."""
import asyncio
import base64
import json
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server_helpers import (RATE16, SR, SYSTEM, opened, pcm16, recv_until, reply_text, send_audio, spoken_turn,
                            start, turn_audio, update, with_silence)


@pytest.fixture()
async def server(inference):
    srv = await start(inference, max_sessions=6, max_message_bytes=64 * 1024)
    yield srv
    await srv.stop()


# -- the happy paths ---------------------------------------------------------------

async def test_spoken_turn_gets_deltas_and_latencies(server, inference, trimmed_speech):
    events, expected = await spoken_turn(server.url, with_silence(trimmed_speech), inference)
    types = [e["type"] for e in events]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.added", "response.created",
                 "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done",
                 "conversation.item.done"):
        assert kind in types
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete")
    assert reply_text(events) == expected and expected
    latency = done["latency_ms"]
    assert 0 <= latency["speech_end_to_encoder_done"] <= latency["speech_end_to_first_token"]
    assert latency["speech_end_to_last_token"] >= latency["speech_end_to_first_token"]


async def test_json_base64_and_binary_audio_give_the_same_reply(server, inference, trimmed_speech):
    binary, _ = await spoken_turn(server.url, with_silence(trimmed_speech), inference, binary=True)
    textual, _ = await spoken_turn(server.url, with_silence(trimmed_speech), inference, binary=False)
    assert reply_text(binary) == reply_text(textual) != ""


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_other_sample_rates_are_resampled(server, trimmed_speech, rate):
    import soxr

    audio = soxr.resample(with_silence(trimmed_speech), SR, rate).astype(np.float32)
    async with connect(server.url) as ws:
        updated = await opened(ws, rate)
        assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": rate}
        data = pcm16(audio)
        for i in range(0, len(data), rate // 25 * 2):
            await ws.send(data[i:i + rate // 25 * 2])
        events = await recv_until(ws, "response.done")
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_ms"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["audio_end_ms"]
    # speech was found where it is: 200 ms in, lasting as long as the utterance (in 16 kHz time)
    assert abs(end - start - 300 - 1000 * len(trimmed_speech) / SR) < 200
    assert reply_text(events)


async def test_manual_commit_mode(server, inference, trimmed_speech):
    async with connect(server.url) as ws:
        await opened(ws)
        await ws.send(update(audio={"input": {"turn_detection": None}}))
        updated = (await recv_until(ws, "session.updated"))[-1]
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        await send_audio(ws, trimmed_speech)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await recv_until(ws, "response.done")
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in events]
    quantized = np.frombuffer(pcm16(trimmed_speech), "<i2").astype(np.float32) / 32768
    assert reply_text(events) == inference.generate("", audio=quantized, system_prompt=SYSTEM, max_new_tokens=10)


async def test_barge_in_over_the_wire(server, trimmed_speech):
    async with connect(server.url) as ws:
        await opened(ws)
        await ws.send(update(max_output_tokens=3000))
        await recv_until(ws, "session.updated")
        await send_audio(ws, with_silence(trimmed_speech))
        await recv_until(ws, "response.output_text.delta")
        # the running reply keeps its settings; the next one will be short
        await ws.send(update(max_output_tokens=10))
        await send_audio(ws, with_silence(trimmed_speech))  # the user talks over the reply
        events = await recv_until(ws, "response.done")
        assert events[-1]["response"]["status"] == "cancelled"
        assert events[-1]["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        events = await recv_until(ws, "response.done")  # the new turn gets its own reply
        assert "input_audio_buffer.committed" in [e["type"] for e in events]


async def test_second_turn_reuses_the_conversation(server, inference, trimmed_speech):
    async with connect(server.url) as ws:
        await opened(ws)
        await send_audio(ws, with_silence(trimmed_speech))
        first = await recv_until(ws, "response.done")
        second_audio = trimmed_speech[::-1].copy()
        await send_audio(ws, with_silence(second_audio))
        second = await recv_until(ws, "response.done")
    quantized = np.frombuffer(pcm16(with_silence(trimmed_speech)), "<i2").astype(np.float32) / 32768
    quantized2 = np.frombuffer(pcm16(with_silence(second_audio)), "<i2").astype(np.float32) / 32768
    # sample positions count from the start of the connection's audio
    a1, a2 = turn_audio(first, quantized), turn_audio(second, np.concatenate([quantized, quantized2]))
    messages = [{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": reply_text(first)},
                {"role": "user", "content": "<|audio|>"}]
    expected = inference.generate(messages, audio=[a1, a2], system_prompt=SYSTEM, max_new_tokens=10)
    assert reply_text(second) == expected
    u1, u2 = first[-1]["response"]["usage"], second[-1]["response"]["usage"]
    assert u2["input_tokens"] > u1["input_tokens"] + u1["output_tokens"]
    # the second reply's context holds both turns' audio; the first turn and its reply were cached
    assert u2["input_token_details"]["audio_tokens"] > u1["input_token_details"]["audio_tokens"] > 0
    assert u1["input_token_details"]["cached_tokens"] == 0
    assert u2["input_token_details"]["cached_tokens"] >= u1["input_tokens"] + u1["output_tokens"] - 1
    assert u2["total_tokens"] == u2["input_tokens"] + u2["output_tokens"]
    # the conversation's items chain: user, assistant, user, assistant
    added = [e for e in first + second if e["type"] == "conversation.item.added"]
    assert [e["item"]["role"] for e in added] == ["user", "assistant", "user", "assistant"]
    assert [e["previous_item_id"] for e in added] == [None] + [e["item"]["id"] for e in added[:-1]]


async def test_healthz_and_metrics(server, inference, trimmed_speech):
    import urllib.request

    await spoken_turn(server.url, with_silence(trimmed_speech), inference)
    base = server.url.replace("ws://", "http://").replace("/v1/realtime", "")
    loop = asyncio.get_running_loop()
    health = json.loads(await loop.run_in_executor(None, lambda: urllib.request.urlopen(base + "/healthz").read()))
    assert health["status"] == "ok" and health["model"] == "tiny-test"
    metrics = (await loop.run_in_executor(None, lambda: urllib.request.urlopen(base + "/metrics").read())).decode()
    assert "nestvox_sessions_total" in metrics and "nestvox_turns_total 1" in metrics
    assert 'nestvox_latency_ms_count{stage="speech_end_to_first_token"} 1' in metrics
    assert "nestvox_encoder_batch_size_bucket" in metrics
    # compute per chunk size: the encoder's seconds and the audio seconds they encoded (its real-time factor)
    import re
    chunk = int(server.engine.streamer_for(None).chunk_ms)
    seconds = float(re.search(rf'nestvox_encoder_seconds_total{{chunk_ms="{chunk}"}} ([0-9.e+-]+)', metrics).group(1))
    audio = float(re.search(rf'nestvox_encoder_audio_seconds_total{{chunk_ms="{chunk}"}} ([0-9.e+-]+)',
                            metrics).group(1))
    assert seconds > 0 and 1.0 < audio < 5.0  # the turn's ~2 s of speech (plus padding), encoded once
    page = (await loop.run_in_executor(None, lambda: urllib.request.urlopen(base + "/client").read())).decode()
    assert "/v1/realtime" in page and "getUserMedia" in page


# -- bad input: a clear error, and other sessions unaffected -------------------------------

BAD_INPUTS = [
    ("not json {", "invalid_json"),
    ('["a list"]', "invalid_event"),
    ('{"no": "type"}', "invalid_event"),
    ('{"type": "conversation.delete"}', "unknown_event_type"),
    (b"\x01\x02\x03", "invalid_audio"),
    ('{"type": "input_audio_buffer.append", "audio": "***"}', "invalid_audio"),
    (update(audio={"input": {"format": {"type": "audio/pcm", "rate": 12345}}}), "invalid_session_config"),
    (update(nestvox={"chunk_ms": 100}), "invalid_session_config"),
    (update(nestvox={"chunk_ms": 2560}), "invalid_session_config"),  # not offered
    (update(nestvox={"temperature": -1}), "invalid_session_config"),
    (update(chunk_ms=320), "invalid_session_config"),  # extensions go under "nestvox"
    (update(audio={"input": {"transcription": {"model": "whisper-1"}}}), "invalid_session_config"),
    ('{"type": "conversation.item.delete", "item_id": "item_404"}', "item_not_found"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user"}}', "invalid_event"),
    ('{"type": "response.cancel"}', "response_cancel_not_active"),
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
    (b"\x00" * (64 * 1024 + 2), "message_too_large"),
]


async def test_bad_messages_get_errors_and_others_keep_working(server, inference, trimmed_speech):
    bystander = asyncio.create_task(spoken_turn(server.url, with_silence(trimmed_speech), inference))
    async with connect(server.url) as ws:
        await ws.recv()
        for message, code in BAD_INPUTS:
            await ws.send(message)
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["type"] == "error" and event["error"]["code"] == code, (message, event)
            assert event["error"]["message"] and event["event_id"]
        # still usable after all that
        await ws.send(update(nestvox={"temperature": 0.0}))
        assert (await recv_until(ws, "session.updated"))[-1]["type"] == "session.updated"
    events, expected = await bystander
    assert reply_text(events) == expected


async def test_audio_before_session_update_when_required(inference, trimmed_speech):
    srv = await start(inference, require_session_update=True)
    try:
        async with connect(srv.url) as ws:
            await ws.recv()
            await send_audio(ws, trimmed_speech[:3200])
            event = json.loads(await ws.recv())
            assert event["error"]["code"] == "session_update_required"
            await ws.send(update(**RATE16))
            await recv_until(ws, "session.updated")
            await send_audio(ws, with_silence(trimmed_speech))
            assert (await recv_until(ws, "response.done"))[-1]["type"] == "response.done"
    finally:
        await srv.stop()


async def test_token_and_origin_checks(inference, trimmed_speech):
    srv = await start(inference, auth_token="s3cret", allowed_origins=["https://app.example"])
    try:
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.url):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.url + "?token=wrong"):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.url + "?token=s3cret", origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403
        async with connect(srv.url, additional_headers={"Authorization": "Bearer s3cret"},
                           origin="https://app.example") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(srv.url + "?token=s3cret") as ws:  # browsers: the query parameter
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(update(**RATE16))
            await recv_until(ws, "session.updated")
            await send_audio(ws, with_silence(trimmed_speech))
            assert (await recv_until(ws, "response.done"))[-1]["type"] == "response.done"
    finally:
        await srv.stop()


async def test_max_sessions_refusal_and_disconnect_mid_turn_frees_the_session(inference, trimmed_speech):
    srv = await start(inference, max_sessions=2)
    try:
        first = await connect(srv.url)
        await opened(first)
        await send_audio(first, trimmed_speech[: len(trimmed_speech) // 2])  # mid-turn ...
        second = await connect(srv.url)
        await second.recv()
        third = await connect(srv.url)
        event = json.loads(await third.recv())
        assert event["error"]["code"] == "server_full" and "max_sessions=2" in event["error"]["message"]
        with pytest.raises(ConnectionClosed) as info:
            await third.recv()
        assert info.value.rcvd.code == 1013
        await first.close()  # ... the client vanishes
        for _ in range(100):
            if srv.connections == 1 and srv.engine.active_sessions == 1:
                break
            await asyncio.sleep(0.05)
        assert srv.connections == 1 and srv.engine.active_sessions == 1  # its session was freed
        events, expected = await spoken_turn(srv.url, with_silence(trimmed_speech), inference)  # a free slot again
        assert reply_text(events) == expected
        await second.close()
        assert "nestvox_sessions_rejected_total{reason=\"full\"} 1" in srv.metrics.render()
    finally:
        await srv.stop()


async def test_fuzzed_frames_do_not_disturb_another_session(server, inference, trimmed_speech):
    rng = np.random.default_rng(0)
    valid = [update(nestvox={"temperature": 0.5}),
             json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0" * 80).decode()}),
             json.dumps({"type": "input_audio_buffer.clear"}), json.dumps({"type": "response.cancel"})]

    def mutate(text: str) -> str:
        chars = list(text)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(chars)))
            chars[i] = chr(int(rng.integers(32, 0x3000)))
        return "".join(chars)

    async def fuzz():
        sent = 0
        deadline = time.monotonic() + 20
        async with connect(server.url, max_size=None) as ws:
            await ws.recv()
            while sent < 3000 and time.monotonic() < deadline:
                kind = rng.integers(0, 4)
                if kind == 0:
                    await ws.send(rng.bytes(int(rng.integers(0, 5000))))
                elif kind == 1:
                    await ws.send(mutate(valid[int(rng.integers(0, len(valid)))]))
                elif kind == 2:
                    await ws.send(valid[int(rng.integers(0, len(valid)))])
                else:
                    await ws.send(rng.bytes(int(rng.integers(1, 300))).decode("latin-1"))
                sent += 1
                if sent % 50 == 0:  # drain what the server said so its queue stays small
                    try:
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.001)
                    except asyncio.TimeoutError:
                        pass
            await ws.send(update(nestvox={"temperature": 0}))
            while True:  # the fuzzed session itself still answers
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if event["type"] == "session.updated" and event["session"]["nestvox"]["temperature"] == 0:
                    break
        return sent

    fuzzer = asyncio.create_task(fuzz())
    events, expected = await spoken_turn(server.url, with_silence(trimmed_speech), inference)
    assert reply_text(events) == expected
    assert await fuzzer >= 1000
    events, expected = await spoken_turn(server.url, with_silence(trimmed_speech), inference)  # still up afterwards
    assert reply_text(events) == expected


async def test_max_turn_length_and_idle_timeout(inference, trimmed_speech):
    from agent.realtime.config import SessionConfig

    srv = await start(inference, idle_timeout_s=1.5,
                      session=SessionConfig(instructions=SYSTEM, max_response_output_tokens=10, max_turn_seconds=1.0))
    try:
        async with connect(srv.url) as ws:
            await opened(ws)
            await send_audio(ws, trimmed_speech)  # ~2 s of speech, no pause: longer than the 1 s limit
            events = await recv_until(ws, "response.done")
            types = [e["type"] for e in events]
            error = next(e for e in events if e["type"] == "error")
            assert error["error"]["code"] == "turn_too_long" and "max_turn_seconds=1" in error["error"]["message"]
            assert types.index("error") < types.index("input_audio_buffer.committed") < types.index("response.done")
            # then nothing for longer than the idle timeout
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            while event["type"] != "error":
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["error"]["code"] == "idle_timeout"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
    finally:
        await srv.stop()
