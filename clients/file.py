"""Stream a wav file to a nestvox server as one user turn and print the reply.

    python clients/file.py question.wav                       # real time, server VAD ends the turn
    python clients/file.py question.wav --speed 0 --manual    # as fast as possible, commit + response.create
    python clients/file.py question.wav --url ws://host:8765/v1/realtime --token s3cret --json
    python clients/file.py --text "turn on the lights"        # a typed turn (no audio)
    python clients/file.py question.wav --audio --voice en-gb --voice-speed 1.2   # a spoken reply
    python clients/file.py question.wav --save-reply reply.wav                   # ... written to a wav

The file may have any rate and channel count: it is mixed to mono and resampled
(soxr) to --rate, 16 kHz (the model's rate) unless asked otherwise; the rate is
declared in the GA session.update (audio.input.format {"type": "audio/pcm",
"rate"}) when it is not the session's (24 kHz, GA's PCM rate). It is sent as
binary PCM16 packets of --packet-ms, paced at --speed x real time, then
followed by silence so that the server's VAD ends the turn (or, with --manual,
by input_audio_buffer.commit and response.create). The reply is printed as it
arrives (response.output_text.delta), then the latency table (server figures
from response.done, client figures on this machine's clock: see
clients/common.py for their exact definitions).

--text sends a typed user turn instead: conversation.item.create with an
input_text message, then response.create, on the same kind of session.

--audio asks for a spoken reply (session.update: output_modalities ["audio"],
audio.output {format {"type": "audio/pcm", "rate": --output-rate (24000)}, voice
--voice, speed --voice-speed}; --speed stays the pacing of the file). The reply's
transcript (response.output_audio_transcript.delta) is printed as it arrives, then
its audio length, and the latency table gains the first-audio rows (server
speech_end_to_first_audio, client end_to_first_audio). --save-reply out.wav (implies
--audio) writes the reply's audio (the response.output_audio.delta PCM16, decoded
and joined) as a mono 16-bit wav at the output rate. The file client does not play
the audio.

Importable: `result = await stream_file(url, "question.wav", speed=0)` (or
`await send_text(url, "turn on the lights")`) returns a TurnResult with `.text`
(the reply), `.done` (the response.done event), `.latency_ms`, `.client_ms` and
`.events`; with `audio=True` also `.audio_pcm` (PCM16 at `.output_rate`),
`.transcript` and `.audio_seconds`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Callable, Optional

if __package__ in (None, ""):  # run as `python clients/file.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    DEFAULT_URL,
    MODEL_RATE,
    OUTPUT_RATE,
    UNSET,
    ClientError,
    Connection,
    TurnResult,
    add_connection_args,
    connect,
    describe_error,
    describe_session,
    error_of,
    printable,
    read_audio,
    reply_audio,
    run_text_turn,
    run_turn,
    setup_stdout,
    token_from,
    turn_latency_table,
    write_wav,
)


async def configure(conn: Connection, on_event: Optional[Callable[[dict], None]] = None, **fields) -> dict:
    """session.update with the given fields (common.session_update) unless there are none;
    reports session.created (and session.updated) to `on_event`."""
    if on_event is not None:
        on_event({"type": "session.created", "session": conn.session})
    fields = {k: v for k, v in fields.items() if v is not None and v is not UNSET}
    if fields.get("rate") == conn.rate:
        del fields["rate"]
    if not fields:
        return conn.session
    session = await conn.update(**fields)
    if on_event is not None:
        on_event({"type": "session.updated", "session": session})
    return session


async def stream_file(url: str, path: str, *, token: Optional[str] = None, rate: Optional[int] = MODEL_RATE,
                      speed: float = 1.0, packet_ms: float = 20.0, manual: bool = False,
                      chunk_ms: Optional[int] = None, instructions: Optional[str] = None,
                      max_output_tokens: Optional[int] = None,
                      trailing_silence_ms: Optional[float] = None, json_audio: bool = False,
                      audio: bool = False, voice: Optional[str] = None, voice_speed: Optional[float] = None,
                      output_rate: Optional[int] = None,
                      on_event: Optional[Callable[[dict], None]] = None, timeout: float = 60.0) -> TurnResult:
    """Stream `path` as one turn; returns the TurnResult (`.text`, `.done`). Raises ClientError.
    `rate`: the rate to send at (16 kHz by default, declared in session.update; None: the session's).
    `audio`: ask for a spoken reply (voice, voice_speed, output_rate: audio.output; see reply_audio)."""
    if speed < 0:
        raise ClientError(f"speed must be >= 0 (0: as fast as possible), got {speed}")
    if packet_ms <= 0:
        raise ClientError(f"packet_ms must be > 0, got {packet_ms}")
    conn = await connect(url, token)
    async with conn:
        await configure(conn, on_event, rate=rate, manual=True if manual else None, chunk_ms=chunk_ms,
                        instructions=instructions, max_output_tokens=max_output_tokens,
                        **_reply_fields(audio, voice, voice_speed, output_rate))
        audio = read_audio(path, conn.rate)
        return await run_turn(conn, audio, packet_ms=packet_ms, speed=speed, trailing_silence_ms=trailing_silence_ms,
                              as_json=json_audio, on_event=on_event, timeout=timeout)


async def send_text(url: str, text: str, *, token: Optional[str] = None, chunk_ms: Optional[int] = None,
                    instructions: Optional[str] = None, max_output_tokens: Optional[int] = None,
                    audio: bool = False, voice: Optional[str] = None, voice_speed: Optional[float] = None,
                    output_rate: Optional[int] = None,
                    on_event: Optional[Callable[[dict], None]] = None, timeout: float = 60.0) -> TurnResult:
    """One typed turn (conversation.item.create + response.create); returns the TurnResult.
    `audio`: a spoken reply (as in stream_file)."""
    if not text.strip():
        raise ClientError("the typed turn is empty")
    conn = await connect(url, token)
    async with conn:
        await configure(conn, on_event, chunk_ms=chunk_ms, instructions=instructions,
                        max_output_tokens=max_output_tokens, **_reply_fields(audio, voice, voice_speed, output_rate))
        return await run_text_turn(conn, text, on_event=on_event, timeout=timeout)


def _reply_fields(audio: bool, voice: Optional[str], voice_speed: Optional[float],
                  output_rate: Optional[int]) -> dict:
    """session.update fields for a spoken reply (none for a written one: the session's default)."""
    if not audio:
        return {}
    return reply_audio(voice=voice, speed=voice_speed, rate=output_rate or OUTPUT_RATE)


def save_reply(result: TurnResult, path: str) -> str:
    """Write the reply's audio (PCM16 at its output rate) as a mono wav; ClientError when it has none."""
    if not result.audio_chunks:
        raise ClientError(f"the reply has no audio to write to {path} (did the server speak? status "
                          f"{result.status})")
    return write_wav(path, result.audio_pcm, result.output_rate)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wav", nargs="?", help="audio file (wav, flac, ogg: any rate, any channels); not with --text")
    p.add_argument("url_pos", nargs="?", metavar="URL", help=f"server URL (same as --url; default {DEFAULT_URL})")
    add_connection_args(p)
    p.add_argument("--speed", type=float, default=1.0, help="x real time; 0 = as fast as possible (default 1.0)")
    p.add_argument("--packet-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--rate", type=int, default=MODEL_RATE,
                   help=f"send at this rate (audio.input.format.rate in session.update; default {MODEL_RATE}, "
                   "the model's; 24000 is the GA session's own)")
    p.add_argument("--text", default=None, help="send this typed user turn (conversation.item.create + "
                   "response.create) instead of a file")
    p.add_argument("--manual", action="store_true", help="manual turns: commit + response.create, no server VAD")
    p.add_argument("--chunk-ms", type=int, default=None, help="encoder chunk for this session (multiple of 80)")
    p.add_argument("--instructions", default=None, help="system prompt for this session")
    p.add_argument("--max-output-tokens", type=int, default=None, help="reply length limit for this session")
    p.add_argument("--trailing-silence-ms", type=float, default=None,
                   help="silence after the file in VAD mode (default: silence_duration_ms + 300)")
    p.add_argument("--json-audio", action="store_true",
                   help="send input_audio_buffer.append JSON events (base64) instead of binary frames")
    p.add_argument("--audio", action="store_true", help="ask for a spoken reply (output_modalities [\"audio\"])")
    p.add_argument("--save-reply", metavar="OUT.wav", default=None,
                   help="write the spoken reply to this wav at the output rate (implies --audio)")
    p.add_argument("--voice", default=None, help="voice of the spoken reply (an espeak-ng voice such as en-us, "
                   "en-gb; OpenAI names mean the default voice); implies --audio")
    p.add_argument("--voice-speed", type=float, default=None,
                   help="speaking rate of the spoken reply (1.0 normal, 0.25..1.5); implies --audio")
    p.add_argument("--output-rate", type=int, default=None,
                   help=f"rate of the spoken reply's PCM16 (default {OUTPUT_RATE}); implies --audio")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for response.done (default 60)")
    p.add_argument("--json", action="store_true",
                   help="print every server event as one JSON line (and a final client.summary line) instead")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    if args.text is not None and args.wav is not None and args.url_pos is None and not os.path.isfile(args.wav):
        args.wav, args.url_pos = None, args.wav  # `file.py --text "..." ws://host:port`
    url = args.url_pos or args.url
    if (args.text is None) == (args.wav is None):
        print("file.py: give an audio file or --text, not both" if args.wav else
              "file.py: give an audio file (or --text \"...\" for a typed turn)", file=sys.stderr)
        return 2
    if args.wav is not None and not os.path.isfile(args.wav):
        print(f"file.py: no such file: {args.wav}", file=sys.stderr)
        return 2
    audio = bool(args.audio or args.save_reply or args.voice or args.voice_speed is not None
                 or args.output_rate is not None)
    if args.save_reply and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_reply))):
        print(f"file.py: cannot write {args.save_reply}: no such folder", file=sys.stderr)
        return 2
    chunks = [0]

    def on_event(event: dict) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
            return
        kind = event["type"]
        if kind in ("session.created", "session.updated"):
            print(f"{kind}: {describe_session(event['session'])}", flush=True)
        elif kind == "input_audio_buffer.speech_started":
            print(f"[speech started at {event.get('audio_start_ms')} ms]", flush=True)
        elif kind == "input_audio_buffer.speech_stopped":
            print(f"[speech stopped at {event.get('audio_end_ms')} ms]", flush=True)
        elif kind == "response.created":
            print("assistant: ", end="", flush=True)
        elif kind in ("response.output_text.delta", "response.output_audio_transcript.delta"):
            print(printable(event.get("delta", "")), end="", flush=True)
        elif kind == "response.output_audio.delta":
            chunks[0] += 1
        elif kind == "response.done":
            r = event["response"]
            reason = (r.get("status_details") or {}).get("reason")
            print(f"\n[response {r.get('status')}{' (' + reason + ')' if reason else ''}, "
                  f"{(r.get('usage') or {}).get('output_tokens')} tokens]", flush=True)
        elif kind == "conversation.item.truncated":
            print(f"\n[assistant item truncated at {event.get('audio_end_ms')} ms]", flush=True)
        elif kind == "error":  # the turn fails on it; the message follows on stderr
            print(f"\n[server error {describe_error(error_of(event))}]", flush=True)

    speed_text = "as fast as possible" if args.speed == 0 else f"{args.speed:g}x real time"
    if not args.json:
        print(f"sending a typed turn to {url}" if args.text is not None else
              f"streaming {args.wav} to {url} ({speed_text}, {args.packet_ms:g} ms packets)", flush=True)
    try:
        if args.text is not None:
            result = asyncio.run(send_text(
                url, args.text, token=token_from(args), chunk_ms=args.chunk_ms, instructions=args.instructions,
                max_output_tokens=args.max_output_tokens, audio=audio, voice=args.voice,
                voice_speed=args.voice_speed, output_rate=args.output_rate, on_event=on_event,
                timeout=args.timeout))
        else:
            result = asyncio.run(stream_file(
                url, args.wav, token=token_from(args), rate=args.rate, speed=args.speed, packet_ms=args.packet_ms,
                manual=args.manual, chunk_ms=args.chunk_ms, instructions=args.instructions,
                max_output_tokens=args.max_output_tokens, trailing_silence_ms=args.trailing_silence_ms,
                json_audio=args.json_audio, audio=audio, voice=args.voice, voice_speed=args.voice_speed,
                output_rate=args.output_rate, on_event=on_event, timeout=args.timeout))
        if args.save_reply:
            save_reply(result, args.save_reply)
    except ClientError as exc:
        print(f"file.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        summary = {"type": "client.summary", "text": result.text, "latency_ms": result.latency_ms,
                   "client_ms": result.client_ms, "audio_ms": round(result.audio_ms, 1)}
        if audio:
            summary.update(transcript=result.transcript, reply_audio_s=round(result.audio_seconds, 3),
                           output_rate=result.output_rate, audio_chunks=len(result.audio_chunks),
                           saved=args.save_reply)
        print(json.dumps(summary), flush=True)
    else:
        if audio:
            print(f"[spoken reply: {result.audio_seconds:.2f} s of audio at {result.output_rate} Hz in "
                  f"{len(result.audio_chunks)} chunks" + (f", written to {args.save_reply}" if args.save_reply
                                                         else "") + "]")
        print(turn_latency_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
