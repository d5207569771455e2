"""Scale-out on Ray Serve (agent/realtime/ray_serve.py), on loopback: one local Ray for the
module, 2 replicas of the tiny streaming model on the CPU, 2 sessions each."""
import asyncio
import json
import os
import signal
import socket
import time
import urllib.request

import numpy as np
import pytest
import ray
from ray import serve
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.realtime import ray_serve
from server_helpers import pcm16, recv_until

SR = 16000
SYSTEM = "Answer briefly."
TOKENS = 10  # short replies: a random-weight model's long ones can flip on float near-ties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(streaming_checkpoint):
    cli = ray_serve.serve_cli()
    port = free_port()
    args = cli.parse_args(["--replicas", "2", "--model", streaming_checkpoint, "--port", str(port),
                           "--instructions", SYSTEM, "--max-sessions", "2", "--chunk-sizes-ms", "160",
                           "--log-level", "WARNING"])
    ray_serve.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = ray_serve.deploy(args)
        yield {"url": url, "http": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    from conftest import read_wav, synthesize

    a, _ = read_wav(synthesize("turn on the lights in the kitchen", str(tmp_path_factory.mktemp("s") / "a.wav")))
    loud = np.flatnonzero(np.abs(a) > 1e-3)
    a = a[loud[0]: loud[-1] + 1].astype(np.float32)
    return np.concatenate([np.zeros(int(0.2 * SR), np.float32), a, np.zeros(SR, np.float32)])


async def get_json(url):
    loop = asyncio.get_running_loop()
    return json.loads(await loop.run_in_executor(None, lambda: urllib.request.urlopen(url, timeout=30).read()))


async def health(app):
    return await get_json(app["http"] + "/healthz")


async def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        h = await health(app_ref[0])
        if predicate(h):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(h)[:2000]}")
        await asyncio.sleep(0.3)


app_ref = [None]


@pytest.fixture(autouse=True)
def _app_ref(app):
    app_ref[0] = app


def reply_text(events):  # both dialects: response.output_text.delta (GA) / response.text.delta (beta)
    return "".join(e["delta"] for e in events if e["type"].endswith("text.delta"))


def expected_reply(inference, events, audio):
    quantized = np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_sample"]
    end = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["turn_end_sample"]
    return inference.generate("", audio=quantized[start:end], system_prompt=SYSTEM, max_new_tokens=TOKENS)


async def open_session(url):
    ws = await connect(url)
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": TOKENS}}))
    await recv_until(ws, "session.updated")
    return ws


async def turn(ws, audio, packet=640):
    data = pcm16(audio)
    for i in range(0, len(data), packet):
        await ws.send(data[i:i + packet])
    return await recv_until(ws, "response.done")


def sessions_by_pid(h):
    return {r["pid"]: r["sessions"] for r in h["replicas"]}


async def test_callers_spread_over_replicas_and_replies_equal_the_offline_model(app, streaming_inference, speech):
    h = await wait_for(lambda h: len(h["replicas"]) == 2, what="2 replicas reporting")
    assert h["status"] == "ok" and h["max_sessions"] == 4 and h["serve"]["replica_states"] == {"RUNNING": 2}
    callers = [await open_session(app["url"]) for _ in range(4)]
    try:
        # each new session went to the replica with room: 2 + 2, none refused
        h = await wait_for(lambda h: sorted(sessions_by_pid(h).values()) == [2, 2], what="2 sessions on each")
        assert h["sessions"] == 4 and not h["has_room"]
        # a fifth finds every replica full: server_full, then close 1013
        async with connect(app["url"]) as fifth:
            event = json.loads(await fifth.recv())
            assert event["type"] == "error" and event["error"]["code"] == "server_full", event
            with pytest.raises(ConnectionClosed) as info:
                await fifth.recv()
            assert info.value.rcvd.code == 1013
        results = await asyncio.gather(*(turn(ws, speech) for ws in callers))
    finally:
        for ws in callers:
            await ws.close()
    for events in results:
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert reply_text(events) == expected_reply(streaming_inference, events, speech) != ""
    await wait_for(lambda h: h["sessions"] == 0, what="sessions freed")
    metrics = urllib.request.urlopen(app["http"] + "/metrics", timeout=30).read().decode()
    assert "nestvox_replicas 2" in metrics and metrics.count("# TYPE nestvox_sessions_total counter") == 1
    for r in h["replicas"]:  # per replica, labelled
        assert f'nestvox_sessions_total{{replica="{r["id"]}"}} 2' in metrics
        assert f'nestvox_turns_total{{replica="{r["id"]}"}} 2' in metrics
    assert metrics.count('reason="full"} 1') == 1  # the fifth caller, on one of them


async def test_killed_replica_closes_its_callers_others_continue_and_serve_replaces_it(app, streaming_inference,
                                                                                       speech):
    h = await wait_for(lambda h: len(h["replicas"]) == 2 and h["sessions"] == 0, what="2 idle replicas")
    before = {r["id"] for r in h["replicas"]}
    victim_ws = await open_session(app["url"])
    h = await wait_for(lambda h: h["sessions"] == 1, what="the first session")
    victim = next(r for r in h["replicas"] if r["sessions"] == 1)
    bystander_ws = await open_session(app["url"])  # the other replica: it has more room
    await wait_for(lambda h: sorted(sessions_by_pid(h).values()) == [1, 1], what="one session on each")
    try:
        data = pcm16(speech)
        await victim_ws.send(data[: len(data) // 2])  # mid-turn
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(victim_ws.recv(), 30)
        code = info.value.rcvd.code if info.value.rcvd is not None else None
        assert code == ray_serve.LOST_CODE, f"close code {code} ({info.value})"  # service restart: reconnect
        assert time.monotonic() - t0 < 30
        # the other replica's caller is unaffected
        events = await turn(bystander_ws, speech)
        assert reply_text(events) == expected_reply(streaming_inference, events, speech) != ""
        # the victim reconnects and lands on the live replica
        retry = await open_session(app["url"])
        try:
            events = await turn(retry, speech)
            assert reply_text(events) == expected_reply(streaming_inference, events, speech) != ""
        finally:
            await retry.close()
    finally:
        await bystander_ws.close()
        await victim_ws.close()
    # Serve starts a replacement (STARTING while it loads the model, then RUNNING: not waited for, it
    # is a model load); the registry forgets the dead one
    def replaced(h):
        states, ids = h["serve"].get("replica_states", {}), {r["id"] for r in h["replicas"]}
        return (victim["id"] not in ids and sum(states.values()) == 2
                and (states.get("STARTING", 0) == 1 or len(ids - before) == 1))

    h = await wait_for(replaced, timeout=60, what="a replacement replica")
    assert set(h["serve"]["replica_states"]) <= {"STARTING", "RUNNING"}, h["serve"]
