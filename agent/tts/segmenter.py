"""Cut a streaming reply into pieces to synthesize while the rest is still being decoded.

A piece ends after sentence punctuation (. ! ? ...), after a clause mark (, ; :) once the
piece is at least `min_clause_chars` long (an early first piece, without chopping every
comma), or at a line break. A run-on without any of these is cut at a space: the first piece
past `first_max_chars` (so the first audio does not wait for a long unpunctuated clause), later
ones past `max_chars`. Punctuation counts only when followed by whitespace, so "3.5",
"1,000", "e.g." inside a word and "12:30" never cut. A piece keeps the whitespace that follows
its punctuation, and every character lands in exactly one piece: "".join(pieces) is the text.
"""

from __future__ import annotations

from typing import List

_SENTENCE = ".!?…"
_CLAUSE = ",;:"
# Closers that belong to the punctuation before them: 'He said "no." Then'.
_CLOSERS = "\"')]}»”’"
# "Dr. Smith" is one sentence; a wrong cut only adds a pause, so the list stays short.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e",
                  "approx", "fig", "mt", "inc", "ltd"}


class TextSegmenter:
    """`push(delta)` returns the pieces completed by `delta`; `flush()` returns the rest."""

    def __init__(self, min_clause_chars: int = 25, max_chars: int = 200, first_max_chars: int = 60):
        self.min_clause_chars = int(min_clause_chars)
        # A run-on without punctuation is cut at its last space past this length.
        self.max_chars = int(max_chars)
        self.first_max_chars = int(first_max_chars)
        self._first = True  # no piece returned yet
        self._buf = ""
        self._scan = 0  # positions before this were checked already and hold no cut

    def push(self, delta: str) -> List[str]:
        if not delta:
            return []
        self._buf += delta
        out: List[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            self._scan = 0
            self._first = False
        return out

    def flush(self) -> List[str]:
        rest, self._buf, self._scan = self._buf, "", 0
        return [rest] if rest else []

    @property
    def pending(self) -> str:
        """Text pushed but not yet returned in a piece."""
        return self._buf

    def _next_cut(self):
        buf, n = self._buf, len(self._buf)
        i = self._scan
        while i < n:
            ch = buf[i]
            if ch == "\n":
                end = self._after_space(i)
                if end is None:
                    self._scan = i
                    return None
                if buf[:i].strip():
                    return end
                i = end  # leading blank lines stay with the next piece
                continue
            if ch in _SENTENCE or ch in _CLAUSE:
                j = i + 1
                while j < n and (buf[j] in _CLOSERS or buf[j] in _SENTENCE):
                    j += 1  # "?!", "...", '."'
                if j >= n:
                    self._scan = i  # need to see what follows
                    return None
                if buf[j].isspace():
                    if self._is_boundary(i, j, ch):
                        end = self._after_space(j)
                        if end is None:
                            self._scan = i
                            return None
                        return end
                i = j
                continue
            i += 1
        self._scan = n
        if n > (self.first_max_chars if self._first else self.max_chars):
            # Cut before the last word (it may still be growing).
            m = len(buf.rstrip())
            k = m - 1
            while k > 0 and not buf[k].isspace():
                k -= 1
            if k > 0 and buf[:k].strip():
                return self._after_space(k)
        return None

    def _after_space(self, j: int):
        """End of the whitespace run starting at `j`, or None while it may still grow."""
        buf, n = self._buf, len(self._buf)
        while j < n and buf[j].isspace():
            j += 1
        return j if j < n else None

    def _is_boundary(self, i: int, j: int, ch: str) -> bool:
        buf = self._buf
        if ch in _CLAUSE:
            return len(buf[:j].strip()) >= self.min_clause_chars
        if ch == ".":
            k = i
            while k > 0 and not buf[k - 1].isspace():
                k -= 1
            word = buf[k:i].lower().strip("\"'([{")
            if word in _ABBREVIATIONS:
                return False
            if len(word) == 1 and word.isalpha():
                return False  # an initial: "J. Smith", "U.S."-style letters
        return bool(buf[:i].strip())
