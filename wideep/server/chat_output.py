"""Generated text -> the chat message's fields: reasoning, content and tool_calls.

One assembler per request, fed the text deltas; the full response feeds the whole text once, so a
stream's deltas always add up to the full message. The reasoning splitter runs first (tools and
content come after `</think>`), then, by tool mode:
- "auto": DeepSeek's native tool-call tokens are parsed (wideep.server.tool_parser);
- "named": the constrained output is the named function's arguments;
- "required": the constrained output is an array of {name, parameters};
- "none": everything after the reasoning is content.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wideep.server.reasoning import ReasoningSplitter
from wideep.server.tool_parser import (DeepSeekToolStream, RequiredToolStream, parse_required_output,
                                       tool_call_id)


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


class ChatAssembler:
    def __init__(self, splitter: ReasoningSplitter, tool_mode: str = "none", named: str | None = None,
                 parallel_tool_calls: bool = True, include_reasoning: bool = True):
        self.splitter = splitter
        self.mode = tool_mode
        self.named = named
        self.parallel = parallel_tool_calls
        self.include_reasoning = include_reasoning
        self.auto = DeepSeekToolStream() if tool_mode == "auto" else None
        self.required = RequiredToolStream() if tool_mode == "required" else None
        self.named_id: str | None = None
        self.reasoning = ""
        self.content = ""           # content as returned (not the constrained JSON of named/required)
        self.raw_content = ""       # everything after the reasoning
        self.calls: list[dict[str, Any]] = []   # full-shape tool calls, filled by `finish`

    @property
    def reasoning_active(self) -> bool:
        return self.splitter.active

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        r, c = self.splitter.feed(text, final)
        out = ChatDelta(reasoning=r if self.include_reasoning else "")
        self.reasoning += r
        self.raw_content += c
        if self.mode == "auto":
            d = self.auto.feed(c, final)
            out.content, out.tool_calls = d.content, d.calls
        elif self.mode == "named":
            if c:
                if self.named_id is None:
                    self.named_id = tool_call_id()
                    out.tool_calls.append({"index": 0, "id": self.named_id, "type": "function",
                                           "function": {"name": self.named}})
                out.tool_calls.append({"index": 0, "function": {"arguments": c}})
        elif self.mode == "required":
            out.tool_calls = self.required.feed(c)
        else:
            out.content = c
        if not self.parallel:
            out.tool_calls = [t for t in out.tool_calls if t["index"] == 0]
        self.content += out.content
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The tool calls of the whole output (call after the final feed)."""
        if self.mode == "auto":
            calls = self.auto.tool_calls()
        elif self.mode == "named":
            calls = [{"id": self.named_id or tool_call_id(), "type": "function",
                      "function": {"name": self.named, "arguments": self.raw_content}}]
        elif self.mode == "required":
            calls = parse_required_output(self.raw_content) or []
        else:
            calls = []
        self.calls = calls if self.parallel else calls[:1]
        return self.calls

    def message_content(self) -> str | None:
        """vLLM's content: None when a parser took everything (no text left), "" for a constrained call."""
        if self.mode in ("named", "required"):
            return ""
        if self.content:
            return self.content
        if self.calls or self.splitter.active:
            return None
        return ""

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if self.calls and (self.mode == "auto" or engine_reason == "stop"):
            return "tool_calls"
        return engine_reason
