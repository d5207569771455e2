"""The asyncio side of one engine session: send commands, await typed events. Thread-safe."""
from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np

from agent.realtime.config import SessionConfig
from agent.realtime.live_session import ReplyOptions


class SessionHandle:
    def __init__(self, engine, sid: str, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.id = sid
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def _emit(self, event) -> None:  # engine thread -> event loop
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody listens any more
            pass

    def post(self, event) -> None:
        """Put a connection-side event (spoken-reply audio) into the same queue as the
        engine's, so the two stay in order. Thread-safe."""
        self._emit(event)

    def append_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32 samples."""
        self.engine.submit(self.id, "append", np.asarray(samples, dtype=np.float32))

    def commit(self, ref: Optional[str] = None) -> None:
        self.engine.submit(self.id, "commit", ref)

    def clear(self, ref: Optional[str] = None) -> None:
        self.engine.submit(self.id, "clear", ref)

    def create_response(self, instructions: Optional[str] = None, max_output_tokens: Optional[int] = None,
                        ref: Optional[str] = None) -> None:
        """Answer the committed turn; `instructions` / `max_output_tokens` for this response only."""
        self.engine.submit(self.id, "response", ReplyOptions(instructions, max_output_tokens, ref))

    def cancel(self, ref: Optional[str] = None) -> None:
        self.engine.submit(self.id, "cancel", ref)

    def add_text(self, text: str, ref: Optional[str] = None) -> None:
        """A typed user message (answered on create_response)."""
        self.engine.submit(self.id, "text", (text, ref))

    def truncate_reply(self, text: str, ref: Optional[str] = None) -> None:
        """Cut the latest reply to `text` (what the user heard of its audio)."""
        self.engine.submit(self.id, "truncate", (text, ref))

    def delete_last(self, role: str, ref: Optional[str] = None) -> None:
        """Delete the conversation's most recent message, of `role`."""
        self.engine.submit(self.id, "delete", (role, ref))

    def update(self, config: SessionConfig) -> None:
        self.engine.submit(self.id, "update", config)

    def close(self) -> None:
        self.engine.submit(self.id, "close")

    async def next_event(self, timeout: Optional[float] = None):
        """The next `agent.realtime.events` value."""
        return await asyncio.wait_for(self.events.get(), timeout)
