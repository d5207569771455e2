"""Cache-aware streaming NEST encoder: incremental features, equivalence with the
offline forward, batching across streams, latency figures, refusals."""
import warnings

import numpy as np
import pytest
import torch

from agent.nest import NestEncoder
from agent.nest.configs import preprocessor_config
from agent.nest.incremental_mel import IncrementalMel
from agent.nest.processor import NestProcessor
from agent.nest.random_model import build_random_nest
from agent.nest.streaming import StreamingNestEncoder, configure_streaming
from conftest import TEST_DEVICE, TEST_DTYPE, feature_tolerance, nest_on

SR = 16000


def noise(seconds, seed):
    rng = np.random.default_rng(seed)
    # speech-like level changes so frames differ from one another
    x = rng.standard_normal(int(round(seconds * SR))).astype(np.float32) * 0.1
    envelope = 0.2 + np.abs(np.sin(np.arange(x.size) / SR * 3.0)).astype(np.float32)
    return torch.from_numpy(x * envelope)


def stream(streamer, audio, packet_ms, seed=0, jitter=True):
    """Feed `audio` in packets of about `packet_ms` (random sizes when jitter) and flush."""
    rng = np.random.default_rng(seed)
    state, outs, i = streamer.init_state(), [], 0
    base = max(1, int(packet_ms * SR / 1000))
    while i < audio.numel():
        n = int(rng.integers(1, 2 * base)) if jitter else base
        (state,), (feats,) = streamer.step([state], [audio[i:i + n]])
        outs.append(feats)
        i += n
    (state,), (feats,) = streamer.flush([state])
    outs.append(feats)
    assert state.finished
    return torch.cat(outs, dim=1), state


def offline(encoder, audio):
    """The model's offline forward (its trained attention setting)."""
    out = encoder.encode_audio(audio.numpy())
    return out.hidden_states[:, 0, : int(out.lengths[0])]


def offline_of(streamer, audio):
    """The offline forward in the streamer's own attention setting: what it must reproduce."""
    feats = streamer.nest.processor()(audio.numpy())
    hidden, lengths = streamer.encode_offline(feats["input_features"], feats["feature_lengths"])
    return hidden[:, 0, : int(lengths[0])]


TOL = feature_tolerance(TEST_DTYPE)


@pytest.fixture(scope="module")
def causal_nest(tmp_path_factory):
    """Cache-aware tiny NEST: chunked_limited attention, causal convolutions and subsampling,
    saved to .nemo and restored through the real loading code."""
    path = tmp_path_factory.mktemp("stream") / "causal.nemo"
    build_random_nest(str(path), shape="tiny", streaming=True, causal_downsampling=True, seed=3,
                      att_context_size=[64, 1])
    return str(path)


@pytest.fixture(scope="module")
def nest_subsampling_model(tmp_path_factory):
    """Streaming attention and convolutions with NEST's own non-causal subsampling
    (the shape the published weights load into)."""
    path = tmp_path_factory.mktemp("stream") / "noncausal.nemo"
    build_random_nest(str(path), shape="tiny", streaming=True, causal_downsampling=False, seed=4,
                      att_context_size=[64, 3])
    return str(path)


# -- incremental log-mel --------------------------------------------------------

@pytest.mark.parametrize("seconds", [0.0, 0.005, 0.3, 1.37])
@pytest.mark.parametrize("packet", [1, 37, 320, 16000])
def test_incremental_mel_equals_offline_front_end(seconds, packet):
    pre = NestProcessor(preprocessor_config_dict=preprocessor_config(normalize="NA")).preprocessor
    audio = noise(seconds, seed=packet)
    ref, ref_len = pre(input_signal=torch.cat([audio, torch.zeros(1)])[None], length=torch.tensor([audio.numel()]))
    ref = ref[0, :, : int(ref_len)]
    mel = IncrementalMel(pre)
    state, parts, i = mel.init_state(), [], 0
    rng = np.random.default_rng(packet)
    while i < audio.numel():
        n = int(rng.integers(1, 2 * packet + 1))
        state, m = mel.push(state, audio[i:i + n])
        # a frame is only emitted once every sample it reads is known
        assert state.frames_done * 160 + mel.lookahead_samples() - 160 <= state.total_samples or m.shape[1] == 0
        parts.append(m)
        i += n
    state, m = mel.push(state, None, final=True)
    parts.append(m)
    got = torch.cat(parts, dim=1)
    assert got.shape == ref.shape == (80, audio.numel() // 160)
    if got.numel():
        assert (got - ref).abs().max().item() < 1e-5
    assert state.samples.numel() <= 2 * 160 + 200 + 2 * packet  # only a short tail is held


def test_utterance_normalization_is_refused_unless_approximate():
    pre = NestProcessor(preprocessor_config_dict=preprocessor_config(normalize="per_feature")).preprocessor
    with pytest.raises(ValueError, match="per_feature.*cannot be streamed exactly"):
        IncrementalMel(pre)
    mel = IncrementalMel(pre, approximate_normalization=True)
    audio = noise(2.0, seed=1)
    state, a = mel.push(mel.init_state(), audio)
    state, b = mel.push(state, None, final=True)
    feats = torch.cat([a, b], 1)
    # running statistics: late frames are close to zero-mean per feature
    assert feats[:, 100:].mean().abs() < 0.2
    assert pre.featurizer.normalize == "per_feature"  # the model's own front end is untouched


# -- equivalence ----------------------------------------------------------------

# every chunk size with every utterance length; packet sizes rotate (20 ms, 37 ms, 1 s), jittered
CASES = [(c, s, p) for c in (1, 2, 4, 8) for s, p in zip((0.3, 1.37, 7.0, 31.0), ((20, 37, 1000, 20), (37, 1000, 20, 37),
                                                                                     (1000, 20, 37, 1000), (20, 37, 1000, 37))[
    (1, 2, 4, 8).index(c)])]


@pytest.mark.parametrize("chunk,seconds,packet_ms", CASES)
def test_streamed_layers_equal_offline_forward(causal_nest, chunk, seconds, packet_ms):
    encoder = nest_on(NestEncoder(causal_nest, layer="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunk sizes other than the trained [64, 1]
        streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=64)
    audio = noise(seconds, seed=chunk)
    ref = offline_of(streamer, audio)
    got, state = stream(streamer, audio, packet_ms, seed=chunk)
    assert got.device == TEST_DEVICE and got.dtype == TEST_DTYPE
    assert got.shape == ref.shape == (3, int(encoder.processor().encoder_frames(audio.numel())), 32)
    assert (got - ref).abs().max().item() <= TOL
    if chunk == 2:  # the trained setting: also the model's own offline forward
        assert (got - offline(encoder, audio)).abs().max().item() <= TOL
    assert state.frames_emitted == ref.shape[1]
    # all layers, not the last one thrice
    assert (got[0] - got[2]).abs().max() > 1e-2


@pytest.mark.parametrize("chunk", [4, 8])
def test_nest_non_causal_subsampling_streams_exactly(nest_subsampling_model, chunk):
    encoder = nest_on(NestEncoder(nest_subsampling_model, layer="0,2"))
    streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=64) if chunk == 4 else None
    if streamer is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=64)
    assert streamer.plan.first_mel == streamer.plan.step_mel == 8 * chunk
    for seconds, packet in ((1.37, 37), (7.0, 20)):
        audio = noise(seconds, seed=int(seconds * 10))
        ref = offline_of(streamer, audio)
        got, _ = stream(streamer, audio, packet)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= TOL


def test_nemo_default_schedule_is_wrong_for_non_causal_subsampling(nest_subsampling_model):
    """Why chunk_plan overrides NeMo for NEST's subsampling: NeMo's own schedule
    (first chunk 1+8R, 9-frame cache, drop 2) gives different frames."""
    from agent.nest.streaming import ChunkPlan

    encoder = NestEncoder(nest_subsampling_model, layer="last")
    streamer = StreamingNestEncoder(encoder, chunk_frames=4, left_context_frames=64)
    cfg = streamer.encoder.streaming_cfg
    streamer.plan = ChunkPlan(int(cfg.chunk_size[0]), int(cfg.chunk_size[1]), int(cfg.pre_encode_cache_size[1]),
                              int(cfg.drop_extra_pre_encoded))
    audio = noise(2.0, seed=5)
    ref = offline(encoder, audio)
    got, _ = stream(streamer, audio, 80, jitter=False)
    n = min(got.shape[1], ref.shape[1])
    assert (got[:, :n] - ref[:, :n]).abs().max().item() > 1e-2


# -- batching -------------------------------------------------------------------

def test_batched_streams_equal_each_alone(causal_nest):
    encoder = nest_on(NestEncoder(causal_nest, layer="all"))
    streamer = StreamingNestEncoder(encoder)  # the trained setting: chunk 2, left 64
    assert (streamer.chunk_frames, streamer.left_context_frames) == (2, 64)
    lengths = [0.9, 2.3, 1.37, 3.1, 0.45]
    starts = [0, 4, 8, 8, 12]  # ticks (40 ms) at which each stream begins: same chunk phase
    audios = [noise(s, seed=10 + i) for i, s in enumerate(lengths)]
    alone = [stream(streamer, a, 40, jitter=False)[0] for a in audios]
    packet = 640  # 40 ms
    states = [streamer.init_state() for _ in audios]
    got = [[] for _ in audios]
    done = [False] * len(audios)
    batch_sizes = []
    tick = 0
    while not all(done):
        chunks, final = [], []
        for i, a in enumerate(audios):
            k = tick - starts[i]
            live = k >= 0 and not done[i]
            piece = a[k * packet:(k + 1) * packet] if live else None
            chunks.append(piece)
            final.append(live and (k + 1) * packet >= a.numel())
        active = [i for i in range(len(audios)) if chunks[i] is not None]
        new_states, feats = streamer.step([states[i] for i in active], [chunks[i] for i in active],
                                          final=[final[i] for i in active])
        batch_sizes += streamer.last_stats.batch_sizes
        for j, i in enumerate(active):
            states[i] = new_states[j]
            got[i].append(feats[j])
            done[i] = done[i] or final[i]
        tick += 1
    for i in range(len(audios)):
        out = torch.cat(got[i], dim=1)
        assert out.shape == alone[i].shape
        assert torch.allclose(out, alone[i], rtol=0, atol=TOL / 10), (i, (out - alone[i]).abs().max())
    assert max(batch_sizes) >= 4  # the streams really shared encoder calls


def test_flushed_state_is_not_reused_and_silence_gives_nothing(causal_nest):
    encoder = NestEncoder(causal_nest, layer="last")
    streamer = StreamingNestEncoder(encoder)
    (state,), (feats,) = streamer.flush([streamer.init_state()])
    assert feats.shape == (1, 0, 32)
    with pytest.raises(ValueError, match="flushed"):
        streamer.step([state], [torch.zeros(160)])
    with pytest.raises(ValueError, match="2 states but 1"):
        streamer.step([streamer.init_state(), streamer.init_state()], [None])


# -- settings and latency ---------------------------------------------------------

def test_latency_follows_the_chunk_settings(causal_nest, nest_subsampling_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        causal = StreamingNestEncoder(NestEncoder(causal_nest), chunk_frames=4, left_context_frames=32)
        nest = StreamingNestEncoder(NestEncoder(nest_subsampling_model), chunk_frames=2, left_context_frames=64)
    assert causal.chunk_ms == 320 and nest.chunk_ms == 160
    # NEST subsampling: only the STFT half window (200 samples = 12.5 ms) past the chunk
    assert nest.lookahead_ms == pytest.approx(12.5)
    # causal subsampling runs its chunks 7 mel frames (70 ms) ahead of the 80 ms grid
    assert causal.lookahead_ms == pytest.approx(12.5 - 70)
    assert causal.latency_ms == pytest.approx(320 + 12.5 - 70)
    assert "320 ms" in causal.describe() and "2.56 s" in causal.describe()
    by_ms = StreamingNestEncoder.from_ms(NestEncoder(causal_nest), chunk_ms=160, left_context_ms=5120)
    assert (by_ms.chunk_frames, by_ms.left_context_frames) == (2, 64)
    with pytest.raises(ValueError, match="multiple of 80 ms"):
        StreamingNestEncoder.from_ms(NestEncoder(causal_nest), chunk_ms=100)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        StreamingNestEncoder(NestEncoder(causal_nest), chunk_frames=3, left_context_frames=64)


def test_full_context_checkpoint_is_refused_unless_approximate(tiny_nest_path):
    encoder = NestEncoder(tiny_nest_path, layer="all")  # regular attention, symmetric conv, per_feature
    with pytest.raises(ValueError, match="approximate=True"):
        StreamingNestEncoder(encoder, chunk_frames=4, left_context_frames=64)
    full = NestEncoder(tiny_nest_path, layer="all")
    audio = noise(3.0, seed=2)
    ref = offline(full, audio)
    with pytest.warns(UserWarning, match="only approximate"):
        streamer = StreamingNestEncoder(encoder, chunk_frames=4, left_context_frames=64, approximate=True)
    got, _ = stream(streamer, audio, 100)
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1)
    assert torch.all(cos > 0.3) and torch.all(cos < 0.99999)  # close, but not equal


def test_configure_streaming_reports_what_is_causal(tiny_nest_path, causal_nest):
    full = NestEncoder(tiny_nest_path).encoder
    report = configure_streaming(full, 4, 64)
    assert report["causal_convolutions"] is False and report["exact"] is False
    assert report["attention_before"].startswith("regular")
    assert full.att_context_style == "chunked_limited" and list(full.att_context_size) == [64, 3]
    streaming = NestEncoder(causal_nest).encoder
    report = configure_streaming(streaming, 2, 64)
    assert report["causal_convolutions"] and report["causal_subsampling"] and report["exact"]
    assert report["trained_for_this_context"]


# -- report and benchmark entry points ----------------------------------------------

def test_streaming_report_is_exact_for_a_streaming_model_and_not_for_a_full_context_one(causal_nest, tiny_nest_path):
    import io

    from agent.nest.streaming_report import compare

    audio = noise(2.0, seed=7).numpy()
    out = io.StringIO()
    rows = compare(causal_nest, audio, layers="all", chunks_ms=[160, 320], left_context_ms=5120, out=out)
    assert [r["chunk_ms"] for r in rows] == [160, 320]
    # the trained setting (chunk 2 = 160 ms) streams exactly; another chunk changes the attention
    assert rows[0]["exact"] and min(rows[0]["cos_min"]) > 0.99999
    assert not rows[1]["exact"] and min(rows[1]["cos_min"]) < 0.9999
    assert "L0" in out.getvalue() and "L2" in out.getvalue()
    rows = compare(tiny_nest_path, audio, layers="last", chunks_ms=[160], out=io.StringIO())
    assert not rows[0]["exact"] and rows[0]["cos_min"][0] < 0.9999


def test_bench_prints_the_table(capsys):
    from agent.nest.bench import main

    main(["--shape", "tiny", "--seconds", "1", "--batch", "2", "--chunks-ms", "160,320"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith(("160 ", "320 "))]
    assert len(rows) == 2 and "sessions" in out
