"""nestvox realtime server.

    python serve.py                       # the embedded default model on ws://127.0.0.1:8765/v1/realtime
    python serve.py --model my-ckpt --port 9000 --chunk-ms 320 --max-sessions 32 --auth-token s3cret

Every flag has an environment variable (NESTVOX_<FLAG>, e.g. NESTVOX_PORT=9000).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings

log = logging.getLogger("nestvox.serve")
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(HERE, "agent", "assets", "demo_model")
FALLBACK_MODEL = os.path.join(HERE, ".cache", "random-tiny-streaming")


def env(name: str, default):
    value = os.environ.get(f"NESTVOX_{name}")
    if value is None:
        return default
    return type(default)(value) if default is not None and not isinstance(default, bool) else value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=env("PORT", 8765), help="0 picks a free port")
    p.add_argument("--model", default=env("MODEL", None),
                   help="checkpoint folder (UltravoxModel.save_pretrained); default: the embedded demo model")
    p.add_argument("--device", default=env("DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=env("DTYPE", "float32"), choices=DTYPE_CHOICES,
                   help="model weights and activations (the log-mel front end stays float32)")
    p.add_argument("--chunk-ms", type=int, default=env("CHUNK_MS", 0),
                   help="encoder chunk in ms (multiple of 80); default: the model's trained chunk")
    p.add_argument("--left-context-ms", type=int, default=env("LEFT_CONTEXT_MS", 0),
                   help="attention left context in ms; default: the model's")
    p.add_argument("--vad-threshold", type=float, default=env("VAD_THRESHOLD", 0.5))
    p.add_argument("--silence-ms", type=int, default=env("SILENCE_MS", 500), help="silence that ends a turn")
    p.add_argument("--prefix-padding-ms", type=int, default=env("PREFIX_PADDING_MS", 300))
    p.add_argument("--suffix-padding-ms", type=int, default=env("SUFFIX_PADDING_MS", 200),
                   help="silence after the speech that stays in the turn (capped at --silence-ms)")
    p.add_argument("--instructions", default=env("INSTRUCTIONS", None), help="default system prompt")
    p.add_argument("--max-sessions", type=int, default=env("MAX_SESSIONS", 16))
    p.add_argument("--max-batch", type=int, default=env("MAX_BATCH", 32),
                   help="sessions per batched encoder step (1 = no batching)")
    p.add_argument("--llm-batching", choices=["on", "off"], default=env("LLM_BATCHING", "on"),
                   help="on: one batched LLM forward per engine tick for every session (a KV-cache slot each); "
                        "off: a batch-1 cache per session, replies decoded round-robin (the old baseline)")
    p.add_argument("--encoder-step-ms", type=float, default=env("ENCODER_STEP_MS", 640.0),
                   help="while users talk, the encoder steps every session together on a clock of this period, "
                        "in whole chunks (0: every chunk as soon as it is ready); a turn's end flushes at once")
    p.add_argument("--prefill-delay-ms", type=float, default=env("PREFILL_DELAY_MS", 1000.0),
                   help="longest a listening session's audio waits to ride along with an LLM forward that runs "
                        "anyway (decode steps, turn ends)")
    p.add_argument("--reply-tok-s", type=float, default=env("REPLY_TOK_S", 15.0),
                   help="while another caller's turn is open or on its way to a reply, decode replies at about "
                        "this many tokens/s instead of flat out (speech reads ~3-4 tok/s), leaving the engine the "
                        "headroom a turn's end needs (default 15; alone, a reply always runs flat out); 0: never paced")
    p.add_argument("--max-positions", type=int, default=env("MAX_POSITIONS", 0),
                   help="each session's LLM context budget in positions (default: the model's, at most 4096; "
                        "the KV cache of every session slot is allocated at start-up)")
    p.add_argument("--quantize", choices=["none", "int8"], default=env("QUANTIZE", "none"),
                   help="int8: dynamic int8 weights for every linear layer (CPU only; about 2.6x faster batched "
                        "decoding on a CPU, results no longer bit-equal to fp32)")
    p.add_argument("--chunk-sizes-ms", default=env("CHUNK_SIZES_MS", "80,160,320,640,1280"),
                   help="chunk sizes a session may ask for (session.update chunk_ms), built at start-up")
    p.add_argument("--speculation", choices=["on", "off"], default=env("SPECULATION", "on"),
                   help="on: a pause's end-of-turn work runs during the VAD's silence (rolled back if speech "
                        "resumes); off: after it (for comparison)")
    p.add_argument("--tts", choices=["espeak", "piper", "none"], default=env("TTS", "espeak"),
                   help="engine of spoken replies (GA output_modalities [\"audio\"]); none: text replies only")
    p.add_argument("--tts-voice", default=env("TTS_VOICE", None),
                   help="the engine's default voice (espeak-ng: en-us, en-gb, ...; piper: a speaker name)")
    p.add_argument("--piper-model", default=env("PIPER_MODEL", None),
                   help="with --tts piper: the voice file (voice.onnx, with voice.onnx.json beside it)")
    p.add_argument("--max-message-bytes", type=int, default=env("MAX_MESSAGE_BYTES", 1 << 20))
    p.add_argument("--max-turn-seconds", type=float, default=env("MAX_TURN_SECONDS", 60.0))
    p.add_argument("--idle-timeout-s", type=float, default=env("IDLE_TIMEOUT_S", 300.0))
    p.add_argument("--auth-token", default=env("AUTH_TOKEN", None), help="require this bearer token")
    p.add_argument("--allowed-origins", default=env("ALLOWED_ORIGINS", None),
                   help="comma-separated Origin allowlist for browsers (default: any)")
    p.add_argument("--require-session-update", action="store_true",
                   default=str(env("REQUIRE_SESSION_UPDATE", "")).lower() in ("1", "true", "yes"),
                   help="refuse audio before session.update")
    p.add_argument("--approximate", action="store_true",
                   default=str(env("APPROXIMATE", "")).lower() in ("1", "true", "yes"),
                   help="serve a full-context encoder (not converted with agent.training.streamify) as is: "
                        "streamed features then only approximate the offline ones")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    ray = p.add_argument_group("scale-out on Ray Serve (pip install -e .[ray]; without --replicas, no Ray)")
    ray.add_argument("--replicas", type=int, default=env("REPLICAS", 0),
                     help="serve with this many engine replicas on Ray Serve (the initial count when autoscaled)")
    ray.add_argument("--ray-address", default=env("RAY_ADDRESS", None),
                     help="join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start a local Ray")
    ray.add_argument("--min-replicas", type=int, default=env("MIN_REPLICAS", None),
                     help="autoscale by active sessions, down to this many replicas")
    ray.add_argument("--max-replicas", type=int, default=env("MAX_REPLICAS", None),
                     help="autoscale by active sessions, up to this many replicas")
    ray.add_argument("--target-sessions", type=float, default=env("TARGET_SESSIONS", 0.0),
                     help="autoscaling target of sessions per replica (default: 3/4 of --max-sessions)")
    ray.add_argument("--upscale-delay-s", type=float, default=env("UPSCALE_DELAY_S", 30.0))
    ray.add_argument("--downscale-delay-s", type=float, default=env("DOWNSCALE_DELAY_S", 600.0))
    ray.add_argument("--drain-timeout-s", type=float, default=env("DRAIN_TIMEOUT_S", 300.0),
                     help="a replica being removed waits this long for its conversations to end")
    ray.add_argument("--replica-cpus", type=float, default=env("REPLICA_CPUS", 1.0),
                     help="Ray num_cpus per replica (also its torch threads)")
    ray.add_argument("--replica-gpus", type=float, default=env("REPLICA_GPUS", 1.0),
                     help="Ray num_gpus per replica with --device cuda")
    ray.add_argument("--ray-num-cpus", type=int, default=env("RAY_NUM_CPUS", None),
                     help="CPUs of the local Ray started without --ray-address (default: the machine's)")
    return p.parse_args(argv)


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def device_and_dtype(args):
    """(torch.device, dtype name) from --device/--dtype (or NESTVOX_DEVICE/NESTVOX_DTYPE),
    or a one-line error: argparse does not check values that come from the environment."""
    from agent.ultravox.inference import resolve_device

    if args.dtype not in DTYPE_CHOICES:
        raise SystemExit(f"error: --dtype / NESTVOX_DTYPE {args.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    try:
        return resolve_device(args.device), args.dtype
    except ValueError as exc:
        raise SystemExit(f"error: --device / NESTVOX_DEVICE: {exc}") from None


def default_model() -> str:
    if os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
        return DEMO_MODEL
    if not os.path.isfile(os.path.join(FALLBACK_MODEL, "config.json")):
        from agent.ultravox.build import build_random_checkpoint

        print(f"no trained demo model at {DEMO_MODEL}: building a RANDOM-weight streaming model in "
              f"{FALLBACK_MODEL} (plumbing only, its replies are noise)", flush=True)
        build_random_checkpoint(FALLBACK_MODEL, nest="tiny", llm="tiny", streaming=True, layers="all")
    return FALLBACK_MODEL


def streaming_refusal_or_warning(model_path: str, encoder, approximate: bool) -> bool:
    """Refuse a full-context encoder with a one-line error naming both fixes, or (with
    --approximate) warn once. Returns whether streaming is approximate."""
    from agent.nest.streamable import not_streamable_reasons

    reasons = not_streamable_reasons(encoder)
    if not reasons:
        return False
    what = f"the NEST encoder of {model_path} is full-context ({', '.join(reasons)}) and cannot be streamed exactly"
    if not approximate:
        raise SystemExit(
            f"error: {what}. Either convert it: python -m agent.training.streamify --nest-model "
            f"{os.path.join(model_path, 'audio_encoder.nemo')} --out student.nemo --manifest train.jsonl, then "
            f"python -m agent.training.swap_encoder --checkpoint {model_path} --encoder student.nemo --out "
            f"{model_path.rstrip('/')}-streaming; or serve it as is with --approximate (NESTVOX_APPROXIMATE=1)")
    print(f"WARNING: {what}; serving it anyway (--approximate): streamed features only approximate the "
          f"offline ones (measure with python -m agent.nest.streaming_report)", file=sys.stderr, flush=True)
    return True


def build_server(args):
    # No global torch.set_grad_enabled here: grad mode is per thread, and the engine's
    # compute thread turns it off for itself.
    from agent.nest.streaming import StreamingNestEncoder
    from agent.realtime.config import SessionConfig
    from agent.realtime.engine import Engine
    from agent.realtime.server import RealtimeServer, ServerConfig
    from agent.realtime.turns import TurnDetectionSettings
    from agent.ultravox import UltravoxInference
    from agent.ultravox.quantize import quantize_model

    device, dtype = device_and_dtype(args)
    model_path = args.model or default_model()
    inference = UltravoxInference(model_path, device=device, data_type=dtype)
    weights = quantize_model(inference.model, args.quantize)  # before any streamer copies the encoder
    llm = "one batched forward per tick" if args.llm_batching == "on" else "round-robin, a cache per session"
    log.info("weights: %s; LLM: %s", weights, llm)
    encoder = inference.model.audio_tower
    chunk = args.chunk_ms // 80 if args.chunk_ms else None
    left = args.left_context_ms // 80 if args.left_context_ms else None
    if chunk and left is None:
        trained_left = encoder.encoder.att_context_size[0]
        left = max(chunk, (trained_left if trained_left > 0 else 64) // chunk * chunk)
    approximate = streaming_refusal_or_warning(model_path, encoder, args.approximate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if approximate else "default")  # approximate: warned once above
        streamer = StreamingNestEncoder(encoder, chunk_frames=chunk, left_context_frames=left,
                                        approximate=approximate)
    offered = [int(ms) for ms in str(args.chunk_sizes_ms).split(",") if ms.strip()]
    engine = Engine(inference.model, inference.tokenizer, streamer, max_batch=args.max_batch,
                    max_sessions=args.max_sessions, llm_batching=args.llm_batching == "on",
                    offered_chunk_ms=offered, encoder_step_ms=args.encoder_step_ms,
                    prefill_delay_ms=args.prefill_delay_ms, max_positions=args.max_positions or None,
                    speculate=args.speculation == "on", reply_tok_s=args.reply_tok_s)
    session = SessionConfig(
        instructions=args.instructions,
        turn_detection=TurnDetectionSettings(threshold=args.vad_threshold, silence_duration_ms=args.silence_ms,
                                             prefix_padding_ms=args.prefix_padding_ms,
                                             suffix_padding_ms=args.suffix_padding_ms),
        max_turn_seconds=args.max_turn_seconds,
    )
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()] if args.allowed_origins else None
    config = ServerConfig(host=args.host, port=args.port, max_sessions=args.max_sessions,
                          max_message_bytes=args.max_message_bytes, idle_timeout_s=args.idle_timeout_s,
                          auth_token=args.auth_token or None, allowed_origins=origins,
                          require_session_update=args.require_session_update, session=session,
                          tts=None if args.tts == "none" else args.tts, tts_options=tts_options(args))
    return RealtimeServer(engine, config, model_name=model_path), streamer


def tts_options(args) -> dict:
    if args.tts == "piper":
        if not args.piper_model:
            raise SystemExit("error: --tts piper needs --piper-model voice.onnx (a Piper voice file you provide)")
        return {"model": args.piper_model, **({"voice": args.tts_voice} if args.tts_voice else {})}
    return {"voice": args.tts_voice} if args.tts_voice and args.tts == "espeak" else {}


async def main_async(args) -> None:
    server, streamer = build_server(args)
    await server.start()
    print(f"nestvox listening on {server.url}  (health: http://{server.config.host}:{server.config.port}/healthz)")
    print(f"model: {server.model_name}  (encoder on {streamer.device}, {streamer.dtype})")
    print(f"encoder: {streamer.describe()}")
    print(f"spoken replies: {server.tts.engine if server.tts is not None else 'off (text replies only)'}", flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    print("shutting down", flush=True)
    await server.stop()


def run_on_ray(args) -> None:
    """--replicas N: the same engine in N Ray Serve replicas (agent/realtime/ray_serve.py)."""
    import importlib.util

    if args.replicas < 1:
        raise SystemExit(f"error: --replicas must be >= 1, got {args.replicas}")
    if any(importlib.util.find_spec(m) is None for m in ("ray", "fastapi")) or \
            importlib.util.find_spec("ray.serve") is None:
        raise SystemExit("error: --replicas needs Ray Serve, which is not installed: pip install -e .[ray]")
    device_and_dtype(args)  # a bad --device/--dtype fails here, not in every replica
    from agent.realtime.ray_serve import run

    run(args)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("nemo_logger", "websockets.server", "nv_one_logger"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.replicas:
        return run_on_ray(args)
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
