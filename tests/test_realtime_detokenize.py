"""detokenize: deltas never split a character and add up to tokenizer.decode."""
import random

import pytest

from agent.realtime.detokenize import REPLACEMENT, IncrementalDetokenizer, stream_text

TEXTS = [
    "Ünïcödé façade, naïve café — 日本語 テスト ✓",
    "Emoji: 😀🎉 ok 👍🏽 family 👨‍👩‍👧 flag 🇫🇷.",
    "Turning on the lights in the kitchen. 3 plus 4 is 7.",
    "  leading spaces,\ttabs\nand newlines\n\n",
]


@pytest.fixture(scope="module")
def tok():
    from agent.ultravox.text_models import build_tokenizer

    return build_tokenizer()


def llama2_style_tokenizer():
    """SentencePiece-style: '▁' for spaces, byte fallback for unknown characters, and a
    decoder that strips the first leading space (the case the decode window is for)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzTU,.—✓":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "f")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def deltas_of(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_and_never_split_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = deltas_of(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT in d for d in deltas)
    assert deltas[-1] == ""  # valid text leaves nothing held back


def test_the_text_really_has_tokens_that_end_inside_a_character(tok):
    """Guard: the cases above exercise the hold-back path (else they prove nothing)."""
    ids = tok.encode(TEXTS[0] + TEXTS[1], add_special_tokens=False)
    split = [i for i in ids if REPLACEMENT in tok.decode([i])]
    assert len(split) >= 5
    detok = IncrementalDetokenizer(tok)
    held = [detok.push(i) for i in ids]
    assert held.count("") >= 5  # some tokens completed no character


def test_emoji_bytes_are_released_only_when_complete(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) == 4  # one byte per token in this small vocabulary
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids] == ["", "", "", "😀"]


def test_special_tokens_are_skipped_or_kept(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = [start] + tok.encode("café ✓", add_special_tokens=False) + [end]
    assert "".join(deltas_of(tok, ids)) == "café ✓"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = detok.extend(ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=False) == "<|im_start|>café ✓<|im_end|>"


def test_special_token_inside_a_character_does_not_break_it(tok):
    ids = tok.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    ids.insert(1, tok.convert_tokens_to_ids("<|im_end|>"))
    deltas = deltas_of(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "日"


def test_random_ids_add_up_to_decode(tok):
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        assert "".join(deltas_of(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_stream_text_yields_only_non_empty_deltas(tok):
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    deltas = list(stream_text(tok, ids))
    assert all(deltas) and "".join(deltas) == TEXTS[0]
    # An unresolved partial character is released by the final flush.
    partial = tok.encode("日", add_special_tokens=False)[:-1]
    assert list(stream_text(tok, partial)) == [tok.decode(partial)]
    assert tok.decode(partial).endswith(REPLACEMENT)


def test_sentencepiece_style_tokenizer_with_byte_fallback():
    sp = llama2_style_tokenizer()
    text = "the café — 日本語 ✓ the Ünïcödé 😀"
    ids = sp.encode(text, add_special_tokens=False)
    assert any(sp.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback in use
    deltas = deltas_of(sp, ids)
    assert "".join(deltas) == sp.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT in d for d in deltas)
    assert deltas[:3] == ["the", " c", "af"]  # the first token's space is stripped, later ones keep it
    rng = random.Random(1)
    for _ in range(200):
        rand = [rng.randrange(len(sp)) for _ in range(rng.randint(1, 30))]
        assert "".join(deltas_of(sp, rand)) == sp.decode(rand, skip_special_tokens=True), rand


def test_an_open_byte_fallback_run_is_held_until_it_closes(tok):
    """tokenizers decodes a run of byte tokens as a group: one invalid byte turns every
    byte of the run into U+FFFD, so earlier bytes of the run must not be emitted yet."""
    from agent.realtime.detokenize import byte_fallback_ids

    sp = llama2_style_tokenizer()
    assert len(byte_fallback_ids(sp)) == 256 and byte_fallback_ids(tok) == frozenset()
    ids = sp.convert_tokens_to_ids(["▁the", "<0x1D>", "<0x7F>", "<0xFA>", "▁c"])
    detok = IncrementalDetokenizer(sp)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert deltas == ["the", "", "", "", REPLACEMENT * 3 + " c", ""]
    assert "".join(deltas) == sp.decode(ids)
