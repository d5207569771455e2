"""Shared fixtures: tiny NEST / LLM checkpoints built offline, and espeak-ng speech.

TRITON_INTERPRET must be set before anything imports triton (torch._dynamo does
too), so deciding it is the first thing this file does. `import torch` alone does
not import triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


def synthesize(text: str, path: str, voice: str = "en-us", rate: int = 16000, speed: int = 160) -> str:
    """Speak `text` with espeak-ng and convert it to mono PCM16 at `rate` with sox."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise RuntimeError("tests need espeak-ng and sox: run `make test` (it installs them) or apt-get install espeak-ng sox")
    raw = path + ".raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", raw, text], check=True)
    subprocess.run(["sox", raw, "-r", str(rate), "-c", "1", "-b", "16", path], check=True)
    os.remove(raw)
    return path


def read_wav(path: str):
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32")
    return data, rate


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> str:
    return synthesize("turn on the lights in the kitchen", str(tmp_path_factory.mktemp("speech") / "lights.wav"))


@pytest.fixture(scope="session")
def speech(speech_wav) -> np.ndarray:
    data, rate = read_wav(speech_wav)
    assert rate == 16000
    return data


@pytest.fixture(scope="session")
def tiny_nest_path(tmp_path_factory) -> str:
    from agent.nest.random_model import build_random_nest

    return build_random_nest(str(tmp_path_factory.mktemp("nest") / "tiny_nest.nemo"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from agent.ultravox.build import build_random_checkpoint

    return build_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), nest="tiny", llm="tiny", layers="all")


@pytest.fixture(scope="session")
def tiny_inference(tiny_checkpoint):
    from agent.ultravox import UltravoxInference

    return UltravoxInference(tiny_checkpoint)


@pytest.fixture(scope="session")
def streaming_checkpoint(tmp_path_factory) -> str:
    """Tiny checkpoint whose encoder is configured for cache-aware streaming (chunked_limited
    attention, causal convolutions), so streamed sessions must equal the offline model."""
    from agent.ultravox.build import build_random_checkpoint

    return build_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "streaming"), nest="tiny", llm="tiny",
                                   streaming=True, layers="all", stack_factor=3, seed=1)


@pytest.fixture(scope="session")
def streaming_inference(streaming_checkpoint):
    from agent.ultravox import UltravoxInference

    return UltravoxInference(streaming_checkpoint)
