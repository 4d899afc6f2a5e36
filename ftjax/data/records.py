"""The row every source produces, and the error every bad input raises."""

from __future__ import annotations

import dataclasses
import json

from ftjax.errors import FtjaxError


class DataError(FtjaxError, ValueError):
    """Bad input data or data config; the message names the file, the line and a fix."""


@dataclasses.dataclass
class Record:
    """One raw row, before cleaning and tokenisation.

    ``where`` is ``"path:line"`` (or ``"hub-id[split]:index"``) so every message and every
    quarantined row points back at its origin.
    """
    where: str
    text: str = ""
    text_pair: str = ""
    label: str | None = None
    tokens: list[str] | None = None  # token_classification: words
    tags: list[str] | None = None  # token_classification: one tag per word
    messages: list[dict] | None = None  # chat: [{"role": ..., "content": ...}]
    # preference: [chosen, rejected], each a string or a list of chat messages (``text`` or
    # ``messages`` holds the prompt)
    responses: list | None = None

    def key(self) -> tuple:
        """What makes two rows exact duplicates."""
        return (self.text, self.text_pair, self.label,
                tuple(self.tokens or ()), tuple(self.tags or ()),
                tuple((m["role"], m["content"]) for m in self.messages or ()),
                json.dumps(self.responses))

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}
