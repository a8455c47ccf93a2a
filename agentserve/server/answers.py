"""An answer read back from its HTTP response, streamed (server-sent events) or not, as the assistant
message a client appends to its history: for chat completions the first choice's content and tool
calls, for Anthropic's Messages API the content blocks (text and tool_use). The conversation index
(programs/continuity.py) hashes it, so the next turn of a plain client's loop is recognized."""

from __future__ import annotations

import json
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode


class AnswerReader:
    """Fed the response's status and body chunks as they are sent; `answer()` at the end is the
    assistant message, or None for an error, an error event inside the stream, or a body it cannot
    read. Subclasses read one API's events and bodies."""

    def __init__(self) -> None:
        self.status = 0
        self.streamed = False
        self.failed = False
        self._body: list[bytes] = []
        self._pending = b""  # an event line cut between two chunks

    def start(self, status: int, headers) -> None:
        self.status = status
        self.streamed = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

    def feed(self, chunk: bytes) -> None:
        if self.status != 200 or self.failed:
            return
        if not self.streamed:
            self._body.append(chunk)
            return
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line.strip())

    def answer(self) -> dict | None:
        if self.status != 200 or self.failed:
            return None
        if not self.streamed:
            try:
                message = self.message_of(_decode(b"".join(self._body)))
            except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError):
                return None
            return message if isinstance(message, dict) else None
        self._line(self._pending.strip())
        self._pending = b""
        return None if self.failed else self.streamed_message()

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            return
        try:
            self.event(_decode(line[5:]))
        except (msgspec.DecodeError, AttributeError, TypeError, KeyError, ValueError):
            self.failed = True

    # ---- one API's ----------------------------------------------------------------------------
    def message_of(self, body: dict) -> Any:
        raise NotImplementedError

    def event(self, event: dict) -> None:
        raise NotImplementedError

    def streamed_message(self) -> dict:
        raise NotImplementedError


class ChatAnswer(AnswerReader):
    """A chat completion's answer: choice 0's message, or its deltas put together."""

    def __init__(self) -> None:
        super().__init__()
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def message_of(self, body: dict) -> Any:
        return body["choices"][0]["message"]

    def event(self, event: dict) -> None:
        if "error" in event:
            self.failed = True
            return
        delta = next((c.get("delta") or {} for c in event.get("choices") or () if c.get("index", 0) == 0), {})
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

    def streamed_message(self) -> dict:
        calls = [self._calls[i] for i in sorted(self._calls)]
        return {"role": "assistant", "content": "".join(self._content), **({"tool_calls": calls} if calls else {})}


class MessagesAnswer(AnswerReader):
    """An Anthropic Messages answer: the message's content blocks, or the blocks its stream's
    content_block_start / content_block_delta events build (tool_use input from its JSON deltas)."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}

    def message_of(self, body: dict) -> Any:
        if body.get("type") == "error":
            return None
        return {"role": "assistant", "content": body["content"]}

    def event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "error":
            self.failed = True
        elif kind == "content_block_start":
            self._blocks[event["index"]] = dict(event["content_block"])
        elif kind == "content_block_delta":
            block, delta = self._blocks[event["index"]], event["delta"]
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                self._json.setdefault(event["index"], []).append(delta.get("partial_json", ""))

    def streamed_message(self) -> dict:
        for index, parts in self._json.items():
            text = "".join(parts)
            try:
                self._blocks[index]["input"] = json.loads(text) if text.strip() else {}
            except ValueError:  # cut short: kept as sent, so it matches only the same text again
                self._blocks[index]["input"] = text
        return {"role": "assistant", "content": [self._blocks[i] for i in sorted(self._blocks)]}
