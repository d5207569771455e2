"""`NestConfig`: the Hugging Face config type "nest", so an Ultravox config knows
its audio tower's hidden size, depth, selected layers and subsampling."""
from __future__ import annotations

from typing import Any, List, Optional, Union

from transformers import AutoConfig, PretrainedConfig

from agent.nest.configs import NEST_LARGE

# Shapes of published checkpoints whose configs we have checked (NeMo's NEST yaml).
_KNOWN_SHAPES = {
    "nvidia/ssl_en_nest_large_v1.0": (NEST_LARGE.d_model, NEST_LARGE.n_layers),
}


class NestConfig(PretrainedConfig):
    model_type = "nest"

    def __init__(
        self,
        hidden_size: Optional[int] = None,
        num_hidden_layers: Optional[int] = None,
        layers: Union[str, List[int]] = "last",
        subsampling: str = "dw_striding",
        subsampling_factor: int = 8,
        causal_downsampling: bool = False,
        sample_rate: int = 16000,
        nemo_config: Optional[dict] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        name = getattr(self, "_name_or_path", "") or ""
        if nemo_config is not None:
            enc = nemo_config["encoder"]
            hidden_size = hidden_size or int(enc["d_model"])
            num_hidden_layers = num_hidden_layers or int(enc["n_layers"])
            subsampling = enc.get("subsampling", subsampling)
            subsampling_factor = int(enc.get("subsampling_factor", subsampling_factor))
            causal_downsampling = bool(enc.get("causal_downsampling", causal_downsampling))
        elif name in _KNOWN_SHAPES and (hidden_size is None or num_hidden_layers is None):
            hidden_size, num_hidden_layers = _KNOWN_SHAPES[name]
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layers = layers
        self.subsampling = subsampling
        self.subsampling_factor = subsampling_factor
        self.causal_downsampling = causal_downsampling
        self.sample_rate = sample_rate
        self.nemo_config = nemo_config

    def layer_indices(self) -> List[int]:
        from agent.nest.layers import parse_layers

        if self.num_hidden_layers is None:
            raise ValueError("the NEST depth is unknown until the encoder is loaded")
        return parse_layers(self.layers, self.num_hidden_layers)

    @classmethod
    def from_encoder(cls, encoder, name_or_path: str = "") -> "NestConfig":
        """Describe a loaded `NestEncoder` exactly (its NeMo config included)."""
        from omegaconf import OmegaConf

        return cls(
            layers=list(encoder.layer_indices),
            nemo_config=OmegaConf.to_container(encoder.nemo_cfg, resolve=True),
            name_or_path=name_or_path,
        )


AutoConfig.register("nest", NestConfig, exist_ok=True)
