"""Shared fixtures: tiny NEST / LLM checkpoints built offline, and espeak-ng speech.

Device: `NESTVOX_TEST_DEVICE` (`cpu` by default, `cuda` or `cuda:N` on a GPU
machine) and `NESTVOX_TEST_DTYPE` (`float32` by default, `bfloat16`, `float16`)
choose where the device-aware tests (streaming equivalence, stack_fuse,
UltravoxInference) run: the `device` / `dtype` fixtures, or TEST_DEVICE /
TEST_DTYPE for module-level use. A CUDA device that is not there is an error,
never a silent CPU run.

TRITON_INTERPRET must be set before anything imports triton (torch._dynamo does
too), so deciding it is the first thing this file does: on a CPU test device the
Triton kernel runs in the interpreter, on CUDA it is compiled. `import torch`
alone does not import triton.
"""
import os

import torch

TEST_DEVICE = torch.device(os.environ.get("NESTVOX_TEST_DEVICE", "cpu").strip() or "cpu")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_dtype_name = os.environ.get("NESTVOX_TEST_DTYPE", "float32").strip() or "float32"
if _dtype_name not in _DTYPES:
    raise RuntimeError(f"NESTVOX_TEST_DTYPE={_dtype_name!r}: expected one of {sorted(_DTYPES)}")
TEST_DTYPE = _DTYPES[_dtype_name]
if TEST_DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(f"NESTVOX_TEST_DEVICE={TEST_DEVICE} but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if (TEST_DEVICE.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(f"NESTVOX_TEST_DEVICE={TEST_DEVICE} but only {torch.cuda.device_count()} GPU(s)")
    # Exactness tests compare fp32 results to 1e-4: no TF32 in convolutions or matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
elif TEST_DEVICE.type != "cpu":
    raise RuntimeError(f"NESTVOX_TEST_DEVICE={TEST_DEVICE}: expected cpu, cuda or cuda:N")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def feature_tolerance(dtype: torch.dtype) -> float:
    """Max abs difference allowed between two computations of the same encoder
    features that differ only in batching / chunking (tiny NEST, values ~1)."""
    return {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]

import shutil  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


def synthesize(text: str, path: str, voice: str = "en-us", rate: int = 16000, speed: int = 160) -> str:
    """Speak `text` with espeak-ng and convert it to mono PCM16 at `rate` with sox."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        if os.environ.get("NESTVOX_TEST_SPEECH") == "skip":  # e.g. a GPU image without them (gpu_check.sh)
            pytest.skip("espeak-ng / sox not installed (NESTVOX_TEST_SPEECH=skip)")
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
def device() -> torch.device:
    """The device the device-aware tests run on (NESTVOX_TEST_DEVICE)."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    """The model dtype those tests use (NESTVOX_TEST_DTYPE)."""
    return TEST_DTYPE


def nest_on(nest_encoder, device=TEST_DEVICE, dtype=TEST_DTYPE):
    """Move a NestEncoder's encoder to `device` / `dtype`; its log-mel front end stays
    on the CPU in float32, where the audio is (as UltravoxInference places it)."""
    nest_encoder.encoder.to(device=device, dtype=dtype)
    nest_encoder.torch_dtype = dtype
    return nest_encoder


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> str:
    return synthesize("turn on the lights in the kitchen", str(tmp_path_factory.mktemp("speech") / "lights.wav"))


@pytest.fixture(scope="session")
def speech(speech_wav) -> np.ndarray:
    data, rate = read_wav(speech_wav)
    assert rate == 16000
    return data


@pytest.fixture(scope="session")
def trimmed_speech(speech) -> np.ndarray:
    """`speech` without espeak's padding silence: the tests add the silence they mean."""
    loud = np.flatnonzero(np.abs(speech) > 1e-3)
    return speech[loud[0]: loud[-1] + 1].astype(np.float32)


@pytest.fixture(scope="session")
def two_phrases(tmp_path_factory):
    """Two spoken phrases, each trimmed of espeak's padding silence (so a pause the
    tests put between them is exactly theirs)."""
    d = tmp_path_factory.mktemp("phrases")

    def trimmed(text, name):
        x, _ = read_wav(synthesize(text, str(d / name)))
        loud = np.flatnonzero(np.abs(x) > 1e-3)
        return x[loud[0]: loud[-1] + 1].astype(np.float32)

    return trimmed("turn on the lights", "a.wav"), trimmed("in the kitchen please", "b.wav")


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

    # On the test device; float32 always: its tests assert float32 tolerances (the
    # test-dtype variant is tests/test_devices.py).
    return UltravoxInference(tiny_checkpoint, device=TEST_DEVICE)


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


@pytest.fixture(scope="session")
def inference(streaming_inference):
    """The model the server and engine tests serve (a module may bring its own)."""
    return streaming_inference


import asyncio  # noqa: E402
import threading  # noqa: E402


class ServerThread:
    """serve.build_server(...) served from its own thread and event loop."""

    def __init__(self, argv):
        self.argv = argv
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-thread", daemon=True)
        self.server = None

    async def _start(self):
        import serve

        self.server, _ = serve.build_server(serve.parse_args(self.argv))
        await self.server.start()
        return self.server.url

    def start(self) -> "ServerThread":
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(300)
        return self

    def connections(self) -> int:
        return self.server.connections

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
