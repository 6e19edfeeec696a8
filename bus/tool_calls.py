"""Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` text → tool calls, incrementally.

The format bus/constraints.tool_call_constraint forces and node/prompting.py teaches; the gateway
turns it into OpenAI tool_calls, the UIs into readable Markdown (`readable`).

`CallParser.feed(text)` returns what became final: content text, new calls (id + name) and argument
text. Arguments stream as the model writes them when the call starts `{"name": "...", "arguments":`
(the form the grammar forces and the template shows); in any other key order the call comes out
whole once `</tool_call>` arrives. A block that is not valid JSON stays content. The streamed pieces
concatenate to exactly what a whole answer gets, because a whole answer is this same parser fed once.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

__all__ = ["CallDelta", "CallParser", "Output", "parse_all", "readable"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class CallDelta:
    index: int
    id: str = ""  # set (with name) on the first delta of a call
    name: str = ""
    arguments: str = ""


@dataclass
class Output:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, delta: CallDelta) -> None:
        for old in self.calls:
            if old.index == delta.index:
                old.arguments += delta.arguments
                return
        self.calls.append(delta)


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object/array starting at text[start], or None while it is open."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class CallParser:
    def __init__(self) -> None:
        self._pending = ""  # outside a call, not yet released
        self._spaces = ""  # whitespace released only if more content follows
        self._call: str | None = None  # the body of the open call
        self._index = -1
        self._streaming = False  # the open call's header went out; its arguments stream
        self._sent = 0  # arguments characters of the open call already sent
        self.count = 0  # completed or started calls

    def feed(self, text: str) -> Output:
        out = Output()
        self._pending += text
        while self._pending:
            if self._call is None:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = _held(self._pending, OPEN)
                    self._content(out, self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                self._content(out, self._pending[:at])
                self._pending = self._pending[at + len(OPEN) :]
                self._call, self._index, self._streaming, self._sent = "", self.count, False, 0
                self._spaces = ""
            at = self._pending.find(CLOSE)
            if at < 0:
                keep = _held(self._pending, CLOSE)
                self._call += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                self._stream(out, final=False)
                break
            self._call += self._pending[:at]
            self._pending = self._pending[at + len(CLOSE) :]
            self._stream(out, final=True)
            self._close(out)
        return out

    def flush(self) -> Output:
        """At the end of the answer: what was held back (an unclosed call stays as it is)."""
        out = Output()
        if self._call is not None:
            self._call += self._pending
            self._pending = ""
            if self._streaming:
                self._stream(out, final=True)
            else:
                self._content(out, OPEN + self._call)
            self._call = None
        self._content(out, self._pending)
        self._pending, self._spaces = "", ""
        return out

    def _content(self, out: Output, text: str) -> None:
        if not text:
            return
        text = self._spaces + text
        body = text.rstrip()
        self._spaces = text[len(body) :]
        out.content += body

    def _stream(self, out: Output, final: bool) -> None:
        """Send the open call's header once known, then its arguments as far as they are final."""
        assert self._call is not None
        head = _HEAD.match(self._call)
        if head is None or self._call[head.end() : head.end() + 1] not in ("{", "["):
            return
        if not self._streaming:
            self._streaming = True
            self.count += 1
            name = json.loads(f'"{head.group(1)}"')
            out.add(CallDelta(self._index, id=f"call_{uuid.uuid4().hex[:24]}", name=name))
        start = head.end()
        end = _value_end(self._call, start)
        upto = start + (len(self._call[start:]) if end is None else end - start)
        if self._sent < upto - start:
            out.add(CallDelta(self._index, arguments=self._call[start + self._sent : upto]))
            self._sent = upto - start

    def _close(self, out: Output) -> None:
        body, self._call = self._call or "", None
        if self._streaming:
            return
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, KeyError, TypeError):
            self._content(out, OPEN + body + CLOSE)  # not a call after all
            return
        self.count += 1
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.add(CallDelta(self._index, id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=text))


def parse_all(text: str) -> Output:
    """A whole answer's content and calls (what a stream of the same text adds up to)."""
    parser = CallParser()
    out = parser.feed(text)
    rest = parser.flush()
    out.content += rest.content
    for call in rest.calls:
        out.add(call)
    return out


def _pretty(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(value, indent=2, ensure_ascii=False) if isinstance(value, dict | list) else None


def readable(text: str) -> str:
    """Markdown for people: a JSON answer pretty-printed, tool calls as a name and their arguments."""
    pretty = _pretty(text.strip())
    if pretty is not None:
        return f"```json\n{pretty}\n```"
    if OPEN not in text:
        return text
    out = parse_all(text)
    if not out.calls:
        return text
    parts = [out.content] if out.content else []
    for call in out.calls:
        args = _pretty(call.arguments) or call.arguments
        parts.append(f"**Tool call** `{call.name}`\n```json\n{args}\n```")
    return "\n\n".join(parts)
