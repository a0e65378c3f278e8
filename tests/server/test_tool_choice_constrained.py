"""tool_choice "required" and named are enforced by constrained decoding: on a real `wideep serve`
(tiny checkpoint, byte-level tokenizer so JSON is spellable), every named call's arguments and every
required call validate against the function's JSON schema, streamed and not. Needs the structured
output engine (wideep.engine.structured + xgrammar); skipped without it."""
from __future__ import annotations

import json
import random

import openai
import pytest

pytest.importorskip("xgrammar")
pytest.importorskip("wideep.engine.structured")
jsonschema = pytest.importorskip("jsonschema")

from server_harness import API_KEY, start_server, stop_server  # noqa: E402


def _schema(rng: random.Random) -> dict:
    """Small bounded object schemas a random model finishes within max_tokens."""
    props = {}
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(["string", "integer", "boolean", "enum"])
        name = rng.choice(["city", "n", "ok", "unit"]) + str(i)
        props[name] = {"string": {"type": "string", "maxLength": 5},
                       "integer": {"type": "integer", "minimum": 0, "maximum": 99},
                       "boolean": {"type": "boolean"},
                       "enum": {"enum": ["c", "f"]}}[kind]
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_byte_model_dir, tmp_path_factory):
    srv = start_server(tiny_byte_model_dir, tmp_path_factory.mktemp("tools-so"), dp_size=1, kv_events=False,
                       extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v3"])
    try:
        yield srv
    finally:
        stop_server(srv)


def _client(srv):
    return openai.OpenAI(base_url=srv.url() + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_named_and_required_tool_calls_always_validate(server):
    rng = random.Random(5)
    c = _client(server)
    msgs = [{"role": "user", "content": "call a tool"}]
    for k in range(3):
        tools = [{"type": "function", "function": {"name": f"f{j}", "parameters": _schema(rng)}} for j in range(2)]
        by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        named = {"type": "function", "function": {"name": "f1"}}
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice=named, seed=k,
                                      max_tokens=80, temperature=1.0)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "f1" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), by_name["f1"])
        # streamed: the same seed gives the same arguments, delivered as deltas
        args, names = "", []
        for ch in c.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice=named, seed=k,
                                            max_tokens=80, temperature=1.0, stream=True):
            for tc in ch.choices[0].delta.tool_calls or [] if ch.choices else []:
                names += [tc.function.name] if tc.function and tc.function.name else []
                args += tc.function.arguments or "" if tc.function else ""
        assert names == ["f1"] and args == call.function.arguments
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="required", seed=k,
                                      max_tokens=150, temperature=1.0)
        calls = r.choices[0].message.tool_calls
        if r.choices[0].finish_reason == "length":   # an unfinished array cannot be read back
            continue
        assert calls, r.choices[0]
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])
