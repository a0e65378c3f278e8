"""`--tool-call-parser deepseek_v3`: DeepSeek's native tool-call tokens -> OpenAI `tool_calls`.

The model writes (V3 / R1-0528):
  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
and the V3.1 form without the type and the fence:
  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
Text before the first begin token is content; text after the end token is dropped (as vLLM does).
Whitespace around the fence is tolerated (tokenizers that space-join tokens still parse).

Streaming follows vLLM's shape: a call's first delta carries index, id, type and name, later deltas
carry argument text. A full response is the same incremental parser fed the whole text, so the
stream's deltas always concatenate to the full answer. A tool section with no call whose name was
read is returned as content (nothing is lost).

`required` and named tool_choice are not parsed from tokens: the output is constrained to a JSON
schema built here (named: the function's parameters; required: an array of {name, parameters}).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```json"
PARSERS = ("deepseek_v3", "deepseek_r1", "deepseek_v31")
_CLOSE_V3 = re.compile(r"\s*```\s*$")


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


@dataclass
class _Call:
    id: str
    name: str
    args_sent: int = 0       # characters of the arguments already returned
    done: bool = False


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)   # OpenAI streaming tool_call deltas


class DeepSeekToolStream:
    """Feed the growing content text; get content text and tool_call deltas."""

    def __init__(self) -> None:
        self.text = ""
        self.content_sent = 0
        self.section = -1                 # index where the tool section starts (after CALLS_BEGIN)
        self.calls: list[_Call] = []
        self.args: list[str] = []         # arguments so far, per call

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str, final: bool = False) -> ToolDelta:
        self.text += delta
        out = ToolDelta()
        if self.section < 0:
            i = self.text.find(CALLS_BEGIN)
            if i < 0:
                end = len(self.text) if final else len(self.text) - _partial_suffix(self.text, CALLS_BEGIN)
                out.content = self.text[self.content_sent:end]
                self.content_sent = max(self.content_sent, end)
                return out
            out.content = self.text[self.content_sent:i]
            self.content_sent = i
            self.section = i + len(CALLS_BEGIN)
        self._parse_section(out, final)
        if final and not self.calls:   # no call could be read: the section is plain content after all
            out.content += self.text[self.content_sent:]
            self.content_sent = len(self.text)
        return out

    def _parse_section(self, out: ToolDelta, final: bool) -> None:
        section = self.text[self.section:]
        j = section.find(CALLS_END)
        if j >= 0:
            section = section[:j]
            final = True
        pos, k = 0, 0
        while True:
            b = section.find(CALL_BEGIN, pos)
            if b < 0:
                return
            body_start = b + len(CALL_BEGIN)
            e = section.find(CALL_END, body_start)
            complete = e >= 0
            body = section[body_start:e] if complete else section[body_start:]
            parsed = self._parse_call(body, complete or final)
            if parsed is None:
                return
            name, args, args_final = parsed
            if k == len(self.calls):
                self.calls.append(_Call(tool_call_id(), name))
                out.calls.append({"index": k, "id": self.calls[k].id, "type": "function",
                                  "function": {"name": name}})
            call = self.calls[k]
            if len(args) > call.args_sent:
                out.calls.append({"index": k, "function": {"arguments": args[call.args_sent:]}})
                call.args_sent = len(args)
            if len(self.args) <= k:
                self.args.append(args)
            else:
                self.args[k] = args
            call.done = args_final
            if not complete:
                return
            pos, k = e + len(CALL_END), k + 1

    @staticmethod
    def _parse_call(body: str, complete: bool) -> tuple[str, str, bool] | None:
        """(name, arguments visible now, arguments final) or None while the name is not known yet."""
        s = body.find(SEP)
        if s < 0:
            return None
        left, right = body[:s].strip(), body[s + len(SEP):]
        f = right.find(FENCE)
        head = right.lstrip()
        if f >= 0 and not head.startswith(("{", "[")):     # V3: type<sep>name ```json args ```
            name, raw = right[:f].strip(), right[f + len(FENCE):].lstrip()
            if complete:
                return name, _CLOSE_V3.sub("", raw).strip(), True
            raw = raw[:len(raw) - _partial_suffix(raw, CALL_END)]
            return name, raw.rstrip(" \t\r\n`"), False
        if head.startswith(("{", "[")) or (complete and left):   # V3.1: name<sep>args
            if not left:
                return None
            if complete:
                return left, right.strip(), True
            raw = right.lstrip()
            raw = raw[:len(raw) - _partial_suffix(raw, CALL_END)]
            return left, raw.rstrip(), False
        return None

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls read so far, in the full-response shape."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": self.args[i]}}
                for i, c in enumerate(self.calls)]


def make_tool_stream(name: str) -> DeepSeekToolStream:
    if name not in PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not available; choose one of {', '.join(PARSERS)}")
    return DeepSeekToolStream()


# ---- tool_choice "required" and named: the constraint, and reading the constrained output back -----

def named_tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """Named choice: the output is the function's arguments object."""
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


def required_tool_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """Required: a non-empty array of {"name": one of the tools, "parameters": that tool's schema}."""
    variants = []
    for t in tools:
        fn = t["function"]
        variants.append({"type": "object",
                         "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                        "parameters": fn.get("parameters") or {"type": "object", "properties": {}}},
                         "required": ["name", "parameters"]})
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}


def parse_required_output(text: str) -> list[dict[str, Any]] | None:
    """The constrained output of `required` as tool calls; None when it is not the expected array."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        calls.append({"id": tool_call_id(), "type": "function",
                      "function": {"name": it["name"],
                                   "arguments": json.dumps(it.get("parameters", {}), ensure_ascii=False)}})
    return calls


class RequiredToolStream:
    """Streams a `required` array: each element becomes one call once it is complete JSON."""

    def __init__(self) -> None:
        self.text = ""
        self.scan = 0            # next character to scan
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.item_start = -1
        self.n = 0

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        out: list[dict[str, Any]] = []
        t = self.text
        while self.scan < len(t):
            ch = t[self.scan]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
                if self.depth == 2 and ch == "{":
                    self.item_start = self.scan
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1 and ch == "}" and self.item_start >= 0:
                    out.extend(self._emit(t[self.item_start:self.scan + 1]))
                    self.item_start = -1
            self.scan += 1
        return out

    def _emit(self, item_text: str) -> list[dict[str, Any]]:
        try:
            item = json.loads(item_text)
        except ValueError:
            return []
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        k = self.n
        self.n += 1
        return [{"index": k, "id": tool_call_id(), "type": "function", "function": {"name": item["name"]}},
                {"index": k, "function": {"arguments": json.dumps(item.get("parameters", {}), ensure_ascii=False)}}]
