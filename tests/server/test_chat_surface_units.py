"""Unit tests of the chat surface pieces: parsers (streamed == full), shared template renderer (router
== engine, byte for byte), manifest command lines, hub ids, generation defaults, the P/D prefill leg."""
from __future__ import annotations

import json
import random
import shlex

import pytest

from wideep.server.reasoning import DeepSeekR1ReasoningParser, DeepSeekV3ReasoningParser, ReasoningSplitter
from wideep.server.tool_parser import (DeepSeekToolStream, RequiredToolStream, named_tool_schema,
                                       parse_required_output, required_tool_schema)
from wideep.utils.chat_template import ChatTemplate, ChatTemplateError

B, E = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
V3 = f'Sure.{B}function<｜tool▁sep｜>get_weather\n```json\n{{"city": "Paris", "q": "a`b}}"}}\n```{E}tail'
TWO = (f'{B}function<｜tool▁sep｜>a\n```json\n{{"x": 1}}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>'
       f'function<｜tool▁sep｜>b\n```json\n[1, 2]\n```{E}')
V31 = f'{B}get<｜tool▁sep｜>{{"a": "<｜x"}}{E}'


def _chunks(text, rng):
    i = 0
    while i < len(text):
        k = rng.randint(1, 7)
        yield text[i:i + k]
        i += k


@pytest.mark.parametrize("text", [V3, TWO, V31, "no tools at all", f"cut {B}function<｜tool▁sep｜>f\n```json\n{{\"a\"",
                                  f"only begin {B}"])
def test_tool_stream_concatenates_to_full(text):
    full = DeepSeekToolStream()
    d = full.feed(text, final=True)
    want = full.tool_calls()
    for seed in range(5):
        s = DeepSeekToolStream()
        content, args, names = "", {}, {}
        for piece in _chunks(text, random.Random(seed)):
            out = s.feed(piece)
            content += out.content
            for c in out.calls:
                if "id" in c:
                    names[c["index"]] = c["function"]["name"]
                args[c["index"]] = args.get(c["index"], "") + c["function"].get("arguments", "")
        out = s.feed("", final=True)
        content += out.content
        for c in out.calls:
            args[c["index"]] = args.get(c["index"], "") + c["function"].get("arguments", "")
        assert content == d.content
        assert [names[i] for i in sorted(names)] == [c["function"]["name"] for c in want]
        assert [args.get(i, "") for i in sorted(names)] == [c["function"]["arguments"] for c in want]


def test_tool_formats_parse_like_vllm():
    s = DeepSeekToolStream()
    assert s.feed(V3, final=True).content == "Sure."
    [c] = s.tool_calls()
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "q": "a`b}"}'}
    s = DeepSeekToolStream()
    s.feed(TWO, final=True)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in s.tool_calls()] == [("a", '{"x": 1}'), ("b", "[1, 2]")]
    s = DeepSeekToolStream()
    s.feed(V31, final=True)
    assert s.tool_calls()[0]["function"] == {"name": "get", "arguments": '{"a": "<｜x"}'}
    s = DeepSeekToolStream()   # a tool section with no readable call stays content
    assert s.feed(f"only begin {B}", final=True).content == f"only begin {B}"


@pytest.mark.parametrize("text,want", [
    ("abc</think>def", ("abc", "def")), ("<think>abc</think>", ("abc", "")), ("abc", ("abc", "")),
    (" <think> x </think> y</think>z", (" x ", " y</think>z")), ("</think>", ("", "")), ("<thin", ("<thin", "")),
])
def test_r1_reasoning_split_streamed_equals_full(text, want):
    assert DeepSeekR1ReasoningParser().splitter({}).feed(text, final=True) == want
    for seed in range(5):
        sp = ReasoningSplitter()
        r = c = ""
        for piece in _chunks(text, random.Random(seed)):
            a, b = sp.feed(piece)
            r, c = r + a, c + b
        a, b = sp.feed("", final=True)
        assert (r + a, c + b) == want


def test_v3_reasoning_only_when_thinking_is_on():
    assert DeepSeekV3ReasoningParser().splitter({}).feed("a</think>b", final=True) == ("", "a</think>b")
    assert DeepSeekV3ReasoningParser().splitter({"thinking": True}).feed("a</think>b", final=True) == ("a", "b")


def test_required_and_named_schemas_and_readback():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}, "required": ["x"]}}}, {"type": "function", "function": {"name": "g"}}]
    assert named_tool_schema(tools[0]) == tools[0]["function"]["parameters"]
    assert named_tool_schema(tools[1]) == {"type": "object", "properties": {}}
    schema = required_tool_schema(tools)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]] == [["f"], ["g"]]
    out = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]'
    calls = parse_required_output(out)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1}), ("g", {})]
    rs = RequiredToolStream()
    got = rs.feed(out[:20]) + rs.feed(out[20:])
    assert [d["function"]["name"] for d in got if "id" in d] == ["f", "g"]
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(json.loads(out), schema)


# ---- one renderer for the engine and the router ------------------------------------------------

TEMPLATES = {
    "tojson": "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ tools | tojson(indent=2) }}",
    "loopctl": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }}:{{ m.content }}|"
               "{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
    "named": [{"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
              {"name": "tool_use", "template": "T{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"}],
}
BODIES = [
    {"messages": [{"role": "user", "content": "héllo <b> & 'q' \u2028"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"k\": \"é\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "r"}],
     "tools": [{"type": "function", "function": {"name": "f", "description": "<d>", "parameters": {"type": "object"}}}]},
]


def _model_dir(tmp_path, name, template):
    from wideep.model.make_tokenizer import write_tokenizer

    d = tmp_path / name
    d.mkdir()
    write_tokenizer(d, 4096)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name", [*TEMPLATES, "tiny"])
def test_router_and_engine_render_byte_identical_prompts(tmp_path, name):
    from wideep.model.make_tokenizer import CHAT_TEMPLATE
    from wideep.model.tokenizer import Tokenizer
    from wideep.router.tokenize import LocalTokenizer
    from wideep.server.protocol import parse_chat

    d = _model_dir(tmp_path, name, TEMPLATES.get(name, CHAT_TEMPLATE))
    engine, router = Tokenizer(d), LocalTokenizer(d)
    for body in BODIES:
        req = parse_chat({"model": "m", **body})
        text = engine.chat_template.render(req.messages, add_generation_prompt=True, tools=req.tools)
        assert router.render_chat(body) == text
        assert router.token_ids_of(body, chat=True) == engine.encode(text, add_special_tokens=False)
        if name == "tojson" and body is BODIES[0]:   # transformers' tojson: no HTML escaping, non-ASCII kept
            assert '"héllo <b> & \'q\' \u2028"' in text and "\\u" not in text
        if name == "named":
            assert text.startswith("T" if body.get("tools") else "D")


def test_template_bounds_and_errors():
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        time_limit_s=0.2)
    with pytest.raises(ChatTemplateError, match="longer than"):
        slow.render([])
    with pytest.raises(ChatTemplateError, match="size limit"):
        ChatTemplate("{{ 'ab' * 100000000 }}").render([])
    with pytest.raises(ChatTemplateError, match="characters"):
        ChatTemplate("{% for i in range(100000) %}{{ 'abcdefghij' }}{% endfor %}", max_chars=1000).render([])
    with pytest.raises(ChatTemplateError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([])
    t = ChatTemplate("{{ foo }}{% for m in messages %}{% endfor %}")
    t.check_kwargs({"foo": 1})
    for bad, words in (({"tokenize": True}, "may not set"), ({"bar": 1}, "not used"), ({"a b": 1}, "not a template")):
        with pytest.raises(ChatTemplateError, match=words):
            t.check_kwargs(bad)


# ---- manifests, hub ids, generation defaults, the P/D prefill leg -----------------------------------

HYBRID_LB = """--port 8000 --trust-remote-code --disable-uvicorn-access-log --data-parallel-hybrid-lb
 --enable-expert-parallel --tensor-parallel-size 1 --data-parallel-size 16 --data-parallel-size-local 8
 --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 5555 --data-parallel-start-rank 8
 --kv_transfer_config '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"fail"}'
 --enable-eplb --eplb-config '{"window_size":"1000","step_interval":"3000","num_redundant_experts":"32","log_balancedness":"False"}'
 --async-scheduling --enable-dbo --dbo-prefill-token-threshold 32 --dbo-decode-token-threshold 32
 --compilation_config '{"cudagraph_mode": "FULL_DECODE_ONLY"}' --kv-cache-memory-bytes=8G"""
DP_AWARE = """--port 8200 --data-parallel-multi-port-external-lb --data-parallel-supervisor-port=8208
 --data-parallel-size 16 --data-parallel-size-local 8 --data-parallel-start-rank 0 --data-parallel-address 10.0.0.1
 --data-parallel-rpc-port 5555 --max-model-len 65536 --enable-expert-parallel --all2all-backend deepep_high_throughput
 --moe-backend deep_gemm --max-num-batched-tokens 256 --max-num-seqs 256
 --kv_transfer_config '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
 --reasoning-parser deepseek_r1 --enable-auto-tool-choice --tool-call-parser deepseek_v3 --generation-config auto"""


def _hub_cache(tmp_path, monkeypatch, model_dir=None):
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-R1-0528"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return snap


@pytest.mark.parametrize("line", [HYBRID_LB, DP_AWARE])
def test_llm_d_manifest_command_lines_parse_unchanged(tmp_path, monkeypatch, caplog, line):
    import argparse

    from wideep.server.args import add_serve_arguments, serve_config_from_args

    snap = _hub_cache(tmp_path, monkeypatch)
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    ns = p.parse_args(["deepseek-ai/DeepSeek-R1-0528", *shlex.split(line)])
    with caplog.at_level("WARNING", logger="wideep.serve"):
        cfg = serve_config_from_args(ns)
    assert cfg.engine_args.model == str(snap)
    assert cfg.served_model_names == ["deepseek-ai/DeepSeek-R1-0528"]
    assert cfg.engine_args.data_parallel_size == 16 and cfg.dp_size_local == 8
    logs = caplog.text
    if line is HYBRID_LB:
        assert cfg.start_rank == 8 and cfg.engine_args.enable_eplb and not cfg.engine_args.enforce_eager
        assert cfg.engine_args.kv_cache_memory_bytes == 8 * 2 ** 30
        assert cfg.engine_args.async_scheduling and cfg.engine_args.enable_dbo
        assert cfg.engine_args.dbo_prefill_token_threshold == 32
        for flag in ("--trust-remote-code", "--disable-uvicorn-access-log", "--data-parallel-hybrid-lb"):
            assert logs.count(flag) == 1, flag
    else:
        assert cfg.reasoning_parser == "deepseek_r1" and cfg.tool_call_parser == "deepseek_v3"
        assert cfg.enable_auto_tool_choice and cfg.engine_args.max_model_len == 65536
        assert "deepep_high_throughput" in logs and "'all_to_all'" in logs and "--moe-backend" in logs


def test_hub_id_lookup_and_clear_error(tmp_path, monkeypatch):
    from wideep.utils.hf_cache import resolve_model

    snap = _hub_cache(tmp_path, monkeypatch)
    assert resolve_model("deepseek-ai/DeepSeek-R1-0528") == str(snap)
    with pytest.raises(ValueError) as e:
        resolve_model("deepseek-ai/DeepSeek-V3")
    assert str(tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3") in str(e.value) and "HF_HOME" in str(e.value)


def test_compilation_config_and_flag_errors(tmp_path):
    import argparse

    from wideep.server.args import add_serve_arguments, serve_config_from_args

    (tmp_path / "config.json").write_text("{}")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)

    def cfg(*args):
        return serve_config_from_args(p.parse_args([str(tmp_path), *args]))

    assert cfg("--compilation-config", '{"cudagraph_mode": "NONE"}').engine_args.enforce_eager
    assert cfg("--compilation-config", '{"cudagraph_capture_sizes": [1, 2]}').engine_args.cuda_graph_sizes == [1, 2]
    for args, words in ((["--compilation-config", '{"cudagraph_mode": "PIECEWISE"}'], "FULL_DECODE_ONLY"),
                        (["--compilation-config", '{"level": 3}'], "not supported"),
                        (["--enable-auto-tool-choice"], "--tool-call-parser"),
                        (["--chat-template", str(tmp_path / "missing.jinja")], "no such file"),
                        (["--generation-config", str(tmp_path / "nodir")], "--generation-config")):
        with pytest.raises(ValueError, match=words):
            cfg(*args)
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    assert cfg("--chat-template", str(tmp_path / "t.jinja")).chat_template == "{{ messages[0].content }}"


def test_generation_defaults(tmp_path):
    from wideep.server.generation_defaults import apply_defaults, cap_max_tokens, load_sampling_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 100, "do_sample": True, "bos_token_id": 0}))
    d = load_sampling_defaults("auto", str(tmp_path))
    assert d == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 100}
    assert load_sampling_defaults("vllm", str(tmp_path)) == {}
    assert apply_defaults({"temperature": 0.0, "top_p": None}, d) == {"temperature": 0.0, "top_p": 0.95}
    assert cap_max_tokens(None, d) == 100 and cap_max_tokens(500, d) == 100 and cap_max_tokens(5, d) == 5


def test_prefill_leg_strips_output_only_fields():
    from wideep.router.sidecar import prefill_leg_body

    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "min_tokens": 5, "n": 2, "logprobs": True,
            "top_logprobs": 3, "response_format": {"type": "json_object"}, "stream": True,
            "stream_options": {"include_usage": True}, "tools": tools, "tool_choice": "required",
            "chat_template_kwargs": {"thinking": True}, "structured_outputs": {"regex": "a+"}, "seed": 3}
    leg = prefill_leg_body(body)
    for k in ("min_tokens", "n", "logprobs", "top_logprobs", "response_format", "stream_options", "structured_outputs"):
        assert k not in leg
    assert leg["stream"] is False and leg["tools"] == tools and leg["tool_choice"] == "none"
    assert leg["chat_template_kwargs"] == {"thinking": True} and leg["messages"] == body["messages"]
    assert body["min_tokens"] == 5 and body["tool_choice"] == "required"   # the decode leg keeps everything
    assert prefill_leg_body({**body, "tool_choice": "auto"})["tool_choice"] == "auto"
