"""Streaming text out of streaming token ids, without ever sending text that later changes.

Two things make the text of the ids so far differ from a prefix of the final text: a token that ends
inside a multi-byte character decodes to U+FFFD until the next token completes it, and the end of
the text may be the start of a stop string (the client must never see any part of a stop string).
Both are held back until they resolve. Decoding works on a short window of ids (the tokens since
the last emitted boundary plus a few before, as vLLM's incremental detokenizer does), so a long
answer costs linear work, not a decode of everything per token.

The streamed pieces concatenate to exactly `final_text(...)` of the same ids: the last piece is
taken from that function itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rabbitllm.openai_requests import cut_at_stop, final_text

#: Ids decoded before the new ones, so that tokenizers that drop a leading space at the start of a
#: decode (SentencePiece) see the context the final decode sees.
_CONTEXT_TOKENS = 5


def held_back(text: str, stop_strings: Iterable[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalText:
    """Feed generated ids with `add`; each call returns the new text that is final."""

    def __init__(self, tokenizer: Any, stop_strings: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read_offset]
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string appeared: nothing more will be returned
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        if self.stopped:
            return ""
        window = self.ids[self._prefix_offset :]
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(window)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = max(self._read_offset - _CONTEXT_TOKENS, 0)
            self._read_offset = len(self.ids)
        text, found = cut_at_stop(self.text, self.stop_strings)
        if found:
            self.stopped = True
            end = len(text)
        else:
            end = len(text) - held_back(text, self.stop_strings)
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text once the request is done (what was held back, if it stayed)."""
        final = final_text(self.tokenizer, self.ids, self.stop_strings)
        piece = final[self.sent :] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        self.stopped = True
        return piece
