"""llm_state: pre-fill in pieces + step decoding == one forward + HF generate."""
import pytest
import torch

from agent.realtime.llm_state import ContextFull, LLMState
from agent.realtime.sampling import select_next

N_NEW = 12


@pytest.fixture(scope="module")
def tiny():
    from agent.ultravox.text_models import build_llama, build_tokenizer

    tok = build_tokenizer()
    model = build_llama(tok, "tiny", seed=0)
    # A random model with tied embeddings greedily repeats its last input token forever, which
    # would make "same tokens" a weak check: give it its own output head so replies vary.
    g = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(0.1 * torch.randn(model.lm_head.weight.shape, generator=g))
    return tok, model


def pieces(tok, model):
    """Prompt prefix ids, three chunks of "audio" embeddings, suffix ids (the session's order)."""
    emb = model.get_input_embeddings()
    prefix = tok.encode("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)
    suffix = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    g = torch.Generator().manual_seed(0)
    scale = emb.weight.std()
    chunks = [torch.randn(1, n, emb.embedding_dim, generator=g) * scale for n in (3, 1, 4)]
    return prefix, chunks, suffix


def whole_embeds(model, prefix, chunks, suffix):
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return torch.cat([emb(torch.tensor([prefix]))] + chunks + [emb(torch.tensor([suffix]))], dim=1)


def test_piecewise_prefill_and_step_decoding_equal_one_forward_and_hf_generate(tiny):
    tok, model = tiny
    prefix, chunks, suffix = pieces(tok, model)
    whole = whole_embeds(model, prefix, chunks, suffix)

    state = LLMState(model)
    state.prefill_ids(prefix)
    for c in chunks:
        state.prefill_embeds(c)
    logits = state.prefill_ids(suffix)
    assert state.positions == whole.shape[1] == state.cache.get_seq_length()
    with torch.no_grad():
        ref = model(inputs_embeds=whole).logits[0, -1]
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)

    mine, step_logits = [], [logits]
    for _ in range(N_NEW):
        token = int(select_next(step_logits[-1]))
        mine.append(token)
        step_logits.append(state.decode_step(token))

    with torch.no_grad():
        hf = model.generate(inputs_embeds=whole, attention_mask=torch.ones(whole.shape[:2], dtype=torch.long),
                            do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
                            temperature=None, top_p=None, top_k=None)[0].tolist()
        # Teacher-forced forward over prompt + reply: the logits at every decode step.
        emb = model.get_input_embeddings()
        full = torch.cat([whole, emb(torch.tensor([mine]))], dim=1)
        ref_steps = model(inputs_embeds=full).logits[0, whole.shape[1] - 1:]
    assert mine == hf
    assert len(set(mine)) > 1  # a reply that varies, not one token repeated
    torch.testing.assert_close(torch.stack(step_logits), ref_steps, rtol=0, atol=1e-5)


def test_context_budget_raises_before_running_and_leaves_the_state_usable(tiny):
    tok, model = tiny
    state = LLMState(model, max_positions=10)
    assert state.max_positions == 10 and state.remaining == 10
    first = state.prefill_ids(list(range(10, 18)))
    with pytest.raises(ContextFull) as err:
        state.prefill_ids([20, 21, 22])
    assert (err.value.used, err.value.requested, err.value.limit) == (8, 3, 10)
    assert state.positions == 8 and state.cache.get_seq_length() == 8
    assert torch.equal(state.prefill_ids([]), first)  # nothing ran: the logits are still the last ones
    state.decode_step(30)
    state.decode_step(31)
    assert state.remaining == 0 and not state.fits(1)
    with pytest.raises(ContextFull):
        state.decode_step(32)
    assert state.positions == 10


def test_default_budget_is_the_models_and_larger_budgets_are_refused(tiny):
    _, model = tiny
    assert LLMState(model).max_positions == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLMState(model, max_positions=model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match=">= 1"):
        LLMState(model, max_positions=0)


def test_truncate_drops_a_reply_and_re_prefill_gives_the_same_logits(tiny):
    tok, model = tiny
    prefix, chunks, suffix = pieces(tok, model)
    state = LLMState(model)
    state.prefill_ids(prefix)
    mark = state.positions
    after_a = state.prefill_ids([40, 41, 42])
    state.decode_step(43)
    state.truncate(mark)
    assert state.positions == mark == state.cache.get_seq_length() and state.last_logits is None
    torch.testing.assert_close(state.prefill_ids([40, 41, 42]), after_a, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot truncate"):
        state.truncate(state.positions + 1)
    state.truncate(0)
    assert state.positions == 0 and state.cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="nothing pre-filled"):
        state.prefill_ids([])


def test_bad_embeddings_are_clear_errors(tiny):
    _, model = tiny
    state = LLMState(model)
    with pytest.raises(ValueError, match="one conversation"):
        state.prefill_embeds(torch.zeros(2, 3, model.config.hidden_size))
    with pytest.raises(ValueError, match="width"):
        state.prefill_embeds(torch.zeros(1, 3, model.config.hidden_size + 1))
    assert state.positions == 0


def test_a_failed_call_rolls_the_cache_back(tiny, monkeypatch):
    tok, model = tiny
    state = LLMState(model)
    state.prefill_ids([5, 6, 7])
    layer = model.model.layers[1]
    original = layer.forward

    def fail(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(layer, "forward", fail)  # layer 0 has already appended its keys when this raises
    with pytest.raises(RuntimeError, match="simulated"):
        state.prefill_ids([8, 9])
    monkeypatch.setattr(layer, "forward", original)
    assert state.positions == 3
    assert [lay.get_seq_length() for lay in state.cache.layers] == [3, 3]
    fresh = LLMState(model)
    fresh.prefill_ids([5, 6, 7])
    torch.testing.assert_close(state.prefill_ids([8, 9]), fresh.prefill_ids([8, 9]), rtol=0, atol=1e-6)
