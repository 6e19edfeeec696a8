"""Generated token ids → text deltas that never end in a partial UTF-8 char or a possible stop prefix."""

from __future__ import annotations

from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """Generated ids → text deltas that never end in a partial UTF-8 char or a possible stop prefix."""

    def __init__(self, tokenizer: Any, prompt_tail: list[int], stops: list[str]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_tail)
        self._prefix = 0  # window start: decoding from a little earlier keeps spaces right
        self._read = len(self._ids)  # ids before this are already in `text`
        self._stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever was held back, minus an incomplete trailing character."""
        self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> None:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if final:
            after = after.rstrip("\ufffd")
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self._stops and not self.stopped:
            hits = [i for s in self._stops if (i := self.text.find(s, self._sent)) >= 0]
            if hits:
                end = min(hits)
                self.text, self.stopped = self.text[:end], True
            elif not final:
                end -= self._held(self.text[self._sent :])
        out, self._sent = self.text[self._sent : end], end
        return out

    def _held(self, tail: str) -> int:
        """Length of the longest suffix of `tail` that could still grow into a stop string."""
        for size in range(min(len(tail), max(map(len, self._stops)) - 1), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stops):
                return size
        return 0
