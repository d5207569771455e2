"""UltravoxInference: load a checkpoint and answer a prompt about an utterance.

This is the offline path (what Ultravox itself does): the whole utterance is
encoded after it ends, then the LLM pre-fills the prompt and decodes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from agent.nest import NestEncoder, NestProcessor
from agent.ultravox.model import UltravoxModel
from agent.ultravox.processor import UltravoxProcessor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

Message = dict  # {"role": ..., "content": ...}


def resolve_dtype(data_type: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(data_type, torch.dtype):
        return data_type
    if data_type not in DTYPES:
        raise ValueError(f"unknown data_type {data_type!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[data_type]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device; a clear error when it cannot be used."""
    try:
        resolved = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is usable here "
                             f"(torch {torch.__version__}, {built}): use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} GPU(s): "
                             f"cuda:0 .. cuda:{count - 1}")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r}: expected cpu, cuda or cuda:N")
    return resolved


def load_audio_file(path: str):
    """(waveform float32 mono, sample rate) from a sound file."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data.mean(axis=1), int(rate)


class UltravoxInference:
    def __init__(
        self,
        model_path: str,
        audio_processor_id: Optional[str] = None,
        device: str = "cpu",
        data_type: Union[str, torch.dtype] = "float32",
    ):
        """`model_path`: a checkpoint folder written by `UltravoxModel.save_pretrained`.
        `audio_processor_id`: optionally a NEST source (.nemo, NeMo name) whose front end
        replaces the checkpoint's own (the default, and what the model was trained with)."""
        from transformers import AutoTokenizer

        model = UltravoxModel.from_pretrained(model_path, dtype=resolve_dtype(data_type))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        audio_processor = None
        if audio_processor_id is not None:
            from agent.nest.loading import load_nest_parts

            parts = load_nest_parts(audio_processor_id)
            audio_processor = NestProcessor(preprocessor=parts.preprocessor, pre_encode=parts.encoder.pre_encode, resample=True)
        self._setup(model, tokenizer, device, audio_processor)

    @classmethod
    def from_model(cls, model: UltravoxModel, tokenizer, device: str = "cpu") -> "UltravoxInference":
        """Wrap a model already in memory (e.g. fresh from training or the example script)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, None)
        return self

    def _setup(self, model: UltravoxModel, tokenizer, device, audio_processor: Optional[NestProcessor]) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if isinstance(model.audio_tower, NestEncoder):
            # The log-mel front end stays on the CPU in float32, where the audio arrives:
            # the processor feeds it CPU waveforms, and features go to the device once.
            model.audio_tower.preprocessor.to("cpu")
        self.dtype = self.model.dtype
        if audio_processor is None:  # the model's own front end: what it was trained with
            audio_processor = NestProcessor(
                preprocessor=model.audio_tower.preprocessor, pre_encode=model.audio_tower.encoder.pre_encode, resample=True
            )
        self.tokenizer = tokenizer
        self.processor = UltravoxProcessor(
            audio_processor=audio_processor,
            tokenizer=tokenizer,
            stack_factor=model.config.stack_factor,
            audio_context_size=model.config.audio_tower_context_length,
            audio_placeholder=model.config.audio_placeholder,
        )
        if model.config.audio_token_index is None:
            model.config.audio_token_index = self.processor.audio_token_id
        elif model.config.audio_token_index != self.processor.audio_token_id:
            raise ValueError(
                f"tokenizer maps {model.config.audio_placeholder} to id {self.processor.audio_token_id} but the "
                f"model expects {model.config.audio_token_index}: use the tokenizer saved with the checkpoint"
            )

    def build_prompt(self, prompt: Union[str, Sequence[Message]], has_audio: bool, system_prompt: Optional[str] = None) -> str:
        """Render the chat template. A str prompt becomes one user message; with audio and
        no placeholder in it, the placeholder goes at the end of the last user message."""
        placeholder = self.processor.audio_placeholder
        if isinstance(prompt, str):
            messages: List[Message] = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}] + messages
        if has_audio and not any(placeholder in m["content"] for m in messages):
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            sep = "\n" if messages[last_user]["content"] else ""
            messages[last_user]["content"] += sep + placeholder
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare(self, prompt, audio=None, sample_rate: int = 16000, system_prompt: Optional[str] = None) -> dict:
        if isinstance(audio, str):
            audio, sample_rate = load_audio_file(audio)
        audios = [] if audio is None else (list(audio) if isinstance(audio, list) else [audio])
        text = self.build_prompt(prompt, bool(audios), system_prompt)
        inputs = self.processor(text, audio=audios or None, sampling_rate=sample_rate)
        return {k: v.to(self.device) for k, v in inputs.items() if k != "audio_token_len"}

    @torch.no_grad()
    def generate_ids(
        self,
        prompt,
        audio=None,
        sample_rate: int = 16000,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system_prompt: Optional[str] = None,
    ) -> torch.Tensor:
        """Reply token ids. temperature 0 = greedy (deterministic)."""
        inputs = self.prepare(prompt, audio, sample_rate, system_prompt)
        sampling = temperature > 0
        kwargs = dict(do_sample=sampling, max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id)
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return self.model.generate(**inputs, **kwargs)[0]

    def generate(self, prompt, audio=None, sample_rate: int = 16000, max_new_tokens: int = 64, **kwargs) -> str:
        """The reply text for `prompt` (a str or chat messages) about `audio`
        (a waveform at `sample_rate`, a list of them, or a sound file path)."""
        ids = self.generate_ids(prompt, audio=audio, sample_rate=sample_rate, max_new_tokens=max_new_tokens, **kwargs)
        return self.tokenizer.decode(ids, skip_special_tokens=True)
