"""P/D keeps the chat surface: reasoning split, tool calls and min_tokens through the sidecar equal the
aggregated answer (same request without the prefiller header), streamed and not. Both servers run the
test-only forced-output hook (tests/server/forced_output), so the output holds R1's think and
tool-call tokens."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_pd_e2e import DP, Stack, _client, _stop, _wait_usage_zero
from wideep.model.tokenizer import Tokenizer

FORCED = Path(__file__).resolve().parents[1] / "server" / "forced_output"
SCRIPT = ("let me think </think> sure <｜tool▁calls▁begin｜> <｜tool▁call▁begin｜> function <｜tool▁sep｜> find ```json "
          '{ " city " : " north " } ``` <｜tool▁call▁end｜> <｜tool▁calls▁end｜>')
TOOLS = [{"type": "function", "function": {"name": "find", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd-chat")
    tok = Tokenizer(tiny_model_dir)
    (tmp / "script.json").write_text(json.dumps({7: tok.encode(SCRIPT, add_special_tokens=False) + [tok.eos_token_id]}))
    saved = {k: os.environ.get(k) for k in ("WIDEEP_TEST_FORCED_OUTPUT", "PYTHONPATH")}
    os.environ["WIDEEP_TEST_FORCED_OUTPUT"] = str(tmp / "script.json")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(FORCED), saved["PYTHONPATH"] or ""])
    s = Stack(tiny_model_dir, tmp, serve_extra=["--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice",
                                                "--tool-call-parser", "deepseek_v3"])
    try:
        s.start()
        yield s
    finally:
        _stop(s.procs)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _answer(c, stream: bool, headers: dict) -> tuple:
    kw = dict(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "find the north city"}],
              tools=TOOLS, seed=7, max_tokens=60, extra_body={"min_tokens": 3}, extra_headers=headers)
    if not stream:
        r = c.chat.completions.create(**kw)
        m = r.choices[0].message
        return (m.model_extra["reasoning"], m.content,
                [(t.function.name, t.function.arguments) for t in m.tool_calls], r.choices[0].finish_reason)
    reasoning, content, calls, finish = "", "", {}, None
    for ch in c.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning") or ""
        content += d.content or ""
        for t in d.tool_calls or []:
            name, args = calls.get(t.index, ("", ""))
            calls[t.index] = (name + (t.function.name or ""), args + (t.function.arguments or ""))
        finish = ch.choices[0].finish_reason or finish
    return reasoning, content or None, [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow   # ~2.5 min on 2 cores (a P/D stack of its own); fast siblings: the prefill-leg unit test
@pytest.mark.parametrize("stream", [False, True])   # and tests/server/test_reasoning_tools_e2e.py
def test_pd_reasoning_and_tools_equal_aggregated(stack, stream):
    for rank in range(DP):
        c = _client(stack.s_port + rank)
        before = stack.sidecar_stats(stack.s_port + rank)
        pd = _answer(c, stream, {"x-prefiller-host-port": f"127.0.0.1:{stack.p_port + rank}"})
        agg = _answer(c, stream, {})
        assert pd == agg
        reasoning, content, calls, finish = pd
        assert reasoning.strip() == "let me think" and content.strip() == "sure"
        assert calls == [("find", '{ " city " : " north " }')] and finish == "tool_calls"
        after = stack.sidecar_stats(stack.s_port + rank)
        assert after["pd_requests"] == before["pd_requests"] + 1   # min_tokens did not fail the prefill leg
        assert after["local_prefill_fallbacks"] == before["local_prefill_fallbacks"]
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)
