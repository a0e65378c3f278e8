"""Start and stop a real `wideep serve` subprocess on ephemeral ports (shared by the server tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from wideep.utils.net import free_port_range
from wideep.utils.proc import terminate

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int                      # local rank i answers on port + i
    supervisor_port: int
    dp_size: int
    kv_events_port: int | None
    log_path: Path
    model: str = "tiny"
    api_key: str | None = None
    extra: dict = field(default_factory=dict)

    def url(self, rank: int = 0) -> str:
        return f"http://127.0.0.1:{self.port + rank}"

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""


def http(method: str, url: str, body=None, headers=None, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def start_server(model_dir: Path, tmp: Path, dp_size: int = 2, api_key: str | None = API_KEY,
                 kv_events: bool = True, extra_args: list[str] = (), env: dict | None = None,
                 timeout: float = 240.0) -> Server:
    n_ports = dp_size + 1 + (2 * dp_size if kv_events else 0)
    base = free_port_range(n_ports)
    port, sup = base, base + dp_size
    kv_port = base + dp_size + 1 if kv_events else None
    args = [sys.executable, "-m", "wideep", "serve", str(model_dir), "--port", str(port),
            "--host", "127.0.0.1", "--data-parallel-size", str(dp_size),
            "--data-parallel-supervisor-port", str(sup), "--served-model-name", "tiny",
            "--max-model-len", "512", "--block-size", "16", "--max-num-seqs", "64",
            "--kv-cache-memory-bytes", "64m", "--drain-timeout", "20", "--restart-grace-period", "2",
            "--data-parallel-multi-port-external-lb"]
    if api_key:
        args += ["--api-key", api_key]
    if kv_events:
        args += ["--kv-events-config", json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{kv_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{kv_port + dp_size}", "topic": "kv@test@tiny"})]
    args += list(extra_args)
    log_path = tmp / f"serve-{port}.log"
    full_env = {**os.environ, "WIDEEP_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", **(env or {})}
    logf = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                            start_new_session=True)
    server = Server(proc, port, sup, dp_size, kv_port, log_path, api_key=api_key)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wideep serve exited with {proc.returncode}:\n{server.log()}")
        try:
            status, _, _ = http("GET", f"http://127.0.0.1:{sup}/readyz", timeout=3)
            if status == 200:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"wideep serve not ready after {timeout}s:\n{server.log()}")


def stop_server(server: Server, timeout: float = 60.0) -> int | None:
    """SIGTERM (graceful), then SIGKILL of the whole session (children included) if it does not exit in time."""
    terminate([server.proc], timeout, group=True)
    return server.proc.returncode
