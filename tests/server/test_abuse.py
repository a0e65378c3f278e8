"""A real `wideep serve` (DP=2, kv_both, a KV peer allow-list) under abuse and faults:
oversized bodies and prompts are refused without stalling the event loop, kv_transfer_params
naming a producer outside the pool are refused before anything connects, a validate-only request
runs nothing, and a frozen engine (SIGSTOP) is reported by its rank and the supervisor, then
recovers (SIGCONT)."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
from server_harness import http, start_server, stop_server
from test_faults import StreamReader, _engine_pid


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    kv = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
    s = start_server(tiny_model_dir, tmp_path_factory.mktemp("abuse"), dp_size=2, api_key=None, kv_events=False,
                     extra_args=["--kv-transfer-config", json.dumps(kv), "--engine-stall-timeout", "2"],
                     env={"WIDEEP_KV_PEER_ALLOWLIST": "127.0.0.1:1-2", "WIDEEP_KV_SIDE_CHANNEL_PORT": "0"})
    yield s
    stop_server(s)


class HealthWatch(threading.Thread):
    """Probes /health the way the launcher's liveness check does (2 s timeout) until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.statuses, self.done = url, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.statuses.append(http("GET", self.url, timeout=2)[0])
            except OSError as e:  # a timeout: the event loop did not answer in time
                self.statuses.append(type(e).__name__)
            time.sleep(0.1)


def _error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "/" not in err["message"].replace("/v1", ""), err   # no file-system paths for clients
    return err


def test_oversized_requests_are_refused_and_health_stays_200(srv):
    watch = HealthWatch(srv.url(0) + "/health")
    watch.start()
    try:
        url = srv.url(0)
        # Bodies larger than any prompt that fits max_model_len could be: refused while being read.
        big = "lorem ipsum dolor sit amet " * 400_000                  # ~10 MB of text
        for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": big}]}),
                           ("/v1/completions", {"model": "tiny", "prompt": "hi " * 5_000_000}),   # 5M tokens
                           ("/v1/completions", {"model": "tiny", "prompt": [7] * 5_000_000})):    # 5M token ids
            st, _, raw = http("POST", url + path, body, timeout=120)
            assert st == 413 and _error(raw)["type"] == "RequestEntityTooLargeError", raw[:300]
        # Below the body limit but past what max_model_len tokens can spell: 400 before tokenizing.
        st, _, raw = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "hi " * 100_000})
        assert st == 400 and "characters" in _error(raw)["message"] and _error(raw)["param"] == "prompt"
        st, _, raw = http("POST", url + "/v1/chat/completions",
                          {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 100_000}]})
        assert st == 400 and _error(raw)["param"] == "messages"
        st, _, raw = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": [7] * 100_000})
        assert st == 400 and "100000 input tokens" in _error(raw)["message"]
        ok = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "still fine", "max_tokens": 2})
        assert ok[0] == 200
    finally:
        watch.done.set()
        watch.join(10)
    bad = [(i, s) for i, s in enumerate(watch.statuses) if s != 200]
    assert watch.statuses and not bad, (len(watch.statuses), bad)


def test_kv_transfer_params_outside_the_pool_are_refused_without_a_connection(srv):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    try:
        port = listener.getsockname()[1]
        params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "x_dp0",
                  "remote_block_ids": [0, 1], "remote_request_id": "r", "remote_host": "127.0.0.1",
                  "remote_port": port, "tp_size": 1}
        for rank in (0, 1):
            for path, body in (("/v1/completions", {"model": "tiny", "prompt": "hello there", "max_tokens": 2}),
                               ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})):
                st, _, raw = http("POST", srv.url(rank) + path, {**body, "kv_transfer_params": params})
                assert st == 403, raw
                err = _error(raw)
                assert err["type"] == "PermissionDeniedError" and err["param"] == "kv_transfer_params"
                assert "not a member of this pool" in err["message"]
        accepted = 0
        for _ in range(5):
            try:
                listener.accept()[0].close()
                accepted += 1
            except socket.timeout:
                pass
        assert accepted == 0
    finally:
        listener.close()


def test_validate_only_runs_nothing(srv):
    url = srv.url(1) + "/v1/completions"
    st, _, body = http("POST", url, {"model": "tiny", "prompt": "a b c", "max_tokens": 3},
                       headers={"x-wideep-validate-only": "1"})
    assert st == 200 and json.loads(body)["valid"] is True and json.loads(body)["prompt_tokens"] > 0
    st, _, body = http("POST", url, {"model": "tiny", "prompt": "a b c", "max_tokens": 100_000},
                       headers={"x-wideep-validate-only": "1"})
    assert st == 400 and _error(body)["param"] == "max_tokens"
    st, _, body = http("POST", url, {"model": "tiny", "prompt": "a", "temperature": -1},
                       headers={"x-wideep-validate-only": "1"})
    assert st == 400
    metrics = http("GET", srv.url(1) + "/metrics")[2].decode()
    ok = [ln for ln in metrics.splitlines() if ln.startswith("vllm:request_success_total") and "length" in ln]
    assert ok and all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in ok), ok   # nothing was generated


def test_a_frozen_engine_is_reported_then_recovers(srv):
    pid = _engine_pid(srv.proc.pid, 0)
    readers = [StreamReader(srv.url(0) + "/v1/completions",
                            {"model": "tiny", "prompt": f"count {i}", "max_tokens": 40, "ignore_eos": True,
                             "stream": True}) for i in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        assert r.first.wait(60)
    os.kill(pid, signal.SIGSTOP)
    try:
        status, body = 200, b""
        for _ in range(100):    # the stall bound is 2 s; the loop ends as soon as it is reported
            status, _, body = http("GET", srv.url(0) + "/health", timeout=5)
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503
        assert "engine of dp rank 0 made no progress" in _error(body)["message"]
        assert http("GET", srv.url(1) + "/health")[0] == 200
        st, _, sup = http("GET", f"http://127.0.0.1:{srv.supervisor_port}/health")
        sup = json.loads(sup)
        assert st == 503 and sup["down"] == ["0"] and "made no progress" in sup["ranks"]["0"]["reason"], sup
        metrics = http("GET", srv.url(0) + "/metrics", timeout=10)[2].decode()
        assert "wideep:engine_stats_age_seconds" in metrics
        assert "vllm:num_requests_waiting{" not in metrics   # stale numbers are left out, not shown as 0
    finally:
        os.kill(pid, signal.SIGCONT)
    for r in readers:
        r.join(120)
        assert r.error is None and r.lines[-1] == "[DONE]", (r.error, r.lines[-3:])
    for _ in range(100):
        if http("GET", srv.url(0) + "/health")[0] == 200:
            break
        time.sleep(0.1)
    assert http("GET", srv.url(0) + "/health")[0] == 200
    assert http("GET", f"http://127.0.0.1:{srv.supervisor_port}/health")[0] == 200


HUGE = 2 ** 70
BAD_BODIES = [   # (path, raw body): the bad-input suites' cases plus a lone surrogate
    ("/v1/completions", b"[" * 100_000),
    ("/v1/chat/completions", b"[" * 100_000),
    ("/v1/completions", b"not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", b""),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "kv_transfer_params": {"x": [HUGE]}}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "seed": HUGE}).encode()),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [HUGE]}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10 ** 6}).encode()),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode()),
]


def test_router_answers_openai_json_for_every_bad_input(srv):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "router"))
    from router_helpers import RouterThread, router_options

    eps = [f"127.0.0.1:{srv.port + r}" for r in range(srv.dp_size)]
    with RouterThread(router_options(endpoints=eps)) as rt:
        deadline = time.monotonic() + 60
        while not rt.router.datastore.ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{rt.router.opts.proxy_port}"
        for path, raw in BAD_BODIES:
            st, headers, body = http("POST", url + path, raw)
            assert 400 <= st < 500, (raw[:80], st, body[:200])
            assert headers.get("Content-Type", "").startswith("application/json"), (raw[:80], headers)
            _error(body)
        st, _, body = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "fine", "max_tokens": 2})
        assert st == 200, body
