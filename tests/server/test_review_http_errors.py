"""Review, against a real `wideep serve`: bodies that the JSON parser or the engine wire choke on are
OpenAI-style 400s, never a 500 — JSON nested past Python's recursion limit, and integers beyond
64 bits hidden inside kv_transfer_params (passed through to the engine unchecked)."""
from __future__ import annotations

import json

import pytest

from server_harness import http, start_server, stop_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("serve-review"), dp_size=1, api_key=None,
                       kv_events=False)
    try:
        yield srv
    finally:
        stop_server(srv)


def _assert_400(status, body, param="__any__"):
    assert status == 400, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    if param != "__any__":
        assert err["param"] == param, err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_deeply_nested_json_is_400(server, path):
    status, _, body = http("POST", server.url() + path, b"[" * 100_000)
    _assert_400(status, body)


@pytest.mark.parametrize("path,base", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_kv_transfer_params_beyond_int64_is_400(server, path, base):
    status, _, body = http("POST", server.url() + path, {**base, "kv_transfer_params": {"x": [2 ** 70]}})
    _assert_400(status, body, "kv_transfer_params")
    # the server still serves
    status, _, body = http("POST", server.url() + path, base)
    assert status == 200, body
