"""Helpers for the tests that drive the realtime Engine directly (no websocket): they read
its events in the stateless beta shape."""
import asyncio

from agent.realtime.turns import TurnDetectionSettings
from agent.realtime.wire import BetaEvents

to_wire = BetaEvents().to_wire
SR = 16000
SYSTEM = "Answer briefly."
MANUAL = TurnDetectionSettings(mode="manual")


async def until(handle, kind, timeout=120):
    """The session's wire events up to and including the first of type `kind`."""
    seen = []
    while True:
        for event in to_wire(await handle.next_event(timeout)):
            seen.append(event)
            if event["type"] == kind:
                return seen


def reply_text(events):
    return "".join(e["delta"] for e in events if e["type"] == "response.text.delta")


async def manual_turn(handle, audio, packet=1280):
    """Audio in packets, commit, ask for a reply; returns the reply's text."""
    for i in range(0, len(audio), packet):
        handle.append_audio(audio[i:i + packet])
        await asyncio.sleep(0)
    handle.commit()
    handle.create_response()
    return reply_text(await until(handle, "response.done"))
