"""`wideep up`: run a spec's stack as local processes, the way LeaderWorkerSet runs pods.

* Start-up order: in each group the leader's `wideep serve` first, its workers (and the decode
  sidecars) once the leader's supervisor answers; the router once every group is ready.
* Every process gets its own process group (a "pod"), so stopping it reaches its children too.
* A group is recreated as a whole when one of its processes exits or its supervisor's /health
  keeps failing (RecreateGroupOnPodRestart), with exponential backoff.
* A group that keeps failing is given up (reported, exit code 1 at the end); the other groups and
  the router keep serving.
* Ctrl-C / SIGTERM drains: decode, then prefill, then the router last, each with --stop-grace
  (Kubernetes' 30 s terminationGracePeriodSeconds by default) between SIGTERM and SIGKILL, so
  streams in flight finish; nothing is left running.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import yaml

from wideep import envs
from wideep.deploy.plan import GroupPlan, ProcPlan, StackPlan, plan_stack, wideep_executable
from wideep.deploy.ports import PortAllocator
from wideep.deploy.router_config import router_config_text
from wideep.deploy.spec import DeploySpec
from wideep.utils.net import _is_free
from wideep.utils.proc import describe_exit, die_with_parent, terminate_async

LIVENESS_PERIOD_S = 2.0
LIVENESS_FAILURES = 3          # consecutive failed /health probes before the group is recreated
STOP_GRACE_S = 30.0            # SIGTERM to SIGKILL on shutdown (Kubernetes' default grace)
RESTART_GRACE_S = 3.0          # same on a group restart (LWS deletes the pods)
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0                # a group up this long has its backoff reset


def _exited_rank(body: bytes) -> str:
    """'dp rank R: <reason>' when a supervisor's /health body says one of its processes exited."""
    try:
        ranks = json.loads(body).get("ranks", {})
        return next((f"dp rank {k}: {v.get('reason', 'exited')}" for k, v in ranks.items()
                     if isinstance(v, dict) and v.get("exited")), "")
    except (ValueError, AttributeError):
        return ""


def cli_command() -> str:
    """How a user runs `wideep` from a shell: the bare name when it is this interpreter's, on PATH;
    else the venv's script by path (scripts/up.sh does not activate the venv)."""
    script = Path(sys.executable).parent / "wideep"
    found = shutil.which("wideep")
    if found and Path(found).resolve() == script.resolve():
        return "wideep"
    return str(script) if script.exists() else f"{sys.executable} -m wideep"


def default_state_file() -> Path:
    return Path(envs.XDG_CACHE_HOME or Path.home() / ".cache") / "wideep" / "up.json"


class GroupFailed(Exception):
    pass


def _pdeathsig() -> None:
    """Child side: a SIGTERM (a drain) when the launcher dies, even of SIGKILL."""
    die_with_parent(signal.SIGTERM)


class Running:
    """One started process and its log pump."""

    def __init__(self, plan: ProcPlan, proc: asyncio.subprocess.Process, pump: asyncio.Task):
        self.plan, self.proc, self.pump = plan, proc, pump
        self.tail: collections.deque[str] = collections.deque(maxlen=40)


class Launcher:
    def __init__(self, spec: DeploySpec, plan: StackPlan, *, quiet: bool, log_dir: Path | None,
                 ready_timeout: float, max_restarts: int, state_file: Path, out: IO[str] = sys.stdout,
                 stop_grace: float = STOP_GRACE_S):
        self.spec, self.plan = spec, plan
        self.quiet, self.log_dir, self.out = quiet, log_dir, out
        self.ready_timeout, self.max_restarts = ready_timeout, max_restarts
        self.state_file = state_file
        self.stop_grace = stop_grace
        self.given_up: set[str] = set()
        self.running: dict[str, Running] = {}
        self.stop = asyncio.Event()
        self.exit_code = 0
        self._session = None

    # ------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        self.out.write(f"wideep: {msg}\n")
        self.out.flush()

    async def _pump(self, name: str, stream: asyncio.StreamReader, run_ref: list) -> None:
        log = open(self.log_dir / (name.replace("/", "_") + ".log"), "a") if self.log_dir else None
        try:
            while True:
                line = await stream.readline()
                if not line:
                    return
                text = line.decode(errors="replace").rstrip("\n")
                if run_ref:
                    run_ref[0].tail.append(text)
                if log:
                    log.write(text + "\n")
                    log.flush()
                if not self.quiet:
                    self.out.write(f"[{name}] {text}\n")
                    self.out.flush()
        finally:
            if log:
                log.close()

    # --------------------------------------------------------------- processes
    async def start_proc(self, p: ProcPlan) -> Running:
        proc = await asyncio.create_subprocess_exec(
            *p.argv, env=p.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_pdeathsig)
        ref: list = []
        pump = asyncio.create_task(self._pump(p.name, proc.stdout, ref))
        r = Running(p, proc, pump)
        ref.append(r)
        self.running[p.name] = r
        self._write_state()
        return r

    async def stop_proc(self, name: str, grace: float) -> None:
        r = self.running.pop(name, None)
        if r is None:
            return
        # SIGTERM to the process, then SIGKILL to its whole group (start_new_session: it leads one):
        # the server's engine children and stragglers are swept too.
        await terminate_async(r.proc, grace, group=True)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(r.pump, 2.0)

    # ------------------------------------------------------------------- health
    async def _get(self, url: str) -> int | None:
        return (await self._probe(url))[0]

    async def _probe(self, url: str) -> tuple[int | None, str]:
        """(status, the process that exited, if the supervisor's /health names one) of one probe."""
        import aiohttp

        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                body = await resp.read()
                return resp.status, (_exited_rank(body) if resp.status != 200 else "")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None, ""

    def _check_alive(self, names: list[str]) -> None:
        for n in names:
            r = self.running.get(n)
            if r is None or r.proc.returncode is not None:
                rc = None if r is None else r.proc.returncode
                raise GroupFailed(f"{n} {describe_exit(rc)}")

    async def wait_urls(self, names: list[str], urls: list[str], *, any_status: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(urls)
        while pending:
            self._check_alive(names)
            status = await asyncio.gather(*(self._get(u) for u in pending))
            pending = [u for u, s in zip(pending, status) if s is None or (not any_status and s != 200)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise GroupFailed(f"not healthy after {timeout:.0f}s: {', '.join(pending)}")
            await asyncio.sleep(0.5)

    async def wait_tcp(self, names: list[str], port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(names)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise GroupFailed(f"port {port} not accepting connections after {timeout:.0f}s") from None
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------- groups
    async def start_group(self, g: GroupPlan) -> None:
        await self.start_proc(g.leader)
        # LeaderCreated: workers follow once the leader's supervisor is up (not Ready: the DP
        # rendezvous needs every rank before any of them is ready).
        sup_health = g.leader.live_url or g.leader.ready_urls[0]
        await self.wait_urls([g.leader.name], [sup_health], any_status=True, timeout=self.ready_timeout)
        for p in g.others:
            await self.start_proc(p)
        names = [p.name for p in g.procs]
        await self.wait_urls(names, [u for p in g.procs for u in p.ready_urls], any_status=False,
                             timeout=self.ready_timeout)
        for port in (port for p in g.procs for port in p.tcp_ports):
            await self.wait_tcp(names, port, timeout=self.ready_timeout)

    async def stop_group(self, g: GroupPlan, grace: float) -> None:
        # Sidecars and workers first, the leader last (the order a pod deletion would not guarantee,
        # but it keeps the leader's rendezvous from logging spurious errors).
        await asyncio.gather(*(self.stop_proc(p.name, grace) for p in g.others))
        await self.stop_proc(g.leader.name, grace)

    async def _wait_ports_free(self, g: GroupPlan, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        ports = [port for p in g.procs for port in p.ports]
        while time.monotonic() < deadline and not all(_is_free(port) for port in ports):
            await asyncio.sleep(0.25)

    async def watch(self, g: GroupPlan) -> str:
        """Returns why the group must be recreated: a process exited or liveness failed."""
        failures = 0
        while True:
            for p in g.procs:
                r = self.running.get(p.name)
                if r is None or r.proc.returncode is not None:
                    return f"{p.name} " + ("is not running" if r is None else describe_exit(r.proc.returncode))
            for p in g.procs:
                if p.live_url:
                    s, exited = await self._probe(p.live_url)
                    if exited:   # a dead rank is final (a stall may pass): no need for more probes
                        return f"{p.live_url}: {exited}"
                    if s == 200:
                        failures = 0
                    else:
                        failures += 1
                        if failures >= LIVENESS_FAILURES:
                            return f"{p.live_url} failed {failures} liveness probes (last status {s})"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._any_exit(g), LIVENESS_PERIOD_S)

    async def _any_exit(self, g: GroupPlan) -> None:
        waits = [asyncio.create_task(self.running[p.name].proc.wait()) for p in g.procs if p.name in self.running]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def supervise(self, g: GroupPlan, first_ready: asyncio.Event) -> None:
        """Keep one group running: (re)create it, watch it, recreate it with backoff when it fails."""
        restarts = 0
        while not self.stop.is_set():
            up_since = None
            try:
                await self.start_group(g)
                up_since = time.monotonic()
                if first_ready.is_set():
                    self.say(f"{g.name} is ready again (after restart {restarts})")
                first_ready.set()
                reason = await self.watch(g)
            except GroupFailed as exc:
                reason = str(exc)
                if not first_ready.is_set():
                    self._show_tail(g)
                    self.say(f"{g.name} failed to start: {reason}")
                    self.exit_code = 1
                    self.stop.set()
                    return
            if self.stop.is_set():
                return
            if up_since is not None and time.monotonic() - up_since > STABLE_S:
                restarts = 0
            restarts += 1
            if restarts > self.max_restarts:
                self._show_tail(g)
                self.say(f"{g.name} failed {restarts - 1} restarts in a row ({reason}); giving up on it "
                         "(the other groups keep serving)")
                self.exit_code = 1
                self.given_up.add(g.name)
                await self.stop_group(g, RESTART_GRACE_S)
                if all(gp.name in self.given_up for gp in self.plan.groups):
                    self.say("every group was given up; stopping")
                    self.stop.set()
                return
            backoff = min(BACKOFF_MAX_S, 2.0 ** (restarts - 1))
            self.say(f"{g.name}: {reason}; recreating the whole group (restart {restarts}, backoff {backoff:.0f}s)")
            await self.stop_group(g, RESTART_GRACE_S)
            await self._wait_ports_free(g)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)

    def _show_tail(self, g: GroupPlan) -> None:
        if not self.quiet:
            return  # the log was streamed already
        for p in g.procs:
            r = self.running.get(p.name)
            if r and r.tail:
                self.out.write("".join(f"[{p.name}] {line}\n" for line in r.tail))

    # -------------------------------------------------------------------- state
    def _write_state(self) -> None:
        state = {
            "launcher_pid": os.getpid(),
            "router_url": self.plan.router_url,
            "model": self.spec.model.name,
            "ranks": self.plan.rank_urls,
            "endpoints": [e.to_dict() for e in self.plan.endpoints],
            "groups": {g.name: [{"name": p.name, "pid": self.running[p.name].proc.pid if p.name in self.running
                                 else None, "ports": p.ports, "live_url": p.live_url} for p in g.procs]
                       for g in self.plan.groups},
            "router": {"pid": self.running["router"].proc.pid if "router" in self.running else None,
                       "ports": self.plan.router.ports},
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    # ---------------------------------------------------------------------- run
    async def run(self) -> int:
        import aiohttp

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        self._session = aiohttp.ClientSession()
        tasks: list[asyncio.Task] = []
        try:
            ready = {g.name: asyncio.Event() for g in self.plan.groups}
            tasks = [asyncio.create_task(self.supervise(g, ready[g.name])) for g in self.plan.groups]
            async def all_ready() -> None:
                for e in ready.values():
                    await e.wait()
            waiting = asyncio.create_task(all_ready())
            stop_wait = asyncio.create_task(self.stop.wait())
            await asyncio.wait([waiting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if not self.stop.is_set():
                router_group = GroupPlan("router", "router", self.plan.router, [])
                router_ready = asyncio.Event()
                tasks.append(asyncio.create_task(self.supervise(router_group, router_ready)))
                r_wait = asyncio.create_task(router_ready.wait())
                await asyncio.wait([r_wait, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                if router_ready.is_set():
                    self._write_state()
                    self.say(self.ready_line())
            await self.stop.wait()
            waiting.cancel()
            stop_wait.cancel()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.shutdown()
            await self._session.close()
        return self.exit_code

    def ready_line(self) -> str:
        roles = ", ".join(f"{name} {role.replicas}x DP{role.data_parallel_size}"
                          + (f" over {role.nodes} nodes" if role.nodes > 1 else "")
                          for name, role in self.spec.roles())
        return (f"ready at {self.plan.router_url} (router) model={self.spec.model.name} {roles}; "
                f"`{cli_command()} status --state-file {self.state_file}` shows every rank")

    async def shutdown(self) -> None:
        self.say("stopping")
        # Model servers first (each drains its in-flight streams), the router last: it is what the
        # streams reach the clients through.
        # A group's processes get SIGTERM together: the sidecar's streams need the ranks behind them,
        # and no node of an EP group is stopped before the others have even begun to drain.
        for role in ("decode", "prefill"):
            await asyncio.gather(*(self.stop_proc(p.name, self.stop_grace)
                                   for g in self.plan.groups if g.role == role for p in g.procs))
        for name in list(self.running):
            await self.stop_proc(name, self.stop_grace)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self.say("stopped")


def ensure_model(spec: DeploySpec, out: IO[str]) -> None:
    """make_tiny: write the tiny checkpoint when absent (in a child process: deploy never imports torch)."""
    path = Path(spec.model.path)
    if not spec.model.make_tiny or (path / "config.json").is_file():
        return
    out.write(f"wideep: making the tiny model at {path}\n")
    out.flush()
    subprocess.run([*wideep_executable(), "make-model", "tiny", "--out", str(path)], check=True)


def run_up(spec: DeploySpec, *, spec_dir: Path, port_base: int | None = None, router_port: int | None = None,
           state_file: str | None = None, ready_timeout: float = 900.0, max_restarts: int = 10,
           log_dir: str | None = None, quiet: bool = False, stop_grace: float = STOP_GRACE_S) -> int:
    out = sys.stdout
    try:
        ensure_model(spec, out)
    except subprocess.CalledProcessError as exc:
        out.write(f"wideep: making the tiny model failed ({exc})\n")
        return 1
    if spec.gateway.mode == "gateway":
        out.write("wideep: gateway mode needs a cluster's Gateway; running the router's built-in proxy locally\n")
    run_dir = Path(tempfile.mkdtemp(prefix="wideep-up-"))
    try:
        config_path = run_dir / "router-config.yaml"
        config_path.write_text(router_config_text(spec, spec_dir))
        endpoints_file = run_dir / "endpoints.yaml"
        base_env = dict(os.environ, PYTHONUNBUFFERED="1")
        plan = plan_stack(spec, PortAllocator(port_base), router_port=router_port, config_path=str(config_path),
                          endpoints_file=str(endpoints_file), base_env=base_env)
        endpoints_file.write_text(yaml.safe_dump([e.to_dict() for e in plan.endpoints], sort_keys=False))
        logs = Path(log_dir) if log_dir else None
        if logs:
            logs.mkdir(parents=True, exist_ok=True)
        launcher = Launcher(spec, plan, quiet=quiet, log_dir=logs, ready_timeout=ready_timeout,
                            max_restarts=max_restarts, state_file=Path(state_file) if state_file else default_state_file(),
                            out=out, stop_grace=stop_grace)
        return asyncio.run(launcher.run())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
