"""Composition: config + endpoint source + scraper + director + one ingress (built-in proxy,
ext_proc for an external gateway, or ext_proc plus our own Envoy child) + health + /metrics."""
from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from wideep.logs import ACCESS_LOG
from wideep.router.config import PickerConfig, default_config_text, load_config_file, load_config_text
from wideep.router.datastore import Datastore, load_endpoints_file, parse_endpoint_flag
from wideep.router.director import Director
from wideep.router.grpc_health import HealthService
from wideep.router.metrics import RouterMetrics
from wideep.router.scrape import MetricsScraper
from wideep.utils.aio import access_logger_class, install_uvloop

log = logging.getLogger(__name__)

MODES = ("builtin", "ext-proc", "envoy")


@dataclass
class RouterOptions:
    """Everything `wideep router` takes; the DEPLOY launcher builds one of these directly."""

    config_file: str | None = None
    config_text: str | None = None
    endpoints: list[str] = field(default_factory=list)        # "ip:port[,role=prefill,...]"
    endpoints_file: str | None = None
    pool_name: str | None = None                              # Kubernetes InferencePool
    pool_namespace: str = "default"
    pool_selector: dict[str, str] | None = None
    target_ports: list[int] | None = None
    k8s_api_server: str | None = None
    k8s_watch: bool = True                                    # False: LIST every 2 s instead of a watch
    mode: str = "builtin"
    host: str = "0.0.0.0"
    port: int | None = None                                   # 8080 builtin, 8081 envoy
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    envoy_admin_port: int = 9901
    envoy_concurrency: int = 1
    refresh_metrics_interval_s: float = 0.05
    staleness_s: float = 2.0
    failure_mode: str = "FailOpen"
    workdir: str | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.config_file and self.config_text:
            raise ValueError("give --config or --config-text, not both")
        if self.failure_mode not in ("FailOpen", "FailClose"):
            raise ValueError(f"--failure-mode {self.failure_mode!r}: use FailOpen or FailClose")
        if not (self.endpoints or self.endpoints_file or self.pool_name or self.pool_selector):
            raise ValueError("no endpoints: give --endpoint ip:port (repeatable), --endpoints-file, "
                             "or --pool-name/--pool-selector for Kubernetes")
        if self.refresh_metrics_interval_s <= 0 or self.staleness_s <= 0:
            raise ValueError("--refresh-metrics-interval and --staleness must be > 0")

    @property
    def proxy_port(self) -> int:
        return self.port if self.port is not None else (8081 if self.mode == "envoy" else 8080)

    def picker_config(self) -> PickerConfig:
        if self.config_file:
            return load_config_file(self.config_file)
        return load_config_text(self.config_text or default_config_text(),
                                source="--config-text" if self.config_text else "wide-ep-lws (default)")


class Router:
    def __init__(self, opts: RouterOptions):
        opts.validate()
        self.opts = opts
        self.cfg = opts.picker_config()
        self.metrics = RouterMetrics()
        self.datastore = Datastore(staleness_s=opts.staleness_s)
        self.director = Director(self.cfg, self.datastore, self.metrics, opts.failure_mode)
        self.scraper = MetricsScraper(self.datastore, opts.refresh_metrics_interval_s,
                                      timeout_s=max(0.2, min(1.0, opts.staleness_s / 2)))
        self.k8s = None
        self._runners: list[web.AppRunner] = []
        self._grpc: list[grpc.aio.Server] = []
        self.envoy = None
        static = [parse_endpoint_flag(e) for e in opts.endpoints]
        if opts.endpoints_file:
            static += load_endpoints_file(opts.endpoints_file)
        if static:
            self.datastore.set_endpoints(static)

    async def start(self) -> None:
        o = self.opts
        if o.pool_name or o.pool_selector:
            from wideep.router.k8s import KubernetesSource

            self.k8s = KubernetesSource(self.datastore, o.pool_namespace, o.pool_name, o.pool_selector,
                                        o.target_ports, api_server=o.k8s_api_server, watch=o.k8s_watch)
            await self.k8s.start()
        await self.scraper.start()
        await self.scraper.scrape_all()
        for p in self.cfg.plugins.values():
            await p.start(self)
        await self._serve_metrics()
        health = HealthService(lambda: bool(self.datastore.ready()))
        if o.mode in ("ext-proc", "envoy"):
            from wideep.router.extproc import add_to_server

            srv = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
            add_to_server(srv, self.director)
            srv.add_generic_rpc_handlers((health.handler(),))
            srv.add_insecure_port(f"{o.host}:{o.grpc_port}")
            await srv.start()
            self._grpc.append(srv)
            hsrv = grpc.aio.server()
            hsrv.add_generic_rpc_handlers((health.handler(),))
            hsrv.add_insecure_port(f"{o.host}:{o.grpc_health_port}")
            await hsrv.start()
            self._grpc.append(hsrv)
            log.info("ext_proc on :%d, gRPC health on :%d", o.grpc_port, o.grpc_health_port)
        if o.mode == "builtin":
            from wideep.router.proxy import BuiltinProxy

            await self._serve(BuiltinProxy(self.director).app(), o.proxy_port)
            log.info("built-in proxy on %s:%d", o.host, o.proxy_port)
        if o.mode == "envoy":
            from wideep.router.envoy import EnvoyProcess, envoy_config

            workdir = o.workdir or tempfile.mkdtemp(prefix="wideep-envoy-")
            self.envoy = EnvoyProcess(envoy_config(o.host, o.proxy_port, o.grpc_port, o.envoy_admin_port,
                                                   o.failure_mode), workdir, concurrency=o.envoy_concurrency)
            self.envoy.start()
            try:
                await self.envoy.wait_ready()
            except BaseException:
                self.envoy.stop()
                raise
            log.info("envoy gateway on %s:%d (config %s)", o.host, o.proxy_port, self.envoy.config_path)

    async def _serve(self, app: web.Application, port: int) -> None:
        # handler_cancellation: a client that hangs up cancels the proxy's handler, which closes the
        # upstream request, so the endpoint aborts it (frees its KV) even for a non-streaming request.
        runner = web.AppRunner(app, access_log=ACCESS_LOG, access_log_class=access_logger_class(),
                               handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, self.opts.host, port, backlog=4096).start()
        self._runners.append(runner)

    async def _serve_metrics(self) -> None:
        async def metrics(_):
            self.metrics.ready_endpoints.set(len(self.datastore.ready()))
            self.metrics.queue_size.set(len(self.director.flow.queue))
            return web.Response(body=self.metrics.render(), content_type="text/plain")

        async def health(_):
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        await self._serve(app, self.opts.metrics_port)

    async def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for s in self._grpc:
            await s.stop(grace=0.5)
        for r in self._runners:
            await r.cleanup()
        for p in self.cfg.plugins.values():
            await p.stop()
        await self.scraper.stop()
        if self.k8s:
            await self.k8s.stop()


def run_router(opts: RouterOptions) -> int:
    """Blocking entry point (the CLI and the DEPLOY launcher): runs until SIGINT/SIGTERM."""
    import signal

    install_uvloop()

    async def main():
        router = Router(opts)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await router.start()
        print(f"wideep router ready: mode={opts.mode} port={opts.proxy_port} "
              f"endpoints={len(router.datastore.all())} ready={len(router.datastore.ready())}", flush=True)
        try:
            await stop.wait()
        finally:
            await router.stop()

    asyncio.run(main())
    return 0
