"""The one chat-template renderer: the engine's tokenizer and the router's tokenizer both render here,
so a prompt is byte-identical on both sides (precise prefix routing hashes the router's rendering
and must match the engine's KV events).

Rendering follows transformers' `apply_chat_template` (sandboxed jinja2, trim_blocks/lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, its `tojson`), with two bounds a server needs: a
render may run for at most `time_limit_s` and produce at most `max_chars` characters; past either
it fails with ChatTemplateError instead of holding a worker. Torch-free (the router imports it).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

# Names the renderer passes itself: a client's chat_template_kwargs may not set them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                                "bos_token", "eos_token", "tokenize", "chat_template", "return_dict",
                                "return_assistant_tokens_mask", "tool_choice"})
DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MAX_CHARS = 4 * 1024 * 1024


class ChatTemplateError(ValueError):
    """The template failed (its raise_exception, a jinja error, or a bound); the message says why."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, non-ASCII kept (jinja's own tojson escapes '<', '>', '&', "'")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_ENV = None


def _environment():
    global _ENV
    if _ENV is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Env(ImmutableSandboxedEnvironment):
            # '*' and '**' can build huge strings/numbers in one step, which the time bound cannot stop.
            intercepted_binops = frozenset({"*", "**"})

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                    raise ChatTemplateError("chat template: exponent too large")
                if operator == "*":
                    for seq, k in ((left, right), (right, left)):
                        if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > DEFAULT_MAX_CHARS:
                            raise ChatTemplateError("chat template: repetition exceeds the size limit")
                return super().call_binop(context, operator, left, right)

        env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        _ENV = env
    return _ENV


def load_template_source(source: str | list | dict | None) -> str | dict[str, str] | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (named templates)."""
    if isinstance(source, list):
        named = {}
        for t in source:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("template"), str):
                raise ChatTemplateError("a list-valued chat_template must hold {\"name\", \"template\"} objects")
            named[t["name"]] = t["template"]
        return named
    if isinstance(source, dict):
        return dict(source)
    return source


def read_template_file(path: str | Path) -> str:
    """--chat-template PATH: a jinja file, or a JSON file holding a string / tokenizer_config.json."""
    p = Path(path)
    if not p.is_file():
        raise ChatTemplateError(f"chat template file {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        doc = json.loads(text)
        if isinstance(doc, dict) and "chat_template" in doc:
            doc = doc["chat_template"]
        if isinstance(doc, str):
            return doc
        raise ChatTemplateError(f"{p}: expected a JSON string or an object with 'chat_template'")
    return text


def model_dir_template(model_dir: str | Path, config: Mapping[str, Any] | None = None) -> str | dict | None:
    """The model's own template: tokenizer_config.json's chat_template, else chat_template.jinja."""
    d = Path(model_dir)
    if config is None:
        cfg_path = d / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    src = load_template_source(config.get("chat_template"))
    if src is None and (d / "chat_template.jinja").is_file():
        src = (d / "chat_template.jinja").read_text()
    return src


@dataclass
class _Bound:
    deadline: float
    limit_s: float


class ChatTemplate:
    """A compiled server-side template (string or named set) plus bos/eos; `render` is thread-safe."""

    def __init__(self, source: str | dict[str, str], bos_token: str = "", eos_token: str = "",
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S, max_chars: int = DEFAULT_MAX_CHARS):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit_s = time_limit_s
        self.max_chars = max_chars
        self._compiled: dict[str | None, Any] = {}
        self._variables: dict[str | None, frozenset[str]] = {}

    def _select(self, tools: Any, name: str | None) -> tuple[str | None, str]:
        """transformers' choice among named templates: the asked name, 'tool_use' with tools, 'default'."""
        if isinstance(self.source, str):
            if name not in (None, "default"):
                raise ChatTemplateError(f"the model has a single chat template; there is no template named {name!r}")
            return None, self.source
        if name is not None:
            if name not in self.source:
                raise ChatTemplateError(f"no chat template named {name!r}; the model has {sorted(self.source)}")
            return name, self.source[name]
        if tools and "tool_use" in self.source:
            return "tool_use", self.source["tool_use"]
        if "default" in self.source:
            return "default", self.source["default"]
        raise ChatTemplateError(f"the model's chat templates {sorted(self.source)} have no 'default'")

    def _compile(self, key: str | None, text: str):
        compiled = self._compiled.get(key)
        if compiled is None:
            from jinja2 import meta
            from jinja2.exceptions import TemplateSyntaxError

            env = _environment()
            try:
                compiled = env.from_string(text)
                self._variables[key] = frozenset(meta.find_undeclared_variables(env.parse(text)))
            except TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template syntax error: {e}") from None
            self._compiled[key] = compiled
        return compiled

    def variables(self, tools: Any = None, name: str | None = None) -> frozenset[str]:
        """Variables the selected template reads (what chat_template_kwargs may set)."""
        key, text = self._select(tools, name)
        self._compile(key, text)
        return self._variables[key]

    def check_kwargs(self, kwargs: Mapping[str, Any], tools: Any = None) -> None:
        """chat_template_kwargs must name variables the template reads and none the renderer sets."""
        for k in kwargs:
            if not isinstance(k, str) or not k.isidentifier():
                raise ChatTemplateError(f"chat_template_kwargs key {k!r} is not a template variable name")
            if k in RESERVED_VARIABLES:
                raise ChatTemplateError(f"chat_template_kwargs may not set {k!r}: the server sets it")
        unused = sorted(set(kwargs) - self.variables(tools))
        if unused:
            raise ChatTemplateError(f"chat_template_kwargs {unused} are not used by the chat template "
                                    f"(it reads {sorted(self.variables(tools) - RESERVED_VARIABLES)})")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: Any = None,
               continue_final_message: bool = False, template_name: str | None = None, **kwargs: Any) -> str:
        key, text = self._select(tools, template_name)
        compiled = self._compile(key, text)
        ctx = dict(kwargs)
        # tools=None when there are none, as transformers passes it
        ctx.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        out = self._bounded(compiled, ctx)
        if continue_final_message:
            out = _strip_to_final_message(out, messages)
        return out

    def _bounded(self, compiled, ctx: dict[str, Any]) -> str:
        from jinja2.exceptions import TemplateError

        bound = _Bound(time.monotonic() + self.time_limit_s, self.time_limit_s)
        parts: list[str] = []
        size = 0
        prev = sys.gettrace()
        sys.settrace(_tracer(bound))
        try:
            for piece in compiled.generate(**ctx):
                size += len(piece)
                if size > self.max_chars:
                    raise ChatTemplateError(f"the rendered prompt exceeds {self.max_chars} characters")
                parts.append(piece)
        except ChatTemplateError:
            raise
        except _Timeout:
            raise ChatTemplateError(f"rendering the chat template took longer than {self.time_limit_s:g} s") from None
        except TemplateError as e:
            raise ChatTemplateError(str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(prev)
        return "".join(parts)


class _Timeout(BaseException):
    """BaseException so a template's own error handling cannot swallow it."""


def _tracer(bound: _Bound):
    """Line-level tracing of jinja's generated code only (its frames' file is '<template>'): a loop
    that produces nothing still passes here each iteration, so the deadline always fires."""
    def local(frame, event, arg):
        if time.monotonic() > bound.deadline:
            raise _Timeout()
        return local

    def global_(frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return local
        return None
    return global_


def _strip_to_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """continue_final_message: the prompt ends right after the last message's content."""
    last = messages[-1].get("content") if messages else None
    if not isinstance(last, str) or not last:
        return text
    i = text.rfind(last)
    if i < 0:
        raise ChatTemplateError("continue_final_message: the final message's content is not in the rendered prompt")
    return text[: i + len(last)]



# ---- messages as the template sees them (the server and the router normalize identically) ----------

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class MessageError(ValueError):
    """A malformed chat message; `param` names the field (messages[i].content, ...)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessageError(f"'{param}[{j}]' must be {{\"type\": \"text\", \"text\": ...}}; "
                                   "only text parts are supported", param)
            parts.append(part["text"])
        return "".join(parts)
    raise MessageError(f"'{param}' must be a string or a list of text parts", param)


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """Assistant tool_calls in OpenAI form; arguments (a JSON string) become an object, as templates
    that follow transformers' convention expect (vLLM does the same)."""
    if not isinstance(calls, list):
        raise MessageError(f"'{param}' must be an array of tool calls", param)
    out = []
    for j, c in enumerate(calls):
        p = f"{param}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MessageError(f"'{p}' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", p)
        if c.get("type", "function") != "function":
            raise MessageError(f"'{p}.type' must be \"function\"", f"{p}.type")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise MessageError(f"'{p}.function.arguments' is not valid JSON: {e}", f"{p}.function.arguments") from None
        if not isinstance(args, dict):
            raise MessageError(f"'{p}.function.arguments' must be a JSON object", f"{p}.function.arguments")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def normalize_message(m: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise MessageError(f"'{param}' must be an object with 'role' and 'content'", param)
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise MessageError(f"'{param}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"{param}.role")
    content = m.get("content")
    calls = m.get("tool_calls") if role == "assistant" else None
    out: dict[str, Any] = {"role": role}
    if content is None:
        if role != "assistant":
            raise MessageError(f"'{param}.content' is required", f"{param}.content")
        out["content"] = None if calls else ""
    else:
        out["content"] = _text(content, f"{param}.content")
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    if calls:
        out["tool_calls"] = _tool_calls(calls, f"{param}.tool_calls")
    if role == "tool" and m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise MessageError(f"'{param}.tool_call_id' must be a string", f"{param}.tool_call_id")
        out["tool_call_id"] = m["tool_call_id"]
    if role == "assistant":
        for key in ("reasoning", "reasoning_content"):   # earlier reasoning: the template decides what to keep
            if m.get(key) is not None:
                out[key] = _text(m[key], f"{param}.{key}")
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise MessageError("'messages' must be a non-empty array of {role, content} objects", "messages")
    return [normalize_message(m, i) for i, m in enumerate(messages)]


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI `tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise MessageError("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}", "tools")
    out = []
    names = set()
    for j, t in enumerate(tools):
        p = f"tools[{j}]"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise MessageError(f"'{p}' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", p)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise MessageError(f"'{p}.function.name' must be a non-empty string", f"{p}.function.name")
        if name in names:
            raise MessageError(f"'{p}.function.name' {name!r} is used by two tools", f"{p}.function.name")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise MessageError(f"'{p}.function.description' must be a string", f"{p}.function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise MessageError(f"'{p}.function.parameters' must be a JSON schema object", f"{p}.function.parameters")
        out.append({"type": "function", "function": dict(fn)})
    return out
