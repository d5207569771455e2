"""Device and dtype selection: UltravoxInference on NESTVOX_TEST_DEVICE / NESTVOX_TEST_DTYPE
against the CPU float32 model, and the errors of resolve_device and serve.py."""
import numpy as np
import pytest
import torch

from agent.ultravox import UltravoxInference
from agent.ultravox.inference import resolve_device
from conftest import TEST_DEVICE, TEST_DTYPE


def wave(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def cpu_inference(tiny_checkpoint):
    return UltravoxInference(tiny_checkpoint)


def test_inference_on_the_test_device_and_dtype_matches_cpu_float32(tiny_checkpoint, cpu_inference, speech):
    inference = UltravoxInference(tiny_checkpoint, device=str(TEST_DEVICE), data_type=TEST_DTYPE)
    model = inference.model
    assert inference.device == TEST_DEVICE and inference.dtype == TEST_DTYPE
    assert {p.device for p in model.language_model.parameters()} == {TEST_DEVICE}
    assert {p.dtype for p in model.audio_tower.encoder.parameters()} == {TEST_DTYPE}
    # the log-mel front end stays on the CPU in float32, where the waveform is
    assert {b.device.type for b in model.audio_tower.preprocessor.buffers()} == {"cpu"}
    assert {b.dtype for b in model.audio_tower.preprocessor.buffers()} == {torch.float32}
    inputs = inference.prepare("Listen.", audio=speech)
    assert inputs["input_features"].device == TEST_DEVICE
    ref_inputs = cpu_inference.prepare("Listen.", audio=speech)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float().cpu()
        ref = cpu_inference.model(**ref_inputs).logits[0]
    assert logits.shape == ref.shape
    if TEST_DTYPE == torch.float32:
        torch.testing.assert_close(logits, ref, rtol=1e-3, atol=1e-3)
    else:  # half precision: the same function, to a few percent
        cos = torch.nn.functional.cosine_similarity(logits, ref, dim=-1)
        assert cos.min() > 0.98, cos.min()
    ids = inference.generate_ids("Listen.", audio=speech, max_new_tokens=6)
    assert ids.device == TEST_DEVICE and 0 < ids.numel() <= 6
    if TEST_DTYPE == torch.float32:  # greedy on a tiny random model: the same first tokens
        ref_ids = cpu_inference.generate_ids("Listen.", audio=speech, max_new_tokens=6)
        assert ids[:3].cpu().tolist() == ref_ids[:3].tolist()


def test_streamed_session_features_on_the_test_device(streaming_checkpoint):
    """The streamer built from an on-device model runs there and equals its offline tower."""
    from agent.nest.streaming import build_streamers

    inference = UltravoxInference(streaming_checkpoint, device=str(TEST_DEVICE), data_type=TEST_DTYPE)
    tower = inference.model.audio_tower
    (streamer,) = build_streamers(tower, [160]).values()  # the trained chunk
    audio = torch.from_numpy(wave(1.7, seed=3))
    (state,), (a,) = streamer.step([streamer.init_state()], [audio[:9000]])
    (state,), (b,) = streamer.step([state], [audio[9000:]], final=[True])
    got = torch.cat([a, b], 1)
    ref = tower.encode_audio(audio.numpy())
    ref = ref.hidden_states[:, 0, : int(ref.lengths[0])]
    assert got.device == TEST_DEVICE and got.shape == ref.shape
    from conftest import feature_tolerance

    assert (got - ref).abs().max().item() <= feature_tolerance(TEST_DTYPE)


@pytest.mark.parametrize("bad,match", [("gpu", "unknown device"), ("mps", "unsupported device"),
                                       ("cuda:99", "GPU")])
def test_resolve_device_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(bad)


def test_resolve_device_accepts_cpu_and_available_cuda():
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match="no CUDA GPU is usable here.*--device cpu"):
            resolve_device("cuda")


def test_serve_device_and_dtype_flags_and_env(monkeypatch):
    import serve

    monkeypatch.delenv("NESTVOX_DEVICE", raising=False)
    monkeypatch.delenv("NESTVOX_DTYPE", raising=False)
    assert serve.device_and_dtype(serve.parse_args([])) == (torch.device("cpu"), "float32")
    assert serve.device_and_dtype(serve.parse_args(["--dtype", "bfloat16"])) == (torch.device("cpu"), "bfloat16")
    monkeypatch.setenv("NESTVOX_DTYPE", "float16")
    assert serve.device_and_dtype(serve.parse_args([]))[1] == "float16"
    monkeypatch.setenv("NESTVOX_DTYPE", "fp8")
    with pytest.raises(SystemExit, match="NESTVOX_DTYPE 'fp8'"):
        serve.device_and_dtype(serve.parse_args([]))
    monkeypatch.delenv("NESTVOX_DTYPE")
    monkeypatch.setenv("NESTVOX_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="NESTVOX_DEVICE.*tpu"):
        serve.device_and_dtype(serve.parse_args([]))
    with pytest.raises(SystemExit):
        serve.parse_args(["--dtype", "double"])  # argparse choices
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            serve.device_and_dtype(serve.parse_args(["--device", "cuda"]))
