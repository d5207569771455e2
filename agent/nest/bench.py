"""Streaming encoder cost per chunk size, against the offline forward.

    python -m agent.nest.bench [--seconds 10] [--chunks-ms 80,160,320,640,1280] [--batch 8] [--shape large]

On a NEST-L-shaped, streaming-configured random model (chunked_limited
attention, causal convolutions, NEST's subsampling; random weights are fine for
timing), in one process: the offline forward over the whole utterance, then for
each chunk size the same audio streamed in chunk-sized packets with batch 1 and
with `--batch` streams stepped together. Prints compute per second of audio,
the ratio to offline, and how many sessions this machine sustains in real time
(batch 1: one stream per call; batch B: B streams per call).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

SR = 16000


def audio_for(seconds: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    x = rng.standard_normal(n).astype(np.float32) * 0.1 * (0.2 + np.abs(np.sin(np.arange(n) / SR * 3))).astype(np.float32)
    return torch.from_numpy(x)


def time_offline(encoder, audio: torch.Tensor, repeats: int = 3) -> float:
    encoder.encode_audio(audio.numpy())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode_audio(audio.numpy())
        best = min(best, time.perf_counter() - start)
    return best


def time_streaming(streamer, audios, chunk_samples: int) -> float:
    """Seconds of compute to stream `audios` (stepped together) packet by packet, plus flush."""
    states = [streamer.init_state() for _ in audios]
    n = max(a.numel() for a in audios)
    spent = 0.0
    for i in range(0, n, chunk_samples):
        pieces = [a[i:i + chunk_samples] for a in audios]
        start = time.perf_counter()
        states, _ = streamer.step(states, pieces)
        spent += time.perf_counter() - start
    start = time.perf_counter()
    streamer.flush(states)
    return spent + time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--chunks-ms", default="80,160,320,640,1280")
    parser.add_argument("--left-context-frames", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", default="large", choices=["large", "tiny"])
    parser.add_argument("--layers", default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="encoder weights and activations (bf16 halves the weight traffic on CPUs with AVX512-BF16)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the engine thread does (see agent.nest.streaming)

    from agent.nest import NestEncoder
    from agent.nest.configs import nest_model_config
    from agent.nest.streaming import StreamingNestEncoder

    torch.manual_seed(0)
    chunks = [max(1, int(c) // 80) for c in args.chunks_ms.split(",")]
    cfg = nest_model_config(args.shape, streaming=True, att_context_size=[args.left_context_frames, chunks[0] - 1])
    encoder = NestEncoder(cfg, layer=args.layers, torch_dtype=getattr(torch, args.dtype))
    audio = audio_for(args.seconds)
    batch_audio = [audio_for(args.seconds, seed=s) for s in range(args.batch)]
    print(f"NEST {args.shape} (d_model {encoder.hidden_size}, {encoder.num_layers} layers), layers {args.layers}, "
          f"{args.seconds:.0f} s of audio, left context {args.left_context_frames} frames, "
          f"{args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for chunk in chunks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=args.left_context_frames)
        # offline in the same attention setting, measured beside each row (the machine is noisy)
        offline = time_offline(encoder, audio)
        samples = chunk * 1280
        time_streaming(streamer, [audio[: 4 * samples]], samples)  # warm-up: first calls allocate
        one = time_streaming(streamer, [audio], samples)
        many = time_streaming(streamer, batch_audio, samples)
        per_s_offline = 1000 * offline / args.seconds
        per_s_one = 1000 * one / args.seconds
        per_s_many = 1000 * many / args.seconds / args.batch
        rows.append((chunk * 80, streamer.latency_ms, per_s_offline, per_s_one, per_s_many))
        print(f"  chunk {chunk * 80:>5} ms: offline {per_s_offline:6.1f} ms/s, batch 1 {per_s_one:6.1f} ms/s, "
              f"batch {args.batch} {per_s_many:6.1f} ms/s per stream", flush=True)
    header = (f"{'chunk ms':>8} {'latency ms':>10} | {'offline ms/s':>12} | {'stream ms/s':>11} {'ratio':>6} "
              f"{'sessions':>8} | {f'b{args.batch} ms/s':>9} {'ratio':>6} {'sessions':>8}")
    print("\n" + header)
    print("-" * len(header))
    for chunk_ms, latency, off, one, many in rows:
        print(f"{chunk_ms:>8} {latency:>10.1f} | {off:>12.1f} | {one:>11.1f} {one / off:>6.2f} {1000 / one:>8.1f} | "
              f"{many:>9.1f} {many / off:>6.2f} {1000 / many:>8.1f}")
    print("\nms/s: compute per second of audio (per stream); ratio: streaming / offline over the same audio;"
          "\nsessions: streams this machine keeps in real time (1000 / ms/s), all cores, encoder only.")


if __name__ == "__main__":
    main()
