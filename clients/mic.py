"""Talk to a nestvox server from the microphone, and hear its spoken replies.

    python clients/mic.py                                  # default devices, ws://127.0.0.1:8765/v1/realtime
    python clients/mic.py --list-devices
    python clients/mic.py --device 3 --url ws://host:8765/v1/realtime --token s3cret
    python clients/mic.py --device "USB" --seconds 60 --instructions "Answer in one sentence."
    python clients/mic.py --full-duplex --voice en-gb      # a headset: talk over the reply (barge-in)
    python clients/mic.py --text-only                      # written replies only

Captures 16 kHz mono int16 (sounddevice InputStream; --rate for a device that
cannot do 16 kHz, and the server resamples) in --block-ms blocks and streams
them continuously as binary PCM16 frames. The capture rate is declared in the
GA session.update (audio.input.format {"type": "audio/pcm", "rate"}; the GA
session's own rate is 24 kHz). The server's VAD finds the turns. Ctrl-C (or
--seconds) ends the call and prints the latency percentiles over its turns.

Spoken replies (the default when there is an output device; --audio insists on
one, --text-only turns them off): the session.update asks for output_modalities
["audio"] at --output-rate (24 kHz) with --voice / --voice-speed. The reply's
response.output_audio.delta PCM16 goes into a queue that a sounddevice
OutputStream (PortAudio's thread) plays back to back; its transcript
(response.output_audio_transcript.delta) is printed as it arrives. Each turn's
line shows end of speech -> first audio (server and client clocks).

Barge-in: when the server's VAD hears the user while a reply is still playing
(input_audio_buffer.speech_started), playback stops at once (the queue is
dropped, the rest of that reply's late deltas too) and the client sends
conversation.item.truncate {item_id, content_index 0, audio_end_ms: the ms of
that item's audio handed to the device}, so the server keeps in the
conversation only what was heard (it answers conversation.item.truncated).

Echo policy: HALF DUPLEX by default. A speaker next to the microphone would
feed the reply back to the server's VAD, which would hear it as the user
talking and cut the reply off (or answer itself). So while a reply plays, and
for --echo-tail-ms (250 ms) after its last sample, the microphone blocks sent
are replaced by silence of the same length (the stream stays continuous and
in time). The cost: you cannot interrupt the reply by talking over it. With a
headset (or an OS echo canceller, such as PipeWire's echo-cancel module),
pass --full-duplex: the microphone is sent as it is during playback, the
server's VAD hears you, and barge-in works as above.

Exit codes: 0 done, 1 server problem (unreachable, refused, error), 2 no usable
microphone (no input device, PortAudio missing, device cannot open), or no
speaker when --audio asks for one.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import threading
import time
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

if __package__ in (None, ""):  # run as `python clients/mic.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clients.common import (  # noqa: E402
    MODEL_RATE,
    OUTPUT_RATE,
    TEXT_DELTA,
    TRANSCRIPT_DELTA,
    ClientError,
    TurnResult,
    add_connection_args,
    connect,
    describe_error,
    describe_session,
    error_of,
    printable,
    reply_audio,
    setup_stdout,
    summary_table,
    token_from,
)

NO_MIC_EXIT = 2
ECHO_TAIL_MS = 250.0


class NoInputDevice(ClientError):
    """No microphone to record from; the command line exits with code 2."""

    code = "no_input_device"


class NoOutputDevice(NoInputDevice):
    """--audio, and no speaker to play the replies on; the command line exits with code 2."""

    code = "no_output_device"


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


def find_output_device(device=None, sd=None) -> dict:
    """The output device to play replies on, or NoOutputDevice (what is missing, what to do)."""
    sd = sd or load_sounddevice()
    which = f"output device {device!r}" if device is not None else "a default output device"
    try:
        info = sd.query_devices(device, kind="output")
    except (sd.PortAudioError, ValueError, OSError) as exc:
        raise NoOutputDevice(f"no speaker: cannot find {which} ({exc}). See the devices with "
                             f"`python clients/mic.py --list-devices`, or pass --text-only") from None
    if not isinstance(info, dict) or int(info.get("max_output_channels", 0)) < 1:
        raise NoOutputDevice(f"no speaker: {which} has no output channels; see --list-devices, or pass --text-only")
    return info


class Player:
    """The replies' audio: PCM16 chunks queued by the event loop, played back to back by a
    sounddevice OutputStream whose callback (PortAudio's thread) takes them from the queue.

    `feed(item_id, pcm)` queues a chunk of an assistant item; `stop()` drops everything
    queued at once (barge-in) and says which item was cut and how much of it had been
    played (ms handed to the device). `played_ms(item_id)` counts samples handed out."""

    def __init__(self, rate: int = OUTPUT_RATE):
        self.rate = rate
        self.lock = threading.Lock()
        self.queue: Deque[Tuple[str, memoryview]] = collections.deque()
        self.queued = 0  # samples waiting
        self.played: Dict[str, int] = {}  # item id -> samples handed to the device
        self.last_sample_at = 0.0  # monotonic time the last queued sample went out

    def feed(self, item_id: str, pcm: bytes) -> None:
        if len(pcm) < 2:
            return
        with self.lock:
            self.queue.append((item_id, memoryview(pcm[: len(pcm) // 2 * 2])))
            self.queued += len(pcm) // 2
            self.played.setdefault(item_id, 0)

    def callback(self, outdata, frames, time_info, status) -> None:  # PortAudio's thread
        out = outdata.reshape(-1).view(np.uint8)  # int16 (frames, 1) -> its bytes, in place
        need = frames * 2
        pos = 0
        with self.lock:
            while pos < need and self.queue:
                item, chunk = self.queue[0]
                take = min(len(chunk), need - pos)
                out[pos:pos + take] = np.frombuffer(chunk[:take], dtype=np.uint8)
                self.played[item] = self.played.get(item, 0) + take // 2
                pos += take
                if take == len(chunk):
                    self.queue.popleft()
                else:
                    self.queue[0] = (item, chunk[take:])
            self.queued -= pos // 2
            if pos:  # the block leaves the device about one block from now
                self.last_sample_at = time.monotonic() + frames / self.rate
        if pos < need:
            out[pos:need] = 0

    @property
    def playing(self) -> bool:
        """Audio queued, or the last of it still in the device."""
        return self.queued > 0 or time.monotonic() < self.last_sample_at

    def audible(self, tail_s: float) -> bool:
        """Playing, or stopped less than `tail_s` ago (the room's and the device's echo tail)."""
        return self.queued > 0 or time.monotonic() < self.last_sample_at + tail_s

    def played_ms(self, item_id: str) -> float:
        return 1000.0 * self.played.get(item_id, 0) / self.rate

    def stop(self) -> Optional[Tuple[str, float]]:
        """Drop everything queued. Returns (item_id, played ms) of the item that was cut while it
        still had audio to play, or None when nothing was left (the reply had been heard whole)."""
        with self.lock:
            cut = self.queue[0][0] if self.queue else None
            self.queue.clear()
            self.queued = 0
            self.last_sample_at = min(self.last_sample_at, time.monotonic())
        return None if cut is None else (cut, self.played_ms(cut))


def describe_turn(result: TurnResult) -> str:
    lat, cli = result.latency_ms, result.client_ms

    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"

    audio = ""
    if result.spoken or lat.get("speech_end_to_first_audio") is not None:
        audio = (f", first audio {ms(lat.get('speech_end_to_first_audio'))} ({result.audio_seconds:.1f} s "
                 f"of speech)")
    here = (f"speech_stopped -> first audio {ms(cli.get('speech_stopped_to_first_audio'))}" if result.spoken
            else f"speech_stopped -> first delta {ms(cli.get('speech_stopped_to_first_delta'))}")
    return (f"[{result.status}: end of speech -> first token {ms(lat.get('speech_end_to_first_token'))} "
            f"(encoder done {ms(lat.get('speech_end_to_encoder_done'))}), last token "
            f"{ms(lat.get('speech_end_to_last_token'))}{audio}; here: {here}]")


async def run_mic(url: str, *, token: Optional[str] = None, device=None, rate: int = MODEL_RATE,
                  block_ms: float = 20.0,
                  chunk_ms: Optional[int] = None, instructions: Optional[str] = None,
                  seconds: Optional[float] = None, max_turns: Optional[int] = None,
                  turns: Optional[List[TurnResult]] = None, sd=None, out=None,
                  audio: bool = False, output_device=None, voice: Optional[str] = None,
                  voice_speed: Optional[float] = None, output_rate: int = OUTPUT_RATE,
                  full_duplex: bool = False, echo_tail_ms: float = ECHO_TAIL_MS,
                  barge_ins: Optional[List[dict]] = None, stats: Optional[dict] = None) -> List[TurnResult]:
    """Stream the microphone until cancelled, `seconds` pass or `max_turns` replies are done;
    every finished turn is appended to `turns` (and returned). `audio`: spoken replies played
    on `output_device` (half duplex unless `full_duplex`); every barge-in is appended to
    `barge_ins` ({item_id, audio_end_ms, truncated: the server's answer or None}). `stats`
    (a dict) receives "player" (the Player) and "muted_blocks" (mic blocks sent as silence)."""
    out = out or sys.stdout
    sd = sd or load_sounddevice()
    turns = [] if turns is None else turns
    barge_ins = [] if barge_ins is None else barge_ins
    conn = await connect(url, token)
    async with conn:
        update = {}
        if rate != conn.rate:
            update["rate"] = rate
        if chunk_ms is not None:
            update["chunk_ms"] = chunk_ms
        if instructions is not None:
            update["instructions"] = instructions
        if audio:
            update.update({k: v for k, v in reply_audio(voice=voice, speed=voice_speed, rate=output_rate).items()
                           if v is not None})
        if update:
            await conn.update(**update)
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue = asyncio.Queue()
        overflows = [0]
        player = Player(conn.output_rate) if audio else None
        tail_s = echo_tail_ms / 1000.0
        muted = [0]  # blocks replaced by silence (half duplex)
        if stats is not None:
            stats["player"] = player

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
        speaker = None
        if player is not None:
            try:
                speaker = sd.OutputStream(samplerate=player.rate, channels=1, dtype="int16", device=output_device,
                                          callback=player.callback,
                                          blocksize=max(1, int(player.rate * block_ms / 1000)))
            except (sd.PortAudioError, ValueError, OSError) as exc:
                raise NoOutputDevice(f"cannot open the speaker at {player.rate} Hz mono ({exc}); try another "
                                     f"--output-device (see --list-devices), or --text-only") from None

        async def send() -> None:
            while True:
                block = await blocks.get()
                if player is not None and not full_duplex and player.audible(tail_s):
                    block = bytes(len(block))  # half duplex: the reply is playing, the mic hears it
                    muted[0] += 1
                await conn.send_audio(block)

        policy = "" if player is None else (", replies spoken (full duplex: talk over them to interrupt)"
                                            if full_duplex else ", replies spoken (half duplex: the mic is muted "
                                            "while they play)")
        print(f"connected to {conn.url}: {describe_session(conn.session)}{policy}; talk (Ctrl-C ends)",
              file=out, flush=True)
        sender = asyncio.create_task(send())
        current = TurnResult(output_rate=conn.output_rate)
        cut_items = set()  # items stopped by a barge-in: their late audio is not played
        pending: Dict[str, dict] = {}  # item id -> its barge-in record, until conversation.item.truncated
        stop_at = None if seconds is None else time.monotonic() + seconds
        try:
            with stream:
                if speaker is not None:
                    speaker.__enter__()
                try:
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
                        observed = current.observe(event, time.perf_counter(), conn.sent_at)
                        if observed == "audio":
                            item = event.get("item_id") or current.item_id or ""
                            if player is not None and item not in cut_items:
                                player.feed(item, current.audio_chunks[-1])
                        elif kind in TEXT_DELTA or kind in TRANSCRIPT_DELTA:
                            print(printable(event.get("delta", "")), end="", file=out, flush=True)
                        elif kind == "input_audio_buffer.speech_started":
                            cut = player.stop() if player is not None else None
                            if cut is not None:
                                item, played = cut
                                cut_items.add(item)
                                record = {"item_id": item, "audio_end_ms": int(played), "truncated": None}
                                barge_ins.append(record)
                                pending[item] = record
                                await conn.send_event({"type": "conversation.item.truncate", "item_id": item,
                                                       "content_index": 0, "audio_end_ms": int(played)})
                                print(f"\n[barge-in: reply stopped after {played:.0f} ms of audio]", file=out,
                                      flush=True)
                            print("[listening]", file=out, flush=True)
                        elif kind == "conversation.item.truncated":
                            record = pending.pop(event.get("item_id"), None)
                            if record is not None:
                                record["truncated"] = event
                        elif kind == "response.created":
                            print("assistant: ", end="", file=out, flush=True)
                        elif kind == "error":
                            print(f"\n[server error {describe_error(error_of(event))}]", file=out, flush=True)
                        if observed == "done":
                            print("\n" + describe_turn(current), file=out, flush=True)
                            turns.append(current)
                            current = TurnResult(output_rate=conn.output_rate)
                            if max_turns is not None and len(turns) >= max_turns:
                                if player is not None:  # let the last reply be heard to its end
                                    limit = time.monotonic() + player.queued / player.rate + 1.0
                                    while player.playing and time.monotonic() < limit:
                                        await asyncio.sleep(0.02)
                                break
                finally:
                    if speaker is not None:
                        speaker.__exit__(None, None, None)
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass
        if stats is not None:
            stats["muted_blocks"] = muted[0]
        if overflows[0]:
            print(f"[{overflows[0]} audio blocks overflowed: this machine dropped microphone audio]", file=out)
    return turns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--device", default=None, help="input device index or part of its name (see --list-devices)")
    p.add_argument("--output-device", default=None, help="output device for spoken replies (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="print the audio devices and exit")
    p.add_argument("--rate", type=int, default=MODEL_RATE,
                   help=f"capture rate in Hz, declared to the server (default {MODEL_RATE}, the model's)")
    p.add_argument("--block-ms", type=float, default=20.0, help="audio per websocket frame (default 20)")
    p.add_argument("--chunk-ms", type=int, default=None, help="encoder chunk for this session (multiple of 80)")
    p.add_argument("--instructions", default=None, help="system prompt for this session")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--turns", type=int, default=None, help="stop after this many replies (default: Ctrl-C)")
    replies = p.add_mutually_exclusive_group()
    replies.add_argument("--audio", action="store_true", default=None,
                         help="spoken replies, played on the output device (the default when there is one; "
                         "exit code 2 when there is none)")
    replies.add_argument("--text-only", action="store_true", help="written replies only, nothing played")
    p.add_argument("--voice", default=None, help="voice of the spoken replies (an espeak-ng voice: en-us, en-gb, "
                   "...; OpenAI names mean the default voice)")
    p.add_argument("--voice-speed", type=float, default=None, help="speaking rate of the replies (1.0 normal)")
    p.add_argument("--output-rate", type=int, default=OUTPUT_RATE,
                   help=f"rate of the spoken replies (default {OUTPUT_RATE})")
    p.add_argument("--full-duplex", action="store_true",
                   help="send the microphone while a reply plays (a headset or an echo canceller): talking over "
                   "the reply interrupts it. Default: half duplex, the mic is muted while the reply plays")
    p.add_argument("--echo-tail-ms", type=float, default=ECHO_TAIL_MS,
                   help=f"half duplex: keep the mic muted this long after the reply's last sample "
                   f"(default {ECHO_TAIL_MS:g})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_stdout()
    args = parse_args(argv)
    device = parse_device(args.device)
    output_device = parse_device(args.output_device)
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
        audio = False
        if not args.text_only:
            try:
                find_output_device(output_device, sd)
                audio = True
            except NoOutputDevice as exc:
                if args.audio:
                    raise
                print(f"mic.py: {exc}; replies are written only", file=sys.stderr)
        asyncio.run(run_mic(args.url, token=token_from(args), device=device, rate=args.rate,
                            block_ms=args.block_ms, chunk_ms=args.chunk_ms, instructions=args.instructions,
                            seconds=args.seconds, max_turns=args.turns, turns=turns, sd=sd, audio=audio,
                            output_device=output_device, voice=args.voice, voice_speed=args.voice_speed,
                            output_rate=args.output_rate, full_duplex=args.full_duplex,
                            echo_tail_ms=args.echo_tail_ms))
    except NoInputDevice as exc:  # NoOutputDevice too
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
