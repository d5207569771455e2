"""A session's settings, as the engine applies them (the wire protocol maps onto these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from agent.realtime.sampling import GenerationSettings
from agent.realtime.turns import TurnDetectionSettings


@dataclass(frozen=True)
class SessionConfig:
    instructions: Optional[str] = None
    turn_detection: TurnDetectionSettings = field(default_factory=TurnDetectionSettings)
    temperature: float = 0.0
    top_p: float = 1.0
    max_response_output_tokens: int = 64
    max_positions: Optional[int] = None
    chunk_ms: Optional[int] = None  # encoder chunk; None: the server's default
    max_turn_seconds: float = 60.0  # a longer turn is committed where it stands

    def generation(self) -> GenerationSettings:
        return GenerationSettings(temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_response_output_tokens)
