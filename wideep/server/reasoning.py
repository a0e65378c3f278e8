"""`--reasoning-parser`: split a DeepSeek-R1 answer into reasoning and content, as vLLM does.

The R1 template opens `<think>` in the prompt, so the output starts inside the reasoning: everything
before the first `</think>` is reasoning (a leading `<think>` the model repeats is dropped), everything
after it is content; with no `</think>` the whole output is reasoning. `deepseek_v3` splits only when
the request turns thinking on (chat_template_kwargs `thinking` / `enable_thinking`), else all is content.

One incremental splitter serves both shapes: a full response is the same splitter fed the whole text
at once, so the concatenation of a stream's deltas always equals the full response.
"""
from __future__ import annotations

from typing import Any, Mapping

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("deepseek_r1", "deepseek_v3")
# chat_template_kwargs keys a reasoning parser reads even when the template does not.
PARSER_KWARGS = frozenset({"thinking", "enable_thinking"})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Feed the growing output text; get (reasoning_delta, content_delta) pairs."""

    def __init__(self, active: bool = True):
        self.active = active
        self.text = ""
        self.reasoning_sent = 0   # characters of the reasoning already returned
        self.content_sent = 0
        self.ended = not active   # </think> seen (or no reasoning at all)

    def _split(self, final: bool) -> tuple[str, str]:
        """(reasoning, content) visible now; while streaming, a possible partial marker is held back."""
        if not self.active:
            return "", self.text
        text = self.text
        stripped = text.lstrip()
        if stripped.startswith(THINK_START):
            text = stripped[len(THINK_START):]
        elif not final and THINK_START.startswith(stripped):
            return "", ""   # could still become "<think>" (a leading "<think>" and the space before it are dropped)
        i = text.find(THINK_END)
        if i >= 0:
            self.ended = True
            return text[:i], text[i + len(THINK_END):]
        hold = 0 if final else _partial_suffix(text, THINK_END)
        return text[:len(text) - hold], ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self._split(final)
        r = reasoning[self.reasoning_sent:]
        c = content[self.content_sent:]
        self.reasoning_sent = len(reasoning)
        self.content_sent = len(content)
        return r, c


class ReasoningParser:
    """A configured parser; `splitter(kwargs)` starts one request. The no-op default is no parser."""

    name: str | None = None

    def active_for(self, chat_template_kwargs: Mapping[str, Any]) -> bool:
        return False

    def splitter(self, chat_template_kwargs: Mapping[str, Any]) -> ReasoningSplitter:
        return ReasoningSplitter(active=self.active_for(chat_template_kwargs))


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def active_for(self, chat_template_kwargs: Mapping[str, Any]) -> bool:
        return True


class DeepSeekV3ReasoningParser(ReasoningParser):
    name = "deepseek_v3"

    def active_for(self, chat_template_kwargs: Mapping[str, Any]) -> bool:
        return bool(chat_template_kwargs.get("thinking") or chat_template_kwargs.get("enable_thinking"))


def make_reasoning_parser(name: str | None) -> ReasoningParser:
    if name is None:
        return ReasoningParser()
    if name == "deepseek_r1":
        return DeepSeekR1ReasoningParser()
    if name == "deepseek_v3":
        return DeepSeekV3ReasoningParser()
    raise ValueError(f"--reasoning-parser {name!r} is not available; choose one of {', '.join(PARSERS)}")
