"""Fixed per-mel-bin feature normalization: statistics measured once, applied per frame.

NEST's front end normalizes each utterance by its own per-bin mean and std
(`normalize: per_feature`), which needs the whole utterance and so cannot be
streamed. The streaming replacement measures the per-bin mean and std once on
calibration audio (the training set) and applies them to every frame: the same
affine map for every frame, so a frame's features depend only on its samples and
the incremental front end reproduces the offline one exactly.

The statistics are stored in NeMo's own format, `preprocessor.normalize:
{fixed_mean: [...], fixed_std: [...]}`, so the `.nemo` stays a plain NeMo model.
NeMo's `normalize_batch` views those lists as `[batch, n_mels]`, which only
works for a batch of one; `install_fixed_normalization` (called by our loader)
applies the same statistics for any batch size instead.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch

# NeMo adds this to every std (features.CONSTANT) so silence does not divide by zero.
STD_FLOOR = 1e-5


def is_fixed(normalize) -> bool:
    """True for NeMo's fixed-statistics setting (a mapping with fixed_mean and fixed_std)."""
    return normalize is not None and not isinstance(normalize, str) and hasattr(normalize, "keys") \
        and "fixed_mean" in normalize and "fixed_std" in normalize


def fixed_normalize_config(mean: torch.Tensor, std: torch.Tensor) -> dict:
    """The `preprocessor.normalize` value NeMo reads: `{fixed_mean, fixed_std}` lists."""
    return {"fixed_mean": [float(v) for v in mean.reshape(-1)], "fixed_std": [float(v) for v in std.reshape(-1)]}


class FixedMelNormalization(torch.nn.Module):
    """`(x - mean) / std` per mel bin, then frames past each length set back to `pad_value`
    (NeMo pads after normalizing). The statistics are non-persistent buffers: they live in
    the config, and the preprocessor's state dict stays NeMo's."""

    def __init__(self, mean, std, pad_value: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1), persistent=False)
        self.pad_value = float(pad_value)

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        out = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        padded = torch.arange(x.shape[-1], device=x.device)[None, :] >= seq_len[:, None]
        return out.masked_fill(padded[:, None, :], self.pad_value)


def _after_featurizer(module, _inputs, output):
    x, seq_len = output
    return module.fixed_normalization(x, seq_len), seq_len


def install_fixed_normalization(preprocessor: torch.nn.Module) -> bool:
    """If the preprocessor's featurizer is set to fixed statistics, apply them batch-safely
    (NeMo's own path breaks for batches > 1). Returns True when installed. Idempotent."""
    fz = preprocessor.featurizer
    if getattr(fz, "fixed_normalization", None) is not None:
        return True
    if not is_fixed(fz.normalize):
        return False
    stats = fz.normalize
    mean, std = list(stats["fixed_mean"]), list(stats["fixed_std"])
    n_mels = int(fz.nfilt)
    if len(mean) != n_mels or len(std) != n_mels:
        raise ValueError(f"fixed normalization has {len(mean)} means / {len(std)} stds for {n_mels} mel bins")
    if min(std) <= 0:
        raise ValueError("fixed normalization std must be positive")
    fz.fixed_normalization = FixedMelNormalization(mean, std, pad_value=float(fz.pad_value))
    fz.normalize = None  # NeMo's featurizer leaves the log-mel as is; the hook normalizes it
    fz.register_forward_hook(_after_featurizer)
    return True


def clone_preprocessor(preprocessor: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a NeMo mel preprocessor that really is independent of the original.

    NeMo's FilterbankFeatures wraps its bound `forward` in `torch.no_grad()` as an
    instance attribute; `copy.deepcopy` keeps that wrapper, so a plain copy still runs
    the *original* featurizer (and its settings). Re-wrap the copy's own method."""
    import copy

    clone = copy.deepcopy(preprocessor)
    fz = clone.featurizer
    if "forward" in vars(fz):
        del fz.forward
        if not getattr(fz, "use_grads", False):
            fz.forward = torch.no_grad()(fz.forward)
    return clone


def raw_preprocessor(preprocessor: torch.nn.Module) -> torch.nn.Module:
    """A copy of `preprocessor` (eval mode) that returns un-normalized log-mel features."""
    raw = clone_preprocessor(preprocessor).eval()
    fz = raw.featurizer
    fz.normalize = None
    if getattr(fz, "fixed_normalization", None) is not None:
        fz.fixed_normalization = None
        fz._forward_hooks.clear()
    return raw


@torch.no_grad()
def measure_mel_statistics(preprocessor: torch.nn.Module, waves: Iterable[np.ndarray],
                           max_items: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-mel-bin mean and std of the raw log-mel over every valid frame of `waves`
    (pooled; std unbiased, plus NeMo's floor, as `per_feature` computes it per utterance).
    Returns (mean [n_mels], std [n_mels], frames counted). Sums in float64."""
    raw = raw_preprocessor(preprocessor)
    total = total_sq = None
    count = 0
    for i, wave in enumerate(waves):
        if max_items is not None and i >= max_items:
            break
        signal = torch.as_tensor(np.asarray(wave, dtype=np.float32))[None]
        mel, length = raw(input_signal=signal, length=torch.tensor([signal.shape[1]]))
        frames = mel[0, :, : int(length[0])].double()
        if frames.shape[1] == 0:
            continue
        s, ss = frames.sum(1), (frames * frames).sum(1)
        total = s if total is None else total + s
        total_sq = ss if total_sq is None else total_sq + ss
        count += frames.shape[1]
    if count < 2:
        raise ValueError("calibration audio has fewer than 2 mel frames: cannot measure normalization statistics")
    mean = total / count
    var = (total_sq - count * mean * mean).clamp(min=0) / (count - 1)
    return mean.float(), (var.sqrt() + STD_FLOOR).float(), count
