"""The TTS stage: espeak-ng synthesis (library and subprocess paths against the espeak-ng CLI),
the streaming segmenter, the shared synthesis worker, the piper engine's errors."""

import shutil
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest

from agent.tts import TTSEngine, TTSError, TTSWorker, TextSegmenter, build_tts, clamp_speed
from agent.tts.espeak import EspeakEngine, rate_for_speed

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

TEXT = "The kitchen lights are on now, and the heating is set to twenty one degrees."


def rms(x):
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))) if len(x) else 0.0


def cli_seconds(tmp_path, text, voice="en-us", wpm=175):
    """espeak-ng's own synthesis of `text`, as a WAV file it writes: its duration in seconds."""
    out = tmp_path / "cli.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(out), text], check=True)
    with wave.open(str(out)) as w:
        return w.getnframes() / w.getframerate()


@pytest.fixture(scope="module")
def engine():
    return EspeakEngine()  # auto: the library path here


# -- engines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["library", "subprocess"])
def test_espeak_audio_matches_cli(mode, tmp_path):
    eng = EspeakEngine(mode=mode)
    assert eng.mode == mode and eng.sample_rate == 22050
    audio = eng.synthesize(TEXT)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert rms(audio) > 0.02  # speech, not silence
    assert np.abs(audio).max() <= 1.0
    dur = len(audio) / eng.sample_rate
    ref = cli_seconds(tmp_path, TEXT)
    assert ref > 2.0
    assert abs(dur - ref) / ref < 0.15, (dur, ref)


def test_espeak_default_is_library_and_voices(engine):
    assert engine.mode == "library"
    vs = engine.voices()
    assert "en-us" in vs and "en-gb" in vs and "fr-fr" in vs and len(vs) > 50
    assert set(vs) == set(EspeakEngine(mode="subprocess").voices())


@pytest.mark.parametrize("mode", ["library", "subprocess"])
def test_espeak_unknown_voice_is_a_clear_error(mode):
    eng = EspeakEngine(mode=mode)
    # (not "no-such-voice": like the CLI, a language prefix picks a voice, here Norwegian)
    with pytest.raises(TTSError, match="zzq-nope"):
        eng.synthesize("Hello.", voice="zzq-nope")
    assert rms(eng.synthesize("Hello.")) > 0.02  # still works afterwards
    with pytest.raises(TTSError, match="not found"):
        EspeakEngine(voice="zzq-nope", mode="library")
    with pytest.raises(TTSError, match="zzq-nope"):
        eng.check_voice("zzq-nope")
    eng.check_voice("en-gb")
    eng.check_voice(None)


def test_espeak_other_voice_and_empty_text(engine):
    fr = engine.synthesize("Bonjour, comment allez-vous?", voice="fr")
    assert rms(fr) > 0.02
    assert len(engine.synthesize("   ")) == 0


def test_speed_changes_duration(engine, tmp_path):
    d = {s: len(engine.synthesize(TEXT, speed=s)) / engine.sample_rate for s in (0.5, 1.0, 1.5)}
    assert d[0.5] > d[1.0] * 1.5 > d[1.5] * 1.5 * 1.2
    # speed 1.5 = 262 wpm: the CLI at the same rate agrees
    ref = cli_seconds(tmp_path, TEXT, wpm=262)
    assert abs(d[1.5] - ref) / ref < 0.15, (d[1.5], ref)


def test_speed_mapping_and_clamp():
    assert rate_for_speed(1.0) == 175
    assert rate_for_speed(1.5) == 262
    assert rate_for_speed(0.25) == 80  # espeak's minimum rate
    assert rate_for_speed(9.0) == 262  # clamped to GA's 1.5
    assert clamp_speed(0.1) == 0.25 and clamp_speed(2) == 1.5
    for bad in (0, -1, float("nan"), "fast", None):
        with pytest.raises(TTSError):
            clamp_speed(bad)


def test_build_tts_names():
    assert isinstance(build_tts(), EspeakEngine)
    assert build_tts("espeak", mode="subprocess").mode == "subprocess"
    with pytest.raises(TTSError, match="unknown TTS engine 'festival'.*espeak, piper"):
        build_tts("festival")
    with pytest.raises(TTSError, match="mode"):
        build_tts("espeak", mode="dbus")


def test_piper_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(TTSError, match="needs a voice file"):
        build_tts("piper")
    missing = tmp_path / "nope.onnx"
    with pytest.raises(TTSError, match="voice model not found.*nope.onnx"):
        build_tts("piper", model=str(missing))
    model = tmp_path / "v.onnx"
    model.write_bytes(b"x")
    with pytest.raises(TTSError, match="voice config not found.*v.onnx.json"):
        build_tts("piper", model=str(model))
    (tmp_path / "v.onnx.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts were not installed
    with pytest.raises(TTSError, match="piper-tts"):
        build_tts("piper", model=str(model))


# -- segmenter ----------------------------------------------------------------------------------

def segment(text, step=1, **kw):
    seg = TextSegmenter(**kw)
    pieces = []
    for i in range(0, len(text), step):
        pieces += seg.push(text[i:i + step])
    pieces += seg.flush()
    assert "".join(pieces) == text  # every character kept, in order
    return pieces


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_segmenter_sentences(step):
    assert segment("Hello there. How are you? I am fine! Bye", step) == [
        "Hello there. ", "How are you? ", "I am fine! ", "Bye"]


def test_segmenter_clauses_need_length():
    assert segment("Yes, sure, the lights in the kitchen are on, and the heating is off.") == [
        "Yes, sure, the lights in the kitchen are on, ", "and the heating is off."]
    assert segment("Well, if you look at the whole thing carefully, you will see; it is fine: ok.") == [
        "Well, if you look at the whole thing carefully, ", "you will see; it is fine: ", "ok."]


def test_segmenter_never_cuts_numbers_or_abbreviations():
    text = "It costs 3.5 dollars, or 1,000 cents at 12:30 today. Dr. Smith agrees, e.g. J. Doe too."
    assert segment(text) == ["It costs 3.5 dollars, or 1,000 cents at 12:30 today. ",
                             "Dr. Smith agrees, e.g. J. Doe too."]
    # a number at the end of a delta waits for what follows
    seg = TextSegmenter()
    assert seg.push("The answer is 3.") == []
    assert seg.push("5 now. Ok") == ["The answer is 3.5 now. "]
    assert seg.flush() == ["Ok"]


def test_segmenter_quotes_ellipsis_newlines_runons():
    assert segment('He said "no." Then left... ok?! yes') == ['He said "no." ', "Then left... ", "ok?! ", "yes"]
    assert segment("line one\n\nline two\n- item\n") == ["line one\n\n", "line two\n", "- item\n"]
    long = "word " * 100
    pieces = segment(long, step=5, max_chars=120)
    assert len(pieces) >= 4 and all(len(p) <= 125 for p in pieces)


def test_segmenter_flush_and_pending():
    seg = TextSegmenter()
    assert seg.push("Hi. The") == ["Hi. "]
    assert seg.pending == "The"
    assert seg.flush() == ["The"]
    assert seg.flush() == [] and seg.push("") == []
    assert segment("  Leading space. End. ") == ["  Leading space. ", "End. "]


# -- worker -------------------------------------------------------------------------------------

class Wrapped(TTSEngine):
    """The real espeak engine, slowed down per piece and/or failing on a marker word."""

    name = "wrapped"

    def __init__(self, inner, delay=0.0, fail_on=None, gate_after=None):
        self.inner, self.delay, self.fail_on = inner, delay, fail_on
        self.sample_rate = inner.sample_rate
        self.calls = []
        # Calls from number `gate_after` on wait for `gate` (0 = every call): steps in order.
        self.gate, self.gate_after = threading.Event(), gate_after
        self.waiting = threading.Event()

    def synthesize(self, text, voice=None, speed=1.0):
        self.calls.append(text)
        if self.gate_after is not None and len(self.calls) > self.gate_after:
            self.waiting.set()
            assert self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on and self.fail_on in text:
            raise TTSError(f"synthesis refused {self.fail_on!r}")
        return self.inner.synthesize(text, voice, speed)


class Recorder:
    def __init__(self):
        self.audio, self.pieces, self.events = [], [], []
        self.done, self.error = threading.Event(), None
        self.stats = None
        self.lock = threading.Lock()

    def on_audio(self, pcm, piece, ms):
        with self.lock:
            self.audio.append(pcm)
            self.pieces.append(piece)
            self.events.append(("audio", time.perf_counter(), ms, len(pcm)))

    def on_done(self, stats):
        self.stats = stats
        self.events.append(("done", time.perf_counter()))
        self.done.set()

    def on_error(self, exc):
        self.error = exc
        self.events.append(("error", time.perf_counter()))
        self.done.set()

    def kw(self):
        return dict(on_audio=self.on_audio, on_done=self.on_done, on_error=self.on_error)

    def pcm(self):
        return np.frombuffer(b"".join(self.audio), "<i2").astype(np.float32) / 32768.0


def push_in_deltas(stream, text, step=4):
    for i in range(0, len(text), step):
        stream.push_text(text[i:i + step])


REPLY = ("Sure, I can help with that. The kitchen lights are on now, and the heating is off. "
         "Your next meeting starts at half past three. Anything else?")


def test_two_streams_get_audio_and_exact_transcripts(engine):
    with TTSWorker(engine) as w:
        assert w._thread.daemon and w._thread.name == "nestvox-tts"
        a, b = Recorder(), Recorder()
        sa = w.open_stream(rate=24000, **a.kw())
        sb = w.open_stream(rate=16000, voice="en-gb", speed=1.2, **b.kw())
        other = "Good morning! It is sunny, about eighteen degrees, with a light breeze."
        for i in range(0, max(len(REPLY), len(other)), 4):
            sa.push_text(REPLY[i:i + 4])
            sb.push_text(other[i:i + 4])
        sa.finish()
        sb.finish()
        assert a.done.wait(20) and b.done.wait(20)
        assert a.error is None and b.error is None
        assert "".join(a.pieces) == REPLY and "".join(b.pieces) == other
        for rec, rate in ((a, 24000), (b, 16000)):
            pcm = rec.pcm()
            assert rms(pcm) > 0.02
            assert rec.stats.state == "done" and rec.stats.pieces >= 3
            assert rec.stats.audio_s == pytest.approx(len(pcm) / rate, rel=1e-6)
            assert rec.stats.first_audio_s is not None and rec.stats.first_audio_s < 5
            assert all(e[2] <= 100.0 + 1e-6 for e in rec.events if e[0] == "audio")
            assert rec.events[-1][0] == "done"
        st = w.stats()
        assert st["streams"] == 2 and st["streams_open"] == 0 and st["errors"] == 0


def test_output_rate_duration_matches_cli(engine, tmp_path):
    with TTSWorker(engine) as w:
        rec = Recorder()
        s = w.open_stream(rate=24000, **rec.kw())
        s.push_text(TEXT)
        s.finish()
        assert rec.done.wait(20) and rec.error is None
    dur = len(rec.pcm()) / 24000
    ref = cli_seconds(tmp_path, TEXT)
    # the pieces are spoken separately (a clause pause between them): same length within 15%
    assert abs(dur - ref) / ref < 0.15, (dur, ref)
    direct = sum(len(engine.synthesize(p)) for p in rec.pieces if p) / engine.sample_rate
    assert dur == pytest.approx(direct, rel=0.03)  # resampling keeps the duration


def test_cancel_stops_audio(engine):
    gated = Wrapped(engine, gate_after=1)  # the second piece waits for the gate
    with TTSWorker(gated, warmup=False) as w:
        rec = Recorder()
        s = w.open_stream(**rec.kw())
        s.push_text("One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten. ")
        s.finish()
        assert gated.waiting.wait(10)  # piece 1 delivered, piece 2 being synthesized
        assert "".join(rec.pieces) == "One. " and rms(rec.pcm()) > 0.02
        s.cancel()
        n, t_cancel = len(rec.events), time.perf_counter()
        gated.gate.set()
        time.sleep(0.3)
        assert len(rec.events) == n  # nothing after cancel returned: piece 2 dropped
        assert all(e[1] < t_cancel for e in rec.events)
        assert not rec.done.is_set() and rec.error is None
        assert s.state == "cancelled" and gated.calls == ["One. ", "Two. "]
        assert s.stats().pieces_queued == 0
        s.push_text("ignored")  # no error after cancel
        # the worker goes on with other streams
        rec2 = Recorder()
        s2 = w.open_stream(**rec2.kw())
        s2.push_text("Still here.")
        s2.finish()
        assert rec2.done.wait(10) and rms(rec2.pcm()) > 0.02


def test_cancel_waits_for_a_callback_in_flight(engine):
    with TTSWorker(engine) as w:
        in_cb, release, calls = threading.Event(), threading.Event(), []

        def on_audio(pcm, piece, ms):
            calls.append(piece)
            in_cb.set()
            release.wait(10)

        s = w.open_stream(on_audio=on_audio)
        s.push_text(REPLY)
        s.finish()
        assert in_cb.wait(10)
        t = threading.Thread(target=s.cancel)
        t.start()
        t.join(0.2)
        assert t.is_alive()  # cancel() has not returned while on_audio runs
        release.set()
        t.join(5)
        assert not t.is_alive()
        n = len(calls)
        time.sleep(0.2)
        assert len(calls) == n == 1


def test_cancel_from_inside_a_callback(engine):
    with TTSWorker(engine) as w:
        rec = Recorder()
        holder = {}

        def on_audio(pcm, piece, ms):
            rec.on_audio(pcm, piece, ms)
            holder["s"].cancel()

        s = holder["s"] = w.open_stream(on_audio=on_audio, on_done=rec.on_done, on_error=rec.on_error)
        s.push_text(REPLY)
        s.finish()
        time.sleep(0.5)
        assert len(rec.audio) == 1 and not rec.done.is_set()


def test_engine_error_reaches_one_stream_only(engine):
    bad = Wrapped(engine, fail_on="BOOM")
    with TTSWorker(bad) as w:
        a, b = Recorder(), Recorder()
        sa = w.open_stream(**a.kw())
        sb = w.open_stream(**b.kw())
        push_in_deltas(sa, "This part is fine. BOOM goes this one. Never spoken.")
        push_in_deltas(sb, REPLY)
        sa.finish()
        sb.finish()
        assert a.done.wait(20) and b.done.wait(20)
        assert isinstance(a.error, TTSError) and "BOOM" in str(a.error)
        assert "".join(a.pieces) == "This part is fine. " and a.stats is None
        assert sa.state == "error" and "BOOM" in sa.stats().error
        assert "Never spoken." not in bad.calls
        assert b.error is None and "".join(b.pieces) == REPLY and rms(b.pcm()) > 0.02
        assert w.stats()["errors"] == 1


def test_callback_error_stops_its_stream(engine):
    with TTSWorker(engine) as w:
        rec = Recorder()

        def on_audio(pcm, piece, ms):
            raise ValueError("client gone")

        s = w.open_stream(on_audio=on_audio, on_done=rec.on_done, on_error=rec.on_error)
        s.push_text("Hello. World.")
        s.finish()
        assert rec.done.wait(10)
        assert isinstance(rec.error, ValueError) and rec.stats is None and s.state == "error"


def test_round_robin_first_audio(engine):
    gated = Wrapped(engine, gate_after=0)  # the worker holds a's first piece until b is queued
    with TTSWorker(gated, warmup=False) as w:
        a, b = Recorder(), Recorder()
        sa = w.open_stream(**a.kw())
        sa.push_text("".join(f"Sentence number {i}. " for i in range(12)))
        sa.finish()
        assert gated.waiting.wait(10)
        sb = w.open_stream(**b.kw())
        sb.push_text("Quick answer.")
        sb.finish()
        gated.gate.set()
        assert a.done.wait(20) and b.done.wait(20)
        # a's first piece, then b's, then the rest of a: b did not wait for a's 12 pieces
        assert gated.calls[:3] == ["Sentence number 0. ", "Quick answer.", "Sentence number 1. "]
        t_b = next(e[1] for e in b.events if e[0] == "audio")
        assert sum(1 for e, p in zip(a.events, a.pieces) if e[1] < t_b and p) == 1
        assert "".join(a.pieces).count("Sentence") == 12


def test_backlog_merges_pieces_without_losing_text(engine):
    slow = Wrapped(engine, delay=0.1)
    with TTSWorker(slow, max_queue=2, warmup=False) as w:
        rec = Recorder()
        s = w.open_stream(**rec.kw())
        text = "".join(f"Item {i}. " for i in range(15))
        push_in_deltas(s, text, step=3)  # pushes never wait for the slow engine
        assert s.stats().pieces_queued <= 2
        s.finish()
        assert rec.done.wait(20)
        assert "".join(rec.pieces) == text and len(slow.calls) < 15


def test_unspeakable_pieces_and_bad_arguments(engine):
    with TTSWorker(engine) as w:
        rec = Recorder()
        s = w.open_stream(**rec.kw())
        s.push_text("Ok. ")
        s.push_text("... ")
        s.finish()
        assert rec.done.wait(10)
        assert "".join(rec.pieces) == "Ok. ... " and rec.pieces[-1] == "... " and rec.audio[-1] == b""
        with pytest.raises(RuntimeError):
            s.push_text("late")  # after finish: a caller's bug
        with pytest.raises(ValueError):
            w.open_stream(rate=4000)
        with pytest.raises(TTSError):
            w.open_stream(speed=float("nan"))


def test_close_ends_unfinished_streams(engine):
    w = TTSWorker(engine)
    rec = Recorder()
    w.open_stream(**rec.kw()).push_text("Never finished")
    w.close()
    assert rec.done.wait(5) and isinstance(rec.error, TTSError) and "closed" in str(rec.error)
    assert not w._thread.is_alive()
    with pytest.raises(TTSError, match="closed"):
        w.open_stream()


def test_piper_with_a_made_voice(tmp_path):
    """Runs where piper-tts is installed: the real piper code path on a tiny ONNX 'voice'
    (a sine of 256 samples per phoneme id x length_scale), no download."""
    pytest.importorskip("piper")
    import json

    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    nodes = [
        h.make_node("Cast", ["input_lengths"], ["lf"], to=T.FLOAT),
        h.make_node("ReduceSum", ["lf"], ["n"], keepdims=0),
        h.make_node("Gather", ["scales", "one"], ["ls"], axis=0),
        h.make_node("Mul", ["n", "ls"], ["a"]),
        h.make_node("Mul", ["a", "hop"], ["limit"]),
        h.make_node("Range", ["zero", "limit", "onef"], ["r"]),
        h.make_node("Mul", ["r", "freq"], ["ph"]),
        h.make_node("Sin", ["ph"], ["s"]),
        h.make_node("Reshape", ["s", "shape"], ["output"]),
    ]
    inits = [h.make_tensor("one", T.INT64, [], [1]), h.make_tensor("hop", T.FLOAT, [], [256.0]),
             h.make_tensor("zero", T.FLOAT, [], [0.0]), h.make_tensor("onef", T.FLOAT, [], [1.0]),
             h.make_tensor("freq", T.FLOAT, [], [0.1]), h.make_tensor("shape", T.INT64, [3], [1, 1, -1])]
    graph = h.make_graph(nodes, "made", [
        h.make_tensor_value_info("input", T.INT64, [1, None]),
        h.make_tensor_value_info("input_lengths", T.INT64, [1]),
        h.make_tensor_value_info("scales", T.FLOAT, [3])],
        [h.make_tensor_value_info("output", T.FLOAT, [1, 1, None])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "made.onnx"
    onnx.save(model, str(path))
    (tmp_path / "made.onnx.json").write_text(json.dumps({
        "num_symbols": 256, "num_speakers": 1, "audio": {"sample_rate": 16000},
        "espeak": {"voice": "en-us"}, "phoneme_id_map": DEFAULT_PHONEME_ID_MAP}))
    eng = build_tts("piper", model=str(path))
    assert eng.sample_rate == 16000
    a = eng.synthesize("Hello there, how are you?")
    assert len(a) > 0 and len(a) % 256 == 0 and rms(a) > 0.5
    assert len(eng.synthesize("Hello there, how are you?", speed=0.5)) == pytest.approx(2 * len(a), rel=0.01)
    with pytest.raises(TTSError, match="no speaker 'bob'"):
        eng.synthesize("Hi.", voice="bob")
    with TTSWorker(eng) as w:
        rec = Recorder()
        s = w.open_stream(rate=24000, **rec.kw())
        s.push_text("One, two. Three!")
        s.finish()
        assert rec.done.wait(10) and rec.error is None
        assert "".join(rec.pieces) == "One, two. Three!"
        assert len(rec.pcm()) / 24000 == pytest.approx(rec.stats.audio_s)


def test_a_long_first_run_on_is_cut_early_later_ones_late():
    from agent.tts import TextSegmenter

    words = " ".join(f"word{i}" for i in range(60))  # ~400 characters, no punctuation
    seg = TextSegmenter()
    pieces = []
    for k in range(0, len(words), 3):
        pieces += seg.push(words[k:k + 3])
    pieces += seg.flush()
    assert "".join(pieces) == words
    assert 40 <= len(pieces[0]) <= 66 and pieces[0].endswith(" ")  # the first audio need not wait
    assert all(len(p) > 150 for p in pieces[1:-1])  # the rest as before: cut only past 200
