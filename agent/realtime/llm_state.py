"""Per-conversation LLM state: a KV cache that grows by pre-fill and decode steps.

The session pre-fills pieces as they become known (template tokens, groups of
audio embeddings while the user talks, the assistant header at end of turn) and
then decodes one token per step; every call returns the logits for the token
after everything in the cache. Positions are passed explicitly, so pieces of any
size give the same result as one forward over the whole sequence.

Context budget: `max_positions` (default: the LLM's `max_position_embeddings`,
or less when configured). A call that would take the conversation past it
raises `ContextFull` *before* running, with the state untouched: the caller ends
the reply there (a reply cut short by context) or frees room with `truncate` /
`reset` and pre-fills a shorter conversation.

Written against the transformers >= 5 cache API (`cache=` keyword,
`DynamicCache(config=...)`, `crop(-n)`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch


class ContextFull(RuntimeError):
    """The conversation would outgrow the context budget; nothing was run."""

    def __init__(self, used: int, requested: int, limit: int):
        self.used, self.requested, self.limit = used, requested, limit
        super().__init__(
            f"context full: {used} positions used + {requested} requested > budget {limit}; "
            f"end the reply, or truncate/reset the conversation"
        )


class LLMState:
    def __init__(self, language_model, max_positions: Optional[int] = None):
        """`language_model`: a Hugging Face causal LM (e.g. `UltravoxModel.language_model`).
        `max_positions`: the context budget; at most the model's `max_position_embeddings`."""
        from transformers import DynamicCache

        self.model = language_model
        self._cache_class = DynamicCache
        config = language_model.config
        model_limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if max_positions is not None:
            if int(max_positions) < 1:
                raise ValueError(f"max_positions must be >= 1, got {max_positions}")
            if model_limit is not None and int(max_positions) > model_limit:
                raise ValueError(
                    f"max_positions={max_positions} exceeds the model's max_position_embeddings={model_limit}"
                )
        limit = max_positions if max_positions is not None else model_limit
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings: pass max_positions")
        self.max_positions = int(limit)
        embeddings = language_model.get_input_embeddings()
        self._embed = embeddings
        self.device = embeddings.weight.device
        self.dtype = embeddings.weight.dtype
        self.reset()

    # -- bookkeeping ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation: an empty cache."""
        self.cache = self._cache_class(config=self.model.config)
        self.positions = 0
        self.last_logits: Optional[torch.Tensor] = None
        self.probed: Dict[int, torch.Tensor] = {}

    def probe(self) -> int:
        """The next-token logits at the last position so far, in `probed[position]`
        (this state runs every call at once: they are the last call's)."""
        if self.last_logits is None:
            raise ValueError("nothing pre-filled yet (or truncated since)")
        self.probed[self.positions - 1] = self.last_logits
        return self.positions - 1

    @property
    def remaining(self) -> int:
        """Positions left in the budget."""
        return self.max_positions - self.positions

    def fits(self, n: int) -> bool:
        return self.positions + int(n) <= self.max_positions

    def truncate(self, positions: int) -> None:
        """Drop everything after the first `positions` positions (e.g. a cancelled reply,
        or a reply to be re-pre-filled as canonical ids). `last_logits` is unknown
        afterwards: pre-fill at least one token before decoding."""
        positions = int(positions)
        if not 0 <= positions <= self.positions:
            raise ValueError(f"cannot truncate to {positions}: the cache holds {self.positions} positions")
        if positions == self.positions:
            return
        if positions == 0:
            self.reset()
            return
        if not getattr(self.cache, "is_croppable", True):
            raise ValueError("this model's cache (sliding window or recurrent layers) cannot be truncated: reset it")
        self.cache.crop(positions - self.positions)  # transformers 5: a negative count of tokens to drop
        self.positions = positions
        self.last_logits = None
        self.probed = {p: v for p, v in self.probed.items() if p < positions}

    # -- model calls -----------------------------------------------------------------
    @torch.no_grad()
    def prefill_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append embeddings `[1, n, H]` (or `[n, H]`); returns the next-token logits `[V]`
        (float32). n = 0 returns the logits of the last call."""
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != 3 or embeds.shape[0] != 1:
            raise ValueError(f"embeds must be [1, n, H] or [n, H] (one conversation), got {tuple(embeds.shape)}")
        if embeds.shape[-1] != self._embed.embedding_dim:
            raise ValueError(f"embeds have width {embeds.shape[-1]}, the LLM expects {self._embed.embedding_dim}")
        return self._run(embeds.to(device=self.device, dtype=self.dtype))

    @torch.no_grad()
    def prefill_ids(self, ids: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        """Append token ids (embedded with the LLM's input embeddings); returns the
        next-token logits `[V]`."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        return self._run(self._embed(ids))

    def decode_step(self, token_id: int) -> torch.Tensor:
        """Append one token (the one just picked); returns the logits for the next."""
        return self.prefill_ids([int(token_id)])

    # This state runs every call at once; the batched slot state (llm_batch.py) queues
    # them instead. Both speak this interface, so Session runs on either.
    pending = 0

    def queue_token(self, token_id: int) -> None:
        self.decode_step(token_id)

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        if n == 0:
            if self.last_logits is None:
                raise ValueError("nothing pre-filled yet (or truncated since): there are no logits to return")
            return self.last_logits
        if not self.fits(n):
            raise ContextFull(self.positions, n, self.max_positions)
        position_ids = torch.arange(self.positions, self.positions + n, device=self.device).unsqueeze(0)
        try:
            out = self.model(
                inputs_embeds=embeds,
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,  # only the last position's logits: a long pre-fill skips the vocab projection
            )
        except BaseException:
            self._roll_back()
            raise
        self.positions += n
        self.last_logits = out.logits[0, -1].float()
        return self.last_logits

    def _roll_back(self) -> None:
        """After a failed call (e.g. out of memory), drop what some layers already
        appended, so the cache matches `positions` again."""
        for layer in getattr(self.cache, "layers", []):
            length = layer.get_seq_length() if hasattr(layer, "get_seq_length") else None
            if length is not None and length > self.positions:
                if not getattr(layer, "is_croppable", True):
                    self.reset()  # cannot be undone: a clean empty state beats a corrupt one
                    return
                layer.crop(self.positions - length)
