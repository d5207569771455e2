"""`UltravoxConfig`: a NEST audio tower, a projector and a causal LLM."""
from __future__ import annotations

from typing import Any, Optional, Union

from transformers import AutoConfig, PretrainedConfig

from agent.nest.config import NestConfig

AUDIO_PLACEHOLDER = "<|audio|>"


class UltravoxConfig(PretrainedConfig):
    """Ultravox-style speech LLM config with a NEST audio tower.

    audio_config: `{"model_type": "nest", "_name_or_path": <.nemo | NeMo name>, "layers": "all", ...}`
        or a `NestConfig`. `layers` picks the encoder layers the projector fuses.
    text_config / text_model_id: the LLM's config, and where to load its weights from
        (a Hugging Face id or a local folder; None keeps random weights).
    stack_factor: encoder frames stacked into one LLM position (8 x 80 ms = 640 ms).
    projector_hidden_size: width of the projector's SwiGLU layer (before halving).
    audio_tower_context_length: longest audio (in mel frames, 10 ms each) the encoder
        takes in one call; longer audio is split into chunks encoded separately.
        None: no limit (a conformer takes any length its position table allows).
    """

    model_type = "ultravox_nest"
    sub_configs = {"audio_config": NestConfig, "text_config": AutoConfig}

    def __init__(
        self,
        audio_config: Union[dict, NestConfig, None] = None,
        text_config: Union[dict, PretrainedConfig, None] = None,
        text_model_id: Optional[str] = None,
        audio_model_id: Optional[str] = None,
        stack_factor: int = 8,
        projector_hidden_size: Optional[int] = None,
        projector_norm_eps: float = 1e-6,
        audio_tower_context_length: Optional[int] = None,
        audio_token_index: Optional[int] = None,
        audio_placeholder: str = AUDIO_PLACEHOLDER,
        ignore_index: int = -100,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(audio_config, dict):
            audio_config = {k: v for k, v in audio_config.items() if k != "model_type"}
            audio_config = NestConfig(**audio_config)
        elif audio_config is None:
            audio_config = NestConfig(name_or_path=audio_model_id or "")
        if audio_model_id and not audio_config._name_or_path:
            audio_config._name_or_path = audio_model_id
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        elif text_config is None and text_model_id is not None:
            text_config = AutoConfig.from_pretrained(text_model_id)
        if stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, got {stack_factor}")
        self.audio_config = audio_config
        self.text_config = text_config
        self.text_model_id = text_model_id
        self.stack_factor = int(stack_factor)
        self.projector_hidden_size = projector_hidden_size
        self.projector_norm_eps = projector_norm_eps
        self.audio_tower_context_length = audio_tower_context_length
        self.audio_token_index = audio_token_index
        self.audio_placeholder = audio_placeholder
        self.ignore_index = ignore_index

    @property
    def audio_model_id(self) -> str:
        return self.audio_config._name_or_path


AutoConfig.register("ultravox_nest", UltravoxConfig, exist_ok=True)
