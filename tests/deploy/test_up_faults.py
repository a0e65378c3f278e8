"""`wideep up` (the embedded default: prefill and decode groups of DP=2 with EP, sidecar, router) under
the faults of issue 19, end to end on the CPU. Slow (several minutes): WIDEEP_SLOW_TESTS=1. The fast
siblings run the same checks one component at a time: tests/server/test_abuse.py (bodies, SSRF at a
rank, frozen engine, router bad inputs), tests/kv_transfer/test_transport_faults.py (producer restart,
tarpit), tests/router/test_sidecar.py (refusal before the prefill leg), tests/router/test_router_faults.py.

Figures are written to $WIDEEP_RELIABILITY_OUT (JSON) when set: docs/reliability.md quotes them."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_up_e2e import _alive, _descendants, _listening_ports, _reap, _wait_for

from wideep.utils.net import free_port

HOLD_S = 20   # the producers' hold on blocks nobody reads (VLLM_NIXL_ABORT_REQUEST_TIMEOUT; default 480 s)


def _http(method, url, body=None, timeout=60):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Stream(threading.Thread):
    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines, self.error, self.first, self.ended_at = [], None, threading.Event(), None

    def run(self):
        req = urllib.request.Request(self.url, data=json.dumps(self.body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        if '"text":"' in line and '"text":""' not in line:
                            self.first.set()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    @property
    def errored(self) -> bool:
        return any(ln.startswith('{"error"') for ln in self.lines)

    @property
    def finished(self) -> bool:
        return (self.error is None and self.lines[-1:] == ["[DONE]"] and not self.errored
                and any('"finish_reason":"length"' in ln for ln in self.lines))


def _kv_usage(url: str) -> float:
    st, body = _http("GET", url + "/metrics", timeout=10)
    vals = [float(ln.rsplit(" ", 1)[1]) for ln in body.decode().splitlines()
            if ln.startswith("vllm:kv_cache_usage_perc{")]
    return max(vals) if vals else -1.0


def _rank_engine(leader_pid: int, dp_rank: int) -> int:
    for pid in _descendants(leader_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "wideep.server.child engine" in cmd and f'"data_parallel_rank": {dp_rank},' in cmd:
            return pid
    raise AssertionError(f"no engine for rank {dp_rank} under {leader_pid}")


def _wait_log(log: Path, needle: str, after: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(needle) > after:
            return
        time.sleep(0.5)
    raise AssertionError(f"no {needle!r} within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_up_holds_under_faults(tmp_path, tiny_model_dir):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    router_port = free_port()
    state_file, log = tmp_path / "state.json", tmp_path / "up.log"
    argv = [sys.executable, "-m", "wideep", "up", "--state-file", str(state_file), "--router-port", str(router_port),
            "--max-restarts", "5"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", WIDEEP_LOG_LEVEL="WARNING",
                                         VLLM_NIXL_ABORT_REQUEST_TIMEOUT=str(HOLD_S)))
    fig: dict = {}
    tracked: set[int] = set()
    router = f"http://127.0.0.1:{router_port}"
    try:
        _wait_for(log, "wideep: ready at ", proc, timeout=600)
        state = json.loads(state_file.read_text())
        ranks = state["ranks"]                       # "prefill-0/rank-0" -> http://...
        sups = [p["live_url"] for g in state["groups"].values() for p in g if p["live_url"]]
        model = json.loads(_http("GET", router + "/v1/models")[1])["data"][0]["id"]
        chat = lambda text, n=4, **kw: {"model": model, "max_tokens": n, "messages": [{"role": "user", "content": text}], **kw}
        assert _http("POST", router + "/v1/chat/completions", chat("warm up"))[0] == 200
        base = {k: _kv_usage(u) for k, u in ranks.items()}

        # 1. a 10 MB body and a 5M-token prompt: 4xx; no group restart; every /health 200 meanwhile
        probes: list = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                for u in sups:
                    try:
                        probes.append(_http("GET", u, timeout=2)[0])
                    except OSError as e:
                        probes.append(type(e).__name__)
                time.sleep(0.2)
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        codes = [_http("POST", router + "/v1/chat/completions", chat("lorem ipsum " * 900_000), timeout=120)[0],
                 _http("POST", router + "/v1/completions", {"model": model, "prompt": "hi " * 5_000_000}, timeout=120)[0]]
        for u in ranks.values():
            codes.append(_http("POST", u + "/v1/completions", {"model": model, "prompt": "hi " * 5_000_000}, timeout=120)[0])
        stop.set()
        t.join(10)
        fig["oversized_status"] = sorted(set(codes))
        fig["health_probes_failed"] = sum(1 for p in probes if p != 200)
        assert all(400 <= c < 500 for c in codes), codes
        assert fig["health_probes_failed"] == 0 and "recreating" not in log.read_text()

        # 2. kv_transfer_params naming a host outside the pool: refused on every path, never dialled
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        lst.settimeout(0.2)
        bad = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "x_dp0",
               "remote_block_ids": [0, 1], "remote_request_id": "r", "remote_host": "127.0.0.1",
               "remote_port": lst.getsockname()[1], "tp_size": 1}
        decode_sidecars = [e["address"] for e in state["endpoints"] if e["labels"]["llm-d.ai/role"] == "decode"]
        targets = [router] + [f"http://{a}" for a in decode_sidecars] + list(ranks.values())
        ssrf = [_http("POST", u + "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 2,
                                                       "kv_transfer_params": bad})[0] for u in targets]
        accepted = 0
        for _ in range(10):
            try:
                lst.accept()[0].close()
                accepted += 1
            except socket.timeout:
                pass
        lst.close()
        fig["ssrf_status"], fig["ssrf_connections"] = sorted(set(ssrf)), accepted
        assert all(400 <= c < 500 for c in ssrf) and accepted == 0, (ssrf, accepted)

        # 3. requests decode refuses leave prefill KV at baseline
        refused = [_http("POST", router + "/v1/chat/completions", chat("x " * 50, n=100_000))[0] for _ in range(20)]
        assert set(refused) == {400}, refused
        time.sleep(1.0)
        fig["prefill_kv_after_refusals"] = {k: _kv_usage(u) for k, u in ranks.items() if k.startswith("prefill")}
        assert all(v <= base[k] for k, v in fig["prefill_kv_after_refusals"].items())

        # 4. a prefill rank restarts: the next 20 P/D requests all succeed
        n_ready = log.read_text().count("prefill-0 is ready again")
        prefill_leader = next(p["pid"] for p in state["groups"]["prefill-0"] if p["name"] == "prefill-0/leader")
        os.kill(_rank_engine(prefill_leader, 0), signal.SIGKILL)
        _wait_log(log, "prefill-0 is ready again", n_ready, 600)
        time.sleep(2.0)   # a scrape or two: the router sees the new prefill ranks
        results = [_http("POST", router + "/v1/chat/completions", chat(f"after the restart {i}"))[0] for i in range(20)]
        fig["pd_failures_after_prefill_restart"] = sum(1 for c in results if c != 200)
        assert fig["pd_failures_after_prefill_restart"] == 0, results

        # 5. kill -9 of a decode rank under 8 streaming clients
        state = json.loads(state_file.read_text())
        streams = [Stream(router + "/v1/completions", {"model": model, "prompt": f"stream {i}", "max_tokens": 1500,
                                                        "ignore_eos": True, "stream": True}) for i in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(120)
        n_ready = log.read_text().count("decode-0 is ready again")
        decode_leader = next(p["pid"] for p in state["groups"]["decode-0"] if p["name"] == "decode-0/leader")
        victim = _rank_engine(decode_leader, 0)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        marks = {}

        def timeline():   # when the launcher saw the failure and when the group was ready again
            while "ready" not in marks and time.monotonic() - killed < 600:
                text = log.read_text(errors="replace")
                if "recreate" not in marks and text.count("decode-0:") and "recreating" in text.split("decode-0:")[-1]:
                    marks["recreate"] = round(time.monotonic() - killed, 2)
                if text.count("decode-0 is ready again") > n_ready:
                    marks["ready"] = round(time.monotonic() - killed, 2)
                time.sleep(0.2)
        tl = threading.Thread(target=timeline, daemon=True)
        tl.start()
        for s in streams:
            s.join(120)
        fig["streams_ended_with_error_event"] = sum(1 for s in streams if s.errored)
        fig["max_s_kill_to_stream_end"] = round(max(s.ended_at - killed for s in streams), 2)
        first_ok = None
        while first_ok is None and time.monotonic() - killed < 300:
            st, _ = _http("POST", router + "/v1/completions", {"model": model, "prompt": "ok?", "max_tokens": 2},
                          timeout=30)
            if st == 200:
                first_ok = time.monotonic() - killed
            else:
                time.sleep(0.25)
        fig["s_kill_to_first_success"] = round(first_ok, 2) if first_ok else None
        _wait_log(log, "decode-0 is ready again", n_ready, 600)
        tl.join(10)
        fig["s_kill_to_group_recreate"], fig["s_kill_to_group_ready"] = marks.get("recreate"), marks.get("ready")
        restart_line = [ln for ln in log.read_text().splitlines() if "decode-0:" in ln and "recreating" in ln][-1]
        fig["decode_restart_line"] = restart_line
        assert all(not s.is_alive() for s in streams)
        assert fig["streams_ended_with_error_event"] == 8, [s.lines[-2:] for s in streams]
        # A P/D request whose decode rank died after its prefill leg leaves the prefill blocks to the
        # producer's hold timeout (nobody will read them): poll until every rank is back at baseline.
        deadline = time.monotonic() + HOLD_S + 30
        while True:
            state = json.loads(state_file.read_text())
            fig["kv_after_decode_kill"] = {k: _kv_usage(u) for k, u in state["ranks"].items()}
            at_base = all(v <= base.get(k, 0.0) for k, v in fig["kv_after_decode_kill"].items())
            if at_base or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        fig["s_kill_to_kv_baseline"] = round(time.monotonic() - killed, 2)
        assert at_base, fig

        # 6. SIGTERM during 8 streams of ~20 s: all complete, then nothing is left. Calibrate the
        # length on this machine: 8 concurrent streams of 64 tokens first.
        t0 = time.monotonic()
        probe = [Stream(router + "/v1/completions", {"model": model, "prompt": f"probe {i}", "max_tokens": 64,
                                                      "ignore_eos": True, "stream": True}) for i in range(8)]
        for s in probe:
            s.start()
        for s in probe:
            s.join(120)
        per_token = (time.monotonic() - t0) / 64
        n_tokens = max(64, min(1900, int(20.0 / per_token)))
        fig["drain_stream_tokens"] = n_tokens
        streams = [Stream(router + "/v1/completions", {"model": model, "prompt": f"drain {i}", "max_tokens": n_tokens,
                                                        "ignore_eos": True, "stream": True}) for i in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(120)
        tracked = _descendants(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for s in streams:
            s.join(300)
        fig["drain_streams_completed"] = sum(1 for s in streams if s.finished)
        fig["drain_stream_s_after_sigterm"] = round(max(s.ended_at - started for s in streams), 2)
        assert proc.wait(timeout=300) == 0
        time.sleep(1.0)
        left = [p for p in tracked if _alive(p)]
        ports = [p for g in state["groups"].values() for pr in g for p in pr["ports"]] + [router_port]
        fig["processes_left"], fig["ports_left"] = len(left), len([p for p in ports if p in _listening_ports()])
        assert fig["drain_streams_completed"] == 8, [(s.error, s.lines[-2:]) for s in streams]
        assert not left and fig["ports_left"] == 0
    finally:
        out = os.environ.get("WIDEEP_RELIABILITY_OUT")
        if out:
            Path(out).write_text(json.dumps(fig, indent=1))
        print(json.dumps(fig, indent=1))
        _reap(proc, tracked)
