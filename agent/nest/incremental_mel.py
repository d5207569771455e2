"""Log-mel features computed as audio arrives, equal to the offline front end.

NeMo's featurizer (pre-emphasis, centred STFT, mel, log) is run on a short
window of samples that starts two hops before the first new frame: frame `j`
only reads samples `[j*hop - left, j*hop + right)` (window half-width, plus one
sample for pre-emphasis), so every frame it returns past the first two is
bit-identical to the offline frame, and a frame is returned only once the
samples it reads have arrived (or the utterance has ended, where the offline
front end pads with zeros too). Reusing the featurizer, not a copy of it, keeps
its exact arithmetic.

Utterance-level normalization (`per_feature`, `all_features`) needs statistics
of the whole utterance, so it cannot be streamed exactly: it is refused unless
the caller accepts an approximation (running statistics of the frames so far).
Fixed per-bin statistics (`agent.nest.normalization`, what a streamified
encoder uses) are the same for every frame, so they stream exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

from agent.nest.normalization import clone_preprocessor, install_fixed_normalization

# Frames of left context fed to the featurizer and discarded: the first frame of
# a window sees a truncated pre-emphasis and zero padding, the second the padding.
CONTEXT_FRAMES = 2
STREAMABLE_NORMALIZATION = (None, "", "NA", "na", "none", "None")


@dataclass
class MelStreamState:
    """One stream's front-end state. `samples` holds the audio from sample index
    `offset` on; `frames_done` mel frames have been emitted; `stats` are the
    running sums for approximate normalization (None when exact)."""

    samples: torch.Tensor  # [n] float32
    offset: int = 0
    total_samples: int = 0
    frames_done: int = 0
    stats: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None


class IncrementalMel:
    """Streams a NeMo `AudioToMelSpectrogramPreprocessor` (in eval mode: no dither)."""

    def __init__(self, preprocessor: torch.nn.Module, approximate_normalization: bool = False):
        self.preprocessor = preprocessor.eval()
        fz = preprocessor.featurizer
        # Fixed statistics act frame by frame (exact); installing them is a no-op for a
        # batch of one and makes NeMo's own fixed_mean path batch-safe.
        self.fixed_normalization = install_fixed_normalization(preprocessor)
        self.normalize = fz.normalize
        self.hop = int(fz.hop_length)
        n_fft, win = int(fz.n_fft), int(fz.win_length)
        if getattr(fz, "stft_pad_amount", None) is not None or getattr(fz, "frame_splicing", 1) != 1:
            raise ValueError("streaming needs NeMo's default centred STFT without frame splicing")
        # torch.stft centres a win_length window inside n_fft: frame j reads
        # [j*hop - half, j*hop + half) with half = win/2, plus one sample of pre-emphasis.
        self.right = n_fft // 2 - (n_fft - win) // 2
        self.exact = self.fixed_normalization or self.normalize in STREAMABLE_NORMALIZATION
        if not self.exact and not approximate_normalization:
            raise ValueError(
                f"this model normalizes features with {self.normalize!r} statistics of the whole utterance, "
                f"which cannot be streamed exactly. Use a streaming-configured model "
                f"(preprocessor normalize: 'NA'), or pass approximate=True to stream with running statistics "
                f"(an approximation: measure it with python -m agent.nest.streaming_report)"
            )
        if not self.exact:
            # The raw log-mel is needed for running statistics: a private copy of
            # the front end with its utterance normalization switched off.
            self.preprocessor = clone_preprocessor(preprocessor).eval()  # a plain deepcopy aliases NeMo's forward
            self.preprocessor.featurizer.normalize = None
        self.n_mels = int(fz.nfilt)
        self.pad_value = float(fz.pad_value)

    @property
    def device(self) -> torch.device:
        """The front end's device (its window and filterbank): samples are kept there."""
        buffer = next(self.preprocessor.buffers(), None)
        return buffer.device if buffer is not None else torch.device("cpu")

    def init_state(self) -> MelStreamState:
        return MelStreamState(samples=torch.zeros(0, dtype=torch.float32, device=self.device))

    def lookahead_samples(self) -> int:
        """Samples past the end of a frame's hop that the frame reads."""
        return self.right

    def total_frames(self, num_samples: int) -> int:
        return num_samples // self.hop

    @torch.no_grad()
    def push(self, state: MelStreamState, audio: Optional[torch.Tensor], final: bool = False):
        """Append `audio` (1-D float32, 16 kHz) and return `(new_state, mel [n_mels, m])`:
        every frame whose samples are all known (all remaining ones when `final`)."""
        samples = state.samples
        if audio is not None and audio.numel():
            samples = torch.cat([samples, audio.reshape(-1).to(device=samples.device, dtype=torch.float32)])
        total = state.total_samples + (0 if audio is None else int(audio.numel()))
        if final:
            last = total // self.hop  # the offline frame count
        else:  # frame j is ready once j*hop + right <= total
            last = (total - self.right) // self.hop + 1 if total >= self.right else 0
        first = state.frames_done
        new_state = replace(state, samples=samples, total_samples=total)
        if last <= first:
            return new_state, samples.new_zeros(self.n_mels, 0)
        start_frame = max(first - CONTEXT_FRAMES, 0)
        window = samples[start_frame * self.hop - state.offset:]
        frames_needed = last - start_frame
        if window.numel() // self.hop < frames_needed:  # only when the window is shorter than a hop
            window = torch.cat([window, window.new_zeros(frames_needed * self.hop - window.numel())])
        length = torch.tensor([window.numel()], device=window.device)
        mel, _ = self.preprocessor(input_signal=window[None], length=length)
        mel = mel[0, :, first - start_frame: last - start_frame]
        if not self.exact:
            mel, new_state.stats = self._running_normalize(mel, state.stats)
        keep_from = max(last - CONTEXT_FRAMES, 0) * self.hop
        new_state.samples = samples[keep_from - state.offset:]
        new_state.offset = keep_from
        new_state.frames_done = last
        return new_state, mel

    def _running_normalize(self, mel: torch.Tensor, stats):
        """Approximate per-feature normalization: each frame uses the mean and std of
        the utterance's frames up to and including itself."""
        s, ss, n = stats if stats is not None else (mel.new_zeros(self.n_mels, 1), mel.new_zeros(self.n_mels, 1), 0)
        cum = torch.cumsum(mel, dim=1) + s
        cum_sq = torch.cumsum(mel * mel, dim=1) + ss
        counts = torch.arange(1, mel.shape[1] + 1, dtype=mel.dtype, device=mel.device)[None] + n
        mean = cum / counts
        var = (cum_sq / counts - mean * mean).clamp(min=0) * counts / (counts - 1).clamp(min=1)
        out = (mel - mean) / (var.sqrt() + 1e-5)
        return out, (cum[:, -1:], cum_sq[:, -1:], n + mel.shape[1])
