"""`wideep serve` supervisor: per local DP rank one engine process and one HTTP frontend process.

Layout for --port P, --data-parallel-size-local N, --data-parallel-start-rank S:

    supervisor (this process)      GET /health, /readyz on --data-parallel-supervisor-port
      ├─ engine  dp rank S+i       scheduling + model (python -m wideep.server.child engine ...)
      └─ frontend dp rank S+i      OpenAI HTTP on port P+i (tokenize, detokenize, stream)
                                   ↔ its engine over ZMQ IPC (token ids, msgpack)

Lifecycle decisions (what Kubernetes / the launcher sees):
* Startup: all engines start together (EP ranks must meet in one collective group); each frontend
  opens its port only once its engine is ready, so `/v1/models` answering means "ready".
* SIGTERM / SIGINT: frontends stop accepting and drain in-flight requests (--drain-timeout), then the
  engines are stopped; exit 0.
* A child dies unexpectedly: the supervisor's /health turns 503 naming the rank, and after
  --restart-grace-period the supervisor stops the remaining children and exits 1, so the pod (or
  `wideep up`) restarts the whole group: an EP group cannot continue without one of its ranks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

from wideep.logs import setup_logging
from wideep.server.args import ServeConfig
from wideep.utils.aio import install_uvloop
from wideep.utils.proc import describe_exit, terminate

log = logging.getLogger("wideep.supervisor")


@dataclass
class RankProcs:
    local_rank: int
    dp_rank: int
    port: int
    engine: subprocess.Popen
    frontend: subprocess.Popen
    died: dict[str, int] = field(default_factory=dict)   # role -> exit code, for unexpected deaths


def child_env(cfg: ServeConfig, local_rank: int, role: str) -> dict[str, str]:
    """The environment a pod's container would give this rank (LWS_* etc. are inherited as is)."""
    env = dict(os.environ)
    dp_rank = cfg.start_rank + local_rank
    env.update({
        "LOCAL_RANK": str(local_rank),
        "WIDEEP_DP_RANK": str(dp_rank),
        "WIDEEP_DP_RANK_LOCAL": str(local_rank),
        "WIDEEP_DP_SIZE": str(cfg.engine_args.data_parallel_size),
        "WIDEEP_DP_SIZE_LOCAL": str(cfg.dp_size_local),
        "PYTHONUNBUFFERED": "1",
        "WIDEEP_LOG_LEVEL": cfg.log_level.upper(),   # wideep.logs: children log at the server's level
    })
    if role == "frontend":
        env["CUDA_VISIBLE_DEVICES"] = ""   # the frontend never touches a GPU
    return env


def _spawn(role: str, payload: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wideep.server.child", role, json.dumps(payload)], env=env)


class Supervisor:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.ranks: list[RankProcs] = []
        self.stopping = False
        self.first_death: float | None = None
        self.ipc_dir = tempfile.mkdtemp(prefix="wideep-serve-")
        self._stop = asyncio.Event()

    # ---- children --------------------------------------------------------------------------
    def start_children(self) -> None:
        cfg = self.cfg
        for i in range(cfg.dp_size_local):
            args = cfg.engine_args_for(i)
            tag = uuid.uuid4().hex[:8]
            input_addr = f"ipc://{self.ipc_dir}/dp{args.data_parallel_rank}-{tag}-in"
            output_addr = f"ipc://{self.ipc_dir}/dp{args.data_parallel_rank}-{tag}-out"
            engine = _spawn("engine", {"engine_args": args.to_dict(), "input_addr": input_addr,
                                       "output_addr": output_addr},
                            child_env(cfg, i, "engine"))
            frontend = _spawn("frontend", {"serve": _serve_dict(cfg), "local_rank": i, "input_addr": input_addr,
                                           "output_addr": output_addr, "engine_pid": engine.pid},
                              child_env(cfg, i, "frontend"))
            self.ranks.append(RankProcs(i, args.data_parallel_rank, cfg.rank_port(i), engine, frontend))
            log.info("dp rank %d: engine pid %d, frontend pid %d on port %d",
                     args.data_parallel_rank, engine.pid, frontend.pid, cfg.rank_port(i))

    def poll_children(self) -> None:
        if self.stopping:
            return
        for r in self.ranks:
            for role, p in (("engine", r.engine), ("frontend", r.frontend)):
                code = p.poll()
                if code is not None and role not in r.died:
                    r.died[role] = code
                    log.error("dp rank %d: %s (pid %d) %s", r.dp_rank, role, p.pid, describe_exit(code))
                    if self.first_death is None:
                        self.first_death = time.monotonic()
        if self.first_death is not None and time.monotonic() - self.first_death >= self.cfg.restart_grace_s:
            log.error("a child process died; stopping the group so it can be restarted")
            self._stop.set()

    async def stop_children(self, drain: bool) -> None:
        """Frontends first (SIGTERM: drain), then engines (SIGTERM, SIGKILL after a timeout)."""
        self.stopping = True
        fronts = [r.frontend for r in self.ranks]
        engines = [r.engine for r in self.ranks]
        await asyncio.to_thread(terminate, fronts, (self.cfg.drain_timeout_s if drain else 0) + 10)
        await asyncio.to_thread(terminate, engines, 15)
        try:
            for name in os.listdir(self.ipc_dir):
                os.unlink(os.path.join(self.ipc_dir, name))
            os.rmdir(self.ipc_dir)
        except OSError:
            pass

    # ---- health ------------------------------------------------------------------------------
    async def rank_status(self, path: str) -> tuple[bool, dict]:
        """Asks every local frontend `path`; a dead child or a non-200 answer marks its rank down."""
        import aiohttp

        async def one(r: RankProcs, session: aiohttp.ClientSession) -> tuple[str, dict]:
            if r.died:
                return str(r.dp_rank), {"ok": False, "port": r.port, "exited": True,
                                        "reason": ", ".join(f"{k} {describe_exit(v)}" for k, v in r.died.items())}
            try:
                async with session.get(f"http://127.0.0.1:{r.port}{path}") as resp:
                    ok = resp.status == 200
                    reason = "" if ok else f"{path} answered {resp.status}" + await _error_message(resp)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                ok, reason = False, f"{path} unreachable ({type(e).__name__})"
            return str(r.dp_rank), {"ok": ok, "port": r.port, **({"reason": reason} if reason else {})}

        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = dict(await asyncio.gather(*(one(r, session) for r in self.ranks)))
        ok = bool(results) and all(v["ok"] for v in results.values()) and not self.stopping
        return ok, results

    def health_app(self):
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            path = "/health" if request.path == "/health" else "/readyz"
            ok, ranks = await self.rank_status(path)
            down = [k for k, v in ranks.items() if not v["ok"]]
            body = {"status": "ok" if ok else ("stopping" if self.stopping else "unavailable"),
                    "ranks": ranks, "down": down}
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/health", handler)
        app.router.add_get("/readyz", handler)
        return app

    # ---- main --------------------------------------------------------------------------------
    async def run(self) -> int:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.start_children()
        runner = None
        if self.cfg.supervisor_port is not None:
            runner = web.AppRunner(self.health_app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.cfg.host, self.cfg.supervisor_port, reuse_address=True).start()
            log.info("supervisor health on port %d", self.cfg.supervisor_port)
        crashed = False
        try:
            while not self._stop.is_set():
                self.poll_children()
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
            crashed = self.first_death is not None and not self.stopping
        finally:
            await self.stop_children(drain=not crashed)
            if runner is not None:
                await runner.cleanup()
        return 1 if crashed else 0

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: draining and stopping", signal.Signals(sig).name)
        self._stop.set()


async def _error_message(resp) -> str:
    """': <message>' of a frontend's OpenAI error body (e.g. which engine stalled), or ''."""
    try:
        return ": " + str((await resp.json(content_type=None))["error"]["message"])
    except Exception:  # noqa: BLE001 - a reason is a nicety; the status already says "down"
        return ""


def _serve_dict(cfg: ServeConfig) -> dict:
    d = asdict(cfg)
    d["engine_args"] = cfg.engine_args.to_dict()
    return d


def serve_config_from_dict(d: dict) -> ServeConfig:
    from wideep.engine.config import EngineArgs

    d = dict(d)
    d["engine_args"] = EngineArgs.from_dict(d["engine_args"])
    return ServeConfig(**d)


def run_supervisor(cfg: ServeConfig) -> int:
    setup_logging("supervisor", cfg.log_level)
    install_uvloop()
    return asyncio.run(Supervisor(cfg).run())
