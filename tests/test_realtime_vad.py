"""vad: the eager Silero network equals the packaged model; packets of any size."""
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from agent.realtime.vad import CONTEXT, WINDOW, SileroVad, model_file


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


@pytest.fixture(scope="module")
def padded_speech(speech):
    z = np.zeros(8000, np.float32)
    return np.concatenate([z, speech, z, 0.3 * speech[::-1].copy(), z])


def packaged_torchscript_probs(audio: np.ndarray) -> np.ndarray:
    """The silero-vad package's default model (TorchScript) through its own stateful wrapper.
    Loaded by path, not via `import silero_vad` (that import sets torch to one thread)."""
    spec = importlib.util.find_spec("silero_vad")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.jit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(path, map_location="cpu").eval()
    model.reset_states()
    x = torch.from_numpy(audio)
    with torch.no_grad():
        return np.array([float(model(x[i : i + WINDOW][None], 16000)) for i in range(0, len(x) - WINDOW + 1, WINDOW)])


def test_matches_the_packaged_model_and_finds_the_speech(vad, padded_speech, speech):
    stream = vad.new_stream()
    probs = vad.process(stream, padded_speech)
    ref = packaged_torchscript_probs(padded_speech)
    assert probs.shape == ref.shape == (len(padded_speech) // WINDOW,)
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-5)
    # Values, not only shapes: speech is speech and silence is silence.
    voiced = np.abs(speech) > 0.02
    first, last = 8000 + np.argmax(voiced), 8000 + len(voiced) - np.argmax(voiced[::-1])
    inside = probs[(first // WINDOW) + 3 : (last // WINDOW) - 3]
    assert np.median(inside) > 0.9
    assert probs[: 7000 // WINDOW].max() < 0.2
    assert stream.samples == len(probs) * WINDOW and len(stream.pending) == len(padded_speech) % WINDOW


def test_random_packet_sizes_give_the_same_probabilities(vad, padded_speech):
    # the same up to float rounding: a packet's windows run their convolutions as one batch
    whole = vad.process(vad.new_stream(), padded_speech)
    rng = np.random.default_rng(0)
    stream, parts, i = vad.new_stream(), [], 0
    while i < len(padded_speech):
        n = int(rng.choice([0, 1, 37, 511, 512, 513, 1000, 4097]))
        parts.append(vad.process(stream, padded_speech[i : i + n]))
        i += n
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-5)


def test_packet_bookkeeping_int16_input_and_reset(vad, padded_speech):
    stream = vad.new_stream()
    assert vad.process(stream, np.zeros(300, np.float32)).shape == (0,)
    assert vad.process(stream, np.zeros(300, np.float32)).shape == (1,)
    assert stream.samples == WINDOW and len(stream.pending) == 600 - WINDOW
    pcm = np.clip(padded_speech[:8192] * 32768, -32768, 32767).astype(np.int16)
    a = vad.process(vad.new_stream(), pcm)
    b = vad.process(vad.new_stream(), pcm.astype(np.float32) / 32768.0)
    assert np.array_equal(a, b)
    vad.reset(stream)
    assert stream.samples == 0 and len(stream.pending) == 0 and float(stream.rnn.abs().sum()) == 0.0


def test_batched_step_equals_separate_streams(vad, padded_speech):
    x = torch.from_numpy(padded_speech)
    a, b = x[:20 * WINDOW].view(20, WINDOW), x[20 * WINDOW : 40 * WINDOW].view(20, WINDOW) * 0.5
    rnn, ctx = torch.zeros(2, 2, 128), torch.zeros(2, CONTEXT)
    batched = []
    for k in range(20):
        p, rnn, ctx = vad.step(torch.stack([a[k], b[k]]), rnn, ctx)
        batched.append(p)
    batched = torch.stack(batched).numpy()
    sa = vad.process(vad.new_stream(), a.flatten().numpy())
    sb = vad.process(vad.new_stream(), b.flatten().numpy())
    np.testing.assert_allclose(batched[:, 0], sa, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched[:, 1], sb, rtol=0, atol=1e-5)


def test_bad_input_is_a_clear_error(vad):
    stream = vad.new_stream()
    with pytest.raises(ValueError, match="16000 Hz"):
        vad.process(stream, np.zeros(1024, np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match="1-D"):
        vad.process(stream, np.zeros((2, 1024), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        vad.process(stream, np.zeros(1024, np.int32))
    with pytest.raises(ValueError, match="windows"):
        vad.step(torch.zeros(1, 100), torch.zeros(2, 1, 128), torch.zeros(1, CONTEXT))


def test_loading_does_not_import_silero_vad_which_would_change_torch_threads():
    import sys

    from agent.realtime import vad as vad_module

    before = torch.get_num_threads()
    vad_module._shared_net.cache_clear()
    SileroVad(model_file())
    assert torch.get_num_threads() == before
    assert "silero_vad" not in sys.modules


def test_process_batch_equals_each_stream_alone(vad, padded_speech):
    """Three streams at different points, with packets of different sizes in one call:
    the same probabilities as feeding each stream on its own."""
    from agent.realtime.turns import TurnDetector

    offsets, sizes = (0, 7000, 15000), (320, 5000, 1)
    alone = [vad.new_stream() for _ in offsets]
    batched = [vad.new_stream() for _ in offsets]
    for stream, off in zip(alone + batched, offsets * 2):  # bring each to its own position
        vad.process(stream, padded_speech[:off])
    pos = list(offsets)
    for _ in range(6):
        pieces = [padded_speech[p:p + n] for p, n in zip(pos, sizes)]
        want = [vad.process(s, x) for s, x in zip(alone, pieces)]
        got = vad.process_batch(batched, pieces)
        for w, g in zip(want, got):
            assert len(w) == len(g) and np.allclose(w, g, atol=1e-5)
        pos = [p + n for p, n in zip(pos, sizes)]
    assert [s.samples for s in alone] == [s.samples for s in batched] and sum(len(g) for g in got) > 0
    # the detectors on top give the same events batched as alone
    dets_alone, dets_batched = [TurnDetector(vad=vad) for _ in range(2)], [TurnDetector(vad=vad) for _ in range(2)]
    streams = [padded_speech, np.concatenate([np.zeros(8000, np.float32), padded_speech])]
    events_alone = [d.feed(x) for d, x in zip(dets_alone, streams)]
    events_batched = TurnDetector.feed_batch(dets_batched, streams)
    assert events_alone == events_batched and all(events_alone)
