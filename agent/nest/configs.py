"""NeMo configs for NEST (`EncDecDenoiseMaskedTokenPredModel`) models built from scratch.

The shapes follow NeMo's `examples/asr/conf/ssl/nest/nest_fast-conformer.yaml`
(the published NEST-L: d_model 512, 17 layers, 8 heads, 8x dw_striding with 256
channels). Tests build a tiny model from the same config family and save/restore
it through the same `.nemo` code path a real checkpoint takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class NestShape:
    d_model: int
    n_layers: int
    n_heads: int
    conv_channels: int
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    num_classes: int = 8192


# The published NEST-L (nvidia/ssl_en_nest_large_v1.0) and a tiny sibling for tests.
NEST_LARGE = NestShape(d_model=512, n_layers=17, n_heads=8, conv_channels=256)
NEST_TINY = NestShape(d_model=32, n_layers=3, n_heads=2, conv_channels=16, ff_expansion_factor=2, num_classes=64)
SHAPES = {"large": NEST_LARGE, "tiny": NEST_TINY}


def preprocessor_config(normalize: str = "per_feature", dither: float = 1e-5) -> dict:
    """NEST's log-mel front end: 80 mel, 25 ms window, 10 ms hop, n_fft 512."""
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": SAMPLE_RATE,
        "normalize": normalize,
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 80,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": dither,
        "pad_to": 16,
        "pad_value": 0.0,
    }


def nest_model_config(
    shape: NestShape | str = "large",
    *,
    streaming: bool = False,
    att_context_size: Optional[Sequence[int]] = None,
    causal_downsampling: bool = False,
    normalize: Optional[str] = None,
    dropout: float = 0.1,
):
    """OmegaConf config for `EncDecDenoiseMaskedTokenPredModel(cfg=...)`.

    `streaming=True` makes the encoder cache-aware: `chunked_limited` attention
    with `att_context_size` ([left, right] in 80 ms frames, default [64, 1]),
    causal convolutions and no utterance-level feature normalization (per-feature
    statistics need the whole utterance, so they cannot be streamed exactly).
    Subsampling stays NEST's non-causal one unless `causal_downsampling` is set
    (NEST weights only load into the non-causal shape).
    """
    from omegaconf import OmegaConf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown NEST shape {shape!r}; choose one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if normalize is None:
        normalize = "NA" if streaming else "per_feature"
    if streaming:
        att = list(att_context_size) if att_context_size is not None else [64, 1]
        att_style, conv_context = "chunked_limited", "causal"
    else:
        att = list(att_context_size) if att_context_size is not None else [-1, -1]
        att_style, conv_context = "regular", None
    features, subsampling_factor = 80, 8
    cfg = {
        "sample_rate": SAMPLE_RATE,
        "num_classes": shape.num_classes,
        "num_books": 1,
        "code_dim": 16,
        "squeeze_single": False,
        "mask_position": "pre_conv",
        "preprocessor": preprocessor_config(normalize=normalize),
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 0,
            "time_masks": 0,
            "freq_width": 27,
            "time_width": 0.05,
        },
        "masking": {
            "_target_": "nemo.collections.asr.modules.RandomBlockMasking",
            "block_size": 40,
            "mask_prob": 0.01,
            "feat_in": features,
            "freeze": True,
            "allow_overlap": True,
        },
        "quantizer": {
            "_target_": "nemo.collections.asr.modules.RandomProjectionVectorQuantizer",
            "feat_in": features,
            "code_dim": 16,
            "num_books": 1,
            "num_classes": shape.num_classes,
            "dist_fn": "l2",
            "freeze": True,
            "squeeze_single": False,
            "combine_time_steps": subsampling_factor,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": features,
            "feat_out": -1,
            "n_layers": shape.n_layers,
            "d_model": shape.d_model,
            "use_bias": True,
            "subsampling": "dw_striding",
            "subsampling_factor": subsampling_factor,
            "subsampling_conv_channels": shape.conv_channels,
            "causal_downsampling": causal_downsampling,
            "ff_expansion_factor": shape.ff_expansion_factor,
            "self_attention_model": "rel_pos",
            "n_heads": shape.n_heads,
            "att_context_size": att,
            "att_context_style": att_style,
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": shape.conv_kernel_size,
            "conv_norm_type": "batch_norm",
            "conv_context_size": conv_context,
            "dropout": dropout,
            "dropout_pre_encoder": dropout,
            "dropout_emb": 0.0,
            "dropout_att": dropout,
            "stochastic_depth_drop_prob": 0.0,
            "stochastic_depth_mode": "linear",
            "stochastic_depth_start_layer": 1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.MultiSoftmaxDecoder",
            "feat_in": shape.d_model,
            "num_classes": shape.num_classes,
            "num_decoders": 1,
            "squeeze_single": False,
            "use_bias": True,
        },
        "loss": {
            "_target_": "nemo.collections.asr.losses.MultiMLMLoss",
            "combine_time_steps": subsampling_factor,
            "mask_threshold": 0.8,
            "num_decoders": 1,
            "squeeze_single": False,
        },
    }
    return OmegaConf.create(cfg)


def chunk_context_sizes(chunks_frames: Sequence[int], left_context_frames: int) -> list:
    """NeMo `att_context_size` entries `[left, chunk-1]` for each chunk (80 ms frames).
    The left context must be a multiple of every chunk: chunked attention sees whole chunks."""
    sizes = []
    for chunk in chunks_frames:
        if chunk < 1 or left_context_frames % chunk:
            raise ValueError(f"left context {left_context_frames} frames is not a multiple of chunk {chunk} frames")
        sizes.append([int(left_context_frames), int(chunk) - 1])
    return sizes


def uniform_probs(n: int) -> list:
    """Equal `att_context_probs` that sum to exactly 1 (NeMo checks `sum(...) != 1`)."""
    probs = [1.0 / n] * n
    probs[-1] = 1.0 - sum(probs[:-1])  # exact in float for the small n used here
    return probs


def cache_aware_config(full_cfg, att_context_sizes: Sequence[Sequence[int]], normalize,
                       att_context_probs: Optional[Sequence[float]] = None):
    """A cache-aware copy of a full-context NEST config, into which its weights load strictly.

    Follows NeMo's cache-aware FastConformer recipe: `chunked_limited` attention trained
    with several look-aheads (`att_context_size` list + `att_context_probs`), causal
    depthwise convolutions, and no utterance normalization (`normalize`: here fixed
    statistics, see agent.nest.normalization). One departure: the subsampling stays
    NEST's non-causal `dw_striding` (causal subsampling changes a weight's shape, and the
    non-causal one streams exactly with 8-frame-aligned chunks)."""
    import copy

    from omegaconf import OmegaConf

    cfg = copy.deepcopy(full_cfg)
    OmegaConf.set_struct(cfg, False)
    sizes = [list(map(int, s)) for s in att_context_sizes]
    cfg.encoder.att_context_style = "chunked_limited"
    cfg.encoder.att_context_size = sizes
    cfg.encoder.att_context_probs = list(att_context_probs) if att_context_probs else uniform_probs(len(sizes))
    cfg.encoder.conv_context_size = "causal"
    cfg.encoder.causal_downsampling = False
    cfg.preprocessor.normalize = normalize
    return cfg
