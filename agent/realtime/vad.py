"""Voice activity: Silero VAD run in plain torch with explicit per-stream state.

The model comes from the `silero-vad` PyPI package, which ships its weights
inside the wheel (no download). The package's own loader is not used: it runs
the TorchScript file through `torch.jit.load` (deprecated in current torch) and
its import calls `torch.set_num_threads(1)` for the whole process. Instead the
network (STFT conv, four conv blocks, an LSTM cell, a sigmoid head) is rebuilt
here in eager torch and its weights are read from the package's 16 kHz ONNX
file (`silero_vad_16k_op15.onnx`, parameters named like the TorchScript
model's) with the `onnx` parser; no onnxruntime. The tests check that it gives
exactly the packaged TorchScript model's probabilities.

Silero works on 512-sample windows at 16 kHz (32 ms), each preceded by the last
64 samples of the previous window; the LSTM state and that context carry over.
`VadStream` keeps both, plus the samples that do not yet fill a window, so audio
can arrive in packets of any size.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
WINDOW = 512  # samples per VAD decision at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each window
HIDDEN = 128  # LSTM width
ONNX_FILE = "silero_vad_16k_op15.onnx"


def model_file() -> str:
    """Path of the 16 kHz Silero model inside the installed `silero-vad` package
    (found without importing the package, whose import changes torch's thread count)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("voice activity detection needs the silero-vad package: pip install silero-vad")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", ONNX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"silero-vad is installed but has no {ONNX_FILE} ({path}): pip install -U silero-vad")
    return path


def load_weights(path: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The network's parameters, by name, from the ONNX file (default: the packaged one)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ImportError("reading the Silero VAD weights needs the onnx package: pip install onnx") from e
    graph = onnx.load(path or model_file()).graph
    weights = {}
    for init in graph.initializer:
        name = init.name[len("model."):] if init.name.startswith("model.") else init.name
        weights[name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    return weights


class SileroNet(nn.Module):
    """Silero VAD v5/v6 16 kHz network. forward(x [B, 64 + 512], state [2, B, 128])
    -> (speech probability [B], new state [2, B, 128])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stft_basis", torch.zeros(258, 1, 256))  # real and imaginary DFT rows
        self.convs = nn.ModuleList(
            [nn.Conv1d(129, 128, 3, padding=1), nn.Conv1d(128, 64, 3, stride=2, padding=1),
             nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.Conv1d(64, 128, 3, padding=1)]
        )
        self.rnn = nn.LSTMCell(HIDDEN, HIDDEN)
        self.head = nn.Conv1d(HIDDEN, 1, 1)

    @classmethod
    def from_weights(cls, weights: Dict[str, torch.Tensor]) -> "SileroNet":
        net = cls()
        mapping = {"stft_basis": "stft.forward_basis_buffer", "head.weight": "decoder.decoder.2.weight",
                   "head.bias": "decoder.decoder.2.bias"}
        for i in range(4):
            for p in ("weight", "bias"):
                mapping[f"convs.{i}.{p}"] = f"encoder.{i}.reparam_conv.{p}"
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            mapping[f"rnn.{p}"] = f"decoder.rnn.{p}"
        missing = [src for src in mapping.values() if src not in weights]
        if missing:
            raise ValueError(f"not a Silero VAD 16 kHz model: missing {missing}")
        net.load_state_dict({dst: weights[src] for dst, src in mapping.items()})
        return net.eval()

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.decide(self.features(x), state)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 64 + 512] windows -> [N, 128]: the stateless part (STFT + convolutions), so
        every window of every stream can run in one call; only the LSTM chains."""
        x = F.pad(x, (0, CONTEXT), mode="reflect").unsqueeze(1)
        spec = F.conv1d(x, self.stft_basis, stride=128)
        half = spec.shape[1] // 2
        x = torch.sqrt(spec[:, :half] ** 2 + spec[:, half:] ** 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.squeeze(-1)

    def decide(self, feats: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step: features [B, 128], state [2, B, 128] -> (probability [B], new state)."""
        h, c = self.rnn(feats, (state[0], state[1]))
        prob = torch.sigmoid(self.head(F.relu(h).unsqueeze(-1))).squeeze(1).mean(dim=1)
        return prob, torch.stack([h, c])


@functools.lru_cache(maxsize=4)
def _shared_net(path: str) -> SileroNet:
    # One network for every stream: it holds no per-stream state.
    return SileroNet.from_weights(load_weights(path))


@dataclass
class VadStream:
    """One audio stream's VAD state.

    rnn: LSTM state [2, 1, 128]; context: the last 64 samples of the previous window
    [1, 64]; pending: samples waiting to fill a window; samples: samples consumed by
    complete windows so far (window k covers samples [k*512, (k+1)*512))."""

    rnn: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, HIDDEN))
    context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, CONTEXT))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    samples: int = 0


def as_float_audio(audio) -> np.ndarray:
    """1-D float32 samples in [-1, 1] from float arrays/tensors or PCM16 (int16) arrays."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {audio.shape}")
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be float samples in [-1, 1] or int16 PCM, got dtype {audio.dtype}")
    return audio.astype(np.float32, copy=False)


class SileroVad:
    """Speech probability per 32 ms window of 16 kHz audio.

    `process(stream, audio)` takes packets of any size; `step` is the batched core
    (several streams' windows at once) for a caller that batches sessions.
    """

    sample_rate = SAMPLE_RATE
    window = WINDOW

    def __init__(self, path: Optional[str] = None):
        self.net = _shared_net(os.path.abspath(path or model_file()))

    def new_stream(self) -> VadStream:
        return VadStream()

    @torch.no_grad()
    def step(self, windows: torch.Tensor, rnn: torch.Tensor, context: torch.Tensor):
        """windows [B, 512], rnn [2, B, 128], context [B, 64] -> (probabilities [B],
        new rnn state, new context)."""
        if windows.dim() != 2 or windows.shape[1] != WINDOW:
            raise ValueError(f"windows must be [B, {WINDOW}], got {tuple(windows.shape)}")
        prob, rnn = self.net(torch.cat([context, windows], dim=1), rnn)
        return prob, rnn, windows[:, -CONTEXT:].clone()

    def process(self, stream: VadStream, audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Feed a packet; returns the probabilities of the windows it completed (float32,
        possibly empty). `stream.samples` then counts the samples those windows covered."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"the VAD takes {SAMPLE_RATE} Hz audio, got {sample_rate} Hz: resample first")
        return self.process_batch([stream], [audio])[0]

    @torch.no_grad()
    def process_batch(self, streams: Sequence[VadStream], audios: Sequence[np.ndarray]) -> List[np.ndarray]:
        """`process` for many streams at once. A window's input (its 512 samples and the 64
        before them) is known from the audio alone, so the convolutions of every new window
        of every stream run in one call; then the k-th windows of the streams that have one
        take their LSTM step together. A tick costs one convolution call and as many small
        LSTM steps as the most windows any one stream completed."""
        windows, counts = [], []
        for stream, audio in zip(streams, audios):
            audio = as_float_audio(audio)
            buf = np.concatenate([stream.pending, audio]) if len(stream.pending) else audio
            n = len(buf) // WINDOW
            stream.pending = buf[n * WINDOW:].copy()
            counts.append(n)
            if n:
                flat = torch.cat([stream.context[0], torch.from_numpy(np.ascontiguousarray(buf[: n * WINDOW]))])
                windows.append(flat.unfold(0, CONTEXT + WINDOW, WINDOW))  # [n, 576], each with its context
                stream.context = flat[-CONTEXT:].clone().view(1, CONTEXT)
            else:
                windows.append(None)
        probs = [np.empty(n, np.float32) for n in counts]
        # Streams by window count, most first: the streams with a k-th window are then a
        # prefix, so each LSTM step reads and writes one slice of the batched state.
        rows = sorted((i for i, n in enumerate(counts) if n), key=lambda i: -counts[i])
        if rows:
            live = [sum(1 for i in rows if counts[i] > k) for k in range(counts[rows[0]])]
            feats = self.net.features(torch.cat([windows[i][k: k + 1] for k, m in enumerate(live) for i in rows[:m]]))
            state = torch.cat([streams[i].rnn for i in rows], dim=1)
            at = 0
            for k, m in enumerate(live):
                p, state[:, :m] = self.net.decide(feats[at: at + m], state[:, :m])
                at += m
                for i, pi in zip(rows[:m], p.tolist()):
                    probs[i][k] = pi
            for j, i in enumerate(rows):
                streams[i].rnn = state[:, j: j + 1].clone()
        for stream, n in zip(streams, counts):
            stream.samples += n * WINDOW
        return probs

    def reset(self, stream: VadStream) -> None:
        """Forget the stream's past (a new conversation or a cleared buffer)."""
        fresh = VadStream()
        stream.rnn, stream.context, stream.pending, stream.samples = fresh.rnn, fresh.context, fresh.pending, 0
