"""Incremental detokenisation with stop strings, shared by streamed and whole responses."""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class TextStream:
    """One row's text as tokens arrive; ``push`` returns only text that can no longer change.

    Text that might be the start of a stop string is held back until it is not; a stop string
    ends the stream and is cut from the text.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the final text so far (grows as tokens arrive)
        self.stopped = False  # a stop string was found
        self._emitted = 0
        self._prefix = self._read = 0  # the decode window: ids[_prefix:_read] is already text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly final text."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        piece = self._new_text()
        if not piece:  # a special token, or part of a multi-byte character
            return ""
        self.text += piece
        found = [i for i in (self.text.find(s, max(0, self._emitted - len(s))) for s in self.stop)
                 if i >= 0]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
            return self._flush(len(self.text))
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                   default=0)
        return self._flush(len(self.text) - held)

    def _new_text(self) -> str:
        """The text the newest token adds, decoding only a short window of ids (as TGI/vLLM do),
        so a stream costs time linear in its length. The window starts one step back, so
        tokenizers that strip a leading space at the start of a decode still get it right."""
        done = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def finish(self) -> str:
        """The rest of the text once generation ended without a stop string (held-back text and
        any trailing incomplete character, decoded as the tokenizer does)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._flush(len(self.text))

    def _flush(self, end: int) -> str:
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out
