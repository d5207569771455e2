"""NEST (NVIDIA FastConformer SSL) encoder: loading, layer selection, processor."""
from agent.nest.encoder import NestEncoder, NestEncoderOutput
from agent.nest.layers import parse_layers
from agent.nest.processor import NestProcessor

__all__ = ["NestEncoder", "NestEncoderOutput", "NestProcessor", "parse_layers"]
