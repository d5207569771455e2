"""End-of-speech to first token: the streaming session against the offline baseline.

    python -m agent.bench ttft [--seconds 2,5,10,20] [--chunk-ms 320] [--repeats 3] [--nest large] [--llm bench]
                               [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
    python -m agent.bench load [--streams 1,4,8,16] [--duration 30] ...   (agent/bench_load.py: sessions
                               sustained in real time, batched LLM against round-robin)

One process, one model (random weights are fine for timing): a NEST-L-shaped
streaming encoder and a ~150M-parameter Llama-style LLM. For each utterance
length the session is fed the audio in chunk-sized packets (pre-filling as it
goes; that time is not counted), then the clock starts at end of speech:

* session: flush the last partial chunk, pre-fill the last audio group and the
  assistant header, pick the first token;
* offline: featurize + encode the whole utterance, pre-fill the whole prompt,
  pick the first token (what Ultravox does);
* floor: one encoder step of one chunk + the header pre-fill + one decode step,
  the least any streaming design pays after the user stops.

Medians over `--repeats`, side by side, with the ratios the targets speak of.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import torch

SR = 16000
SYSTEM = "You are a helpful voice assistant. Answer briefly."


DEVICE_CHOICES = "cpu, cuda or cuda:N"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against what this machine has (ValueError if unusable)."""
    from agent.ultravox.inference import resolve_device as resolve

    return resolve(device)


def build(nest: str, llm: str, chunk_frames: int, left_frames: int, device: str = "cpu", dtype: str = "float32",
          quantize: str = "none"):
    """An in-memory Ultravox model with a streaming NEST tower and its inference wrapper,
    on `device` in `dtype` (the NEST front end, log-mel, stays float32 as NestEncoder keeps it)."""
    from agent.nest import NestEncoder
    from agent.nest.configs import nest_model_config
    from agent.ultravox import UltravoxConfig, UltravoxInference, UltravoxModel
    from agent.ultravox.inference import resolve_dtype
    from agent.ultravox.quantize import quantize_model
    from agent.ultravox.text_models import build_llama, build_tokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tower = NestEncoder(nest_model_config(nest, streaming=True, att_context_size=[left_frames, chunk_frames - 1]),
                        torch_dtype=torch_dtype, layer="all")
    language_model = build_llama(tokenizer, size=llm, vocab_size=32000 if llm == "bench" else None).to(torch_dtype)
    config = UltravoxConfig(audio_config={"model_type": "nest", "layers": "all"}, text_config=language_model.config,
                            stack_factor=8, audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"))
    model = UltravoxModel(config, audio_tower=tower, language_model=language_model, dtype=torch_dtype).eval()
    inference = UltravoxInference.from_model(model, tokenizer, device=str(dev))
    quantize_model(inference.model, quantize)
    return inference, tokenizer


def build_streaming(args):
    """The bench model of `args` (add_model_arguments) and its streamer at --chunk-ms."""
    from agent.nest.streaming import StreamingNestEncoder

    chunk = max(1, args.chunk_ms // 80)
    inference, tokenizer = build(args.nest, args.llm, chunk, args.left_context_frames, device=args.device,
                                 dtype=args.dtype, quantize=getattr(args, "quantize", "none"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamer = StreamingNestEncoder(inference.model.audio_tower, chunk_frames=chunk,
                                        left_context_frames=args.left_context_frames)
    params = sum(p.numel() for p in inference.model.language_model.parameters()) / 1e6
    return inference, tokenizer, streamer, params


def describe_device(model) -> str:
    """Where the model's weights live, e.g. "cuda:0 (NVIDIA H200) bfloat16"."""
    param = next(model.language_model.parameters())
    where = str(param.device)
    if param.device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(param.device)})"
    return f"{where} {str(param.dtype).replace('torch.', '')}"


def add_model_arguments(p, nest: str = "large", llm: str = "bench") -> None:
    p.add_argument("--chunk-ms", type=int, default=320)
    p.add_argument("--left-context-frames", type=int, default=64)
    p.add_argument("--nest", default=nest, choices=["large", "tiny"])
    p.add_argument("--llm", default=llm, choices=["tiny", "small", "bench"])
    p.add_argument("--device", default=os.environ.get("NESTVOX_DEVICE", "cpu"),
                   help=f"{DEVICE_CHOICES} (env NESTVOX_DEVICE)")
    p.add_argument("--dtype", default=os.environ.get("NESTVOX_DTYPE", "float32"), choices=DTYPE_CHOICES,
                   help="model weights' dtype (env NESTVOX_DTYPE)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: dynamic int8 linear layers (CPU), as serve.py --quantize")


def synchronize(inference) -> None:
    """Wait for queued device work, so wall-clock timings on CUDA are real."""
    if inference.device.type == "cuda":
        torch.cuda.synchronize(inference.device)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    return (rng.standard_normal(n) * 0.1 * (0.2 + np.abs(np.sin(np.arange(n) / SR * 3)))).astype(np.float32)


class _SessionFeeds:
    """The Session API before SingleStream: the session ran its own encoder stream."""

    def __init__(self, session):
        self.session = session

    def feed(self, audio: torch.Tensor) -> int:
        return self.session.feed(audio)

    def end_turn(self, speech_end=None) -> None:
        self.session.end_turn(speech_end=speech_end)


def single_stream(inference, streamer, max_new_tokens: int):
    """One conversation streamed in this thread: `.feed(packet)`, `.end_turn()`, `.session`."""
    import inspect

    from agent.realtime.sampling import GenerationSettings
    from agent.realtime.session import Session

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    if "streamer" in inspect.signature(Session.__init__).parameters:
        return _SessionFeeds(Session(inference.model, inference.tokenizer, streamer, system_prompt=SYSTEM,
                                     settings=settings))
    from agent.realtime.single_stream import SingleStream

    return SingleStream(Session(inference.model, inference.tokenizer, system_prompt=SYSTEM, settings=settings),
                        streamer)


def session_ttft(inference, streamer, audio: np.ndarray, chunk_samples: int, speculative: bool = False):
    """Seconds from end of speech to the first token. Speculative: the end-of-turn
    work runs during the VAD's silence window (as the engine does), so only picking
    the first token is left when the end is detected; returns (ttft, hidden work)."""
    stream = single_stream(inference, streamer, max_new_tokens=1)
    session = stream.session
    wave = torch.from_numpy(audio)
    for i in range(0, wave.numel(), chunk_samples):
        stream.feed(wave[i:i + chunk_samples])  # while the user talks: not counted
    hidden = 0.0
    synchronize(inference)
    if speculative:  # during the silence the VAD waits out
        start = time.perf_counter()
        stream.end_turn()
        synchronize(inference)
        hidden = time.perf_counter() - start
    start = time.perf_counter()  # end of speech detected
    if not speculative:
        stream.end_turn(speech_end=start)
    session.turn.times.first_token = None
    next(iter(session.reply()), None)
    return session.turn.times.first_token - start, hidden


def floor_ttft(inference, streamer, chunk_samples: int) -> float:
    """One encoder step of one chunk + the header pre-fill + one decode step."""
    from agent.realtime.llm_state import LLMState

    llm = LLMState(inference.model.language_model)
    llm.prefill_ids(list(range(3, 40)))
    after = inference.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    state = streamer.init_state()
    (state,), _ = streamer.step([state], [torch.from_numpy(speech_like(0.5, 9))])
    piece = torch.from_numpy(speech_like(chunk_samples / SR, 10))
    synchronize(inference)
    start = time.perf_counter()
    streamer.step([state], [piece])
    llm.prefill_ids(after)
    llm.decode_step(5)
    synchronize(inference)
    return time.perf_counter() - start


def ttft(args) -> None:
    from agent.realtime.baseline import offline_first_token

    chunk = max(1, args.chunk_ms // 80)
    inference, _, streamer, params = build_streaming(args)
    print(f"NEST {args.nest} streaming ({streamer.describe()}), LLM {args.llm} ({params:.0f}M params), "
          f"{describe_device(inference.model)}, {torch.get_num_threads()} threads, medians of {args.repeats}",
          flush=True)
    samples = chunk * 1280
    # warm-up: allocations and kernel selection happen on first calls
    session_ttft(inference, streamer, speech_like(1.0, 0), samples)
    session_ttft(inference, streamer, speech_like(1.0, 0), samples, speculative=True)
    offline_first_token(inference, speech_like(1.0, 0), SYSTEM)
    floor = statistics.median(floor_ttft(inference, streamer, samples) for _ in range(args.repeats))
    rows = []
    for seconds in [float(s) for s in args.seconds.split(",")]:
        audio = speech_like(seconds, int(seconds))
        sess = statistics.median(session_ttft(inference, streamer, audio, samples)[0] for _ in range(args.repeats))
        spec_runs = [session_ttft(inference, streamer, audio, samples, speculative=True) for _ in range(args.repeats)]
        spec = statistics.median(r[0] for r in spec_runs)
        hidden = statistics.median(r[1] for r in spec_runs)
        off = statistics.median(offline_first_token(inference, audio, SYSTEM)[1] for _ in range(args.repeats))
        rows.append((seconds, sess, spec, hidden, off))
        print(f"  {seconds:>5.1f} s: session {1000 * sess:7.1f} ms, speculative {1000 * spec:6.1f} ms "
              f"(+{1000 * hidden:.0f} ms in the silence), offline {1000 * off:7.1f} ms", flush=True)
    header = (f"{'utterance':>9} | {'offline ms':>10} | {'session ms':>10} {'sess/off':>8} {'sess/floor':>10} | "
              f"{'speculative ms':>14} {'spec/off':>8} {'hidden ms':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for seconds, sess, spec, hidden, off in rows:
        print(f"{seconds:>8.0f}s | {1000 * off:>10.1f} | {1000 * sess:>10.1f} {sess / off:>8.3f} {sess / floor:>10.2f} | "
              f"{1000 * spec:>14.2f} {spec / off:>8.4f} {1000 * hidden:>9.1f}")
    print(f"floor (one {chunk * 80} ms encoder step + header pre-fill + one decode step): {1000 * floor:.1f} ms")
    if len(rows) > 1:
        print(f"session longest/shortest: {rows[-1][1] / rows[0][1]:.2f}")
    print("session: end-of-turn work after the end is detected (flush + one LLM pre-fill + first token);\n"
          "speculative: that work runs in the VAD's silence window (hidden ms < silence_duration_ms), as the\n"
          "engine does, and is undone if speech resumes; offline: encode everything + pre-fill everything.")


def decode(args) -> None:
    """Aggregate decode speed with N sessions all replying: one batched forward per
    token for all of them (BatchedLLM) against one forward per session (round-robin
    on per-session caches, the old engine)."""
    from agent.realtime.llm_batch import BatchedLLM
    from agent.realtime.llm_state import LLMState

    inference, _ = build("tiny", args.llm, 4, 64, device=args.device, dtype=args.dtype, quantize=args.quantize)
    lm = inference.model.language_model
    counts = [int(n) for n in args.sessions.split(",")]
    batch = BatchedLLM(lm, slots=max(counts))
    history = list(range(3, 3 + args.positions))
    print(f"LLM {args.llm} ({sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M params, {describe_device(inference.model)}, "
          f"{args.quantize} weights), {torch.get_num_threads()} threads, {args.positions} positions of history, "
          f"medians of {args.steps} steps", flush=True)

    def median_step(run_step) -> float:
        run_step()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            run_step()
            synchronize(inference)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rows = []
    for n in counts:
        slots = [batch.open() for _ in range(n)]
        for slot in slots:
            slot.prefill_ids(history)
        batch.flush(slots)

        def batched_step():
            for slot in slots:
                slot.queue_token(5)
            batch.flush(slots)

        one = LLMState(lm)
        one.prefill_ids(history)
        batched = median_step(batched_step)
        single = median_step(lambda: one.decode_step(5))  # round-robin: n of these per token of every session
        for slot in slots:
            batch.close(slot)
        rows.append((n, batched, single * n, n / batched, 1 / single))
        print(f"  {n:>3} sessions: batched {1000 * batched:7.1f} ms/step, round-robin {1000 * single * n:7.1f} ms/round",
              flush=True)
    header = f"{'sessions':>8} | {'batched ms/step':>15} {'agg tok/s':>9} | {'round-robin ms/round':>20} {'agg tok/s':>9} | ratio"
    print("\n" + header + "\n" + "-" * len(header))
    for n, batched, rr, agg_b, agg_rr in rows:
        print(f"{n:>8} | {1000 * batched:>15.2f} {agg_b:>9.1f} | {1000 * rr:>20.2f} {agg_rr:>9.1f} | {agg_b / agg_rr:5.2f}x")


def main(argv=None) -> None:
    from agent import bench_load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ttft", help="end of speech -> first token, session vs offline")
    p.add_argument("--seconds", default="2,5,10,20")
    p.add_argument("--repeats", type=int, default=3)
    add_model_arguments(p)
    p = sub.add_parser("decode", help="aggregate decode tok/s, N replying sessions: batched vs round-robin")
    p.add_argument("--sessions", default="1,4,8,16")
    p.add_argument("--positions", type=int, default=100, help="history in each session's cache")
    p.add_argument("--steps", type=int, default=10)
    add_model_arguments(p)
    p = sub.add_parser("load", help="N real-time streams on one engine: batched LLM vs round-robin",
                       description=bench_load.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    bench_load.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_flush_denormal(True)
    if args.what == "ttft":
        ttft(args)
    elif args.what == "load":
        bench_load.load(args)
    elif args.what == "decode":
        decode(args)


if __name__ == "__main__":
    main()
