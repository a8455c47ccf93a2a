"""A chat completion's answer read back from its HTTP response, streamed (server-sent events of
deltas) or not, as the assistant message a client appends to its history: the content and the tool
calls of the first choice. The conversation index (programs/continuity.py) hashes it, so the next turn
of a plain client's loop is recognized."""

from __future__ import annotations

from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode


class AnswerReader:
    """Fed the response's status and body chunks as they are sent; `answer()` at the end is the
    assistant message, or None for an error, an error event inside the stream, or a body it cannot read."""

    def __init__(self) -> None:
        self.status = 0
        self.streamed = False
        self._body: list[bytes] = []
        self._pending = b""  # an event line cut between two chunks
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._failed = False

    def start(self, status: int, headers) -> None:
        self.status = status
        self.streamed = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

    def feed(self, chunk: bytes) -> None:
        if self.status != 200 or self._failed:
            return
        if not self.streamed:
            self._body.append(chunk)
            return
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._event(line.strip())

    def answer(self) -> dict | None:
        if self.status != 200 or self._failed:
            return None
        if not self.streamed:
            try:
                message = _decode(b"".join(self._body))["choices"][0]["message"]
            except (msgspec.DecodeError, KeyError, IndexError, TypeError):
                return None
            return message if isinstance(message, dict) else None
        self._event(self._pending.strip())
        self._pending = b""
        if self._failed:
            return None
        calls = [self._calls[i] for i in sorted(self._calls)]
        return {"role": "assistant", "content": "".join(self._content), **({"tool_calls": calls} if calls else {})}

    def _event(self, line: bytes) -> None:
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            return
        try:
            event = _decode(line[5:])
            if "error" in event:
                self._failed = True
                return
            choices = event.get("choices") or ()
            delta = next((c.get("delta") or {} for c in choices if c.get("index", 0) == 0), {})
        except (msgspec.DecodeError, AttributeError, TypeError):
            self._failed = True
            return
        if delta.get("content"):
            self._content.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            into = self._calls.setdefault(call.get("index", len(self._calls)),
                                          {"type": "function", "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                into["id"] = call["id"]
            function = call.get("function") or {}
            into["function"]["name"] += function.get("name") or ""
            into["function"]["arguments"] += function.get("arguments") or ""
