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

from wideep.logs import ACCESS_LOG, setup_logging
from wideep.utils.aio import access_logger_class, install_uvloop
from wideep.utils.proc import send

log = logging.getLogger("wideep.frontend")


class SiblingProcess:
    """The engine's pid seen through the interface AsyncEngineClient's watchdog expects
    (sentinel fd readable at exit, is_alive, pid, exitcode); works for a non-child via pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self._exitcode: int | None = None

    @property
    def exitcode(self) -> int | None:
        """Popen-style (negative: killed by that signal), read from /proc while the exited process is a
        zombie (the supervisor reaps it within its 0.2 s poll); None if it is gone already."""
        if self._exitcode is None:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] in ("Z", "X") and len(fields) > 49:
                    raw = int(fields[49])          # field 52, exit_code, in waitpid(2) form
                    self._exitcode = -(raw & 0x7F) if raw & 0x7F else (raw >> 8) & 0xFF
            except (OSError, IndexError, ValueError):
                pass
        return self._exitcode

    def is_alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def kill(self) -> None:
        send(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 0)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)


async def serve_frontend(payload: dict[str, Any]) -> int:
    from aiohttp import web

    from wideep.engine.client import AsyncEngineClient, EngineDeadError
    from wideep.engine.output_processor import OutputProcessor
    from wideep.kv_transfer.peers import kv_peer_allowlist_from_env
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
    max_token_chars = await loop.run_in_executor(None, tokenizer.max_token_chars)
    chat = chat_options(cfg, tokenizer)
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
        engine_errors=(EngineDeadError,), chat=chat, stall_timeout_s=cfg.engine_stall_timeout_s,
        step_timeout_s=cfg.engine_step_timeout_s,
        max_prompt_chars=int(info["max_model_len"]) * max_token_chars,
        kv_peers=kv_peer_allowlist_from_env())
    state.metrics.update_engine_stats(client.latest_stats)
    app = build_app(state)
    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup aborts
    # the engine request (frees its KV blocks) even when nothing was being written at that moment.
    runner = web.AppRunner(app, access_log=ACCESS_LOG, access_log_class=access_logger_class(),
                           handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, port, reuse_address=True, backlog=2048)
    await site.start()
    state.ready = True
    log.info("dp rank %d: serving %s on %s:%d", dp_rank, cfg.model_name, cfg.host, port)

    watch = asyncio.ensure_future(_watch_engine(state, stop))
    stall = asyncio.ensure_future(_watch_progress(state))
    await stop.wait()
    watch.cancel()
    stall.cancel()
    code = 0
    if state.engine_dead_reason:
        code = 1
    else:
        await _drain(state, site, cfg.drain_timeout_s)
    await runner.cleanup()
    client.close()
    return code


def chat_options(cfg, tokenizer):
    """The server's OpenAI-surface settings; --chat-template replaces the model's template."""
    from concurrent.futures import ThreadPoolExecutor

    from wideep.server.generation_defaults import load_sampling_defaults
    from wideep.server.reasoning import make_reasoning_parser
    from wideep.server.state import ChatOptions

    if cfg.chat_template is not None:
        tokenizer.set_chat_template(cfg.chat_template)
    return ChatOptions(
        reasoning_parser=make_reasoning_parser(cfg.reasoning_parser) if cfg.reasoning_parser else None,
        reasoning_field=cfg.reasoning_field, tool_call_parser=cfg.tool_call_parser,
        enable_auto_tool_choice=cfg.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=cfg.exclude_tools_when_tool_choice_none,
        trust_request_chat_template=cfg.trust_request_chat_template,
        sampling_defaults=load_sampling_defaults(cfg.generation_config, cfg.engine_args.model),
        render_pool=ThreadPoolExecutor(max_workers=2, thread_name_prefix="chat-template"))


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


async def _watch_progress(state) -> None:
    """Logs a stalled engine once per stall (its /health says so meanwhile: see FrontendState.stalled)."""
    reported = False
    while True:
        why = state.stalled()
        if why and not reported:
            log.error("dp rank %d: %s", state.dp_rank, why)
        elif reported and not why:
            log.warning("dp rank %d: the engine makes progress again", state.dp_rank)
        reported = bool(why)
        await asyncio.sleep(0.5)


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
