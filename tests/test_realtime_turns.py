"""turns: server-VAD turn detection on espeak-ng speech with a pause; manual commit; barge-in."""
import numpy as np
import pytest

from agent.realtime.turns import (
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
    TurnDetectionSettings,
    TurnDetector,
)
from agent.realtime.vad import SileroVad, WINDOW
from conftest import read_wav, synthesize

MS = 16  # samples per millisecond
PAUSE_MS = 300  # the short pause inside the utterance
TOLERANCE = 100 * MS


def trimmed_speech(text: str, path: str) -> np.ndarray:
    """espeak-ng speech without its leading/trailing silence, so pauses are exactly what we insert."""
    audio, rate = read_wav(synthesize(text, path))
    assert rate == 16000
    voiced = np.nonzero(np.abs(audio) > 0.02)[0]
    return audio[voiced[0] : voiced[-1] + 1].astype(np.float32)


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


@pytest.fixture(scope="module")
def utterance(tmp_path_factory):
    """500 ms silence, speech, a 300 ms pause, more speech, 1 s silence; with the true
    boundaries (sample indices)."""
    d = tmp_path_factory.mktemp("turns")
    a = trimmed_speech("turn on the lights in the kitchen", str(d / "a.wav"))
    b = trimmed_speech("and then close the door please", str(d / "b.wav"))
    z = lambda ms: np.zeros(ms * MS, np.float32)  # noqa: E731
    audio = np.concatenate([z(500), a, z(PAUSE_MS), b, z(1000)])
    start1 = 500 * MS
    end1 = start1 + len(a)
    start2 = end1 + PAUSE_MS * MS
    end2 = start2 + len(b)
    return audio, (start1, end1, start2, end2)


def run(detector, audio, packets=None):
    if packets is None:
        return detector.feed(audio)
    events, i = [], 0
    for n in packets:
        events += detector.feed(audio[i : i + n])
        i += n
    assert i >= len(audio)
    return events


def random_packets(total, seed):
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(0, 2500)))
    return sizes


def test_long_silence_ends_one_turn_after_the_final_speech_not_in_the_pause(vad, utterance):
    audio, (start1, end1, start2, end2) = utterance
    settings = TurnDetectionSettings(silence_duration_ms=500, prefix_padding_ms=300)
    events = run(TurnDetector(settings, vad), audio)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    started, stopped = events
    assert abs(started.onset - start1) <= TOLERANCE
    assert started.sample == started.onset - 300 * MS and not started.barge_in
    # The turn ends after the final speech, where the silence really began.
    assert stopped.sample > start2
    assert end2 <= stopped.sample <= end2 + TOLERANCE
    # ...and only once the configured silence has passed (decided per 32 ms window).
    assert 500 * MS <= stopped.detected_at - stopped.sample < 500 * MS + WINDOW
    # The turn's audio keeps 200 ms (suffix_padding_ms' default) of that silence.
    assert stopped.end == stopped.sample + 200 * MS


def test_short_silence_setting_ends_a_turn_inside_the_pause(vad, utterance):
    audio, (start1, end1, start2, end2) = utterance
    events = run(TurnDetector(TurnDetectionSettings(silence_duration_ms=150), vad), audio)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped, SpeechStarted, SpeechStopped]
    _, stop1, start_b, stop2 = events
    assert end1 <= stop1.sample <= end1 + TOLERANCE
    assert stop1.detected_at <= start2 + TOLERANCE  # decided inside the pause
    assert abs(start_b.onset - start2) <= TOLERANCE
    # suffix_padding_ms (200) is capped at the 150 ms silence that ends the turn
    assert stop1.end == stop1.sample + 150 * MS
    # Prefix padding would reach back into the previous turn: it stops at that turn's end.
    assert start_b.sample == stop1.end
    assert end2 <= stop2.sample <= end2 + TOLERANCE


@pytest.mark.parametrize("silence_ms", [500, 150])
def test_random_packet_sizes_give_identical_events(vad, utterance, silence_ms):
    audio, _ = utterance
    settings = TurnDetectionSettings(silence_duration_ms=silence_ms)
    whole = run(TurnDetector(settings, vad), audio)
    for seed in (0, 1):
        assert run(TurnDetector(settings, vad), audio, random_packets(len(audio), seed)) == whole


def test_speech_during_a_reply_is_reported_as_barge_in(vad, utterance):
    audio, (start1, end1, start2, _) = utterance
    detector = TurnDetector(TurnDetectionSettings(silence_duration_ms=150), vad)
    first = detector.feed(audio[: start2 - 50 * MS])
    assert [type(e) for e in first] == [SpeechStarted, SpeechStopped] and not first[0].barge_in
    detector.reply_active = True  # the caller is generating the reply to turn 1
    second = detector.feed(audio[start2 - 50 * MS :])
    assert isinstance(second[0], SpeechStarted) and second[0].barge_in
    assert abs(second[0].onset - start2) <= TOLERANCE


def test_manual_mode_emits_nothing_until_commit(vad, utterance):
    audio, _ = utterance
    detector = TurnDetector(TurnDetectionSettings.from_config(None), vad)
    assert detector.settings.mode == "manual"
    assert run(detector, audio, random_packets(len(audio), 2)) == []
    assert detector.commit() == TurnCommitted(sample=len(audio))
    assert detector.samples == len(audio)


def test_switching_modes_keeps_sample_positions_absolute(vad, utterance):
    audio, (start1, *_rest) = utterance
    detector = TurnDetector(TurnDetectionSettings(mode="manual"), vad)
    detector.feed(np.zeros(16000, np.float32))
    detector.update_settings(TurnDetectionSettings(silence_duration_ms=500, prefix_padding_ms=0))
    events = detector.feed(audio)
    assert isinstance(events[0], SpeechStarted)
    assert abs(events[0].onset - (16000 + start1)) <= TOLERANCE
    assert events[0].sample == events[0].onset


def test_commit_and_clear_in_server_vad_mode(vad, utterance):
    audio, (start1, end1, start2, end2) = utterance
    detector = TurnDetector(TurnDetectionSettings(silence_duration_ms=500), vad)
    assert isinstance(detector.feed(audio[: start1 + 8000])[0], SpeechStarted)
    assert detector.in_speech
    assert detector.commit() == TurnCommitted(sample=start1 + 8000)
    assert not detector.in_speech
    # Still talking after the commit: that is a new turn, whose padding starts at the commit.
    events = detector.feed(audio[start1 + 8000 : start1 + 12000])
    assert isinstance(events[0], SpeechStarted) and events[0].sample >= start1 + 8000
    detector.clear()
    assert not detector.in_speech


def test_state_machine_on_synthetic_probabilities():
    settings = TurnDetectionSettings(threshold=0.5, silence_duration_ms=100, prefix_padding_ms=0,
                                     min_speech_duration_ms=64)
    detector = TurnDetector(settings, vad=None)  # push_probabilities never needs the VAD
    # A one-window blip is too short to start a turn.
    assert detector.push_probabilities(np.array([0.0, 0.9, 0.1, 0.0]), 0) == []
    # Speech, then probabilities between neg_threshold (0.35) and threshold: still speech.
    events = detector.push_probabilities(np.array([0.9, 0.9, 0.9] + [0.4] * 10), 4 * WINDOW)
    assert events == [SpeechStarted(sample=4 * WINDOW, onset=4 * WINDOW, barge_in=False, detected_at=6 * WINDOW)]
    # Silence (< 0.35) for 100 ms = 3.125 windows: the turn ends after the 4th silent window.
    events = detector.push_probabilities(np.array([0.1, 0.1, 0.1, 0.1]), 17 * WINDOW)
    assert events == [SpeechStopped(sample=17 * WINDOW, detected_at=21 * WINDOW, end=17 * WINDOW + 100 * MS)]
    # A silent stretch interrupted by speech starts counting again.
    detector.push_probabilities(np.array([0.9, 0.9]), 21 * WINDOW)
    assert detector.push_probabilities(np.array([0.1, 0.1, 0.9, 0.1, 0.1, 0.1]), 23 * WINDOW) == []
    assert detector.in_speech


def test_settings_validation_and_protocol_round_trip():
    s = TurnDetectionSettings.from_config({"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 700})
    assert (s.mode, s.threshold, s.silence_duration_ms, s.prefix_padding_ms) == ("server_vad", 0.6, 700, 300)
    assert TurnDetectionSettings.from_config(s.to_config()) == s
    assert TurnDetectionSettings(mode="manual").to_config() is None
    for bad, match in [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0}, "threshold"),
        ({"silence_duration_ms": -1}, "silence_duration_ms"),
        ({"prefix_padding_ms": 2.5}, "prefix_padding_ms"),
        ({"mode": "semantic"}, "mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            TurnDetectionSettings(**bad)
    with pytest.raises(ValueError, match="unknown turn_detection field"):
        TurnDetectionSettings.from_config({"type": "server_vad", "silence_ms": 5})
    with pytest.raises(ValueError, match="type"):
        TurnDetectionSettings.from_config({"type": "energy_vad"})
    with pytest.raises(ValueError, match="object or null"):
        TurnDetectionSettings.from_config("server_vad")


def test_suffix_padding_holds_back_only_the_pause_beyond_it():
    settings = TurnDetectionSettings(threshold=0.5, silence_duration_ms=320, prefix_padding_ms=0,
                                     suffix_padding_ms=96, min_speech_duration_ms=64)
    detector = TurnDetector(settings, vad=None)
    detector.push_probabilities(np.array([0.9] * 6), 0)
    assert detector.speech_until(10 ** 6) == 6 * WINDOW  # all decided speech, nothing undecided
    detector.push_probabilities(np.array([0.1, 0.1]), 6 * WINDOW)
    # a pause began at window 6: the turn may take 96 ms of it, the rest waits for the VAD
    assert detector.speech_until(10 ** 6) == 6 * WINDOW + 96 * MS
    assert detector.speech_until(6 * WINDOW + 10) == 6 * WINDOW + 10
    events = detector.push_probabilities(np.array([0.1] * 8), 8 * WINDOW)
    assert events == [SpeechStopped(sample=6 * WINDOW, detected_at=16 * WINDOW, end=6 * WINDOW + 96 * MS)]
    assert TurnDetectionSettings.from_config({"suffix_padding_ms": 0}).suffix_padding_ms == 0
    with pytest.raises(ValueError, match="suffix_padding_ms"):
        TurnDetectionSettings(suffix_padding_ms=-5)


# -- semantic_vad: the pause a turn needs is decided per pause ----------------------------------

def test_semantic_silence_rises_from_the_floor_to_the_cap_as_the_model_doubts():
    from agent.realtime.turns import SEMANTIC, semantic_silence_ms

    for eagerness, (floor, cap) in SEMANTIC.items():
        values = [semantic_silence_ms(p, eagerness) for p in (1.0, 0.9, 0.5, 0.1, 0.0)]
        assert values[0] == floor and values[-1] == cap and values == sorted(values)
    assert semantic_silence_ms(0.5, "high") < semantic_silence_ms(0.5, "medium") < semantic_silence_ms(0.5, "low")


def feed_until_pause(det, utterance):
    """Feed up to 260 ms into the (300 ms) pause after the first phrase; the events so far."""
    audio, bounds = utterance
    audio = np.concatenate([audio, np.zeros(2000 * MS, np.float32)])
    upto = bounds[1] + 260 * MS
    return det.feed(audio[:upto]), upto


def test_semantic_vad_waits_the_cap_until_a_pause_is_decided_then_ends_at_the_decision(vad, utterance):
    audio, bounds = utterance
    audio = np.concatenate([audio, np.zeros(2000 * MS, np.float32)])  # 3 s of silence at the end
    settings = TurnDetectionSettings.from_config({"type": "semantic_vad", "eagerness": "high"})
    # undecided: the 300 ms pause inside the utterance does not end the turn; the final one does at the 2 s cap
    det = TurnDetector(settings, vad=vad)
    events = det.feed(audio)
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(stops) == 1 and abs(stops[0].sample - bounds[3]) < TOLERANCE
    assert 2000 <= stops[0].silence_ms < 2000 + 40  # the cap, to a VAD window
    # decided at the pause: the model is sure (p 0.95): the turn ends inside the pause
    det = TurnDetector(settings, vad=vad)
    events, upto = feed_until_pause(det, utterance)
    assert det.pending_silence_start is not None and not det.pause_decided
    stopped = det.decide_pause(100, p_done=0.95)  # 100 ms < what has been heard: at once
    assert len(stopped) == 1 and stopped[0].silence_ms >= 100 and stopped[0].p_done == 0.95
    assert abs(stopped[0].sample - bounds[1]) < TOLERANCE
    # decided long: the pause goes by, speech resumes, and the next pause decides anew
    det = TurnDetector(settings, vad=vad)
    events, upto = feed_until_pause(det, utterance)
    assert det.decide_pause(1500, p_done=0.2) == []
    rest = det.feed(audio[upto:])  # audio: the 3 s tail version
    assert [type(e) for e in rest] == [SpeechStopped]  # only the final one, with the cap (undecided)
    assert abs(rest[0].sample - bounds[3]) < TOLERANCE and rest[0].p_done is None
