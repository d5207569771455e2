"""sampling: greedy is argmax, top-p keeps HF's nucleus, draws follow the distribution."""
import pytest
import torch

from agent.realtime.sampling import GenerationSettings, Sampler, nucleus_mask, select_next, stop_ids

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.2, 0.3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"seed": "abc"}, "seed"),
        ({"stop_token_ids": ["x"]}, "stop_token_ids"),
    ],
)
def test_invalid_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**kwargs)


def test_settings_normalize_and_replace_revalidates():
    s = GenerationSettings(temperature=1, stop_token_ids=[5, 7], seed=3)
    assert s.temperature == 1.0 and s.stop_token_ids == (5, 7) and not s.greedy
    assert GenerationSettings(stop_token_ids=9).stop_token_ids == (9,)
    assert GenerationSettings().greedy
    assert s.replace(temperature=0).greedy
    with pytest.raises(ValueError, match="top_p"):
        s.replace(top_p=2)
    assert stop_ids(2, None, [2, 4], (4, 6)) == (2, 4, 6)


def test_greedy_is_argmax_like_hf_generate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    assert torch.equal(select_next(logits), torch.argmax(logits, dim=-1))
    assert int(select_next(logits[3])) == int(torch.argmax(logits[3]))
    tied = torch.tensor([0.1, 3.0, 3.0, -1.0])
    assert int(select_next(tied)) == 1  # the first maximum, as torch.argmax in HF greedy search
    sampler = Sampler(GenerationSettings(temperature=0.0))
    assert sampler(logits[5]) == int(torch.argmax(logits[5]))


def test_greedy_matches_hf_generate_on_a_tiny_llm():
    from agent.ultravox.text_models import build_llama, build_tokenizer

    tok = build_tokenizer()
    model = build_llama(tok, "tiny", seed=1)
    ids = torch.tensor([tok.encode("Turn on the lights", add_special_tokens=False)])
    with torch.no_grad():
        hf = model.generate(ids, do_sample=False, max_new_tokens=8, temperature=None, top_p=None, top_k=None,
                            eos_token_id=None)[0, ids.shape[1]:].tolist()
        seq, mine = ids, []
        for _ in range(8):
            nxt = select_next(model(seq).logits[0, -1])
            mine.append(int(nxt))
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert mine == hf


def test_nucleus_is_hf_top_p_set():
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    for top_p in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999):
        logits = torch.randn(8, 40, generator=g) * 2
        hf_keep = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(nucleus_mask(torch.softmax(logits, -1), top_p), hf_keep), top_p


def test_tiny_top_p_always_gives_the_argmax():
    sampler = Sampler(GenerationSettings(temperature=1.5, top_p=1e-6, seed=0))
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        logits = torch.randn(30, generator=g)
        assert sampler(logits) == int(torch.argmax(logits))


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.0, 1.0), (1.8, 0.6)])
def test_draws_follow_softmax_over_the_nucleus(temperature, top_p):
    n = 40000
    probs = torch.softmax(LOGITS / temperature, dim=-1)
    keep = nucleus_mask(probs, top_p)
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    gen = torch.Generator().manual_seed(1234)
    draws = select_next(LOGITS.expand(n, -1), temperature, top_p, gen)
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    assert counts[~keep].sum() == 0  # nothing outside the nucleus
    exp_counts = expected[keep].double() * n
    chi2 = float(((counts[keep] - exp_counts) ** 2 / exp_counts).sum())
    dof = int(keep.sum()) - 1
    # 99.9% quantile of chi-square is below dof + 4.5 * sqrt(2 dof) + 6 for these dof.
    assert chi2 < dof + 4.5 * (2 * max(dof, 1)) ** 0.5 + 6, (chi2, dof)
    # Independent oracle for the nucleus: most probable first, until the mass reaches top_p.
    order, mass, oracle = sorted(range(len(probs)), key=lambda i: -float(probs[i])), 0.0, set()
    for i in order:
        if mass >= top_p:
            break
        oracle.add(i)
        mass += float(probs[i])
    assert set(torch.nonzero(keep).flatten().tolist()) == oracle
    assert 1 < len(oracle) <= len(LOGITS)


def test_seeded_samplers_are_reproducible_and_seeds_differ():
    settings = GenerationSettings(temperature=1.0, seed=42)
    a, b = Sampler(settings), Sampler(settings)
    c = Sampler(settings.replace(seed=43))
    sa = [a(LOGITS) for _ in range(64)]
    assert sa == [b(LOGITS) for _ in range(64)]
    assert sa != [c(LOGITS) for _ in range(64)]
    state = torch.random.get_rng_state()
    Sampler(GenerationSettings(temperature=1.0))  # no seed: must not touch the global generator
    assert torch.equal(state, torch.random.get_rng_state())


def test_batch_rows_are_sampled_independently_and_stop_ids_are_checked():
    logits = torch.full((3, 5), -1e4)
    logits[0, 1] = logits[1, 3] = logits[2, 4] = 0.0
    sampler = Sampler(GenerationSettings(temperature=1.0, seed=0, stop_token_ids=(4,)))
    assert sampler(logits).tolist() == [1, 3, 4]
    assert sampler.is_stop(4) and not sampler.is_stop(3)
    with pytest.raises(ValueError, match="logits"):
        select_next(torch.zeros(2, 3, 4))
