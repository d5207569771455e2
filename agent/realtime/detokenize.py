"""Incremental detokenization: token ids in, one at a time; text deltas out.

Byte-level BPE (GPT-2 style) and byte-fallback tokenizers can end a token in the
middle of a multi-byte UTF-8 character: decoding such a prefix yields a trailing
U+FFFD that becomes a real character once the next token arrives. Deltas are
held back while the decoded text ends in U+FFFD, so a client never receives a
broken character; `flush()` at the end of the reply releases whatever is left
(an unresolved U+FFFD is then really in the text).

Only a short window of ids is decoded per token (the tokens since the
second-to-last emission, as vLLM does): a token decoded after its predecessor
keeps the leading space that decoders such as SentencePiece's strip from a
sequence's first token, and the cost per token stays constant however long the
reply gets. The concatenation of the deltas equals
`tokenizer.decode(all_ids, skip_special_tokens=skip_special_tokens)`.

Byte-fallback tokenizers (Llama 2, Mistral: `<0xE6>`-style tokens) decode a run
of byte tokens as one group and, if the run is not valid UTF-8 as a whole,
replace every byte of it by U+FFFD, so a later byte token can change the text of
earlier ones. Text is therefore held back while such a run is open (the last
token is a byte token); a character is released one token late at most.
"""
from __future__ import annotations

from typing import FrozenSet, Iterable, Iterator, List

REPLACEMENT = "\ufffd"


def byte_fallback_ids(tokenizer) -> FrozenSet[int]:
    """The ids of the `<0x00>`..`<0xFF>` tokens of a byte-fallback tokenizer (else empty)."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not getattr(model, "byte_fallback", False):
        return frozenset()
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in (f"<0x{b:02X}>" for b in range(256)) if t in vocab)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: List[int] = []
        self._prefix_offset = 0  # window start: ids before it are settled
        self._read_offset = 0  # ids before it have been emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._emitted: List[str] = []
        self._byte_ids = byte_fallback_ids(tokenizer)
        # Skipped special tokens vanish before the decoder runs, so they neither open nor close a byte run.
        self._transparent = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._byte_run_open = False

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._emitted)

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text it completes ("" while held back)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id not in self._transparent:
            self._byte_run_open = token_id in self._byte_ids
        if self._byte_run_open:
            return ""
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # a skipped special token, or a character still incomplete
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        self._emitted.append(delta)
        return delta

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several tokens; returns their combined delta."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: the held-back rest, U+FFFD included if it never resolved."""
        if self._read_offset == len(self.ids):
            return ""
        new_text = self._decode(self.ids[self._prefix_offset:])
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset = len(self.ids)
        self._prefix_text = ""
        self._byte_run_open = False
        if delta:
            self._emitted.append(delta)
        return delta


def stream_text(tokenizer, token_ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
    """Non-empty text deltas for `token_ids`, flushed at the end."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    for t in token_ids:
        delta = detok.push(t)
        if delta:
            yield delta
    rest = detok.flush()
    if rest:
        yield rest
