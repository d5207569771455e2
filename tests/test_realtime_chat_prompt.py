"""chat_prompt: incremental segments tokenize exactly like UltravoxInference.prepare."""
import numpy as np
import pytest

from agent.realtime.chat_prompt import (
    DEFAULT_PLACEHOLDER,
    ChatTemplateError,
    assistant_turn_ids,
    encode,
    expand_audio,
    render,
    user_content,
    user_turn_ids,
)

REPLY_1 = "Turning on the lights in the kitchen. Ünïcödé façade ✓"


def wave(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def test_placeholder_matches_the_model_config():
    from agent.ultravox.config import AUDIO_PLACEHOLDER

    assert DEFAULT_PLACEHOLDER == AUDIO_PLACEHOLDER


@pytest.mark.parametrize("system_prompt", [None, "You are a helpful voice assistant. Answer briefly."])
@pytest.mark.parametrize("text", ["", "What did I say?"])
def test_two_turns_built_incrementally_equal_prepare_on_the_whole_conversation(tiny_inference, system_prompt, text):
    tok, proc = tiny_inference.tokenizer, tiny_inference.processor
    audio_id = proc.audio_token_id
    w1, w2 = wave(1.3, seed=1), wave(2.1, seed=2)
    n1, n2 = proc.audio_token_count(len(w1)), proc.audio_token_count(len(w2))
    assert n1 != n2

    # Turn 1: nothing is cached yet.
    c1 = user_content(text)
    t1 = user_turn_ids(tok, [], c1, system_prompt=system_prompt)
    assert t1.cached == [] and t1.audio_token_id == audio_id
    session = t1.before + [audio_id] * n1 + t1.after
    offline = tiny_inference.prepare([{"role": "user", "content": c1}], audio=w1, system_prompt=system_prompt)
    assert session == offline["input_ids"][0].tolist()
    # The assistant header closes the "after" segment: decoding starts right after it.
    assert tok.decode(t1.after).endswith("<|im_start|>assistant\n")
    assert audio_id not in t1.before + t1.after

    # The reply and the template's end of turn go into the cache.
    history = [{"role": "user", "content": c1}]
    a1 = assistant_turn_ids(tok, history, REPLY_1, system_prompt=system_prompt)
    assert tok.decode(a1.reply) == REPLY_1
    assert tok.decode(a1.closing) == "<|im_end|>\n"
    session += a1.reply + a1.closing

    # Turn 2: only the new tokens are pre-filled.
    history.append({"role": "assistant", "content": REPLY_1})
    c2 = user_content(text and "And now?")
    t2 = user_turn_ids(tok, history, c2, system_prompt=system_prompt)
    assert expand_audio(t2.cached, audio_id, [n1]) == session
    session += t2.before + [audio_id] * n2 + t2.after
    offline = tiny_inference.prepare(history + [{"role": "user", "content": c2}], audio=[w1, w2], system_prompt=system_prompt)
    assert session == offline["input_ids"][0].tolist()
    # The system prompt was pre-filled once, on turn 1.
    if system_prompt:
        assert tok.decode(t1.before).count(system_prompt) == 1
        assert system_prompt not in tok.decode(t2.before)
    assert tok.decode(t2.before).startswith("<|im_start|>user\n")


def test_segments_are_the_template_text_around_the_placeholder():
    from agent.ultravox.text_models import build_tokenizer

    tok = build_tokenizer()
    t = user_turn_ids(tok, [], user_content("Hi"), system_prompt="S")
    assert tok.decode(t.before) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi\n"
    assert tok.decode(t.after) == "<|im_end|>\n<|im_start|>assistant\n"
    whole = render(tok, [{"role": "user", "content": user_content("Hi")}], "S", add_generation_prompt=True)
    assert t.before + [t.audio_token_id] + t.after == encode(tok, whole)


def test_non_canonical_reply_ids_are_detectable():
    """The caveat: ids the model emitted may decode to a reply whose canonical ids differ."""
    from agent.ultravox.text_models import build_tokenizer

    tok = build_tokenizer()
    history = [{"role": "user", "content": DEFAULT_PLACEHOLDER}]
    emitted = [tok.convert_tokens_to_ids(c) for c in "the"]  # spelled out letter by letter
    text = tok.decode(emitted, skip_special_tokens=True)
    assert text == "the"
    canonical = assistant_turn_ids(tok, history, text).reply
    assert canonical == encode(tok, "the") and canonical != emitted


def test_template_that_drops_the_placeholder_is_a_clear_error():
    from agent.ultravox.text_models import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="placeholder"):
        user_turn_ids(tok, [])


def test_template_that_re_renders_earlier_turns_and_bad_content_are_clear_errors():
    from agent.ultravox.text_models import build_tokenizer

    tok = build_tokenizer()
    history = [{"role": "user", "content": DEFAULT_PLACEHOLDER}, {"role": "assistant", "content": "ok"}]
    assert user_turn_ids(tok, history).cached == encode(tok, render(tok, history))
    # A template that renders the newest message first: the cached conversation is no prefix.
    tok.chat_template = (
        "{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="reset the conversation"):
        user_turn_ids(tok, history)
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="exactly once"):
        user_turn_ids(tok, history, "no audio here")
    with pytest.raises(ValueError, match="exactly once"):
        user_turn_ids(tok, history, DEFAULT_PLACEHOLDER * 2)
    with pytest.raises(ValueError, match="count"):
        expand_audio([1, 3, 2], 3, [4, 5])
    assert expand_audio([1, 3, 2, 3], 3, [2, 1]) == [1, 3, 3, 2, 3]


def test_tokenizer_without_the_audio_token_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from agent.ultravox.text_models import CHAT_TEMPLATE

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                                                   show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="UltravoxProcessor"):
        user_turn_ids(tok, [])
