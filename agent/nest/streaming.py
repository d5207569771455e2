"""Cache-aware streaming NEST encoder, batched across streams.

Built on NeMo's own machinery: `setup_streaming_params` / `get_initial_cache_state`
for the caches and `encoder.cache_aware_stream_step` for each step; we add the
per-stream bookkeeping that lets one encoder call serve many streams, each at a
different point of its utterance, and the incremental log-mel front end.

One step of a stream feeds the encoder `[pre-encode cache | n chunks of new mel
frames]` and keeps the new frames of every selected layer. The chunk schedule
depends on the subsampling:

* causal subsampling (`causal_downsampling: true`): NeMo's own schedule, first
  chunk `1 + 8R` mel frames, then `8(R+1)` with a 9-frame mel cache, dropping
  the 2 extra pre-encoded frames (none on the first step);
* NEST's non-causal `dw_striding` (kernel 3, stride 2, padding 1 per stage):
  NeMo's default schedule is wrong for it, so chunks are aligned to 8 mel
  frames, with an 8-frame mel cache and one extra frame dropped. Each stage then
  only needs one frame of left context and none on the right: exact, with no
  look-ahead beyond the chunk.

With `chunked_limited` attention `[left, chunk-1]` and causal convolutions the
streamed frames equal the offline forward of the same encoder (tests hold it to
1e-4). Caches of streams stepped together must have equal input lengths (NeMo
keeps the *last* positions of the padded batch in the attention cache), so a
step groups the ready streams by input length and runs one call per group;
in steady state that is one call for all streams.

A streamer never reconfigures the model it was built from: it runs its own
encoder object (`streaming_copy`), which shares the weights. `build_streamers`
makes one per offered chunk size, up front.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from agent.nest.capture import capture_layers
from agent.nest.incremental_mel import IncrementalMel, MelStreamState

FRAME_MS_DEFAULT = 80


@dataclass(frozen=True)
class ChunkPlan:
    """Mel frames a step consumes and how many pre-encoded frames it drops."""

    first_mel: int  # mel frames of a stream's first chunk (no cache before it)
    step_mel: int  # mel frames of every later chunk
    cache_mel: int  # mel frames carried from one step to the next
    drop: int  # extra pre-encoded frames dropped on later steps (0 on the first)


@dataclass
class EncoderStreamState:
    """Everything one stream needs between chunks. Tensors are batch-first with a
    batch of one, so a step concatenates them along dim 0 for a batched call."""

    mel_state: MelStreamState  # audio samples not yet turned into features
    mel_pending: torch.Tensor  # [n_mels, m] features not yet encoded
    mel_cache: torch.Tensor  # [n_mels, c] features before them (the pre-encode cache)
    att_cache: torch.Tensor  # [1, n_layers, left, d_model]
    conv_cache: torch.Tensor  # [1, n_layers, d_model, kernel-1]
    att_cache_len: torch.Tensor  # [1] valid positions in att_cache (at its end)
    steps: int = 0  # encoder steps run
    frames_emitted: int = 0  # encoder frames returned so far
    finished: bool = False

    @property
    def samples_received(self) -> int:
        return self.mel_state.total_samples


@dataclass
class StepStats:
    """What one `step` call did (for metrics and benchmarks)."""

    calls: int = 0
    batch_sizes: List[int] = field(default_factory=list)


def _attention_style(encoder) -> Tuple[str, List[int]]:
    return encoder.att_context_style, list(encoder.att_context_size)


def is_causal_conv(encoder) -> bool:
    """True when every conformer depthwise convolution sees no future frames."""
    return all(layer.conv.depthwise_conv._right_padding == 0 for layer in encoder.layers)


def configure_streaming(encoder, chunk_frames: int, left_context_frames: int) -> Dict[str, object]:
    """Switch a NeMo ConformerEncoder to `chunked_limited` attention `[left, chunk-1]`
    and set up NeMo's streaming parameters for it.

    Changes `encoder` in place: give it a `streaming_copy` (StreamingNestEncoder
    does) to keep the original's offline forward as trained.

    Works on full-context checkpoints too (the published NEST models are): their
    weights are unchanged, but the attention no longer sees the future, and a
    symmetric convolution gets zeros where the next chunk would be, so streamed
    features only approximate the offline ones (the returned report says which
    parts are exact; measure with `python -m agent.nest.streaming_report`).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if left_context_frames < 0 or left_context_frames % chunk_frames:
        raise ValueError(
            f"left context ({left_context_frames} frames) must be a non-negative multiple of the chunk "
            f"({chunk_frames} frames): chunked attention sees whole chunks"
        )
    style, before = _attention_style(encoder)
    target = [int(left_context_frames), int(chunk_frames) - 1]
    trained = [list(a) for a in encoder.att_context_size_all]
    encoder.att_context_style = "chunked_limited"
    encoder.att_context_size = target
    if target not in trained:
        encoder.att_context_size_all = [target] + [a for a in trained if a != [-1, -1]]
    encoder.setup_streaming_params()
    causal_conv = is_causal_conv(encoder)
    for layer in encoder.layers:
        conv = layer.conv.depthwise_conv
        # NeMo's conv cache keeps the last positions of the padded input; with a
        # right pad those are zeros, so drop the pad before caching.
        conv.cache_drop_size = conv._right_padding
    return {
        "attention_before": f"{style} {before}",
        "attention_now": f"chunked_limited {target}",
        "trained_for_this_context": style == "chunked_limited" and target in trained,
        "causal_convolutions": causal_conv,
        "causal_subsampling": bool(getattr(encoder.pre_encode, "is_causal", False)),
        # Streaming reproduces the offline forward of the encoder as configured now;
        # it is the *trained* model only if it already used chunked attention.
        "exact": style == "chunked_limited" and causal_conv,
    }


def _has_streaming_settings(module: torch.nn.Module) -> bool:
    """NeMo's cache-aware modules (MultiHeadAttention, CausalConv1D, ConvSubsampling)
    carry `_max_cache_len`; `setup_streaming_params` writes their `cache_drop_size`."""
    return hasattr(module, "_max_cache_len")


# Module internals that stay shared with the original: the same tensors, also after
# the original is moved with `.to()` (it swaps buffers in these very dicts).
_SHARED_INTERNALS = ("_parameters", "_buffers", "_non_persistent_buffers_set")


def _fork(module: torch.nn.Module, must_fork) -> torch.nn.Module:
    """A copy of `module` with its own attributes, hooks and children, sharing its
    parameter and buffer dicts. Children are forked only where `must_fork` holds for
    them or a descendant; the rest are the original child modules themselves."""
    new = module.__class__.__new__(module.__class__)
    state = {}
    for key, value in module.__dict__.items():
        if key in _SHARED_INTERNALS or key == "_modules":
            state[key] = value
        elif key.startswith("_") and "hook" in key and isinstance(value, dict):
            state[key] = value.__class__(value)  # hooks added to the copy stay on the copy
        elif isinstance(value, (list, dict, set)) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            state[key] = copy.deepcopy(value)  # e.g. att_context_size, streaming_cfg
        else:
            state[key] = value  # scalars, strings, configs: never mutated in place
    new.__dict__.update(state)
    new._modules = OrderedDict(
        (name, _fork(child, must_fork) if child is not None and _subtree_matches(child, must_fork) else child)
        for name, child in module._modules.items()
    )
    return new


def _subtree_matches(module: torch.nn.Module, predicate) -> bool:
    return any(predicate(m) for m in module.modules())


def streaming_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """A NeMo ConformerEncoder whose streaming settings are its own.

    The encoder object, its layer list, the layers and the cache-aware modules in
    them are new Python objects (so `configure_streaming`, forward hooks and NeMo's
    per-module `cache_drop_size` on the copy never reach the original); every
    parameter and buffer is shared, and every other module is the original one, so
    the copy costs no weight memory and follows the original through `.to(device)`
    or a weight update. Inference only: `train()` on either reaches the shared
    submodules of both.
    """
    return _fork(encoder, _has_streaming_settings)


def chunk_plan(encoder, chunk_frames: int) -> ChunkPlan:
    sub = encoder.pre_encode
    factor = int(encoder.subsampling_factor)
    if getattr(sub, "is_causal", False):
        cfg = encoder.streaming_cfg  # NeMo's schedule is right for causal subsampling
        return ChunkPlan(int(cfg.chunk_size[0]), int(cfg.chunk_size[1]), int(cfg.pre_encode_cache_size[1]),
                         int(cfg.drop_extra_pre_encoded))
    kernel, stride = getattr(sub, "_kernel_size", 3), getattr(sub, "_stride", 2)
    pads = (getattr(sub, "_left_padding", 1), getattr(sub, "_right_padding", 1))
    if getattr(sub, "_subsampling", "dw_striding") not in ("dw_striding", "striding") or (kernel, stride) != (3, 2) \
            or pads != (1, 1):
        raise ValueError(f"streaming supports causal subsampling or NEST's dw_striding (kernel 3, stride 2), "
                         f"not {type(sub).__name__} {getattr(sub, '_subsampling', '?')} k={kernel} s={stride}")
    step = factor * chunk_frames
    return ChunkPlan(step, step, factor, 1)


def _frame_ms(nest_encoder) -> float:
    featurizer = nest_encoder.preprocessor.featurizer
    return 1000.0 * int(featurizer.hop_length) * int(nest_encoder.encoder.subsampling_factor) / int(
        getattr(featurizer, "sample_rate", 16000))


def _ms_to_frames(ms: float, frame_ms: float, what: str) -> int:
    n = ms / frame_ms
    if n < 1 or abs(n - round(n)) > 1e-6:
        raise ValueError(f"{what} must be a positive multiple of {frame_ms:g} ms, got {ms}")
    return int(round(n))


class StreamingNestEncoder:
    """Runs a `NestEncoder` chunk by chunk over many streams at once.

        streamer = StreamingNestEncoder(nest_encoder, chunk_frames=4, left_context_frames=64)
        states = [streamer.init_state() for _ in range(n)]
        states, feats = streamer.step(states, [audio_1, None, audio_3, ...])
        states, feats = streamer.flush(states)          # end of turn
        feats[i]: [K, t_i, D] new frames of stream i for each selected layer

    Each streamer has its own encoder object (`streaming_copy`: weights shared,
    attention settings its own), so streamers of several chunk sizes over one
    model (`build_streamers`) can be stepped in any order, and the model's
    offline forward keeps its trained setting. States and features live on the
    encoder's device; build streamers after moving the model there.

    `approximate=True` allows what cannot be streamed exactly (a full-context
    checkpoint, utterance-level feature normalization) with a warning.
    """

    def __init__(self, nest_encoder, chunk_frames: Optional[int] = None, left_context_frames: Optional[int] = None,
                 approximate: bool = False, max_chunks_per_call: int = 16):
        # This streamer's own encoder object (weights shared): its attention setting is
        # fixed here and never touches `nest_encoder`, which stays the offline model.
        enc = streaming_copy(nest_encoder.encoder)
        style, (left, right) = _attention_style(enc)
        if chunk_frames is None:
            chunk_frames = right + 1 if style == "chunked_limited" and right >= 0 else 4
        if left_context_frames is None:
            left_context_frames = left if style == "chunked_limited" and left >= 0 else 64
            left_context_frames -= left_context_frames % chunk_frames
        self.nest = nest_encoder
        self.encoder = enc
        self.report = configure_streaming(enc, chunk_frames, left_context_frames)
        if not self.report["exact"]:
            message = (f"this encoder was not trained for cache-aware streaming with chunk {chunk_frames} and "
                       f"left context {left_context_frames} ({self.report['attention_before']}, causal "
                       f"convolutions: {self.report['causal_convolutions']}): streamed features only approximate "
                       f"the offline ones")
            if not approximate:
                raise ValueError(message + ". Pass approximate=True to run it anyway, or fine-tune it for "
                                 "streaming (agent.training with a chunked_limited encoder).")
            warnings.warn(message, stacklevel=2)
        elif not self.report["trained_for_this_context"]:
            warnings.warn(f"attention context {self.report['attention_now']} is not one this encoder was trained "
                          f"with ({self.report['attention_before']}): streaming equals the offline forward in this "
                          f"setting (encode_offline), not the trained one, and accuracy may differ", stacklevel=2)
        self.mel = IncrementalMel(nest_encoder.preprocessor, approximate_normalization=approximate)
        self.approximate = bool(approximate)  # so streamers built alongside this one can match it
        self.chunk_frames = int(chunk_frames)
        self.left_context_frames = int(left_context_frames)
        self.plan = chunk_plan(enc, self.chunk_frames)
        self.max_chunks_per_call = max(1, int(max_chunks_per_call))
        self.layer_indices = list(nest_encoder.layer_indices)
        self.hop = self.mel.hop
        self.sample_rate = int(nest_encoder.preprocessor.featurizer.sample_rate) if hasattr(
            nest_encoder.preprocessor.featurizer, "sample_rate") else 16000
        self.last_stats = StepStats()

    @classmethod
    def from_ms(cls, nest_encoder, chunk_ms: float, left_context_ms: Optional[float] = None, **kwargs):
        """Settings in milliseconds (multiples of the encoder's frame, 80 ms for NEST)."""
        frame_ms = _frame_ms(nest_encoder)
        left = None if left_context_ms is None else _ms_to_frames(left_context_ms, frame_ms, "left_context_ms")
        return cls(nest_encoder, chunk_frames=_ms_to_frames(chunk_ms, frame_ms, "chunk_ms"),
                   left_context_frames=left, **kwargs)

    # -- device ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are: states and features live there too."""
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    # -- the offline forward this streamer reproduces ------------------------------
    @torch.no_grad()
    def encode_offline(self, input_features: torch.Tensor, feature_lengths: torch.Tensor):
        """Whole-utterance forward of this streamer's encoder (its own attention setting):
        `[K, B, T, D]` selected layers, zero past each length, and lengths `[B]`. For a
        cache-aware encoder it is what `step` + `flush` return, frame for frame; the
        model's offline forward (`nest_encoder(...)`) keeps the trained setting."""
        features = input_features.to(device=self.device, dtype=self.dtype)
        lengths = feature_lengths.to(self.device)
        with capture_layers(self.encoder, self.layer_indices) as captured:
            _, out_len = self.encoder(audio_signal=features, length=lengths)
        hidden = torch.stack([captured[i] for i in self.layer_indices])
        valid = torch.arange(hidden.shape[2], device=hidden.device)[None, :] < out_len[:, None]
        return hidden * valid[None, :, :, None].to(hidden.dtype), out_len

    # -- latency ---------------------------------------------------------------
    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.hop * int(self.encoder.subsampling_factor) / self.sample_rate

    @property
    def chunk_ms(self) -> float:
        return self.chunk_frames * self.frame_ms

    @property
    def lookahead_ms(self) -> float:
        """Audio past a chunk's 80 ms grid end needed before the chunk can run: the
        STFT half window; causal subsampling runs its chunks 7 mel frames early
        (first chunk 1+8R frames), which makes this negative."""
        stft = 1000.0 * self.mel.lookahead_samples() / self.sample_rate
        early = 1000.0 * self.hop * (self.plan.step_mel - self.plan.first_mel) / self.sample_rate
        return stft - early

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency of a frame: the chunk it waits for plus the look-ahead."""
        return self.chunk_ms + self.lookahead_ms

    def describe(self) -> str:
        return (f"chunk {self.chunk_frames} frames = {self.chunk_ms:.0f} ms, left context "
                f"{self.left_context_frames} frames = {self.left_context_frames * self.frame_ms / 1000:.2f} s, "
                f"look-ahead {self.lookahead_ms:.1f} ms -> latency {self.latency_ms:.1f} ms + compute")

    # -- state -------------------------------------------------------------------
    def init_state(self) -> EncoderStreamState:
        """A new stream's state, on the encoder's device (caches in its dtype; mel
        features stay float32, as the front end makes them, until the encoder call)."""
        device = self.device
        att, conv, att_len = self.encoder.get_initial_cache_state(batch_size=1, dtype=self.dtype, device=device)
        return EncoderStreamState(
            mel_state=self.mel.init_state(),
            mel_pending=torch.zeros(self.mel.n_mels, 0, device=device),
            mel_cache=torch.zeros(self.mel.n_mels, 0, device=device),
            att_cache=att.transpose(0, 1).contiguous(),
            conv_cache=conv.transpose(0, 1).contiguous(),
            att_cache_len=att_len,
        )

    # -- stepping ----------------------------------------------------------------
    def _need(self, state: EncoderStreamState) -> int:
        return self.plan.first_mel if state.steps == 0 else self.plan.step_mel

    def _ready_chunks(self, state: EncoderStreamState) -> int:
        have = state.mel_pending.shape[1]
        if state.steps == 0:
            if have < self.plan.first_mel:
                return 0
            return 1 + min((have - self.plan.first_mel) // self.plan.step_mel, self.max_chunks_per_call - 1)
        return min(have // self.plan.step_mel, self.max_chunks_per_call)

    @torch.no_grad()
    def step(self, states: Sequence[EncoderStreamState], audio: Sequence[Optional[torch.Tensor]],
             final: Optional[Sequence[bool]] = None, max_calls: Optional[int] = None):
        """Feed new 16 kHz samples to each stream and encode every complete chunk.

        `audio[i]`: 1-D float32 samples for stream i (or None). `final[i]`: the
        stream's turn ended: its remaining audio is encoded too, with the padding
        the offline forward uses, and the state is marked finished.
        Returns `(new_states, features)`, `features[i]` of shape `[K, t_i, D]`.
        Input states are not modified. `max_calls` bounds the encoder calls of this
        step (the rest stays queued in the states for the next one).
        """
        if len(audio) != len(states):
            raise ValueError(f"{len(states)} states but {len(audio)} audio entries")
        # Subnormal floats appear in the first steps after zero-initialized caches
        # and made each of them 30-40x slower on x86 CPUs (measured: 3 s vs 0.1 s
        # per NEST-L step). Flushing them changes values by < 1e-38.
        torch.set_flush_denormal(True)
        final = list(final) if final is not None else [False] * len(states)
        states = list(states)
        device = self.device
        for i, (state, samples) in enumerate(zip(states, audio)):
            if state.finished:
                raise ValueError(f"stream {i} was flushed: start a new state for the next turn")
            if samples is not None and not isinstance(samples, torch.Tensor):
                samples = torch.as_tensor(samples, dtype=torch.float32)
            mel_state, mel = self.mel.push(state.mel_state, samples, final=final[i])
            # New audio reaches the encoder's device here, once (the front end may run elsewhere).
            mel = mel.to(device, non_blocking=True)
            pending = mel if state.mel_pending.shape[1] == 0 else torch.cat([state.mel_pending, mel], dim=1)
            states[i] = replace(state, mel_state=mel_state, mel_pending=pending)
        outputs: List[List[torch.Tensor]] = [[] for _ in states]
        stats = StepStats()
        # Full chunks first, in batched calls grouped by input shape and drop.
        while max_calls is None or stats.calls < max_calls:
            groups: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
            for i, state in enumerate(states):
                n = self._ready_chunks(state)
                if n:
                    need = self._need(state) + (n - 1) * self.plan.step_mel
                    groups.setdefault((state.mel_cache.shape[1] + need, self._drop(state)), []).append((i, need))
            if not groups:
                break
            for (_, drop), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                self._run(states, members, drop, outputs, stats)
        # Then the tails of finished turns, in padded calls: their caches are discarded.
        tails = [i for i, f in enumerate(final) if f and self._ready_chunks(states[i]) == 0]
        if tails and (max_calls is None or stats.calls < max_calls):
            by_drop: Dict[int, List[Tuple[int, int]]] = {}
            for i in tails:
                if states[i].mel_pending.shape[1]:
                    by_drop.setdefault(self._drop(states[i]), []).append((i, states[i].mel_pending.shape[1]))
            for drop, members in by_drop.items():
                self._run(states, members, drop, outputs, stats)
            for i in tails:
                states[i] = replace(states[i], finished=True)
        self.last_stats = stats
        features = [self._concat(parts) for parts in outputs]
        return states, features

    def _drop(self, state: EncoderStreamState) -> int:
        """Pre-encoded frames at the head of the next call that were emitted before."""
        if state.steps == 0:
            return 0
        if state.mel_cache.shape[1] < self.plan.cache_mel:
            # The history is shorter than the cache: the call starts at the first
            # mel frame and recomputes every frame emitted so far.
            return state.frames_emitted
        return self.plan.drop

    def flush(self, states: Sequence[EncoderStreamState]):
        """End of turn for every stream given: encode what remains of each."""
        return self.step(states, [None] * len(states), final=[True] * len(states))

    def _concat(self, parts: List[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return torch.zeros(len(self.layer_indices), 0, int(self.encoder.d_model), dtype=self.dtype,
                               device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _run(self, states, members: List[Tuple[int, int]], drop: int, outputs, stats: StepStats):
        """One batched encoder call: each `(stream, count)` consumes `count` pending mel frames."""
        enc = self.encoder
        dtype, device = self.dtype, self.device
        streams = [i for i, _ in members]
        inputs = []
        for i, count in members:
            st = states[i]
            pending = st.mel_pending[:, :count]
            inputs.append(pending if st.mel_cache.shape[1] == 0 else torch.cat([st.mel_cache, pending], 1))
        width = max(x.shape[1] for x in inputs)
        batch = torch.zeros(len(members), self.mel.n_mels, width, dtype=dtype, device=device)
        for j, x in enumerate(inputs):  # zero padding, as the offline front end pads
            batch[j, :, : x.shape[1]] = x
        length = torch.tensor([x.shape[1] for x in inputs]).to(device, non_blocking=True)
        att = torch.cat([states[i].att_cache for i in streams]).transpose(0, 1)
        conv = torch.cat([states[i].conv_cache for i in streams]).transpose(0, 1)
        att_len = torch.cat([states[i].att_cache_len for i in streams])
        with capture_layers(enc, self.layer_indices) as captured:
            _, out_len, att_next, conv_next, att_len_next = enc.cache_aware_stream_step(
                processed_signal=batch, processed_signal_length=length, cache_last_channel=att,
                cache_last_time=conv, cache_last_channel_len=att_len, keep_all_outputs=True,
                drop_extra_pre_encoded=drop,
            )
        stats.calls += 1
        stats.batch_sizes.append(len(members))
        hidden = torch.stack([captured[k] for k in self.layer_indices])  # [K, B, T, D]
        left = self.left_context_frames
        # Several chunks in one call leave more than `left` positions: keep the last ones.
        att_next = (att_next[:, :, -left:] if att_next.shape[2] > left else att_next).transpose(0, 1)
        conv_next = conv_next.transpose(0, 1)
        out_counts = out_len.tolist()  # the one device -> host sync of a call
        for j, (i, count) in enumerate(members):
            st = states[i]
            n = int(out_counts[j])
            outputs[i].append(hidden[:, j, :n])
            consumed = inputs[j]
            states[i] = replace(
                st,
                mel_pending=st.mel_pending[:, count:],
                mel_cache=consumed[:, max(consumed.shape[1] - self.plan.cache_mel, 0):],
                att_cache=att_next[j: j + 1],
                conv_cache=conv_next[j: j + 1],
                att_cache_len=att_len_next[j: j + 1],
                steps=st.steps + 1,
                frames_emitted=st.frames_emitted + n,
            )


def default_left_context_frames(encoder, chunk_frames: int) -> int:
    """The trained left context (64 frames when the encoder has none), rounded down to
    whole chunks, at least one chunk."""
    style, (left, _) = _attention_style(encoder)
    trained = left if style == "chunked_limited" and left >= 0 else 64
    return max(chunk_frames, trained // chunk_frames * chunk_frames)


def build_streamers(nest_encoder, chunk_ms_list: Iterable[float], left_context_ms: Optional[float] = None,
                    approximate: bool = False, **kwargs) -> Dict[int, StreamingNestEncoder]:
    """One streamer per offered chunk size, keyed by chunk frames (80 ms each for NEST).

    Build them once, up front, on the thread that will step them, after the model is
    on its device: each has its own encoder settings (see `streaming_copy`), so they
    can be stepped in any order, and `nest_encoder` stays the offline model.
    `left_context_ms=None`: the trained left context, rounded down to whole chunks.
    """
    frame_ms = _frame_ms(nest_encoder)
    streamers: Dict[int, StreamingNestEncoder] = {}
    for chunk_ms in chunk_ms_list:
        chunk = _ms_to_frames(chunk_ms, frame_ms, "chunk_ms")
        if chunk in streamers:
            continue
        if left_context_ms is None:
            left = default_left_context_frames(nest_encoder.encoder, chunk)
        else:
            left = max(chunk, _ms_to_frames(left_context_ms, frame_ms, "left_context_ms") // chunk * chunk)
        streamers[chunk] = StreamingNestEncoder(nest_encoder, chunk_frames=chunk, left_context_frames=left,
                                                approximate=approximate, **kwargs)
    if not streamers:
        raise ValueError("chunk_ms_list is empty: offer at least one chunk size")
    return streamers
