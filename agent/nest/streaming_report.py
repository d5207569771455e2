"""How close is streaming to the offline forward, per chunk size and layer?

    python -m agent.nest.streaming_report --nest-model nvidia/ssl_en_nest_large_v1.0 \\
        [--audio-file speech.wav] [--layers all] [--chunks-ms 160,320,640,1280] [--left-context-ms 5120]

For a full-context checkpoint (the published NEST models) streaming is an
approximation: the encoder is switched to chunked attention and its symmetric
convolutions see zeros where the next chunk would be. For each chunk size this
prints the cosine similarity of streamed vs offline features (mean over frames,
and the worst frame) per selected layer, and the compute time per second of audio.
For a streaming-configured model the similarity is 1 to float precision.

With `--student-model STUDENT.nemo` (a cache-aware encoder from
`python -m agent.training.streamify`) the reference is the `--nest-model`
teacher's full-context offline features, and each layer gets two columns: the
teacher streamed naively (`approximate=True`) and the student streamed (exact,
no approximation), plus the student's worst deviation from its own offline
forward (it streams exactly: ~1e-6).

    python -m agent.nest.streaming_report --nest-model teacher.nemo --student-model student.nemo \\
        [--manifest val.jsonl] [--chunks-ms 160,320,640]
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import List, Optional

import numpy as np
import torch

SR = 16000


def default_audio(seconds: float = 6.0) -> np.ndarray:
    """Speech from espeak-ng when it is installed, else noise with a speech-like envelope."""
    text = ("turn on the lights in the kitchen, then set a timer for five minutes. "
            "what is seven times eight? thank you very much, that is all for today.")
    if shutil.which("espeak-ng") and shutil.which("sox"):
        with tempfile.TemporaryDirectory() as tmp:
            raw, wav = f"{tmp}/raw.wav", f"{tmp}/speech.wav"
            subprocess.run(["espeak-ng", "-w", raw, text], check=True)
            subprocess.run(["sox", raw, "-r", str(SR), "-c", "1", "-b", "16", wav], check=True)
            import soundfile as sf

            audio, _ = sf.read(wav, dtype="float32")
            return audio
    rng = np.random.default_rng(0)
    n = int(seconds * SR)
    return (rng.standard_normal(n) * 0.1 * (0.2 + np.abs(np.sin(np.arange(n) / SR * 3)))).astype(np.float32)


def stream_all(streamer, audio: torch.Tensor, chunk_samples: int):
    """Stream `audio` in chunk-sized packets; returns (features [K,T,D], compute seconds)."""
    state, parts, spent = streamer.init_state(), [], 0.0
    for i in range(0, audio.numel(), chunk_samples):
        start = time.perf_counter()
        (state,), (feats,) = streamer.step([state], [audio[i:i + chunk_samples]])
        spent += time.perf_counter() - start
        parts.append(feats)
    start = time.perf_counter()
    (state,), (feats,) = streamer.flush([state])
    spent += time.perf_counter() - start
    parts.append(feats)
    return torch.cat(parts, dim=1), spent


def compare(nest_model, audio: np.ndarray, layers="all", chunks_ms: Optional[List[int]] = None,
            left_context_ms: int = 5120, out=sys.stdout) -> List[dict]:
    from agent.nest import NestEncoder
    from agent.nest.streaming import StreamingNestEncoder

    chunks_ms = chunks_ms or [160, 320, 640, 1280]
    base = NestEncoder(nest_model, layer=layers)
    wave = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    base.encode_audio(audio)  # warm-up: first calls pay for allocations and kernel selection
    start = time.perf_counter()
    ref = base.encode_audio(audio)
    offline_s = time.perf_counter() - start
    ref = ref.hidden_states[:, 0, : int(ref.lengths[0])]
    seconds = wave.numel() / SR
    frame_ms = 80
    print(f"model: {nest_model}  audio: {seconds:.2f} s  layers: {base.layer_indices}", file=out)
    print(f"offline forward: {1000 * offline_s / seconds:.1f} ms per second of audio", file=out)
    header = f"{'chunk ms':>8} | {'ms/s audio':>10} | " + " | ".join(f"L{k:<2} mean/min" for k in base.layer_indices)
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for chunk_ms in chunks_ms:
        chunk = max(1, chunk_ms // frame_ms)
        left = max(chunk, (left_context_ms // frame_ms) // chunk * chunk)
        encoder = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=left, approximate=True)
        stream_all(streamer, wave[: 2 * SR], chunk * 1280)  # warm-up
        got, spent = stream_all(streamer, wave, chunk * 1280)
        n = min(got.shape[1], ref.shape[1])
        cos = torch.nn.functional.cosine_similarity(got[:, :n].float(), ref[:, :n].float(), dim=-1)  # [K, T]
        row = {"chunk_ms": chunk * frame_ms, "ms_per_s": 1000 * spent / seconds, "exact": streamer.report["exact"] and streamer.report["trained_for_this_context"],
               "cos_mean": cos.mean(1).tolist(), "cos_min": cos.min(1).values.tolist()}
        rows.append(row)
        cells = " | ".join(f"{m:.4f}/{mn:.3f}" for m, mn in zip(row["cos_mean"], row["cos_min"]))
        print(f"{row['chunk_ms']:>8} | {row['ms_per_s']:>10.1f} | {cells}", file=out, flush=True)
    print(f"streaming report: {streamer.report}", file=out)
    return rows


def _cat_cos(parts_a, parts_b) -> torch.Tensor:
    """Cosine per layer over every frame of every utterance: [K, sum T]."""
    a = torch.cat([x.float() for x in parts_a], dim=1)
    b = torch.cat([x.float() for x in parts_b], dim=1)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _offline_frames(encoder, wave) -> torch.Tensor:
    out = encoder.encode_audio(wave)
    return out.hidden_states[:, 0, : int(out.lengths[0])]


def student_rows(teacher, student, waves, chunks_ms: List[int], left_context_ms: int = 5120) -> List[dict]:
    """For each chunk size: cosine per layer to the teacher's full-context offline features of
    (a) the teacher streamed naively and (b) the student streamed, over all frames of `waves`;
    and the student's largest |streamed - own offline| (exactness). `teacher`, `student`:
    NestEncoders with the same layer selection (they are not modified)."""
    from agent.nest.streaming import StreamingNestEncoder

    if list(teacher.layer_indices) != list(student.layer_indices):
        raise ValueError(f"teacher layers {teacher.layer_indices} != student layers {student.layer_indices}")
    waves = [np.asarray(w, dtype=np.float32) for w in waves]
    ref = [_offline_frames(teacher, w) for w in waves]
    frame_ms = 80
    rows = []
    for chunk_ms in chunks_ms:
        chunk = max(1, chunk_ms // frame_ms)
        left = max(chunk, (left_context_ms // frame_ms) // chunk * chunk)
        naive_enc, student_enc = copy.deepcopy(teacher), copy.deepcopy(student)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            naive = StreamingNestEncoder(naive_enc, chunk_frames=chunk, left_context_frames=left, approximate=True)
        streamer = StreamingNestEncoder(student_enc, chunk_frames=chunk, left_context_frames=left)  # exact or refuses
        # The student's own offline forward with this chunk's attention: what streaming must equal.
        offline_enc = copy.deepcopy(student)
        offline_enc.encoder.set_default_att_context_size([left, chunk - 1])
        naive_out, student_out, own_offline = [], [], []
        for w in waves:
            wave = torch.from_numpy(w)
            naive_out.append(stream_all(naive, wave, chunk * 1280)[0])
            student_out.append(stream_all(streamer, wave, chunk * 1280)[0])
            own_offline.append(_offline_frames(offline_enc, w))
        naive_cos, student_cos = _cat_cos(naive_out, ref), _cat_cos(student_out, ref)
        exact = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(student_out, own_offline))
        rows.append({"chunk_ms": chunk * frame_ms, "left_context_ms": left * frame_ms,
                     "layers": list(teacher.layer_indices), "frames": int(naive_cos.shape[1]),
                     "teacher_naive_cos": naive_cos.mean(1).tolist(), "student_cos": student_cos.mean(1).tolist(),
                     "teacher_naive_cos_min": naive_cos.min(1).values.tolist(),
                     "student_cos_min": student_cos.min(1).values.tolist(),
                     "student_stream_vs_offline_max_abs": exact,
                     "student_trained_for_chunk": bool(streamer.report["trained_for_this_context"])})
    return rows


def format_student_rows(rows: List[dict]) -> str:
    """Markdown table: one row per chunk size, naive/student cosine per layer, then the mean."""
    layers = rows[0]["layers"] if rows else []
    head = "| chunk ms | " + " | ".join(f"L{k} naive / student" for k in layers) + \
        " | mean naive / student | student stream-offline max abs |"
    lines = [head, "|---|" + "---|" * (len(layers) + 2)]
    for r in rows:
        cells = [f"{a:.4f} / {b:.4f}" for a, b in zip(r["teacher_naive_cos"], r["student_cos"])]
        mean_a = float(np.mean(r["teacher_naive_cos"]))
        mean_b = float(np.mean(r["student_cos"]))
        lines.append(f"| {r['chunk_ms']} | " + " | ".join(cells) +
                     f" | {mean_a:.4f} / {mean_b:.4f} | {r['student_stream_vs_offline_max_abs']:.1e} |")
    return "\n".join(lines)


def manifest_waves(path: str, limit: Optional[int] = None) -> List[np.ndarray]:
    from agent.training.data import load_wave, read_manifest

    return [load_wave(item["audio_filepath"]) for item in read_manifest(path, limit)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nest-model", required=True, help=".nemo file, NeMo pretrained name, or .yaml config")
    parser.add_argument("--audio-file", help="wav/flac to stream (default: espeak-ng speech)")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--chunks-ms", default="160,320,640,1280")
    parser.add_argument("--left-context-ms", type=int, default=5120)
    parser.add_argument("--student-model", help="streamified .nemo: adds the student column (teacher = --nest-model)")
    parser.add_argument("--manifest", help="JSONL manifest of the audio to compare on (with --student-model)")
    parser.add_argument("--limit", type=int, default=16, help="utterances of --manifest to use")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunks_ms.split(",")]
    if args.student_model:
        from agent.nest import NestEncoder

        waves = manifest_waves(args.manifest, args.limit) if args.manifest else [default_audio()]
        teacher = NestEncoder(args.nest_model, layer=args.layers)
        student = NestEncoder(args.student_model, layer=args.layers)
        rows = student_rows(teacher, student, waves, chunks, args.left_context_ms)
        print(f"cosine to the teacher's full-context offline features ({len(waves)} utterances, "
              f"{rows[0]['frames'] if rows else 0} frames); naive = teacher streamed with approximate=True")
        print(format_student_rows(rows))
        return
    if args.audio_file:
        from agent.ultravox.inference import load_audio_file
        from agent.nest.processor import resample

        audio, rate = load_audio_file(args.audio_file)
        audio = resample(audio, rate, SR)
    else:
        audio = default_audio()
    compare(args.nest_model, audio, layers=args.layers, chunks_ms=chunks,
            left_context_ms=args.left_context_ms)


if __name__ == "__main__":
    main()
