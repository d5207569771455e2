"""One LLM state for every conversation: a preallocated KV cache with a slot per session.

gpt-fast's recipe with Hugging Face's model code: the K/V tensors of every layer
are allocated once, `[slots, kv_heads, capacity, head_dim]`; a forward runs any
subset of slots at once, each row at its own positions (explicit `position_ids`
and a 4-D mask), writes only its real tokens into its slot and attends only to
its own slot's history. So one forward serves the audio pre-fill of every
listening session, and one more the next token of every replying session.

    llm = BatchedLLM(model.language_model, slots=16)
    a, b = llm.open(), llm.open()          # SlotLLMState: one conversation each
    a.prefill_ids(ids_a); b.prefill_embeds(audio_b)   # queued, nothing runs yet
    llm.flush([a, b])                      # ONE forward for both
    a.last_logits, b.last_logits           # [V] float32 each

A `SlotLLMState` has `LLMState`'s interface (`prefill_*`, `decode_step`,
`truncate`, `reset`, `positions`, `last_logits`, `ContextFull` raised before
anything is queued), so `Session` runs on either. Pre-fills are lazy: they are
queued until the engine flushes a batch, or until someone reads `last_logits`
(then that slot runs alone: the offline / single-session path). Truncation is
bookkeeping only (a slot's length is its valid prefix), so rolling back a
speculative end of turn or a reply costs nothing.

Requires a decoder whose every layer is full causal attention through
`cache.update` (Llama, Qwen2, Mistral without sliding window, ...); anything
else is refused at construction with the alternative named.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache

from agent.realtime.llm_state import ContextFull

# Rows of at most this many tokens share a forward (decode tokens, audio groups);
# longer ones run in a forward of their own, so they do not pad the short ones.
NARROW_ROW = 4


class SlotKVCache(Cache):
    """K/V storage of all slots; `bind` says which slots and positions the next forward touches.

    The attention layers call `update(k, v, layer)` with the step's new keys
    `[B, kv_heads, n, head_dim]`: they are written at each row's positions in its
    slot, and the slots' keys up to the longest row's end are returned.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        shape = (slots, kv_heads, capacity, head_dim)
        # zeros, not empty: a row's attention reads (masked) positions past its own end,
        # and uninitialised memory may hold NaN, which no mask removes (0 * NaN = NaN).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self._bound = None

    def bind(self, slots: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, positions: torch.Tensor,
             kv_len: int, contiguous: Optional[slice]) -> None:
        """The next forward: batch row r is slot `slots[r]`; its real tokens are
        `(rows, cols)` of the step, written at `positions`."""
        self._bound = (slots, rows, cols, positions, kv_len, contiguous)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        slots, rows, cols, positions, kv_len, contiguous = self._bound
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        target = slots[rows]
        keys[target, :, positions] = key_states.transpose(1, 2)[rows, cols]
        values[target, :, positions] = value_states.transpose(1, 2)[rows, cols]
        if contiguous is not None:  # the rows are consecutive slots: a view, no copy
            return keys[contiguous, :, :kv_len], values[contiguous, :, :kv_len]
        return keys[slots, :, :kv_len], values[slots, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._bound is None else self._bound[4]


def check_batchable(config) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    sliding = getattr(text, "sliding_window", None) not in (None, 0) and getattr(text, "use_sliding_window", True)
    if kinds != {"full_attention"} or sliding:
        raise ValueError(f"the batched LLM state needs full causal attention in every layer; this model has "
                         f"{sorted(kinds)} (sliding_window={getattr(text, 'sliding_window', None)}): serve it with "
                         f"llm_batching off (serve.py --llm-batching off)")


class BatchedLLM:
    def __init__(self, language_model, slots: int, max_positions: Optional[int] = None):
        """`slots`: conversations held at once; `max_positions`: each slot's context
        budget (default: the model's `max_position_embeddings`)."""
        config = language_model.config
        check_batchable(config)
        text = config.get_text_config()
        limit = getattr(text, "max_position_embeddings", None)
        if max_positions is not None:
            if int(max_positions) < 1:
                raise ValueError(f"max_positions must be >= 1, got {max_positions}")
            if limit is not None and int(max_positions) > limit:
                raise ValueError(f"max_positions={max_positions} exceeds the model's max_position_embeddings={limit}")
        limit = int(max_positions if max_positions is not None else limit)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = language_model
        self.decoder = language_model.get_decoder()
        self.head = language_model.get_output_embeddings()
        self.embed = language_model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.max_positions = limit
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.cache = SlotKVCache(text.num_hidden_layers, slots, kv_heads, head_dim, limit, self.dtype, self.device)
        self.slots = slots
        self._free = list(range(slots))
        self.forwards = 0  # forwards run (stats)
        self.max_rows = 0  # the most rows one forward ran

    # -- slots -----------------------------------------------------------------
    def open(self) -> "SlotLLMState":
        if not self._free:
            raise RuntimeError(f"all {self.slots} LLM slots are in use")
        self._free.sort()  # lowest first: active slots stay packed, so batches are often contiguous views
        return SlotLLMState(self, self._free.pop(0))

    def close(self, state: "SlotLLMState") -> None:
        if state.slot is not None:
            self._free.append(state.slot)
            state.slot = None

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- the batched forward -----------------------------------------------------
    @torch.no_grad()
    def flush(self, states: Sequence["SlotLLMState"]) -> int:
        """Run every given state's queued work (pre-fill pieces, decode tokens) in one
        forward; returns the rows run. Rows are padded to the longest, so long
        pieces (a turn's template, a reply's canonical re-fill) run in a second
        forward of their own rather than padding every one-token row to their
        length: at most two forwards, one in the steady state."""
        todo = [s for s in states if s.slot is not None and s._pending]
        narrow = [s for s in todo if s._pending_len <= NARROW_ROW]
        wide = [s for s in todo if s._pending_len > NARROW_ROW]
        for group in (narrow, wide):
            if group:
                self._run(group)
        return len(todo)

    def _run(self, todo: List["SlotLLMState"]) -> None:
        pieces = [torch.cat(s._pending) if len(s._pending) > 1 else s._pending[0] for s in todo]
        try:
            logits = self._forward([s.slot for s in todo], [s._committed for s in todo], pieces)
        except BaseException:
            for s in todo:  # nothing was committed; the queued work is lost with the failed call
                s._pending.clear()
                s._pending_len = 0
                s.pending_since = None
            raise
        for s, piece, row in zip(todo, pieces, logits):
            s._committed += piece.shape[0]
            s._pending.clear()
            s._pending_len = 0
            s.pending_since = None
            s._logits = row
        self.forwards += 1
        self.max_rows = max(self.max_rows, len(todo))

    def _forward(self, slots: List[int], starts: List[int], pieces: List[torch.Tensor]) -> torch.Tensor:
        device = self.device
        lengths = [p.shape[0] for p in pieces]
        batch, width = len(pieces), max(lengths)
        x = pieces[0].new_zeros(batch, width, pieces[0].shape[-1])
        for r, p in enumerate(pieces):
            x[r, : p.shape[0]] = p
        # Index tensors are built on the host and sent once: nothing here waits for the device.
        rows = [r for r, n in enumerate(lengths) for _ in range(n)]
        cols = [c for n in lengths for c in range(n)]
        cpu = dict(dtype=torch.long)
        position_ids = (torch.tensor(starts, **cpu)[:, None] + torch.arange(width)[None, :])  # pad columns: harmless
        kv_len = max(s + n for s, n in zip(starts, lengths))
        allowed = torch.arange(kv_len)[None, None, :] <= position_ids[:, :, None]  # causal within the row's own slot
        mask = torch.zeros(batch, 1, width, kv_len, dtype=self.dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        rows_t, cols_t = torch.tensor(rows, **cpu), torch.tensor(cols, **cpu)
        write_pos = position_ids[rows_t, cols_t]
        last = torch.tensor(lengths, **cpu) - 1
        to = dict(device=device, non_blocking=True)
        contiguous = slice(slots[0], slots[0] + batch) if slots == list(range(slots[0], slots[0] + batch)) else None
        self.cache.bind(torch.tensor(slots, **cpu).to(**to), rows_t.to(**to), cols_t.to(**to), write_pos.to(**to),
                        kv_len, contiguous)
        try:
            hidden = self.decoder(inputs_embeds=x, attention_mask=mask.to(**to), position_ids=position_ids.to(**to),
                                  cache=self.cache, use_cache=True).last_hidden_state
        finally:
            self.cache.bind(None, None, None, None, 0, None)
        last_hidden = hidden[torch.arange(batch, device=device), last.to(**to)]  # each row's last real token
        return self.head(last_hidden).float()


class SlotLLMState:
    """One conversation's view of a `BatchedLLM` slot, with `LLMState`'s interface."""

    def __init__(self, batch: BatchedLLM, slot: int):
        self.batch = batch
        self.slot: Optional[int] = slot
        self.max_positions = batch.max_positions
        self.device = batch.device
        self.dtype = batch.dtype
        self._committed = 0  # positions whose K/V are in the slot
        self._pending: List[torch.Tensor] = []  # queued embeddings [n, H], not run yet
        self._pending_len = 0
        self.pending_since: Optional[float] = None  # perf_counter when the queued work began
        self._logits: Optional[torch.Tensor] = None

    # -- bookkeeping ---------------------------------------------------------------
    @property
    def positions(self) -> int:
        return self._committed + self._pending_len

    @property
    def pending(self) -> int:
        return self._pending_len

    @property
    def remaining(self) -> int:
        return self.max_positions - self.positions

    def fits(self, n: int) -> bool:
        return self.positions + int(n) <= self.max_positions

    def reset(self) -> None:
        self._committed = 0
        self._pending.clear()
        self._pending_len = 0
        self.pending_since = None
        self._logits = None

    def truncate(self, positions: int) -> None:
        """Keep the first `positions` positions (queued ones included); `last_logits`
        is unknown afterwards unless queued work remains."""
        positions = int(positions)
        if not 0 <= positions <= self.positions:
            raise ValueError(f"cannot truncate to {positions}: the cache holds {self.positions} positions")
        if positions == self.positions:
            return
        if positions >= self._committed:  # only queued work goes
            keep, kept = positions - self._committed, []
            for piece in self._pending:
                if keep <= 0:
                    break
                kept.append(piece[:keep])
                keep -= kept[-1].shape[0]
            self._pending, self._pending_len = kept, positions - self._committed
            if not kept:
                self.pending_since = None
        else:  # the slot's valid prefix shrinks; stale K/V past it are overwritten later
            self._committed = positions
            self._pending.clear()
            self._pending_len = 0
            self.pending_since = None
        self._logits = None

    @property
    def last_logits(self) -> Optional[torch.Tensor]:
        """Next-token logits `[V]` after everything pre-filled; queued work runs now
        (this slot alone) if the engine has not flushed it yet."""
        if self._pending:
            self.batch.flush([self])
        return self._logits

    @last_logits.setter
    def last_logits(self, value: Optional[torch.Tensor]) -> None:
        if self._pending:
            raise RuntimeError("cannot set the logits while pre-fill work is queued")
        self._logits = value

    # -- queueing ------------------------------------------------------------------
    def prefill_embeds(self, embeds: torch.Tensor) -> None:
        """Queue embeddings `[n, H]` (or `[1, n, H]`); ContextFull before anything is queued."""
        if embeds.dim() == 3:
            if embeds.shape[0] != 1:
                raise ValueError(f"embeds must be [1, n, H] or [n, H] (one conversation), got {tuple(embeds.shape)}")
            embeds = embeds[0]
        if embeds.dim() != 2 or embeds.shape[-1] != self.batch.embed.embedding_dim:
            raise ValueError(f"embeds must be [n, {self.batch.embed.embedding_dim}], got {tuple(embeds.shape)}")
        n = embeds.shape[0]
        if n == 0:
            return
        if not self.fits(n):
            raise ContextFull(self.positions, n, self.max_positions)
        if not self._pending:
            self.pending_since = time.perf_counter()
        self._pending.append(embeds.to(device=self.device, dtype=self.dtype))
        self._pending_len += n
        self._logits = None

    @torch.no_grad()
    def prefill_ids(self, ids: Union[Sequence[int], torch.Tensor]) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel():
            if not self.fits(ids.numel()):
                raise ContextFull(self.positions, ids.numel(), self.max_positions)
            self.prefill_embeds(self.batch.embed(ids))

    def queue_token(self, token_id: int) -> None:
        """The token just picked, for the next (batched) decode forward."""
        self.prefill_ids([int(token_id)])

    def decode_step(self, token_id: int) -> torch.Tensor:
        """Append one token and return the logits for the next (runs now)."""
        self.queue_token(token_id)
        return self.last_logits
