"""Parse and validate OpenAI completion / chat request bodies into one typed request.

Every rejection is an APIError(400) whose `param` names the offending field, as vLLM does.
Field names and defaults follow vLLM's protocol (max_tokens 16 for completions, unlimited for chat;
max_completion_tokens wins over max_tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from wideep.engine.structured import StructuredOutputsParams
from wideep.server.errors import APIError, bad_request
from wideep.utils.chat_template import MessageError, normalize_messages, normalize_tools

Kind = Literal["completion", "chat"]

_MISSING = object()
# The engine wire (msgpack) and torch carry signed 64-bit ints: larger JSON integers are a 400 here.
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass
class GenerateRequest:
    """What a completion or chat body asks for, validated; the prompt is tokenized later."""

    kind: Kind
    model: str | None
    prompt_text: str | None = None            # completions: text prompt
    prompt_token_ids: list[int] | None = None  # completions: token-id prompt
    messages: list[dict[str, Any]] | None = None  # chat
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    kv_transfer_params: dict[str, Any] | None = None
    max_tokens_param: str = "max_tokens"  # which field set the limit, for error messages
    # chat: tools, reasoning and template fields (validated against the server's config in serving)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None   # None: "auto" with tools, else "none"
    parallel_tool_calls: bool = True
    chat_template: str | None = None                  # a client template (needs --trust-request-chat-template)
    continue_final_message: bool = False
    include_reasoning: bool = True
    # Sampling transforms, logprobs, n (engine SamplingParams; bad_words are tokenized by the frontend)
    n: int = 1
    best_of: int | None = None                 # completions: best n of best_of by cumulative logprob
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    bad_words: list[str] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: max_model_len)
    logprobs: int | None = None                # chat: top_logprobs when logprobs is true; completions: logprobs
    prompt_logprobs: int | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    request_id: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    structured_param: str = "structured_outputs"   # the field that set it, for error messages


def _type_name(t: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object", list: "an array"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _field(body: dict[str, Any], name: str, types: type | tuple, default: Any = None) -> Any:
    """body[name] checked against `types` (bool is never an int or float here); null means default."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    wanted = types if isinstance(types, tuple) else (types,)
    ok = any(
        isinstance(v, t) and not (isinstance(v, bool) and t in (int, float))
        for t in wanted
    )
    if not ok:
        raise bad_request(f"'{name}' must be {_type_name(types)}, got {type(v).__name__} {v!r:.60}", name)
    if float in wanted and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)  # a number field: 2 and 2.0 mean the same, and a float never overflows the wire
    if isinstance(v, int) and not isinstance(v, bool) and not _INT64_MIN <= v <= _INT64_MAX:
        raise bad_request(f"'{name}' is out of range for a 64-bit integer, got {v!r:.60}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"'{name}' must be a finite number, got {v!r}", name)
    return v


def _int_range(body: dict[str, Any], name: str, default: Any, lo: int | None = None) -> Any:
    v = _field(body, name, int, default)
    if v is not None and lo is not None and v < lo:
        raise bad_request(f"'{name}' must be >= {lo}, got {v}", name)
    return v


def _token_ids(v: Any, param: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT64_MAX
                                          for t in v):
        raise bad_request(f"'{param}' must be a list of non-negative integer token ids", param)
    return v


def _parse_common(body: Any, kind: Kind) -> GenerateRequest:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", None)
    req = GenerateRequest(kind=kind, model=_field(body, "model", str))

    req.n = _int_range(body, "n", 1, 1)
    if req.n > MAX_N:
        raise bad_request(f"'n' must be <= {MAX_N}, got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _field(body, name, (int, float), 0.0)
        if not -2 <= v <= 2:
            raise bad_request(f"'{name}' must be in [-2, 2], got {v}", name)
        setattr(req, name, v)
    req.repetition_penalty = _field(body, "repetition_penalty", (int, float), 1.0)
    if not 0 < req.repetition_penalty <= 2:
        raise bad_request(f"'repetition_penalty' must be in (0, 2], got {req.repetition_penalty}", "repetition_penalty")
    bias = _field(body, "logit_bias", dict, {})
    for k, v in bias.items():
        try:
            tid = int(k)
        except ValueError:
            tid = -1
        if not 0 <= tid <= _INT64_MAX or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad_request(f"'logit_bias' maps token ids (as strings) to numbers, got {k!r}: {v!r:.40}", "logit_bias")
        req.logit_bias[tid] = max(-100.0, min(100.0, float(v)))   # OpenAI's documented range, clamped as vLLM does
    req.min_p = _field(body, "min_p", (int, float), 0.0)
    if not 0 <= req.min_p <= 1:
        raise bad_request(f"'min_p' must be in [0, 1], got {req.min_p}", "min_p")
    bad_words = _field(body, "bad_words", list, [])
    if not all(isinstance(w, str) and w.strip() for w in bad_words):
        raise bad_request("'bad_words' must be a list of non-empty strings", "bad_words")
    req.bad_words = bad_words
    allowed = _field(body, "allowed_token_ids", list, None)
    if allowed is not None:
        req.allowed_token_ids = _token_ids(allowed, "allowed_token_ids")
        if not allowed:
            raise bad_request("'allowed_token_ids' must not be empty", "allowed_token_ids")
    req.truncate_prompt_tokens = _field(body, "truncate_prompt_tokens", int, None)
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < -1:
        raise bad_request("'truncate_prompt_tokens' must be -1 (the model's context) or >= 0",
                          "truncate_prompt_tokens")
    side = _field(body, "truncation_side", str, "left")
    if side != "left":
        raise bad_request("only truncation_side 'left' (keep the last tokens) is supported", "truncation_side")
    req.prompt_logprobs = _logprob_count(body, "prompt_logprobs")
    req.return_tokens_as_token_ids = _field(body, "return_tokens_as_token_ids", bool, False)
    req.return_token_ids = _field(body, "return_token_ids", bool, False)
    req.request_id = _field(body, "request_id", str, None)
    priority = _field(body, "priority", int, 0)
    if priority != 0:
        raise bad_request("priority scheduling is not enabled on this server: 'priority' must be 0", "priority")
    _parse_structured(body, req)
    _reject_unsupported(body)

    # Output length: max_completion_tokens (newer OpenAI name) wins over max_tokens.
    mct = _int_range(body, "max_completion_tokens", None)
    mt = _int_range(body, "max_tokens", None)
    if mct is not None:
        req.max_tokens, req.max_tokens_param = mct, "max_completion_tokens"
    else:
        req.max_tokens = mt if mt is not None else (16 if kind == "completion" else None)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"'{req.max_tokens_param}' must be >= 1, got {req.max_tokens}", req.max_tokens_param)

    req.temperature = _field(body, "temperature", (int, float), 1.0)
    if req.temperature < 0:
        raise bad_request(f"'temperature' must be >= 0, got {req.temperature}", "temperature")
    req.top_p = _field(body, "top_p", (int, float), 1.0)
    if not 0 < req.top_p <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {req.top_p}", "top_p")
    req.top_k = _field(body, "top_k", int, 0)
    if req.top_k < -1:
        raise bad_request(f"'top_k' must be -1, 0 (off) or a positive integer, got {req.top_k}", "top_k")
    req.seed = _field(body, "seed", int, None)
    req.min_tokens = _int_range(body, "min_tokens", 0, 0)
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise bad_request(f"'min_tokens' ({req.min_tokens}) must be <= {req.max_tokens_param} ({req.max_tokens})", "min_tokens")
    req.ignore_eos = _field(body, "ignore_eos", bool, False)
    req.include_stop_str_in_output = _field(body, "include_stop_str_in_output", bool, False)
    req.skip_special_tokens = _field(body, "skip_special_tokens", bool, True)

    stop = _field(body, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    req.stop = stop
    req.stop_token_ids = _token_ids(_field(body, "stop_token_ids", list, []), "stop_token_ids")

    req.stream = _field(body, "stream", bool, False)
    opts = _field(body, "stream_options", dict, None)
    if opts is not None:
        if not req.stream:
            raise bad_request("'stream_options' can only be set when 'stream' is true", "stream_options")
        req.include_usage = _field(opts, "include_usage", bool, False)
        req.continuous_usage_stats = _field(opts, "continuous_usage_stats", bool, False)

    req.kv_transfer_params = _field(body, "kv_transfer_params", dict, None)
    if req.kv_transfer_params is not None:
        try:  # passed to the engine as is: it must survive the engine wire (msgpack, 64-bit ints)
            msgpack.packb(req.kv_transfer_params, use_bin_type=True)
        except (OverflowError, ValueError, TypeError) as e:
            raise bad_request(f"'kv_transfer_params' cannot be sent to the engine: {e}", "kv_transfer_params") from None
    return req


MAX_N = 128            # choices per request (n, best_of)
MAX_LOGPROBS = 20      # vLLM's default --max-logprobs

# vLLM request fields wideep does not implement: sending anything but the default is a 400 naming it.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1.0, "length_penalty applies to beam search, which is not supported"),
    "watermarking": (False, "watermarking is not supported"),
    "spaces_between_special_tokens": (True, "only spaces_between_special_tokens=true is supported"),
    "logprob_token_ids": (None, "logprob_token_ids is not supported; use logprobs / top_logprobs"),
    "cache_salt": (None, "cache_salt is not supported (the prefix cache is not salted)"),
    "vllm_xargs": (None, "vllm_xargs (custom extensions) is not supported"),
    "repetition_detection": (None, "repetition_detection is not supported"),
    "stream_interval": (None, "stream_interval is not supported (every step is streamed)"),
    "prompt_embeds": (None, "prompt_embeds is not supported"),
    "media_io_kwargs": (None, "multimodal inputs are not supported"),
    "mm_processor_kwargs": (None, "multimodal inputs are not supported"),
    "ec_transfer_params": (None, "encoder-cache transfer is not supported"),
    "return_prompt_text": (None, "return_prompt_text is not supported"),
    "return_token_offsets": (False, "return_token_offsets is only for render endpoints, which are not served"),
    "return_mm_kwargs": (True, "return_mm_kwargs is only for render endpoints, which are not served"),
    "routed_experts_prompt_start": (0, "routed-expert data is not returned"),
    "session_id": (None, "session_id is not supported"),
    "guided_decoding_backend": (None, "the grammar engine is fixed (xgrammar); omit guided_decoding_backend"),
    "guided_whitespace_pattern": (None, "guided_whitespace_pattern is not supported"),
    "structural_tag": (None, "structural tags are not supported"),
}


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name, (default, why) in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != default and not (isinstance(default, float) and v == int(default)):
            raise bad_request(f"'{name}': {why}", name)


def _logprob_count(body: dict[str, Any], name: str) -> int | None:
    v = _field(body, name, int, None)
    if v is not None and not 0 <= v <= MAX_LOGPROBS:
        raise bad_request(f"'{name}' must be in [0, {MAX_LOGPROBS}], got {v}", name)
    return v


def _parse_structured(body: dict[str, Any], req: GenerateRequest) -> None:
    """response_format, vLLM's structured_outputs and the guided_* aliases: at most one constraint."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    fmt = _field(body, "response_format", dict, None)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", js.get("json_schema")), dict):
                raise bad_request("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                                  "response_format")
            found.append(("response_format", StructuredOutputsParams(json=js.get("schema", js.get("json_schema")))))
        elif kind == "structural_tag":
            raise bad_request("response_format 'structural_tag' is not supported", "response_format")
        elif kind != "text":
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                              "response_format")
    so = _field(body, "structured_outputs", dict, None)
    if so is not None:
        known = {"json", "regex", "choice", "grammar", "json_object"}
        extra = sorted(k for k, v in so.items() if k not in known and v not in (None, False))
        if extra:
            raise bad_request(f"structured_outputs: unsupported key(s) {extra}; use one of {sorted(known)}",
                              "structured_outputs")
        found.append(("structured_outputs", StructuredOutputsParams(
            json=so.get("json"), json_object=bool(so.get("json_object")), regex=so.get("regex"),
            choice=so.get("choice"), grammar=so.get("grammar"))))
    for alias, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if body.get(alias) is not None:
            found.append((alias, StructuredOutputsParams(**{key: body[alias]})))
    if len(found) > 1:
        raise bad_request(f"only one output constraint may be given, got {', '.join(n for n, _ in found)}",
                          found[1][0])
    if found:
        name, params = found[0]
        try:
            params.validate()
        except ValueError as e:
            raise bad_request(f"'{name}': {e}", name) from None
        req.structured_param, req.structured_outputs = name, params


def parse_completion(body: Any) -> GenerateRequest:
    req = _parse_common(body, "completion")
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt")
    prompt = body["prompt"]
    # A batch of one is accepted; vLLM's batched prompts are not (n=1 serving, one stream per request).
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        req.prompt_text = prompt
    elif isinstance(prompt, list):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        if all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request("only one prompt per request is supported", "prompt")
        req.prompt_token_ids = _token_ids(prompt, "prompt")
    else:
        raise bad_request("'prompt' must be a string or a list of token ids", "prompt")
    req.echo = _field(body, "echo", bool, False)
    req.logprobs = _logprob_count(body, "logprobs")
    if req.echo and req.prompt_logprobs is None:
        req.prompt_logprobs = req.logprobs      # as vLLM: echo returns the prompt's logprobs too
    if body.get("suffix") is not None:
        raise bad_request("'suffix' (fill-in-the-middle) is not supported for this model", "suffix")
    req.best_of = _field(body, "best_of", int, None)
    if req.best_of is not None:
        if not req.n <= req.best_of <= MAX_N:
            raise bad_request(f"'best_of' must be in [n, {MAX_N}], got {req.best_of}", "best_of")
        if req.stream and req.best_of > req.n:
            raise bad_request("'best_of' > n cannot be streamed", "best_of")
    req.add_special_tokens = _field(body, "add_special_tokens", bool, True)
    return req


def parse_chat(body: Any) -> GenerateRequest:
    req = _parse_common(body, "chat")
    messages = body.get("messages")
    try:
        req.messages = normalize_messages(messages)
        req.tools = normalize_tools(body.get("tools"))
    except MessageError as e:
        raise bad_request(str(e), e.param) from None
    top = _logprob_count(body, "top_logprobs")
    if _field(body, "logprobs", bool, False):
        req.logprobs = top or 0
    elif top:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    req.echo = _field(body, "echo", bool, False)
    if body.get("best_of") is not None:
        raise bad_request("'best_of' is only supported for completions", "best_of")
    _parse_tool_fields(body, req)
    req.add_generation_prompt = _field(body, "add_generation_prompt", bool, True)
    req.add_special_tokens = _field(body, "add_special_tokens", bool, False)
    req.chat_template_kwargs = _field(body, "chat_template_kwargs", dict, {})
    req.chat_template = _field(body, "chat_template", str, None)
    req.continue_final_message = _field(body, "continue_final_message", bool, False)
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                          "continue_final_message")
    if req.continue_final_message and req.messages[-1]["role"] != "assistant":
        raise bad_request("'continue_final_message' needs the last message to be the assistant's",
                          "continue_final_message")
    req.include_reasoning = _field(body, "include_reasoning", bool, True)
    if body.get("documents"):
        raise bad_request("'documents' is not supported", "documents")
    if body.get("thinking_token_budget") is not None:
        raise bad_request("'thinking_token_budget' is not supported (no reasoning budget here)", "thinking_token_budget")
    if body.get("reasoning_effort") is not None:
        raise bad_request("'reasoning_effort' is not supported by DeepSeek's templates; use "
                          "chat_template_kwargs {\"thinking\": ...} with --reasoning-parser deepseek_v3",
                          "reasoning_effort")
    return req


def _parse_tool_fields(body: dict[str, Any], req: GenerateRequest) -> None:
    for legacy, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(legacy) is not None:
            raise bad_request(f"'{legacy}' is deprecated by OpenAI and not supported; send '{new}'", legacy)
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise bad_request(f"'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                  f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}",
                                  "tool_choice")
        else:
            fn = choice.get("function") if isinstance(choice, dict) else None
            if not isinstance(fn, dict) or choice.get("type", "function") != "function" \
                    or not isinstance(fn.get("name"), str):
                raise bad_request("a named 'tool_choice' must be {\"type\": \"function\", \"function\": "
                                  "{\"name\": ...}}", "tool_choice")
            choice = {"type": "function", "function": {"name": fn["name"]}}
        if choice != "none" and not req.tools:
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        if isinstance(choice, dict) and choice["function"]["name"] not in {t["function"]["name"] for t in req.tools}:
            raise bad_request(f"tool_choice names {choice['function']['name']!r}, which is not in 'tools'",
                              "tool_choice")
    req.tool_choice = choice
    req.parallel_tool_calls = _field(body, "parallel_tool_calls", bool, True)


def check_model(req_model: str | None, served: list[str]) -> str:
    """The served name a request is for; an unknown name is vLLM's 404 NotFoundError with param 'model'."""
    if not req_model:
        return served[0]
    if req_model not in served:
        raise APIError(f"The model `{req_model}` does not exist.", 404, "model", "NotFoundError")
    return req_model
