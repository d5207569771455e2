"""Ultravox-style speech LLM with a NEST audio tower."""
from agent.ultravox.config import AUDIO_PLACEHOLDER, UltravoxConfig
from agent.ultravox.inference import UltravoxInference
from agent.ultravox.model import UltravoxModel
from agent.ultravox.processor import UltravoxProcessor
from agent.ultravox.projector import UltravoxProjector

__all__ = [
    "AUDIO_PLACEHOLDER",
    "UltravoxConfig",
    "UltravoxInference",
    "UltravoxModel",
    "UltravoxProcessor",
    "UltravoxProjector",
]
