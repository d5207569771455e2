"""One conversation streamed without the engine: its encoder stream and its Session.

For evaluation, benchmarks and notebooks that stream a single conversation in
the calling thread. The realtime server never uses it: there the engine owns
every session's encoder stream and steps all of them in one batched call.

    stream = SingleStream(Session(model, tokenizer, system_prompt="..."), streamer)
    for packet in packets:
        stream.feed(packet)          # encodes complete chunks, pre-fills their embeddings
    stream.end_turn()                # encoder flush + last group + assistant header
    text = "".join(stream.session.reply())
"""
from __future__ import annotations

from typing import Optional

import torch


class SingleStream:
    def __init__(self, session, streamer):
        self.session = session
        self.streamer = streamer
        self.encoder_state = None  # the turn's EncoderStreamState

    def feed(self, audio: torch.Tensor) -> int:
        """Encode the complete chunks of `audio` and pre-fill them; starts a turn if
        none is open. Returns the audio positions pre-filled."""
        if not self.session.listening:
            self.session.start_turn()
        if self.encoder_state is None or self.encoder_state.finished:  # a new turn: a new encoder stream
            self.encoder_state = self.streamer.init_state()
        (self.encoder_state,), (frames,) = self.streamer.step([self.encoder_state], [audio])
        return self.session.accept_frames(frames)

    def end_turn(self, speech_end: Optional[float] = None, probe: bool = False) -> None:
        """`probe`: keep the end-of-turn probability (`session.end_of_turn_probability()`)."""
        (self.encoder_state,), (frames,) = self.streamer.flush([self.encoder_state])
        self.session.end_turn(frames=frames, speech_end=speech_end, probe=probe)
