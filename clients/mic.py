"""Talk to a nestvox server from the microphone.

    python clients/mic.py                                  # default input device, ws://127.0.0.1:8765/v1/realtime
    python clients/mic.py --list-devices
    python clients/mic.py --device 3 --url ws://host:8765/v1/realtime --token s3cret
    python clients/mic.py --device "USB" --seconds 60 --instructions "Answer in one sentence."

Captures 16 kHz mono int16 (sounddevice InputStream; --rate for a device that
cannot do 16 kHz, and the server resamples) in --block-ms blocks and streams
them continuously as binary PCM16 frames. The capture rate is declared in the
GA session.update (audio.input.format {"type": "audio/pcm", "rate"}; the GA
session's own rate is 24 kHz). The server's VAD finds the turns; replies
(response.output_text.delta) are printed as they arrive, with the latency of
each turn. Ctrl-C (or --seconds) ends the call and prints
the latency percentiles over its turns.

Exit codes: 0 done, 1 server problem (unreachable, refused, error), 2 no usable
microphone (no input device, PortAudio missing, device cannot open).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import List, Optional

if __package__ in (None, ""):  # run as `python clients/mic.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    MODEL_RATE,
    TEXT_DELTA,
    ClientError,
    TurnResult,
    add_connection_args,
    connect,
    describe_error,
    describe_session,
    error_of,
    printable,
    setup_stdout,
    summary_table,
    token_from,
)

NO_MIC_EXIT = 2


class NoInputDevice(ClientError):
    """No microphone to record from; the command line exits with code 2."""

    code = "no_input_device"


def load_sounddevice():
    """Import sounddevice; a missing PortAudio library or package becomes NoInputDevice."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError('PortAudio library not found') at import
        raise NoInputDevice(f"PortAudio is not available ({exc}): install it (Debian/Ubuntu: apt-get install "
                            f"libportaudio2; macOS: brew install portaudio), or stream a recording with "
                            f"clients/file.py") from None
    except ImportError as exc:
        raise NoInputDevice(f"the sounddevice package is missing ({exc}): pip install sounddevice") from None
    return sounddevice


def parse_device(value: Optional[str]):
    """--device: an index ("3") or part of a device name ("USB")."""
    if value is None or value == "":
        return None
    return int(value) if value.strip().lstrip("-").isdigit() else value


def find_input_device(device=None, sd=None) -> dict:
    """The input device to record from (sounddevice's device dict), or NoInputDevice
    with a message that says what is missing and what to do."""
    sd = sd or load_sounddevice()
    which = f"input device {device!r}" if device is not None else "a default input device"
    try:
        info = sd.query_devices(device, kind="input")
    except (sd.PortAudioError, ValueError, OSError) as exc:
        raise NoInputDevice(f"no microphone: cannot find {which} ({exc}). See the devices with "
                            f"`python clients/mic.py --list-devices`, or stream a recording with "
                            f"clients/file.py") from None
    if not isinstance(info, dict) or int(info.get("max_input_channels", 0)) < 1:
        raise NoInputDevice(f"no microphone: {which} has no input channels; see --list-devices")
    return info


def describe_turn(result: TurnResult) -> str:
    lat, cli = result.latency_ms, result.client_ms

    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"

    return (f"[{result.status}: end of speech -> first token {ms(lat.get('speech_end_to_first_token'))} "
            f"(encoder done {ms(lat.get('speech_end_to_encoder_done'))}), last token "
            f"{ms(lat.get('speech_end_to_last_token'))}; here: speech_stopped -> first delta "
            f"{ms(cli.get('speech_stopped_to_first_delta'))}]")


async def run_mic(url: str, *, token: Optional[str] = None, device=None, rate: int = MODEL_RATE,
                  block_ms: float = 20.0,
                  chunk_ms: Optional[int] = None, instructions: Optional[str] = None,
                  seconds: Optional[float] = None, max_turns: Optional[int] = None,
                  turns: Optional[List[TurnResult]] = None, sd=None, out=None) -> List[TurnResult]:
    """Stream the microphone until cancelled, `seconds` pass or `max_turns` replies are done;
    every finished turn is appended to `turns` (and returned)."""
    out = out or sys.stdout
    sd = sd or load_sounddevice()
    turns = [] if turns is None else turns
    conn = await connect(url, token)
    async with conn:
        update = {}
        if rate != conn.rate:
            update["rate"] = rate
        if chunk_ms is not None:
            update["chunk_ms"] = chunk_ms
        if instructions is not None:
            update["instructions"] = instructions
        if update:
            await conn.update(**update)
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue = asyncio.Queue()
        overflows = [0]

        def callback(indata, frames, when, status):  # PortAudio's thread
            if status:
                overflows[0] += 1
            loop.call_soon_threadsafe(blocks.put_nowait, indata.tobytes())

        try:
            stream = sd.InputStream(samplerate=rate, channels=1, dtype="int16", device=device, callback=callback,
                                    blocksize=max(1, int(rate * block_ms / 1000)))
        except (sd.PortAudioError, ValueError, OSError) as exc:
            raise NoInputDevice(f"cannot open the microphone at {rate} Hz mono ({exc}); try --rate 48000 or "
                                f"another --device (see --list-devices)") from None

        async def send() -> None:
            while True:
                await conn.send_audio(await blocks.get())

        print(f"connected to {conn.url}: {describe_session(conn.session)}; talk (Ctrl-C ends)", file=out, flush=True)
        sender = asyncio.create_task(send())
        current = TurnResult()
        stop_at = None if seconds is None else time.monotonic() + seconds
        try:
            with stream:
                while True:
                    if sender.done():
                        sender.result()  # raises the send failure
                    wait = 0.25 if stop_at is None else min(0.25, stop_at - time.monotonic())
                    if wait <= 0:
                        break
                    try:
                        event = await conn.recv_event(wait)
                    except ClientError as exc:
                        if getattr(exc, "code", "") == "timeout":
                            continue
                        raise
                    kind = event.get("type")
                    if kind in TEXT_DELTA:
                        print(printable(event.get("delta", "")), end="", file=out, flush=True)
                    elif kind == "input_audio_buffer.speech_started":
                        print("[listening]", file=out, flush=True)
                    elif kind == "response.created":
                        print("assistant: ", end="", file=out, flush=True)
                    elif kind == "error":
                        print(f"\n[server error {describe_error(error_of(event))}]", file=out, flush=True)
                    if current.observe(event, time.perf_counter(), conn.sent_at) == "done":
                        print("\n" + describe_turn(current), file=out, flush=True)
                        turns.append(current)
                        current = TurnResult()
                        if max_turns is not None and len(turns) >= max_turns:
                            break
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass
        if overflows[0]:
            print(f"[{overflows[0]} audio blocks overflowed: this machine dropped microphone audio]", file=out)
    return turns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--device", default=None, help="input device index or part of its name (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="print the audio devices and exit")
    p.add_argument("--rate", type=int, default=MODEL_RATE,
                   help=f"capture rate in Hz, declared to the server (default {MODEL_RATE}, the model's)")
    p.add_argument("--block-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--chunk-ms", type=int, default=None, help="encoder chunk for this session (multiple of 80)")
    p.add_argument("--instructions", default=None, help="system prompt for this session")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--turns", type=int, default=None, help="stop after this many replies (default: Ctrl-C)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    device = parse_device(args.device)
    turns: List[TurnResult] = []
    try:
        sd = load_sounddevice()
        if args.list_devices:
            try:
                devices = sd.query_devices()
            except (sd.PortAudioError, OSError) as exc:
                raise NoInputDevice(f"cannot list audio devices: {exc}") from None
            if len(devices) == 0:
                print("PortAudio found no audio devices on this machine", file=sys.stderr)
                return NO_MIC_EXIT
            print(devices)
            return 0
        find_input_device(device, sd)
        asyncio.run(run_mic(args.url, token=token_from(args), device=device, rate=args.rate,
                            block_ms=args.block_ms, chunk_ms=args.chunk_ms, instructions=args.instructions,
                            seconds=args.seconds, max_turns=args.turns, turns=turns, sd=sd))
    except NoInputDevice as exc:
        print(f"mic.py: {exc}", file=sys.stderr)
        return NO_MIC_EXIT
    except ClientError as exc:
        print(f"mic.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    if turns:
        print(summary_table(turns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
