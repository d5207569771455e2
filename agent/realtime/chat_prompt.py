"""The tokenizer's own chat template, split into token segments around the audio.

A realtime session pre-fills the LLM's KV cache in pieces: the template text
before a user turn's audio as soon as the turn can start, the audio embeddings
while the user talks, and the rest of the user turn plus the assistant header
when the turn ends. This module finds those pieces by rendering the tokenizer's
chat template (never a hand-written format) around the `<|audio|>` placeholder
and diffing against what the cache already holds, so that

    cached + before + [audio id] * n + after

is exactly the `input_ids` that `UltravoxInference.prepare` builds for the whole
conversation (n = the audio positions of this turn's utterance).

"What the cache holds" is the conversation so far (`history`) rendered with
`add_generation_prompt=False`: after a reply the session has pre-filled the
previous user turn, the assistant header, the reply and the template's
end-of-turn text (`assistant_turn_ids(...).closing`, `<|im_end|>\\n` in ChatML).
That needs a template whose rendering of a longer conversation starts with the
rendering of a shorter one (ChatML, Llama 3, Mistral do); one that re-renders
earlier turns (or a system prompt changed mid-conversation) raises
`ChatTemplateError`, and the caller must reset the cache and pre-fill again.

Caveat, replies: the offline path sees an earlier reply as *text* and
re-tokenizes it; the session has the ids the model emitted in its cache. They
are the same only when the emitted ids are the tokenizer's canonical
tokenization of the decoded reply. A trained model nearly always emits those; a
random one often does not (e.g. "t" + "he" for "the"), and special tokens it
emits vanish from the decoded text. `assistant_turn_ids(...).reply` gives the
canonical ids: when they differ from the emitted ones, crop the cache back to
the reply's start and pre-fill `reply + closing` to stay token-identical to the
offline model (or keep the emitted ids: self-consistent, but not what the
offline path computes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# Same value as agent.ultravox.config.AUDIO_PLACEHOLDER; not imported from there
# because importing agent.ultravox loads the whole model stack (NeMo).
DEFAULT_PLACEHOLDER = "<|audio|>"

Message = Dict[str, str]  # {"role": ..., "content": ...}


class ChatTemplateError(ValueError):
    """The chat template cannot be split the way incremental pre-fill needs."""


@dataclass(frozen=True)
class UserTurnIds:
    """Token segments of a new user turn with audio.

    cached: the ids of the conversation so far (each earlier audio as ONE audio
        id; `expand_audio` turns them into the positions the cache holds).
    before: pre-fill before the audio: the delta from `cached` up to the audio.
    after: pre-fill after the audio: the rest of the user turn and the assistant
        generation header; decoding starts right after these.
    """

    cached: List[int]
    before: List[int]
    after: List[int]
    audio_token_id: int


@dataclass(frozen=True)
class AssistantTurnIds:
    """reply: the reply content as the offline path tokenizes it (canonical ids).
    closing: the template's end of the assistant turn after the content (ChatML:
        `<|im_end|>\\n`), i.e. the text between the reply and the next message."""

    reply: List[int]
    closing: List[int]


def user_content(text: str = "", placeholder: str = DEFAULT_PLACEHOLDER) -> str:
    """A user message's content for an audio turn, as `UltravoxInference.build_prompt`
    writes it: the placeholder alone, or `text + "\\n" + placeholder`."""
    return f"{text}\n{placeholder}" if text else placeholder


def render(
    tokenizer,
    messages: Sequence[Message],
    system_prompt: Optional[str] = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's text for `messages` (a system message first when given,
    as `UltravoxInference.build_prompt` does). No messages: the empty string."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs += [dict(m) for m in messages]
    if not msgs:
        return ""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> List[int]:
    """Token ids of `text` the way `UltravoxProcessor` tokenizes a prompt (no extra
    special tokens: the template's text carries them)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def audio_token_id(tokenizer, placeholder: str = DEFAULT_PLACEHOLDER) -> int:
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    if token_id is None or token_id == tokenizer.unk_token_id or placeholder not in tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer has no {placeholder!r} token: use the tokenizer saved with the checkpoint "
            f"(UltravoxProcessor adds it as a special token)"
        )
    return int(token_id)


def expand_audio(ids: Sequence[int], audio_id: int, counts: Sequence[int]) -> List[int]:
    """Replace the k-th audio id in `ids` by `counts[k]` copies, as `UltravoxProcessor`
    expands each placeholder into that audio's positions."""
    slots = sum(1 for t in ids if t == audio_id)
    if slots != len(counts):
        raise ValueError(f"{slots} audio id(s) in the ids but {len(counts)} count(s) given")
    out: List[int] = []
    it = iter(counts)
    for t in ids:
        out.extend([t] * int(next(it)) if t == audio_id else [t])
    return out


def _split_after_prefix(tokenizer, prefix_text: str, full_text: str, what: str):
    """(ids of prefix_text, the remaining ids of full_text), checking that the prefix
    tokenizes the same alone as inside the full text."""
    if not full_text.startswith(prefix_text):
        raise ChatTemplateError(
            f"the chat template does not render {what} as a continuation of the conversation so far "
            f"(it re-renders earlier turns, or the system prompt changed): the cached tokens cannot be "
            f"reused; reset the conversation's cache and pre-fill it again"
        )
    full = encode(tokenizer, full_text)
    prefix = encode(tokenizer, prefix_text)
    if full[: len(prefix)] != prefix:
        raise ChatTemplateError(
            f"a token spans the boundary before {what}: {full_text[len(prefix_text) - 20:len(prefix_text) + 20]!r} "
            f"tokenizes differently in one piece than split, so it cannot be pre-filled incrementally"
        )
    return prefix, full[len(prefix):]


def user_turn_ids(
    tokenizer,
    history: Sequence[Message],
    content: Optional[str] = None,
    system_prompt: Optional[str] = None,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> UserTurnIds:
    """Segments for a new user turn with audio after `history` (the conversation so far,
    already in the cache; empty at the start of a session, when `before` holds the
    system prompt and the template's text up to the audio).

    `content`: the new user message, holding the placeholder exactly once (default:
    the placeholder alone; see `user_content` for a text prompt before the audio).
    """
    content = placeholder if content is None else content
    if content.count(placeholder) != 1:
        raise ValueError(f"the new user turn must hold {placeholder!r} exactly once, got {content!r}")
    audio_id = audio_token_id(tokenizer, placeholder)
    messages = list(history) + [{"role": "user", "content": content}]
    full_text = render(tokenizer, messages, system_prompt, add_generation_prompt=True)
    expected = sum(str(m["content"]).count(placeholder) for m in messages) + (system_prompt or "").count(placeholder)
    if full_text.count(placeholder) != expected:
        raise ChatTemplateError(
            f"the chat template rendered {full_text.count(placeholder)} {placeholder!r} placeholder(s) where the "
            f"messages hold {expected}: it must render each message's content verbatim"
        )
    cached_text = render(tokenizer, history, system_prompt) if history else ""
    cached, rest = _split_after_prefix(tokenizer, cached_text, full_text, "the new user turn")
    slots = [i for i, t in enumerate(rest) if t == audio_id]
    if len(slots) != 1:
        raise ChatTemplateError(
            f"the new user turn tokenizes to {len(slots)} {placeholder!r} token(s), expected 1: the placeholder "
            f"must be a special token of the tokenizer"
        )
    i = slots[0]
    return UserTurnIds(cached=cached, before=rest[:i], after=rest[i + 1:], audio_token_id=audio_id)


def assistant_turn_ids(
    tokenizer,
    history: Sequence[Message],
    reply: str,
    system_prompt: Optional[str] = None,
) -> AssistantTurnIds:
    """Ids of the reply `reply` to the last user turn of `history` and of the text that
    closes the assistant turn, as the template renders `history + [assistant(reply)]`.

    After decoding, the session pre-fills whatever of `reply + closing` is not in its
    cache yet (HF-style decoding never feeds the last emitted token back), so the
    next turn's `user_turn_ids(history + [assistant(reply)])` starts where it stops.
    """
    prompt_text = render(tokenizer, history, system_prompt, add_generation_prompt=True)
    done_text = render(tokenizer, list(history) + [{"role": "assistant", "content": reply}], system_prompt)
    prompt, rest = _split_after_prefix(tokenizer, prompt_text, done_text, "the assistant reply")
    tail = done_text[len(prompt_text):]
    # Templates such as Llama 3's trim the content; the reply is then the trimmed text.
    shown = next((c for c in (reply, reply.strip()) if tail.startswith(c)), None)
    if shown is None:
        raise ChatTemplateError(
            f"the chat template does not render the assistant content verbatim (rendered {tail!r} for {reply!r})"
        )
    with_reply, closing = _split_after_prefix(tokenizer, prompt_text + shown, done_text, "the end of the assistant turn")
    if with_reply[: len(prompt)] != prompt:
        raise ChatTemplateError(
            "the reply's first token merges with the end of the assistant header: it cannot be decoded after "
            "a pre-filled header"
        )
    return AssistantTurnIds(reply=with_reply[len(prompt):], closing=closing)


def continuation_ids(
    tokenizer,
    history: Sequence[Message],
    new_messages: Sequence[Message],
    system_prompt: Optional[str] = None,
    add_generation_prompt: bool = True,
    cached_generation_prompt: bool = False,
) -> List[int]:
    """The ids that follow the cached conversation `history` (rendered with the
    generation header when `cached_generation_prompt`) to make `history +
    new_messages` (with the header when `add_generation_prompt`): a typed user turn,
    a system message before a reply, the generation header alone (no new messages)."""
    cached_text = render(tokenizer, history, system_prompt, cached_generation_prompt) if history else ""
    full_text = render(tokenizer, list(history) + list(new_messages), system_prompt, add_generation_prompt)
    return _split_after_prefix(tokenizer, cached_text, full_text, "the new message(s)")[1]


def generation_header_ids(tokenizer, history: Sequence[Message], system_prompt: Optional[str] = None) -> List[int]:
    """The assistant generation header after `history` (ChatML: `<|im_start|>assistant\\n`)."""
    return continuation_ids(tokenizer, history, [], system_prompt, add_generation_prompt=True)
