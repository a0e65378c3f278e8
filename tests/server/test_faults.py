"""Faults of a real `wideep serve`: SIGTERM drains in-flight streams then exits 0; a killed engine turns
/health into 503, ends its in-flight requests with an error, and the supervisor exits non-zero."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

from server_harness import http, start_server, stop_server


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append((int(d.name), cmd))
    return out


def _engine_pid(supervisor_pid: int, dp_rank: int) -> int:
    for pid, cmd in _children(supervisor_pid):
        if "wideep.server.child engine" in cmd and f'"data_parallel_rank": {dp_rank},' in cmd:
            return pid
    raise AssertionError(f"no engine child for rank {dp_rank}: {_children(supervisor_pid)}")


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background, recording every data: line."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        req = urllib.request.Request(self.url, data=json.dumps(self.body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        if line.startswith("data: {") and '"text":"' in line:
                            self.first.set()
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            self.error = e
        finally:
            self.first.set()


def test_sigterm_drains_in_flight_then_exits_zero(tiny_model_dir, tmp_path):
    # a generous drain bound: this test is about draining, not about the bound (the CI CPU is shared)
    srv = start_server(tiny_model_dir, tmp_path, dp_size=1, api_key=None, kv_events=False,
                       extra_args=["--drain-timeout", "300"])
    try:
        children = [p for p, _ in _children(srv.proc.pid)]
        assert len(children) == 2  # one engine, one frontend
        reader = StreamReader(srv.url(0) + "/v1/completions",
                              {"model": "tiny", "prompt": "a b c", "max_tokens": 30, "ignore_eos": True,
                               "stream": True, "stream_options": {"include_usage": True}})
        reader.start()
        assert reader.first.wait(60), "stream did not start"
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert reader.error is None, reader.error
        assert reader.lines[-1] == "[DONE]"
        usage = json.loads(reader.lines[-2])["usage"]
        assert usage["completion_tokens"] == 30   # the request finished during the drain
        assert json.loads(reader.lines[-3])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(120) == 0, srv.log()
        time.sleep(0.2)
        assert not any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().rsplit(")", 1)[1][:3]
                       for p in children), "children outlived the supervisor"
    finally:
        stop_server(srv)


def test_dead_engine_fails_requests_and_health(tiny_model_dir, tmp_path):
    srv = start_server(tiny_model_dir, tmp_path, dp_size=2, api_key=None, kv_events=False,
                       extra_args=["--restart-grace-period", "3"])
    try:
        reader = StreamReader(srv.url(0) + "/v1/completions",
                              {"model": "tiny", "prompt": "a b c", "max_tokens": 400, "ignore_eos": True,
                               "stream": True})
        reader.start()
        assert reader.first.wait(60), "stream did not start"
        os.kill(_engine_pid(srv.proc.pid, 0), signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "in-flight stream hangs after its engine died"
        assert any(l.startswith("{\"error\"") for l in reader.lines), reader.lines[-3:]
        assert reader.lines[-1] == "[DONE]"
        # rank 0 reports its engine dead; rank 1 is still fine; the supervisor names rank 0.
        assert http("GET", srv.url(0) + "/health")[0] == 503
        status, _, body = http("POST", srv.url(0) + "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 503 and json.loads(body)["error"]["code"] == 503
        assert http("GET", srv.url(1) + "/health")[0] == 200
        status, _, body = http("GET", f"http://127.0.0.1:{srv.supervisor_port}/health")
        assert status == 503 and json.loads(body)["down"] == ["0"], body
        # once the supervisor has reaped the engine it says the rank's process exited (the launcher
        # recreates the group on that at once instead of after three failed probes)
        for _ in range(100):
            rank0 = json.loads(http("GET", f"http://127.0.0.1:{srv.supervisor_port}/health")[2])["ranks"]["0"]
            if rank0.get("exited"):
                break
            time.sleep(0.05)
        assert rank0.get("exited") and "SIGKILL" in rank0["reason"], rank0
        # after the grace period the supervisor stops the group and exits non-zero (restart me)
        assert srv.proc.wait(60) != 0
    finally:
        stop_server(srv)
