"""UltravoxProcessor: text with `<|audio|>` + waveforms -> model inputs.

Each `<|audio|>` becomes exactly as many audio tokens as the model will produce
embeddings for that audio: ceil(encoder_frames / stack_factor) per encoder call,
with encoder frames from the NEST processor's real subsampling formula.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from agent.nest import NestProcessor
from agent.ultravox.config import AUDIO_PLACEHOLDER

PROCESSOR_FILE = "processor_config.json"


class UltravoxProcessor:
    def __init__(
        self,
        audio_processor: Optional[NestProcessor] = None,
        tokenizer=None,
        stack_factor: int = 8,
        audio_context_size: Optional[int] = None,
        audio_placeholder: str = AUDIO_PLACEHOLDER,
    ):
        if tokenizer is None:
            raise ValueError("UltravoxProcessor needs a tokenizer")
        self.audio_processor = audio_processor or NestProcessor()
        self.tokenizer = tokenizer
        self.stack_factor = int(stack_factor)
        self.audio_context_size = audio_context_size  # mel frames per encoder call, None = unlimited
        self.audio_placeholder = audio_placeholder
        if audio_placeholder not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [audio_placeholder]})
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_placeholder)

    # -- counting ----------------------------------------------------------------
    @property
    def chunk_samples(self) -> Optional[int]:
        """Samples per encoder call when audio is longer than `audio_context_size`."""
        if self.audio_context_size is None:
            return None
        hop = self.audio_processor.preprocessor.featurizer.hop_length
        return int(self.audio_context_size) * int(hop)

    def split(self, wave: np.ndarray) -> List[np.ndarray]:
        step = self.chunk_samples
        if step is None or len(wave) <= step:
            return [wave]
        return [wave[i : i + step] for i in range(0, len(wave), step)]

    def audio_token_count(self, num_samples: int) -> int:
        """How many `<|audio|>` positions `num_samples` of 16 kHz audio fill."""
        step = self.chunk_samples
        sizes = [num_samples] if step is None or num_samples <= step else [
            min(step, num_samples - i) for i in range(0, num_samples, step)
        ]
        frames = self.audio_processor.encoder_frames(torch.tensor(sizes))
        return int(sum(math.ceil(int(f) / self.stack_factor) for f in frames))

    # -- processing --------------------------------------------------------------
    def __call__(
        self,
        text: Union[str, Sequence[str]],
        audio=None,
        sampling_rate: Optional[int] = None,
        return_tensors: str = "pt",
        padding: Union[bool, str] = True,
    ) -> dict:
        """`text` holds one `<|audio|>` per waveform in `audio` (in order across a batch).

        Returns `input_ids`, `attention_mask` and, with audio, `input_features`,
        `feature_lengths` (one row per encoder call) and `audio_token_len`.
        """
        texts = [text] if isinstance(text, str) else list(text)
        waves = [] if audio is None else self.audio_processor.prepare_waveforms(audio, sampling_rate)
        n_placeholders = sum(t.count(self.audio_placeholder) for t in texts)
        if n_placeholders != len(waves):
            raise ValueError(
                f"the text has {n_placeholders} {self.audio_placeholder} placeholder(s) but {len(waves)} "
                f"audio input(s) were given: put one placeholder where each audio belongs"
            )
        chunks: List[np.ndarray] = []
        token_lens: List[int] = []
        wave_iter = iter(waves)
        expanded = []
        for t in texts:
            pieces = t.split(self.audio_placeholder)
            out = pieces[0]
            for piece in pieces[1:]:
                wave = next(wave_iter)
                n = self.audio_token_count(len(wave))
                chunks.extend(self.split(wave))
                token_lens.append(n)
                out += self.audio_placeholder * n + piece
            expanded.append(out)
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, add_special_tokens=False)
        result = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if chunks:
            feats = self.audio_processor(chunks)
            result["input_features"] = feats["input_features"]
            result["feature_lengths"] = feats["feature_lengths"]
            result["audio_token_len"] = torch.tensor(token_lens)
        return result

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, **kwargs)

    # -- save / load -------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_FILE), "w") as f:
            json.dump(
                {
                    "processor_class": "UltravoxProcessor",
                    "stack_factor": self.stack_factor,
                    "audio_context_size": self.audio_context_size,
                    "audio_placeholder": self.audio_placeholder,
                },
                f,
                indent=2,
            )

    @classmethod
    def from_pretrained(cls, path: str, audio_processor: Optional[NestProcessor] = None) -> "UltravoxProcessor":
        """Load the tokenizer and settings saved beside a checkpoint; the NEST front end
        comes from `audio_processor`, else from the checkpoint's config."""
        from transformers import AutoTokenizer

        from agent.ultravox.config import UltravoxConfig

        settings = {}
        settings_file = os.path.join(path, PROCESSOR_FILE)
        if os.path.isfile(settings_file):
            with open(settings_file) as f:
                settings = json.load(f)
        if audio_processor is None:
            config = UltravoxConfig.from_pretrained(path)
            audio_processor = NestProcessor.from_config(config.audio_config.nemo_config)
            settings.setdefault("stack_factor", config.stack_factor)
            settings.setdefault("audio_context_size", config.audio_tower_context_length)
        return cls(
            audio_processor=audio_processor,
            tokenizer=AutoTokenizer.from_pretrained(path),
            stack_factor=settings.get("stack_factor", 8),
            audio_context_size=settings.get("audio_context_size"),
            audio_placeholder=settings.get("audio_placeholder", AUDIO_PLACEHOLDER),
        )
