"""NestEncoder / NestProcessor: loading, layer selection, lengths, errors."""
import sys

import numpy as np
import pytest
import torch

from agent.nest import NestEncoder, NestProcessor, parse_layers
from agent.nest.configs import nest_model_config


@pytest.fixture(scope="module")
def nemo_model(tiny_nest_path):
    from nemo.collections.asr.models.ssl_models import SpeechEncDecSelfSupervisedModel

    return SpeechEncDecSelfSupervisedModel.restore_from(tiny_nest_path, map_location="cpu").eval()


def features_for(model, seconds=(1.37, 0.6), seed=0):
    rng = np.random.default_rng(seed)
    waves = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in seconds]
    n = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(n.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        return model.preprocessor(input_signal=batch, length=n)


@pytest.mark.parametrize("spec,expected", [("last", [2]), ("all", [0, 1, 2]), ("0,2", [0, 2]), ([2, -3], [0, 2]), ("-1", [2])])
def test_layer_selection_matches_nemo_extractor(nemo_model, tiny_nest_path, spec, expected):
    from nemo.collections.asr.modules.conformer_encoder import ConformerMultiLayerFeatureExtractor

    encoder = NestEncoder(tiny_nest_path, layer=spec)
    assert encoder.layer_indices == expected
    feats, lens = features_for(nemo_model)
    with torch.no_grad():
        ours = encoder(feats, lens)
        nemo_model.encoder.interctc_capture_at_layers = None  # NeMo keeps the first list otherwise
        extractor = ConformerMultiLayerFeatureExtractor(nemo_model.encoder, expected, include_final_output=False)
        theirs, their_lens = extractor(audio_signal=feats, length=lens)
        nemo_model.encoder.reset_registry()
    assert torch.equal(ours.lengths, their_lens[0])
    assert ours.hidden_states.shape[0] == len(expected)
    for k, ref in enumerate(theirs):
        ref = ref.transpose(1, 2)  # [B, T, D]
        for b in range(ref.shape[0]):
            n = int(ours.lengths[b])
            torch.testing.assert_close(ours.hidden_states[k, b, :n], ref[b, :n], rtol=0, atol=1e-5)
            assert torch.count_nonzero(ours.hidden_states[k, b, n:]) == 0  # padding zeroed


def test_last_layer_is_the_encoder_output(nemo_model, tiny_nest_path):
    encoder = NestEncoder(tiny_nest_path, layer="last")
    feats, lens = features_for(nemo_model, seconds=(2.0,))
    with torch.no_grad():
        final, final_len = nemo_model.encoder(audio_signal=feats, length=lens)
        ours = encoder(feats, lens)
    n = int(final_len[0])
    torch.testing.assert_close(ours.last_hidden_state[0, :n], final[0].T[:n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", ["3", [0, 7], "-4", "first", "", [5]])
def test_invalid_layers_raise_value_error_naming_the_range(tiny_nest_path, bad):
    with pytest.raises(ValueError, match=r"0\.\.2"):
        NestEncoder(tiny_nest_path, layer=bad)


def test_parse_layers_units():
    assert parse_layers("all", 17) == list(range(17))
    assert parse_layers(" 3, 1,3 ", 17) == [1, 3]
    assert parse_layers(-1, 17) == [16]
    with pytest.raises(ValueError, match="valid indices are 0..16"):
        parse_layers([17], 17)


def test_config_source_and_nemo_file_give_the_same_encoder(tiny_nest_path, tmp_path):
    encoder = NestEncoder(tiny_nest_path, layer="all")
    out = tmp_path / "resaved.nemo"
    encoder.save_nemo(str(out))
    again = NestEncoder(str(out), layer="all")
    x = torch.randn(1, 80, 64)
    n = torch.tensor([64])
    with torch.no_grad():
        assert torch.equal(encoder(x, n).hidden_states, again(x, n).hidden_states)
    # built from a config: random weights, same architecture
    fresh = NestEncoder(nest_model_config("tiny"), layer="all")
    assert fresh.num_layers == 3 and fresh.hidden_size == 32


@pytest.mark.parametrize("seconds", [0.1, 1.0, 1.37, 10.0, 45.0])
def test_processor_frame_count_equals_encoder_output(tiny_nest_path, seconds):
    encoder = NestEncoder(tiny_nest_path)
    n = int(seconds * 16000)
    wave = (np.random.default_rng(1).standard_normal(n) * 0.1).astype(np.float32)
    feats = encoder.processor()(wave)
    with torch.no_grad():
        out = encoder(feats["input_features"], feats["feature_lengths"])
    assert int(out.lengths[0]) == int(encoder.processor().encoder_frames(n))
    # a processor built only from the config computes the same count
    assert int(NestProcessor.from_config(encoder.nemo_cfg).encoder_frames(n)) == int(out.lengths[0])
    assert int(out.lengths[0]) == {0.1: 2, 1.0: 13, 1.37: 18, 10.0: 125, 45.0: 563}[seconds]


def test_processor_batch_equals_single(tiny_nest_path):
    encoder = NestEncoder(tiny_nest_path, layer="all")
    proc = encoder.processor()
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (24000, 9000))
    with torch.no_grad():
        both = encoder(**_enc_args(proc([a, b])))
        only_b = encoder(**_enc_args(proc(b)))
    n = int(only_b.lengths[0])
    torch.testing.assert_close(both.hidden_states[:, 1, :n], only_b.hidden_states[:, 0, :n], rtol=1e-5, atol=1e-5)


def _enc_args(feats):
    return {"input_features": feats["input_features"], "feature_lengths": feats["feature_lengths"]}


def test_processor_rejects_wrong_rate_unless_resampling(tiny_nest_path):
    proc = NestProcessor()
    wave = np.zeros(8000, dtype=np.float32)
    with pytest.raises(ValueError, match="16000 Hz"):
        proc(wave, sampling_rate=8000)
    with pytest.raises(ValueError, match="16000"):
        NestProcessor(sample_rate=8000)
    out = NestProcessor(resample=True)(wave, sampling_rate=8000)
    assert int(out["audio_lengths"][0]) == 16000  # 1 s at 8 kHz -> 1 s at 16 kHz
    assert int(out["feature_lengths"][0]) == 100


def test_int16_audio_is_scaled():
    proc = NestProcessor()
    wave = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    as_int = np.round(wave * 32767).astype(np.int16)
    (converted,) = proc.prepare_waveforms(as_int)
    assert converted.dtype == np.float32
    np.testing.assert_allclose(converted, wave, atol=1.0 / 32768 + 1e-6)


def test_missing_nemo_raises_import_error_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo.collections.asr", None)
    with pytest.raises(ImportError, match=r"pip install nemo_toolkit\[asr\]"):
        NestEncoder(nest_model_config("tiny"))


def test_unreachable_pretrained_name_names_the_model_and_the_fix():
    name = "nvidia/ssl_en_nest_large_v1.0"
    with pytest.raises(RuntimeError) as info:
        NestEncoder(name)
    message = str(info.value)
    assert name in message and ".nemo" in message


def test_missing_nemo_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        NestEncoder(str(tmp_path / "absent.nemo"))
