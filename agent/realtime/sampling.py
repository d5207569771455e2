"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling.

Greedy is `argmax` over the logits, exactly what Hugging Face's
`generate(do_sample=False)` picks (first index on ties). Sampling divides the
logits by the temperature, keeps the nucleus (the most probable tokens whose
mass reaches top_p, as HF's TopPLogitsWarper keeps them) and draws from it with
an explicit `torch.Generator`, so a seeded reply is reproducible.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How one reply is decoded.

    temperature: 0 = greedy (deterministic); > 0 samples from softmax(logits / T).
    top_p: nucleus mass in (0, 1]; 1 keeps every token. Ignored when greedy.
    max_new_tokens: the most tokens one reply may have (>= 1).
    stop_token_ids: tokens that end the reply (e.g. the tokenizer's eos, `<|im_end|>`).
    seed: seeds the sampler's generator; None draws a fresh seed per Sampler.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: Tuple[int, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stops = self.stop_token_ids
        if isinstance(stops, int):
            stops = (stops,)
        try:
            stops = tuple(int(s) for s in stops)
        except (TypeError, ValueError):
            raise ValueError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}") from None
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "GenerationSettings":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask [..., V] of the nucleus: a token is kept when the mass of the tokens
    more probable than it is below top_p (so the kept mass reaches top_p, and the most
    probable token is always kept). Same set as HF's TopPLogitsWarper, ties aside."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def select_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The next token for logits [V] (a 0-d long tensor) or [B, V] (a [B] long tensor)."""
    if logits.dim() not in (1, 2):
        raise ValueError(f"logits must be [V] or [B, V], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    rows = logits.reshape(-1, logits.shape[-1]).float()
    probs = torch.softmax(rows / temperature, dim=-1)
    probs = probs.masked_fill(~nucleus_mask(probs, top_p), 0.0)
    picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # renormalizes itself
    return picked.reshape(logits.shape[:-1])


class Sampler:
    """Picks next tokens for one reply (or one conversation) under `settings`, with its
    own generator: two samplers with the same seed draw the same tokens."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        # secrets, not torch.seed(): that would re-seed torch's global generator.
        self.seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self._generator: Optional[torch.Generator] = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor) -> Union[int, torch.Tensor]:
        """The next token id (an int for logits [V], a [B] tensor for [B, V])."""
        s = self.settings
        gen = None if s.greedy else self._generator_for(logits.device)
        token = select_next(logits, s.temperature, s.top_p, gen)
        return int(token) if token.dim() == 0 else token

    def is_stop(self, token_id: int) -> bool:
        return int(token_id) in self.settings.stop_token_ids


def stop_ids(*groups: Union[int, None, Iterable[int]]) -> Tuple[int, ...]:
    """Merge stop token ids (ints, lists, Nones) into one ordered tuple without repeats,
    e.g. `stop_ids(tokenizer.eos_token_id, generation_config.eos_token_id)`."""
    out = []
    for g in groups:
        for t in ([] if g is None else [g] if isinstance(g, int) else g):
            if int(t) not in out:
                out.append(int(t))
    return tuple(out)
