"""Reasoning and tool calls end to end: a real `wideep serve` (tiny model, R1-style template, R1's think
and tool-call tokens) whose engine is made to emit scripted tokens (tests/server/forced_output, selected
by the request's seed), queried with the official openai client, streamed and not."""
from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

from server_harness import http, start_server, stop_server
from wideep.model.tokenizer import Tokenizer

FORCED = Path(__file__).parent / "forced_output"
REASONING = "hello world </think> the answer is 4"
TOOL = ("let me think </think> <｜tool▁calls▁begin｜> <｜tool▁call▁begin｜> function <｜tool▁sep｜> find ```json "
        '{ " city " : " north " } ``` <｜tool▁call▁end｜> <｜tool▁calls▁end｜>')
TOOLS = [{"type": "function", "function": {"name": "find", "description": "find a place",
                                            "parameters": {"type": "object", "properties": {" city ": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tok = Tokenizer(tiny_model_dir)
    script = {1: tok.encode(REASONING, add_special_tokens=False) + [tok.eos_token_id],
              2: tok.encode(TOOL, add_special_tokens=False) + [tok.eos_token_id]}
    tmp = tmp_path_factory.mktemp("forced")
    (tmp / "script.json").write_text(json.dumps(script))
    env = {"WIDEEP_TEST_FORCED_OUTPUT": str(tmp / "script.json"),
           "PYTHONPATH": os.pathsep.join([str(FORCED), os.environ.get("PYTHONPATH", "")])}
    srv = start_server(tiny_model_dir, tmp, dp_size=1, kv_events=False, env=env, extra_args=[
        "--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v3",
        "--reasoning-field", "both"])
    yield srv
    stop_server(srv)


def _client(srv):
    return openai.OpenAI(base_url=srv.url() + "/v1", api_key=srv.api_key, max_retries=0)


def _stream(client, **kw):
    reasoning, content, calls, finish, ids = "", "", {}, None, set()
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        extra = d.model_extra or {}
        reasoning += extra.get("reasoning") or ""
        assert extra.get("reasoning") == extra.get("reasoning_content")
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            if tc.id:
                c["id"] = tc.id
                ids.add(tc.id)
            if tc.function and tc.function.name:
                c["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                c["arguments"] += tc.function.arguments
        finish = ch.choices[0].finish_reason or finish
    return reasoning, content, calls, finish


def test_reasoning_split_full_and_streamed(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "what is two plus two"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, seed=1, max_tokens=40)
    m = r.choices[0].message
    extra = m.model_extra
    assert extra["reasoning"].strip() == "hello world"
    assert extra["reasoning_content"] == extra["reasoning"]
    assert m.content.strip() == "the answer is 4"
    assert r.choices[0].finish_reason == "stop" and not m.tool_calls
    assert r.usage.completion_tokens == len(REASONING.split()) + 1   # reasoning tokens count as completion tokens
    reasoning, content, calls, finish = _stream(c, model="tiny", messages=msgs, seed=1, max_tokens=40)
    assert (reasoning, content) == (extra["reasoning"], m.content)
    assert finish == "stop" and not calls


def test_reasoning_cut_by_max_tokens_is_all_reasoning(server):
    r = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                seed=1, max_tokens=2)
    assert r.choices[0].message.model_extra["reasoning"].strip() == "hello world"
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "length"


def test_tool_call_full_and_streamed(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "find the north city"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, seed=2, max_tokens=60)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.model_extra["reasoning"].strip() == "let me think"
    # the tiny tokenizer space-joins tokens: the text between </think> and the tool calls is one space
    assert ch.message.content == " "
    [call] = ch.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "find"
    assert json.loads(call.function.arguments) == {" city ": " north "}
    reasoning, content, calls, finish = _stream(c, model="tiny", messages=msgs, tools=TOOLS, seed=2, max_tokens=60)
    assert finish == "tool_calls" and content == ch.message.content
    assert reasoning == ch.message.model_extra["reasoning"]
    assert list(calls) == [0]
    assert calls[0]["name"] == "find" and calls[0]["arguments"] == call.function.arguments
    assert calls[0]["id"].startswith("chatcmpl-tool-")


def test_generation_config_defaults_apply(server):
    """`--generation-config auto` (the default): the tiny model's generation_config.json (R1's temperature
    0.6, top_p 0.95) fills omitted fields; a request's own values win."""
    c = _client(server)

    def text(**kw):
        return c.completions.create(model="tiny", prompt="the quick answer", seed=99, max_tokens=24, **kw).choices[0].text
    omitted = text()
    assert omitted == text(temperature=0.6, top_p=0.95)
    assert omitted != text(temperature=1.0, top_p=1.0)


def test_tool_choice_none_keeps_the_raw_text(server):
    r = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                tools=TOOLS, tool_choice="none", seed=2, max_tokens=60)
    m = r.choices[0].message
    assert not m.tool_calls and "<｜tool▁call▁begin｜>" in m.content and r.choices[0].finish_reason == "stop"


def test_tool_history_renders(server, tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "find the north city"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "find", "arguments": '{"city": "north"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "it is cold"},
            {"role": "assistant", "content": "<think>secret</think>it is cold"},
            {"role": "user", "content": "thanks"}]
    status, _, body = http("POST", server.url() + "/tokenize", {"model": "tiny", "messages": msgs, "tools": TOOLS},
                           headers={"Authorization": f"Bearer {server.api_key}"})
    assert status == 200, body
    ids = json.loads(body)["tokens"]
    for marker in ("<｜tool▁calls▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁outputs▁end｜>", "<think>"):
        assert tok.token_to_id(marker) in ids, marker
    assert tok.token_to_id("secret") not in ids          # earlier reasoning is dropped by the template
    assert tok.token_to_id("north") in ids and tok.token_to_id("cold") in ids
    r = _client(server).chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, seed=1, max_tokens=40)
    assert r.choices[0].message.content.strip() == "the answer is 4"


@pytest.mark.parametrize("extra,param,words", [
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "may not set 'tokenize'"),
    ({"chat_template_kwargs": {"nope": 1}}, "chat_template_kwargs", "not used by the chat template"),
    ({"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}, "chat_template_kwargs", "--trust-request-chat-template"),
    ({"chat_template": "{{ 'x' }}"}, "chat_template", "--trust-request-chat-template"),
    ({"functions": [{"name": "f"}]}, "functions", "send 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "not in 'tools'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_chat_fields_are_clear_400s(server, extra, param, words):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    status, _, raw = http("POST", server.url() + "/v1/chat/completions", body,
                          headers={"Authorization": f"Bearer {server.api_key}"})
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["param"] == param and words in err["message"], err
    assert "TypeError" not in err["message"]


def test_required_and_named_tool_choice_need_the_grammar_engine(server):
    try:
        import wideep.engine.structured  # noqa: F401
    except ImportError:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                "tool_choice": "required", "max_tokens": 8}
        status, _, raw = http("POST", server.url() + "/v1/chat/completions", body,
                              headers={"Authorization": f"Bearer {server.api_key}"})
        assert status == 400 and "constrained decoding" in json.loads(raw)["error"]["message"]
    else:
        pytest.skip("structured outputs are present: tests/server/test_tool_choice_constrained.py covers them")


ROUTER_CONFIG = """
plugins:
- {type: token-producer, parameters: {mode: tokenizer, tokenizer: "TOKDIR"}}
- {type: active-request-scorer}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: active-request-scorer}]}
"""


def test_through_the_router(server, tiny_model_dir):
    """The router renders the same prompt ids as the server (tools included) and passes reasoning and
    tool calls through, streamed and not."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "router"))
    from router_helpers import RouterThread, router_options

    opts = router_options(config_text=ROUTER_CONFIG.replace("TOKDIR", str(tiny_model_dir)),
                          endpoints=[f"127.0.0.1:{server.port},name=s-rank-0,rank=0"])
    msgs = [{"role": "user", "content": "find the north city"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "find", "arguments": '{"city": "é"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "cold"}, {"role": "user", "content": "again"}]
    with RouterThread(opts) as rt:
        local = rt.router.cfg.plugins["token-producer"].local
        status, _, raw = http("POST", server.url() + "/tokenize", {"model": "tiny", "messages": msgs, "tools": TOOLS},
                              headers={"Authorization": f"Bearer {server.api_key}"})
        assert status == 200
        assert local.token_ids_of({"messages": msgs, "tools": TOOLS}, chat=True) == json.loads(raw)["tokens"]
        via = openai.OpenAI(base_url=f"http://127.0.0.1:{opts.proxy_port}/v1", api_key=server.api_key, max_retries=0)
        direct = _client(server)
        for seed in (1, 2):
            kw = dict(model="tiny", messages=msgs, tools=TOOLS, seed=seed, max_tokens=60)
            a, b = via.chat.completions.create(**kw), direct.chat.completions.create(**kw)
            ma, mb = a.choices[0].message, b.choices[0].message
            assert (ma.content, ma.model_extra["reasoning"], a.choices[0].finish_reason) == \
                (mb.content, mb.model_extra["reasoning"], b.choices[0].finish_reason)
            assert [(t.function.name, t.function.arguments) for t in ma.tool_calls or []] == \
                [(t.function.name, t.function.arguments) for t in mb.tool_calls or []]
            sa, sb = _stream(via, **kw), _stream(direct, **kw)
            assert sa[:2] == sb[:2] and sa[3] == sb[3]
            assert [(c["name"], c["arguments"]) for c in sa[2].values()] == [(c["name"], c["arguments"]) for c in sb[2].values()]
