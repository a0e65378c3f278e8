"""One DP rank's HTTP frontend process (aiohttp on uvloop), talking token ids to its engine over ZMQ.

Startup: bind the engine client's sockets, load the tokenizer while the engine loads, open the HTTP
port once the engine says ready. The engine is a sibling process (both are children of the
supervisor), watched through a pidfd: when it dies, /health turns 503 and every in-flight request
ends with an error at once. SIGTERM: stop accepting, let in-flight requests finish (bounded by the
drain timeout), abort the rest, exit 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from wideep.logs import ACCESS_LOG, ACCESS_LOG_FORMAT, setup_logging
from wideep.utils.aio import install_uvloop

log = logging.getLogger("wideep.frontend")


class SiblingProcess:
    """The engine's pid seen through the interface AsyncEngineClient's watchdog expects
    (sentinel fd readable at exit, is_alive, pid, exitcode); works for a non-child via pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self.exitcode = None

    def is_alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 0)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)


async def serve_frontend(payload: dict[str, Any]) -> int:
    from aiohttp import web

    from wideep.engine.client import AsyncEngineClient, EngineDeadError
    from wideep.engine.output_processor import OutputProcessor
    from wideep.model.tokenizer import Tokenizer
    from wideep.server.app import build_app
    from wideep.server.metrics import FrontendMetrics
    from wideep.server.state import FrontendState
    from wideep.server.supervisor import serve_config_from_dict

    cfg = serve_config_from_dict(payload["serve"])
    local_rank = payload["local_rank"]
    dp_rank = cfg.start_rank + local_rank
    port = cfg.rank_port(local_rank)
    engine_proc = SiblingProcess(payload["engine_pid"]) if payload.get("engine_pid") else None
    client = AsyncEngineClient(payload["input_addr"], payload["output_addr"], process=engine_proc)
    client.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tokenizer = await loop.run_in_executor(None, Tokenizer, cfg.engine_args.model)
    ready_task = asyncio.ensure_future(client.wait_ready(cfg.engine_start_timeout_s))
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    if not ready_task.done():
        ready_task.cancel()
        client.close()
        return 0
    try:
        info = ready_task.result()
    except (EngineDeadError, TimeoutError) as e:
        log.error("dp rank %d: engine did not start: %s", dp_rank, e)
        client.close()
        return 1

    state = FrontendState(
        client=client, tokenizer=tokenizer, output_processor=OutputProcessor(tokenizer),
        metrics=FrontendMetrics(cfg.model_name, dp_rank), served_model_names=cfg.served_model_names,
        model_root=cfg.engine_args.model, dp_rank=dp_rank, max_model_len=int(info["max_model_len"]),
        vocab_size=int(info.get("vocab_size") or tokenizer.vocab_size), api_key=cfg.api_key,
        engine_errors=(EngineDeadError,))
    state.metrics.update_engine_stats(client.latest_stats)
    app = build_app(state)
    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup aborts
    # the engine request (frees its KV blocks) even when nothing was being written at that moment.
    runner = web.AppRunner(app, access_log=ACCESS_LOG, access_log_format=ACCESS_LOG_FORMAT, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, port, reuse_address=True, backlog=2048)
    await site.start()
    state.ready = True
    log.info("dp rank %d: serving %s on %s:%d", dp_rank, cfg.model_name, cfg.host, port)

    watch = asyncio.ensure_future(_watch_engine(state, stop))
    await stop.wait()
    watch.cancel()
    code = 0
    if state.engine_dead_reason:
        code = 1
    else:
        await _drain(state, site, cfg.drain_timeout_s)
    await runner.cleanup()
    client.close()
    return code


async def _watch_engine(state, stop: asyncio.Event) -> None:
    """Marks the rank dead when the engine goes away; in-flight generate() calls raise at once
    (the client's watchdog); the frontend then stays up answering 503 until the supervisor stops it."""
    while True:
        if not state.client.is_alive():
            state.engine_dead_reason = state.client.dead_reason or "engine process exited"
            state.ready = False
            log.error("dp rank %d: %s", state.dp_rank, state.engine_dead_reason)
            return
        await asyncio.sleep(0.2)


async def _drain(state, site, timeout: float) -> None:
    state.draining = True
    state.ready = False
    await site.stop()   # no new connections
    deadline = time.monotonic() + timeout
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight:
        log.warning("dp rank %d: drain timeout, aborting %d requests", state.dp_rank, len(state.inflight))
        for rid in list(state.inflight):
            await state.client.abort(rid)


def run_frontend(payload: dict[str, Any]) -> int:
    setup_logging("frontend")
    install_uvloop()
    return asyncio.run(serve_frontend(payload))
