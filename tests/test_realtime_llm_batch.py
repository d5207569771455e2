"""BatchedLLM: one forward over many slots equals each conversation run alone."""
import pytest
import torch

from agent.realtime.llm_batch import BatchedLLM, check_batchable
from agent.realtime.llm_state import ContextFull, LLMState


@pytest.fixture(scope="module")
def model():
    from agent.ultravox.text_models import build_llama, build_tokenizer

    return build_llama(build_tokenizer(), size="tiny").eval()


def close(a, b):
    return (a - b).abs().max().item()


def test_rows_at_different_positions_match_their_own_cache(model):
    """Slots pre-filled with different lengths, then a mixed schedule of pre-fills and
    decode steps, with some slots sitting out some forwards."""
    torch.manual_seed(0)
    batch = BatchedLLM(model, slots=5)
    batch.open()  # slot 0 stays empty: the rows below are not a contiguous view
    slots = [batch.open() for _ in range(4)]
    refs = [LLMState(model) for _ in range(4)]
    for n, s, r in zip((3, 11, 1, 25), slots, refs):
        ids = torch.randint(3, 200, (n,))
        s.prefill_ids(ids)
        r.prefill_ids(ids)
    batch.close(slots[0])  # a gap in the middle
    slots[0], refs[0] = None, None
    live = [(s, r) for s, r in zip(slots, refs) if s is not None]
    # 11 and 25 queued positions run apart from the one-token row: two forwards, not one padded to 25
    assert batch.flush([s for s, _ in live]) == 3 and batch.forwards == 2 and batch.max_rows == 2
    for step in range(6):
        for k, (s, r) in enumerate(live):
            if (step + k) % 3 == 0:
                continue  # this slot sits out this forward
            if step % 2:
                tok = int(r.last_logits.argmax())
                s.queue_token(tok)
                r.decode_step(tok)
            else:
                ids = torch.randint(3, 200, (1 + step + k,))
                s.prefill_ids(ids)
                r.prefill_ids(ids)
        batch.flush([s for s, _ in live])
        for s, r in live:
            assert s.positions == r.positions
            assert close(s.last_logits, r.last_logits) < 1e-4


def test_truncate_rolls_back_committed_and_queued_work(model):
    batch = BatchedLLM(model, slots=2)
    s, r = batch.open(), LLMState(model)
    ids = list(range(3, 40))
    s.prefill_ids(ids)
    r.prefill_ids(ids)
    batch.flush([s])
    s.prefill_ids([7, 8, 9])  # queued only
    s.truncate(38)  # keeps one queued token
    assert s.pending == 1 and s.positions == 38
    r.prefill_ids([7])
    assert close(s.last_logits, r.last_logits) < 1e-4
    s.truncate(20)  # into the committed prefix
    r.truncate(20)
    assert s.last_logits is None and s.positions == 20
    s.prefill_ids([50, 51])
    r.prefill_ids([50, 51])
    assert close(s.last_logits, r.last_logits) < 1e-4
    with pytest.raises(ValueError, match="cannot truncate"):
        s.truncate(99)


def test_context_budget_and_slots(model):
    batch = BatchedLLM(model, slots=2, max_positions=10)
    a = batch.open()
    a.prefill_ids(list(range(3, 11)))
    with pytest.raises(ContextFull):
        a.prefill_ids([1, 2, 3])
    assert a.positions == 8  # nothing was queued by the refused call
    batch.open()
    with pytest.raises(RuntimeError, match="all 2 LLM slots"):
        batch.open()
    batch.close(a)
    assert batch.open().positions == 0  # a reused slot starts empty
    with pytest.raises(ValueError, match="max_position_embeddings"):
        BatchedLLM(model, slots=1, max_positions=model.config.max_position_embeddings + 1)


def test_a_model_with_sliding_window_is_refused_with_the_alternative(model):
    config = type(model.config)(**{**model.config.to_dict(), "layer_types": ["sliding_attention"] * 2})
    with pytest.raises(ValueError, match="llm-batching off"):
        check_batchable(config)


def test_chunked_prefill_under_a_token_budget(model):
    """Long pieces run at most `wide_budget` tokens per flush; the rest stays queued,
    and the result equals running them whole."""
    batch = BatchedLLM(model, slots=3)
    a, b = batch.open(), batch.open()
    ref_a, ref_b = LLMState(model), LLMState(model)
    ids_a, ids_b = list(range(3, 33)), list(range(50, 62))
    for s, r, ids in ((a, ref_a, ids_a), (b, ref_b, ids_b)):
        s.prefill_ids(ids)
        r.prefill_ids(ids)
    assert batch.flush([a, b], wide_budget=20) == 1  # a's first 20 tokens only
    assert a.pending == 10 and b.pending == 12 and a._logits is None
    assert batch.flush([b, a], wide_budget=20) == 2  # b whole (12), then 8 of a
    assert a.pending == 2 and b.pending == 0
    assert close(b.last_logits, ref_b.last_logits) < 1e-4
    batch.flush([a])
    assert a.pending == 0 and close(a.last_logits, ref_a.last_logits) < 1e-4
