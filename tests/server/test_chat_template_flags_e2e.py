"""Server-side template policy end to end: --chat-template FILE, --reasoning-parser deepseek_v3 (thinking
switched by the request), --trust-request-chat-template with the render bounds, --generation-config."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import openai
import pytest

from server_harness import http, start_server, stop_server
from wideep.model.make_tokenizer import CHAT_TEMPLATE
from wideep.model.tokenizer import Tokenizer

FORCED = Path(__file__).parent / "forced_output"
OUTPUT = "hello world </think> the answer is 4"
# the tiny R1 template with DeepSeek-V3.1's switch: thinking on opens <think>, off closes it
TEMPLATE = CHAT_TEMPLATE.replace("{{ '<｜Assistant｜><think>\\n' }}",
                                 "{% if thinking %}{{ '<｜Assistant｜><think>\\n' }}{% else %}{{ '<｜Assistant｜></think>' }}{% endif %}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    assert TEMPLATE != CHAT_TEMPLATE
    tok = Tokenizer(tiny_model_dir)
    tmp = tmp_path_factory.mktemp("tpl")
    (tmp / "script.json").write_text(json.dumps({1: tok.encode(OUTPUT, add_special_tokens=False) + [tok.eos_token_id]}))
    (tmp / "v31.jinja").write_text(TEMPLATE)
    env = {"WIDEEP_TEST_FORCED_OUTPUT": str(tmp / "script.json"),
           "PYTHONPATH": os.pathsep.join([str(FORCED), os.environ.get("PYTHONPATH", "")])}
    srv = start_server(tiny_model_dir, tmp, dp_size=1, kv_events=False, env=env, api_key=None, extra_args=[
        "--reasoning-parser", "deepseek_v3", "--chat-template", str(tmp / "v31.jinja"),
        "--trust-request-chat-template", "--generation-config", "vllm"])
    yield srv
    stop_server(srv)


def _client(srv):
    return openai.OpenAI(base_url=srv.url() + "/v1", api_key="none", max_retries=0)


def test_v3_parser_follows_the_thinking_switch_and_the_server_template(server, tiny_model_dir):
    c = _client(server)
    msgs = [{"role": "user", "content": "hi"}]
    off = c.chat.completions.create(model="tiny", messages=msgs, seed=1, max_tokens=20)
    assert off.choices[0].message.content.strip() == OUTPUT and off.choices[0].message.model_extra["reasoning"] is None
    on = c.chat.completions.create(model="tiny", messages=msgs, seed=1, max_tokens=20,
                                   extra_body={"chat_template_kwargs": {"thinking": True}})
    assert on.choices[0].message.model_extra["reasoning"].strip() == "hello world"
    assert on.choices[0].message.content.strip() == "the answer is 4"
    # --chat-template replaced the model's: the prompt ends in </think> with thinking off
    tok = Tokenizer(tiny_model_dir)
    _, _, raw = http("POST", server.url() + "/tokenize", {"model": "tiny", "messages": msgs})
    assert json.loads(raw)["tokens"][-1] == tok.token_to_id("</think>")


def test_trusted_request_template_and_its_bounds(server):
    c = _client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=1, max_tokens=3,
                                  extra_body={"chat_template": "{{ bos_token }}{{ messages[0]['content'] }} the"})
    assert r.usage.prompt_tokens == 3
    heavy = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
             "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=http("POST", server.url() + "/v1/chat/completions", heavy,
                                                             timeout=60)))
    t.start()
    health = [http("GET", server.url() + "/health", timeout=30)[0] for _ in range(3)]   # the loop stays free
    t.join(90)
    assert health == [200, 200, 200]
    status, _, raw = result["r"]
    assert status == 400 and "longer than" in json.loads(raw)["error"]["message"], raw
    big = {**heavy, "chat_template": "{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' * 40 }}{% endfor %}"}
    status, _, raw = http("POST", server.url() + "/v1/chat/completions", big, timeout=60)
    assert status == 400 and "exceeds" in json.loads(raw)["error"]["message"], raw


def test_generation_config_vllm_means_no_model_defaults(server, tiny_model_dir):
    """The tiny model's generation_config.json says temperature 0.6 / top_p 0.95; with `vllm` an omitted
    temperature is 1.0 (a seeded request equals the explicit 1.0 / 1.0 one)."""
    assert json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())["temperature"] == 0.6
    c = _client(server)

    def text(**kw):
        return c.completions.create(model="tiny", prompt="the quick answer", seed=99, max_tokens=24, **kw).choices[0].text
    assert text() == text(temperature=1.0, top_p=1.0)
