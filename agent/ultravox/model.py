"""UltravoxModel: NEST audio tower + projector + causal LLM.

The audio tower is replaceable (any module returning `NestEncoderOutput`-like
`hidden_states [K,B,T,D]` and `lengths`). Audio embeddings replace the
`<|audio|>` token positions of the prompt, in order.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import nn

from agent.nest import NestEncoder
from agent.nest.config import NestConfig
from agent.ultravox.config import UltravoxConfig
from agent.ultravox.projector import UltravoxProjector

# Self-contained checkpoint layout (see save_pretrained).
ENCODER_FILE = "audio_encoder.nemo"
LLM_DIR = "llm"
PROJECTOR_FILE = "projector.safetensors"


def _load_llm(config: UltravoxConfig, dtype: torch.dtype, llm_dir: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    source = llm_dir or config.text_model_id
    if source is not None:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if config.text_config is None:
        raise ValueError("UltravoxConfig needs text_config or text_model_id to build the LLM")
    return AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)


def _audio_source(config: NestConfig):
    """Where the tower's weights come from: a .nemo / NeMo name, else its config (random)."""
    if config._name_or_path:
        return config._name_or_path
    if config.nemo_config is not None:
        return config.nemo_config
    raise ValueError("audio_config needs `_name_or_path` (a .nemo or NeMo name) or `nemo_config`")


class UltravoxModel(nn.Module):
    def __init__(
        self,
        config: UltravoxConfig,
        audio_tower: Optional[nn.Module] = None,
        language_model: Optional[nn.Module] = None,
        dtype: torch.dtype = torch.float32,
        _encoder_path: Optional[str] = None,
        _llm_dir: Optional[str] = None,
    ):
        super().__init__()
        self.config = config
        if audio_tower is None:
            audio_tower = NestEncoder(_encoder_path or _audio_source(config.audio_config), torch_dtype=dtype,
                                      layer=config.audio_config.layers)
        self.audio_tower = audio_tower
        if isinstance(audio_tower, NestEncoder):
            # The loaded encoder is the truth about depth, width and subsampling.
            name = config.audio_config._name_or_path
            config.audio_config = NestConfig.from_encoder(audio_tower, name_or_path=name if not _encoder_path else "")
        self.language_model = language_model if language_model is not None else _load_llm(config, dtype, _llm_dir)
        config.text_config = self.language_model.config
        text_dim = self.language_model.get_input_embeddings().embedding_dim
        self.projector = UltravoxProjector(
            num_layers=len(self.audio_tower.layer_indices),
            audio_dim=config.audio_config.hidden_size,
            stack_factor=config.stack_factor,
            hidden_size=config.projector_hidden_size or 4 * text_dim,
            text_dim=text_dim,
            eps=config.projector_norm_eps,
        ).to(dtype)

    # -- properties the rest of the code relies on ------------------------------
    @property
    def audio_tower_context_length(self) -> Optional[int]:
        return self.config.audio_tower_context_length

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # -- audio -------------------------------------------------------------------
    def audio_embeddings(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> List[torch.Tensor]:
        """Per audio chunk, its LLM embeddings `[ceil(frames/S), H]` (padding dropped)."""
        out = self.audio_tower(input_features, feature_lengths)
        embeds = self.projector(out.hidden_states.to(self.dtype))
        counts = (out.lengths + self.config.stack_factor - 1) // self.config.stack_factor
        return [embeds[i, : int(n)] for i, n in enumerate(counts)]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        feature_lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with the `<|audio|>` positions replaced by audio embeddings."""
        audio_id = self.config.audio_token_index
        is_audio = input_ids == audio_id if audio_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        # The audio token may lie outside the LLM's vocabulary: look up a harmless id there.
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_audio, 0))
        n_slots = int(is_audio.sum())
        if input_features is None:
            if n_slots:
                raise ValueError(f"the prompt has {n_slots} audio token(s) but no audio was given")
            return embeds
        audio = torch.cat(self.audio_embeddings(input_features, feature_lengths)).to(embeds.dtype)
        if audio.shape[0] != n_slots:
            raise ValueError(
                f"the prompt has {n_slots} audio token(s) but the audio gives {audio.shape[0]} embeddings: "
                f"expand {self.config.audio_placeholder} with UltravoxProcessor for this model"
            )
        return embeds.masked_scatter(is_audio[..., None], audio)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_lengths: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        inputs_embeds = self.embed_inputs(input_ids, input_features, feature_lengths)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_lengths: Optional[torch.Tensor] = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids only (the prompt is given as embeddings, so HF returns just the reply)."""
        inputs_embeds = self.embed_inputs(input_ids, input_features, feature_lengths)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    # -- save / load -------------------------------------------------------------
    def save_pretrained(self, path: str, tokenizer=None, self_contained: bool = True) -> None:
        """Write a checkpoint folder.

        self_contained=True (default): `audio_encoder.nemo` + `llm/` + `projector.safetensors`
        + `config.json` (+ the tokenizer): loads with no network.
        self_contained=False: projector and config only; the encoder and LLM are
        re-loaded from `audio_config._name_or_path` and `text_model_id`.
        """
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        config = UltravoxConfig.from_dict(self.config.to_dict())
        if self_contained:
            if not isinstance(self.audio_tower, NestEncoder):
                raise TypeError("a self-contained checkpoint needs a NestEncoder audio tower")
            self.audio_tower.save_nemo(os.path.join(path, ENCODER_FILE))
            self.language_model.save_pretrained(os.path.join(path, LLM_DIR))
            config.audio_config._name_or_path = ""  # found beside config.json instead
            config.text_model_id = None
        elif not config.audio_config._name_or_path or config.text_model_id is None:
            raise ValueError("self_contained=False needs audio_config._name_or_path and text_model_id to reload from")
        state = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(state, os.path.join(path, PROJECTOR_FILE))
        config.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "UltravoxModel":
        from safetensors.torch import load_file

        if not os.path.isdir(path):
            raise FileNotFoundError(f"no Ultravox checkpoint folder at {path!r} (expected config.json inside)")
        config = UltravoxConfig.from_pretrained(path)
        encoder = os.path.join(path, ENCODER_FILE)
        llm_dir = os.path.join(path, LLM_DIR)
        model = cls(
            config,
            dtype=dtype,
            _encoder_path=encoder if os.path.isfile(encoder) else None,
            _llm_dir=llm_dir if os.path.isdir(llm_dir) else None,
        )
        model.projector.load_state_dict(load_file(os.path.join(path, PROJECTOR_FILE)))
        return model.eval()
