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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache

from agent.realtime.llm_state import ContextFull

# Rows of at most this many tokens share a forward (decode tokens, audio groups);
# longer ones run in a forward of their own, so they do not pad the short ones.
NARROW_ROW = 4


@dataclass(frozen=True)
class ForwardPlan:
    """Where one forward's tokens go in the cache, and which keys each layer reads.

    write: the step's real tokens `key_states[:, :, ...]` at `(src_rows, src_cols)` go to
    `(write_slot, write_pos)`. read: either whole slots (`read_slots`, or the view
    `read_view` when they are consecutive) up to `kv_len`, batch row r reading slot r;
    or, packed, the listed `(read_slot, read_pos)` keys as one sequence."""

    src_rows: torch.Tensor
    src_cols: torch.Tensor
    write_slot: torch.Tensor
    write_pos: torch.Tensor
    kv_len: int
    read_slots: Optional[torch.Tensor] = None
    read_view: Optional[slice] = None
    read_slot: Optional[torch.Tensor] = None
    read_pos: Optional[torch.Tensor] = None


class SlotKVCache(Cache):
    """K/V storage of all slots; `plan` says what the next forward writes and reads.

    The attention layers call `update(k, v, layer)` with the step's new keys
    `[B, kv_heads, n, head_dim]`: they are written at each token's position in its
    slot, and the keys the plan names are returned.
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
        self.plan: Optional[ForwardPlan] = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        plan = self.plan
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[plan.write_slot, :, plan.write_pos] = key_states.transpose(1, 2)[plan.src_rows, plan.src_cols]
        values[plan.write_slot, :, plan.write_pos] = value_states.transpose(1, 2)[plan.src_rows, plan.src_cols]
        if plan.read_view is not None:  # consecutive slots: a view, no copy
            return keys[plan.read_view, :, :plan.kv_len], values[plan.read_view, :, :plan.kv_len]
        if plan.read_slots is not None:
            return keys[plan.read_slots, :, :plan.kv_len], values[plan.read_slots, :, :plan.kv_len]
        # packed: [J, kv_heads, head_dim] -> [1, kv_heads, J, head_dim]
        return (keys[plan.read_slot, :, plan.read_pos].transpose(0, 1).unsqueeze(0),
                values[plan.read_slot, :, plan.read_pos].transpose(0, 1).unsqueeze(0))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.plan is None else self.plan.kv_len


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
    def flush(self, states: Sequence["SlotLLMState"], wide_budget: Optional[int] = None) -> int:
        """Run the given states' queued work (pre-fill pieces, decode tokens); returns
        the rows run. Short rows (decode tokens, audio groups) run as a batch of rows
        in one forward; long pieces (a turn's template, a reply's canonical re-fill)
        run packed end to end in one sequence of their own, so no row is padded to
        another's length: at most two forwards, one in the steady state.
        `wide_budget`: the most long-piece tokens this call runs (chunked pre-fill,
        in the order given: the rest stays queued for the next call), so a burst of
        long pieces cannot stall everyone's next token for seconds."""
        todo = [s for s in states if s.slot is not None and s._pending]
        narrow = [s for s in todo if s._pending_len <= NARROW_ROW]
        wide = [s for s in todo if s._pending_len > NARROW_ROW]
        if narrow:
            self._run(narrow, [s._pending_len for s in narrow], self._forward_rows)
        takes, left = [], wide_budget
        for s in wide:
            take = s._pending_len if left is None else min(s._pending_len, left)
            if take <= 0:
                break
            takes.append(take)
            left = None if left is None else left - take
        if takes:
            self._run(wide[:len(takes)], takes, self._forward_packed)
        return len(narrow) + len(takes)

    def _run(self, todo: List["SlotLLMState"], takes: List[int], forward) -> None:
        pieces = [s._take(n) for s, n in zip(todo, takes)]
        # probes: (row, offset in its piece) whose logits were asked for (`SlotLLMState.probe`)
        probes = [(r, p - s._committed) for r, (s, n) in enumerate(zip(todo, takes))
                  for p in s._probes if s._committed <= p < s._committed + n]
        try:
            logits = forward([s.slot for s in todo], [s._committed for s in todo], pieces, probes)
        except BaseException:
            for s in todo:  # nothing was committed; the queued work is lost with the failed call
                s._drop_pending()
            raise
        logits, probed = logits[: len(todo)], logits[len(todo):]
        for (r, offset), row in zip(probes, probed):
            s = todo[r]
            s.probed[s._committed + offset] = row
            s._probes.remove(s._committed + offset)
        for s, piece, row in zip(todo, pieces, logits):
            s._committed += piece.shape[0]
            s._consume(piece.shape[0])
            s._logits = row if not s._pending else None  # a piece cut short: its logits are not the last
        self.forwards += 1
        self.max_rows = max(self.max_rows, len(todo))

    # Index tensors are built on the host and sent once: nothing in a forward waits for the device.
    def _send(self, *tensors):
        return [t.to(device=self.device, non_blocking=True) for t in tensors]

    def _run_decoder(self, x, mask, position_ids, plan: ForwardPlan, last) -> torch.Tensor:
        """Logits at the flat token indices `last` (each row's last real token, then any probes)."""
        mask, position_ids, last = self._send(mask, position_ids, last)
        self.cache.plan = plan
        try:
            hidden = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, cache=self.cache,
                                  use_cache=True).last_hidden_state
        finally:
            self.cache.plan = None
        return self.head(hidden.flatten(0, 1)[last]).float()  # each row's last real token

    def _forward_rows(self, slots: List[int], starts: List[int], pieces: List[torch.Tensor],
                      probes=()) -> torch.Tensor:
        """Batch row r = slot r's piece, right-padded; each row attends to its own slot."""
        lengths = [p.shape[0] for p in pieces]
        batch, width = len(pieces), max(lengths)
        x = pieces[0].new_zeros(batch, width, pieces[0].shape[-1])
        for r, p in enumerate(pieces):
            x[r, : p.shape[0]] = p
        position_ids = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]  # pad columns: never written
        kv_len = max(s + n for s, n in zip(starts, lengths))
        allowed = torch.arange(kv_len)[None, None, :] <= position_ids[:, :, None]  # causal within the row's own slot
        mask = torch.zeros(batch, 1, width, kv_len, dtype=self.dtype).masked_fill_(
            ~allowed[:, None], torch.finfo(self.dtype).min)
        rows = torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)])
        cols = torch.tensor([c for n in lengths for c in range(n)])
        consecutive = slots == list(range(slots[0], slots[0] + batch))
        slot_t = torch.tensor(slots)
        src_rows, src_cols, write_slot, write_pos, read_slots = self._send(
            rows, cols, slot_t[rows], position_ids[rows, cols], slot_t)
        plan = ForwardPlan(src_rows, src_cols, write_slot, write_pos, kv_len, read_slots=read_slots,
                           read_view=slice(slots[0], slots[0] + batch) if consecutive else None)
        last = torch.arange(batch) * width + torch.tensor(lengths) - 1
        last = torch.cat([last, torch.tensor([r * width + c for r, c in probes], dtype=torch.long)])
        return self._run_decoder(x, mask, position_ids, plan, last)

    def _forward_packed(self, slots: List[int], starts: List[int], pieces: List[torch.Tensor],
                        probes=()) -> torch.Tensor:
        """Every piece end to end in ONE sequence: each token attends to its own slot's
        history and the tokens before it in its piece (no padding)."""
        lengths = [p.shape[0] for p in pieces]
        x = torch.cat(pieces).unsqueeze(0)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
        owner = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])  # the piece of each query token
        kv_ends = [s + n for s, n in zip(starts, lengths)]
        read_pos = torch.cat([torch.arange(e) for e in kv_ends])
        read_owner = torch.cat([torch.full((e,), r) for r, e in enumerate(kv_ends)])
        allowed = (owner[:, None] == read_owner[None, :]) & (read_pos[None, :] <= positions[:, None])
        mask = torch.zeros(1, 1, *allowed.shape, dtype=self.dtype).masked_fill_(
            ~allowed[None, None], torch.finfo(self.dtype).min)
        slot_t = torch.tensor(slots)
        n = x.shape[1]
        src_rows, src_cols, write_slot, write_pos, read_slot, read_pos_d = self._send(
            torch.zeros(n, dtype=torch.long), torch.arange(n), slot_t[owner], positions, slot_t[read_owner], read_pos)
        plan = ForwardPlan(src_rows, src_cols, write_slot, write_pos, kv_len=int(read_pos.numel()),
                           read_slot=read_slot, read_pos=read_pos_d)
        ends = torch.tensor(lengths).cumsum(0)
        last = torch.cat([ends - 1, torch.tensor([int(ends[r]) - lengths[r] + c for r, c in probes],
                                                  dtype=torch.long)])
        return self._run_decoder(x, mask, positions.unsqueeze(0), plan, last)


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
        self._probes: List[int] = []  # positions whose logits are wanted when they run
        self.probed: Dict[int, torch.Tensor] = {}  # position -> the next-token logits there

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
        self._probes, self.probed = [], {}

    def probe(self) -> int:
        """Ask for the next-token logits at the last position queued so far (e.g. after a
        turn's audio, before its template text): they land in `probed[position]` when
        that position runs, in the same batched forward. Returns the position."""
        position = self.positions - 1
        if position < 0:
            raise ValueError("nothing pre-filled yet")
        if position < self._committed:  # already run: only its logits if they are the last
            if self._logits is None or position != self._committed - 1:
                raise ValueError("that position already ran without its logits kept")
            self.probed[position] = self._logits
        else:
            self._probes.append(position)
        return position

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
        self._probes = [p for p in self._probes if p < positions]
        self.probed = {p: v for p, v in self.probed.items() if p < positions}

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

    # -- the queue, as BatchedLLM runs it -------------------------------------------------
    def _take(self, n: int) -> torch.Tensor:
        """The first `n` queued positions, as one tensor (still queued until consumed)."""
        whole = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = [whole]
        return whole[:n]

    def _consume(self, n: int) -> None:
        rest = self._pending[0][n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_len = rest.shape[0]
        if not self._pending:
            self.pending_since = None

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_len = 0
        self.pending_since = None

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
