"""`python -m agent.bench load`: real-time streams driving the engine in-process (tiny model)."""
import json
from dataclasses import dataclass

import pytest

from agent import bench, bench_load

SR = 16000
MAX_TOKENS = 12
SILENCE_MS = 500


@pytest.fixture(scope="module")
def tiny():
    import warnings

    from agent.nest.streaming import StreamingNestEncoder

    inference, tokenizer = bench.build("tiny", "tiny", 4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamer = StreamingNestEncoder(inference.model.audio_tower, chunk_frames=4, left_context_frames=64)
    return inference, tokenizer, streamer


@pytest.fixture(scope="module")
def utterances():
    audio, note = bench_load.synthesize_utterances(["turn on the lights", "set a timer"])
    assert note is None, note  # tests have espeak-ng (conftest.synthesize needs it too)
    return audio


def test_two_streams_reply_with_consistent_figures(tiny, utterances):
    inference, tokenizer, streamer = tiny
    report = bench_load.run_load(inference.model, tokenizer, streamer, streams=[2], duration=5.0,
                                 budget_ms=1000, silence_ms=SILENCE_MS, max_tokens=MAX_TOKENS,
                                 utterances=utterances, warm=False, verbose=False)
    from agent.realtime.engine import Engine

    has_switch = bench_load.engine_kwargs(Engine, "batched", 2, None) is not None
    assert [r["mode"] for r in report["results"]] == (["batched", "round-robin"] if has_switch else ["round-robin"])
    assert has_switch or any("batched mode skipped" in n for n in report["notes"])
    speech_s = [u.size / SR for u in utterances]
    longest_token = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    for r in report["results"]:
        assert r["streams"] == 2 and r["error_count"] == 0, r["errors"]
        assert r["streams_replied"] == 2  # every stream got at least one reply
        assert r["client_committed"] == 0  # the engine's VAD ended every turn
        assert 2 <= r["completed"] <= r["turns"]
        assert 0 <= r["on_time"] <= r["turns"]
        assert 5.0 <= r["elapsed_s"] <= 5.0 + 1.0
        tokens = 0
        for reply in r["replies"]:
            assert reply["deltas"] == reply["text"]  # the streamed deltas are the reply
            assert 1 <= reply["n_deltas"] <= reply["output_tokens"] <= MAX_TOKENS
            # the text is no longer than that many tokens can spell
            assert len(reply["text"]) <= reply["output_tokens"] * longest_token
            if reply["status"] == "incomplete":
                assert reply["output_tokens"] == MAX_TOKENS
            # the first token cannot come before the VAD has heard (most of) its silence
            assert reply["e2ft_ms"] > 0.5 * SILENCE_MS
            tokens += reply["output_tokens"]
        assert tokens == r["output_tokens"]
        assert r["agg_tok_s_run"] == pytest.approx(tokens / r["elapsed_s"], rel=0.02)
        assert 0 < r["decoding_s"] <= r["elapsed_s"]
        assert r["agg_tok_s_decoding"] == pytest.approx(tokens / r["decoding_s"], rel=1e-6)
        for key in ("e2ft_ms", "engine_e2ft_ms"):
            assert r[key]["n"] >= 2 and r[key]["p50"] <= r[key]["p99"]
        assert r["session_tok_s"]["n"] >= 1 and r["session_tok_s"]["p50"] > 0
        # the encoder saw each turn's speech (plus at most prefix padding and the suffix)
        assert r["encoder_rtf"] > 0
        assert 0.8 * r["completed"] * min(speech_s) <= r["audio_s"] <= r["turns"] * (max(speech_s) + 0.6)
        assert 0 < r["engine_busy"] <= 1 and 0 < r["encoder_share"] <= 1
    if has_switch:
        assert report["ratios"]["2"] is not None and report["ratios"]["2"] > 0


def test_cli_honours_streams_duration_device_and_json(tiny, tmp_path, monkeypatch):
    calls = []

    def fake_build(nest, llm, chunk, left, device="cpu", dtype="float32", quantize="none"):
        calls.append((nest, llm, chunk, left, device, dtype))
        return tiny[0], tiny[1]

    monkeypatch.setattr(bench, "build", fake_build)
    out = tmp_path / "load.json"
    bench.main(["load", "--nest", "tiny", "--llm", "tiny", "--device", "cpu", "--dtype", "float32",
                "--streams", "1,3", "--duration", "1.5", "--mode", "round-robin", "--no-warm-up",
                "--reply-tok-s", "20", "--json", str(out)])
    assert calls == [("tiny", "tiny", 4, 64, "cpu", "float32")]
    report = json.loads(out.read_text())
    assert [(r["mode"], r["streams"], r["duration_s"]) for r in report["results"]] == \
        [("round-robin", 1, 1.5), ("round-robin", 3, 1.5)]
    for r in report["results"]:  # too short for a turn (speech + silence + budget): none started
        assert r["turns"] == 0 and 1.5 <= r["elapsed_s"] <= 1.5 + 0.5
        assert r["engine_kwargs"]["reply_tok_s"] == 20.0  # the pace reached the engine
    assert report["reply_tok_s"] == 20.0
    with pytest.raises(SystemExit, match="reply-tok-s"):
        bench.main(["load", "--reply-tok-s", "-1"])
    with pytest.raises(SystemExit):
        bench.main(["load", "--device", "tpu"])
    with pytest.raises(SystemExit):
        bench.main(["load", "--dtype", "int8"])


def test_read_event_takes_dicts_and_typed_events():
    @dataclass
    class TextDelta:
        delta: str

    @dataclass
    class ResponseDone:
        status: str
        text: str
        output_tokens: int
        latency_ms: dict

    @dataclass
    class SpeechStopped:
        sample: int

    done = {"type": "response.done", "response": {
        "status": "completed", "usage": {"output_tokens": 3}, "latency_ms": {"speech_end_to_first_token": 5.0},
        "output": [{"type": "message", "content": [{"type": "text", "text": "hi there"}]}]}}
    assert bench_load.read_event(done) == ("done", {"status": "completed", "text": "hi there", "output_tokens": 3,
                                                    "latency_ms": {"speech_end_to_first_token": 5.0}})
    assert bench_load.read_event(ResponseDone("completed", "hi there", 3, {"speech_end_to_first_token": 5.0})) == \
        bench_load.read_event(done)
    assert bench_load.read_event({"type": "response.text.delta", "delta": "hi"}) == ("delta", {"delta": "hi"})
    assert bench_load.read_event(TextDelta("hi")) == ("delta", {"delta": "hi"})
    assert bench_load.read_event({"type": "input_audio_buffer.speech_stopped"})[0] == "speech_stopped"
    assert bench_load.read_event(SpeechStopped(3))[0] == "speech_stopped"
    assert bench_load.read_event({"type": "error", "error": {"code": "x", "message": "y"}}) == \
        ("error", {"code": "x", "message": "y"})
    assert bench_load.read_event({"type": "response.created"})[0] == "other"
    ga_done = {"type": "response.done", "event_id": "event_9", "response": {
        "id": "resp_1", "object": "realtime.response", "status": "completed",
        "usage": {"total_tokens": 10, "input_tokens": 7, "output_tokens": 3},
        "latency_ms": {"speech_end_to_first_token": 5.0},
        "output": [{"id": "item_2", "type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "hi there"}]}]}}
    assert bench_load.read_event(ga_done) == bench_load.read_event(done)
    assert bench_load.read_event({"type": "response.output_text.delta", "response_id": "resp_1", "item_id": "item_2",
                                  "output_index": 0, "content_index": 0, "delta": "hi"}) == ("delta", {"delta": "hi"})
    assert bench_load.read_event({"type": "error", "error": {"type": "invalid_request_error", "code": "x",
                                                             "message": "y", "param": None}}) == \
        ("error", {"code": "x", "message": "y"})


def test_union_seconds_and_ratios():
    assert bench_load.union_seconds([(0, 1), (0.5, 2), (3, 4), (3.2, 3.5)]) == pytest.approx(3.0)
    assert bench_load.union_seconds([]) == 0
    rows = [{"mode": "batched", "streams": 8, "agg_tok_s_decoding": 100.0},
            {"mode": "round-robin", "streams": 8, "agg_tok_s_decoding": 25.0},
            {"mode": "round-robin", "streams": 1, "agg_tok_s_decoding": 30.0}]
    assert bench_load.ratios(rows) == {1: None, 8: 4.0}


def test_decode_benchmark_prints_both_paths_per_session_count(capsys):
    from agent import bench

    bench.main(["decode", "--llm", "tiny", "--sessions", "1,3", "--steps", "2", "--positions", "20"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("1 |", "3 |"))]
    assert len(lines) == 2
    for line in lines:
        cells = [c.strip() for c in line.split("|")]
        batched_ms, batched_agg = (float(x) for x in cells[1].split())
        rr_ms, rr_agg = (float(x) for x in cells[2].split())
        assert batched_ms > 0 and rr_ms > 0 and batched_agg > 0 and rr_agg > 0
        n = int(cells[0])
        # the table's own arithmetic, up to the printed rounding (ms to 0.005, tok/s to 0.05)
        lo, hi = n / ((batched_ms + 0.005) / 1000), n / ((batched_ms - 0.005) / 1000)
        assert lo - 0.05 <= batched_agg <= hi + 0.05
