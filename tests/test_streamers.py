"""Streamers of several chunk sizes over one model: each has its own encoder
settings (weights shared), they step interleaved, and the offline model is left
exactly as it was. Runs on NESTVOX_TEST_DEVICE / NESTVOX_TEST_DTYPE."""
import warnings

import numpy as np
import pytest
import torch

from agent.nest import NestEncoder
from agent.nest.random_model import build_random_nest
from agent.nest.streaming import StreamingNestEncoder, build_streamers, streaming_copy
from conftest import TEST_DEVICE, TEST_DTYPE, feature_tolerance, nest_on

SR = 16000
TOL = feature_tolerance(TEST_DTYPE)


def noise(seconds, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(round(seconds * SR))).astype(np.float32) * 0.1
    return torch.from_numpy(x * (0.2 + np.abs(np.sin(np.arange(x.size) / SR * 3.0)).astype(np.float32)))


@pytest.fixture(scope="module")
def causal_nest(tmp_path_factory):
    """Cache-aware tiny NEST trained (configured) for chunk 2 = 160 ms, left 64."""
    path = tmp_path_factory.mktemp("streamers") / "causal.nemo"
    build_random_nest(str(path), shape="tiny", streaming=True, causal_downsampling=True, seed=5,
                      att_context_size=[64, 1])
    return str(path)


def model_offline(nest, audio):
    out = nest.encode_audio(audio.numpy())
    return out.hidden_states[:, 0, : int(out.lengths[0])]


def streamer_offline(streamer, audio):
    feats = streamer.nest.processor()(audio.numpy())
    hidden, lengths = streamer.encode_offline(feats["input_features"], feats["feature_lengths"])
    return hidden[:, 0, : int(lengths[0])]


def encoder_settings(enc):
    """Everything streaming setup may change on a NeMo encoder, as plain values."""
    return {
        "style": enc.att_context_style,
        "size": list(enc.att_context_size),
        "all": [list(a) for a in enc.att_context_size_all],
        "cfg": repr(enc.streaming_cfg),
        "drops": [(layer.self_attn.cache_drop_size, layer.conv.depthwise_conv.cache_drop_size)
                  for layer in enc.layers],
        "attrs": sorted(enc.__dict__),
        "hooks": [len(layer._forward_hooks) for layer in enc.layers],
    }


def test_two_chunk_sizes_interleaved_each_equal_their_offline_forward(causal_nest):
    nest = nest_on(NestEncoder(causal_nest, layer="all"))
    audios = [noise(2.3, seed=1), noise(1.37, seed=2)]
    before = [model_offline(nest, a) for a in audios]
    settings = encoder_settings(nest.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 320 ms is not the trained chunk
        streamers = build_streamers(nest, [160, 320, 160])
    assert sorted(streamers) == [2, 4]
    a, b = streamers[2], streamers[4]
    assert (a.chunk_ms, b.chunk_ms) == (160, 320)
    assert a.left_context_frames == b.left_context_frames == 64
    assert a.encoder is not b.encoder and a.encoder is not nest.encoder
    # Weights are shared, not copied.
    assert a.encoder.layers[0].feed_forward1.linear1.weight is nest.encoder.layers[0].feed_forward1.linear1.weight
    assert a.encoder.layers[1].self_attn.pos_bias_u is b.encoder.layers[1].self_attn.pos_bias_u

    # Two streams per streamer, every streamer stepped on every 20 ms tick, in turn.
    states = {k: [s.init_state() for _ in audios] for k, s in streamers.items()}
    got = {k: [[] for _ in audios] for k in streamers}
    packet = 320
    ticks = max(x.numel() for x in audios) // packet + 1
    for tick in range(ticks):
        for k in (4, 2) if tick % 2 else (2, 4):
            pieces = [x[tick * packet:(tick + 1) * packet] for x in audios]
            final = [(tick + 1) * packet >= x.numel() for x in audios]
            live = [i for i, st in enumerate(states[k]) if not st.finished]
            new, feats = streamers[k].step([states[k][i] for i in live], [pieces[i] for i in live],
                                           final=[final[i] for i in live])
            for j, i in enumerate(live):
                states[k][i] = new[j]
                got[k][i].append(feats[j])
    for k, streamer in streamers.items():
        for i, audio in enumerate(audios):
            out = torch.cat(got[k][i], dim=1)
            assert out.device == TEST_DEVICE and out.dtype == TEST_DTYPE
            ref = streamer_offline(streamer, audio)
            assert out.shape == ref.shape == before[i].shape
            assert (out - ref).abs().max().item() <= TOL, (k, i)
    # The trained chunk reproduces the model's offline forward; 320 ms attends differently
    # (so the comparison above is not vacuous), and its offline forward says so.
    for i, audio in enumerate(audios):
        assert (torch.cat(got[2][i], 1) - before[i]).abs().max().item() <= TOL
        assert (streamer_offline(b, audio) - before[i]).abs().max().item() > 10 * TOL

    # The offline model is exactly as before: settings, attributes, hooks and outputs.
    assert encoder_settings(nest.encoder) == settings
    for i, audio in enumerate(audios):
        assert torch.equal(model_offline(nest, audio), before[i])
    assert not [k for k in vars(nest.encoder) if "nestvox" in k]
    assert not hasattr(StreamingNestEncoder, "activate")


def test_approximate_streamer_leaves_a_full_context_model_unchanged(tiny_nest_path):
    """Building a streamer used to switch the offline tower to chunked attention."""
    nest = nest_on(NestEncoder(tiny_nest_path, layer="all"))
    audio = noise(2.0, seed=3)
    before = model_offline(nest, audio)
    style = (nest.encoder.att_context_style, list(nest.encoder.att_context_size))
    with pytest.warns(UserWarning, match="only approximate"):
        streamer = StreamingNestEncoder(nest, chunk_frames=4, left_context_frames=64, approximate=True)
    assert streamer.encoder.att_context_style == "chunked_limited"
    assert (nest.encoder.att_context_style, list(nest.encoder.att_context_size)) == style == ("regular", [-1, -1])
    (state,), (part,) = streamer.step([streamer.init_state()], [audio])
    (state,), (tail,) = streamer.flush([state])
    streamed = torch.cat([part, tail], 1)
    assert streamed.shape == before.shape
    assert torch.equal(model_offline(nest, audio), before)
    # the streamer's own offline forward is the chunked one: not the model's
    assert (streamer_offline(streamer, audio) - before).abs().max().item() > 1e-2


def test_streaming_copy_shares_tensors_and_follows_the_original_to_a_dtype(causal_nest):
    nest = NestEncoder(causal_nest, layer="last")
    copy = streaming_copy(nest.encoder)
    original = dict(nest.encoder.named_parameters())
    assert all(p is original[name] for name, p in copy.named_parameters())
    assert [n for n, _ in copy.named_buffers()] == [n for n, _ in nest.encoder.named_buffers()]
    # Shared modules are the same objects; only the cache-aware path is new.
    assert copy.pos_enc is nest.encoder.pos_enc and copy.layers[0].norm_out is nest.encoder.layers[0].norm_out
    assert copy.layers[0] is not nest.encoder.layers[0]
    assert copy.layers[0].conv.depthwise_conv is not nest.encoder.layers[0].conv.depthwise_conv
    copy.att_context_size[1] = 99  # plain settings are the copy's own, even mutated in place
    assert list(nest.encoder.att_context_size) == [64, 1]
    nest.encoder.to(torch.float64)  # `.to` swaps buffers: the copy sees the new ones
    bn = "layers.0.conv.batch_norm.running_mean"
    assert dict(copy.named_buffers())[bn] is dict(nest.encoder.named_buffers())[bn]
    assert dict(copy.named_buffers())[bn].dtype == torch.float64
    assert next(copy.parameters()).dtype == torch.float64
    # A hook on the copy's layer does not fire for the original.
    calls = []
    handle = copy.layers[0].register_forward_hook(lambda *a: calls.append(1))
    feats = nest.processor()(noise(0.5, seed=4).numpy())
    nest.encoder(audio_signal=feats["input_features"].double(), length=feats["feature_lengths"])
    handle.remove()
    assert calls == []


def test_states_and_features_live_on_the_encoder_device(causal_nest):
    nest = nest_on(NestEncoder(causal_nest, layer="0,2"))
    (streamer,) = build_streamers(nest, [160]).values()
    assert streamer.device == TEST_DEVICE and streamer.dtype == TEST_DTYPE
    state = streamer.init_state()
    for t in (state.mel_pending, state.mel_cache, state.att_cache, state.conv_cache, state.att_cache_len):
        assert t.device == TEST_DEVICE
    assert state.att_cache.dtype == TEST_DTYPE
    (state,), (feats,) = streamer.step([state], [noise(0.7, seed=6)])
    assert feats.device == TEST_DEVICE and feats.dtype == TEST_DTYPE and feats.shape[0] == 2 and feats.shape[1] > 0
    assert state.mel_cache.device == TEST_DEVICE and state.att_cache.device == TEST_DEVICE
    (state,), (empty,) = streamer.flush([streamer.init_state()])
    assert empty.shape == (2, 0, 32) and empty.device == TEST_DEVICE
    assert streamer.last_stats.calls == 0


def test_build_streamers_settings_and_errors(causal_nest):
    nest = NestEncoder(causal_nest, layer="last")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamers = build_streamers(nest, [80, 240, 1280], left_context_ms=2000)
    # left context: whole chunks, at least one
    assert {k: s.left_context_frames for k, s in streamers.items()} == {1: 25, 3: 24, 16: 16}
    with pytest.raises(ValueError, match="multiple of 80 ms"):
        build_streamers(nest, [100])
    with pytest.raises(ValueError, match="empty"):
        build_streamers(nest, [])
