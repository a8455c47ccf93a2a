"""A request's conversation in one normal form, whatever API it came through, for the conversation index
(programs/continuity.py): each message as (role, text, tool calls), where a tool call is (name, its
arguments as canonical JSON). What clients change between turns does not count: ids, names, key order,
whitespace in tool arguments, null or empty content, text split into parts, reasoning and thinking
blocks, Anthropic's `cache_control` marks (clients move them to the newest blocks every turn).

- Chat completions: `messages`, tool calls from `tool_calls` (and the legacy `function_call`), a tool's
  result as a `tool` message's text; `developer` counts as `system`.
- Anthropic Messages: `system` first, then `messages` of content blocks: `text`, `tool_use` (a tool
  call) and `tool_result` (the result's text, marked as a result, and whether it was an error).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from agentserve.server.answers import AnswerReader, ChatAnswer, MessagesAnswer

_encode = msgspec.json.Encoder(order="sorted").encode
_ROLES = {"developer": "system"}  # roles clients use interchangeably
_DROPPED_BLOCKS = {"thinking", "redacted_thinking"}  # clients strip them from the history
Item = tuple  # (role, text, [(tool name, canonical arguments)])


class Transcript:
    """One API's conversation form: its request's messages and its answers, normalized."""

    def messages(self, body: dict) -> list[Item] | None:
        """The request's conversation, or None if it is not one (malformed: vLLM answers it)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return None
        return self._head(body) + [self._item(m) for m in messages]

    def _head(self, body: dict) -> list[Item]:
        """What comes before the messages (a system prompt kept outside them)."""
        return []

    def answer(self, message: dict) -> tuple[Item, str | None]:
        """An answer's normal form and the name of its first tool call (None: it called no tool)."""
        item = self._item(message)
        return item, item[2][0][0] if item[2] else None

    def _item(self, message: dict) -> Item:
        raise NotImplementedError

    def reader(self) -> AnswerReader:
        raise NotImplementedError


class ChatTranscript(Transcript):
    def reader(self) -> AnswerReader:
        return ChatAnswer()

    def _item(self, message: dict) -> Item:
        role = str(message.get("role", ""))
        calls = [c.get("function", c) for c in message.get("tool_calls") or () if isinstance(c, dict)]
        if isinstance(message.get("function_call"), dict):
            calls.append(message["function_call"])
        return (_ROLES.get(role, role), _text(message.get("content")),
                [(str(c.get("name", "")), _arguments(c.get("arguments"))) for c in calls if isinstance(c, dict)])


class MessagesTranscript(Transcript):
    def _head(self, body: dict) -> list[Item]:
        system = body.get("system")
        return [("system", self._blocks(system)[0], [])] if system else []

    def reader(self) -> AnswerReader:
        return MessagesAnswer()

    def _item(self, message: dict) -> Item:
        text, calls = self._blocks(message.get("content"))
        return str(message.get("role", "")), text, calls

    @staticmethod
    def _blocks(content: Any) -> tuple[str, list]:
        if not isinstance(content, list):
            return _text(content), []
        texts, calls = [], []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                calls.append((str(block.get("name", "")), _arguments(block.get("input"))))
            elif kind == "tool_result":
                result = MessagesTranscript._blocks(block.get("content"))[0]
                texts.append(f"\x00tool_result{':error' if block.get('is_error') else ''}\x00{result}")
            elif kind not in _DROPPED_BLOCKS:
                texts.append(_canonical(block))
        return "".join(texts).strip(), calls


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return (content or "").strip()
    if isinstance(content, list):
        return "".join(p.get("text") or "" if isinstance(p, dict) and p.get("type") == "text" else _canonical(p)
                       for p in content).strip()
    return _canonical(content)


def _canonical(part: Any) -> str:
    if isinstance(part, dict):
        part = {k: v for k, v in part.items() if k != "cache_control"}
    return _encode(part).decode()


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            return _encode(json.loads(arguments)).decode()
        except ValueError:
            return "".join(arguments.split())
    return _encode(arguments).decode()


# The routes whose requests that name no program are matched to conversations, with their form.
TRANSCRIPTS: dict[str, Transcript] = {"/v1/chat/completions": ChatTranscript(), "/v1/messages": MessagesTranscript()}
