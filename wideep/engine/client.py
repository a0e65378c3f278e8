"""AsyncEngineClient: the frontend's handle on one engine process (EngineClient protocol of api.py).

    client = await start_engine(EngineArgs(model=...))        # spawns the process, waits until ready
    async for out in client.generate(EngineRequest(...)): ...  # RequestOutput deltas until finished
    await client.abort(request_id); await client.stats(); client.is_alive(); await client.shutdown()

If the engine process dies, is_alive() turns False and every in-flight generate() raises
EngineDeadError promptly (a watchdog watches the process sentinel).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from wideep.errors import WideepError
from wideep.engine.api import EngineRequest, EngineStats, InvalidRequest, RequestOutput
from wideep.engine.config import EngineArgs
from wideep.engine.proc import run_engine_process
from wideep.engine.wire import (Abort, Add, Fatal, Outputs, Ready, Rejected, ResetPrefixCache, Shutdown, Stats,
                                StatsRequest, decode_from_engine, encode)


class EngineDeadError(WideepError, RuntimeError):
    """The engine process is gone; requests in flight cannot finish."""


def ipc_addresses() -> tuple[str, str]:
    base = os.path.join(tempfile.gettempdir(), f"wideep-engine-{uuid.uuid4().hex[:12]}")
    return f"ipc://{base}-in", f"ipc://{base}-out"


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncEngineClient:
    """Binds both sockets; the engine process (started by `start_engine` or by someone else with
    `run_engine_process(args, input_addr, output_addr)`) connects to them."""

    def __init__(self, input_addr: str, output_addr: str, process: multiprocessing.process.BaseProcess | None = None):
        self.input_addr = input_addr
        self.output_addr = output_addr
        self.process = process
        self.ctx = zmq.asyncio.Context()
        self.inp = self.ctx.socket(zmq.PUSH)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.bind(input_addr)
        self.outp = self.ctx.socket(zmq.PULL)
        self.outp.setsockopt(zmq.LINGER, 0)
        self.outp.bind(output_addr)
        self.info: dict[str, Any] = {}
        self.latest_stats = EngineStats()
        self._streams: dict[str, _Stream] = {}
        self._stats_waiters: list[asyncio.Future] = []
        self._ready = asyncio.Event()
        self._dead: str | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the reader (and the process watchdog). Call inside the event loop."""
        if not self._tasks:
            self._tasks.append(asyncio.ensure_future(self._read_loop()))
            if self.process is not None:
                self._tasks.append(asyncio.ensure_future(self._watch_process()))

    async def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        self.start()
        ready = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait([ready], timeout=timeout)
        if self._dead:
            raise EngineDeadError(self._dead)
        if not done:
            ready.cancel()
            raise TimeoutError(f"engine not ready after {timeout}s")
        return self.info

    def is_alive(self) -> bool:
        if self._dead:
            return False
        return self.process is None or self.process.is_alive()

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self.is_alive():
            try:
                await self.inp.send(encode(Shutdown()))
            except zmq.ZMQError:
                pass
        if self.process is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            while self.process.is_alive() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=5)
        self._mark_dead("engine shut down")
        self.close()

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self.inp.close(linger=0)
        self.outp.close(linger=0)
        self.ctx.term()

    # ---- EngineClient protocol -------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self.is_alive():
            raise EngineDeadError(self._dead or "engine process is not running")
        request.sampling_params.validate()
        rid = request.request_id
        if rid in self._streams:
            raise InvalidRequest(f"request_id {rid!r} is already in use", "request_id")
        stream = _Stream()
        self._streams[rid] = stream
        finished = False
        try:
            await self.inp.send(encode(Add(request)))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished and self.is_alive():  # the caller went away (disconnect, cancel): free its blocks
                try:
                    await self.inp.send(encode(Abort([rid])))
                except zmq.ZMQError:
                    pass

    async def abort(self, request_id: str) -> None:
        if self.is_alive():
            await self.inp.send(encode(Abort([request_id])))

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        """Fresh stats from the engine (answered between steps); the last known ones if it is slow or dead."""
        if not self.is_alive():
            return self.latest_stats
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        await self.inp.send(encode(StatsRequest()))
        try:
            return await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, EngineDeadError):
            if fut in self._stats_waiters:  # a hung engine must not grow the list one scrape at a time
                self._stats_waiters.remove(fut)
            return self.latest_stats

    async def reset_prefix_cache(self) -> None:
        await self.inp.send(encode(ResetPrefixCache()))

    # ---- background tasks ------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            msg = decode_from_engine(await self.outp.recv())
            if isinstance(msg, Outputs):
                if msg.stats is not None:
                    self.latest_stats = msg.stats
                for out in msg.outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.queue.put_nowait(out)
            elif isinstance(msg, Rejected):
                stream = self._streams.get(msg.request_id)
                if stream is not None:
                    stream.queue.put_nowait(InvalidRequest(msg.message, msg.param))
            elif isinstance(msg, Stats):
                self.latest_stats = msg.stats
                waiters, self._stats_waiters = self._stats_waiters, []
                for f in waiters:
                    if not f.done():
                        f.set_result(self.latest_stats)
            elif isinstance(msg, Ready):
                self.info = msg.info
                self._ready.set()
            elif isinstance(msg, Fatal):
                self._mark_dead(msg.message)

    async def _watch_process(self) -> None:
        loop = asyncio.get_running_loop()
        sentinel_ready = asyncio.Event()
        loop.add_reader(self.process.sentinel, sentinel_ready.set)
        try:
            await sentinel_ready.wait()
        finally:
            loop.remove_reader(self.process.sentinel)
        self._mark_dead(f"engine process {self.process.pid} exited with code {self.process.exitcode}")

    @property
    def dead_reason(self) -> str | None:
        """Why the engine is gone (None while it is alive)."""
        return self._dead

    def _mark_dead(self, why: str) -> None:
        if self._dead:
            return
        self._dead = why
        self._ready.set()
        err = EngineDeadError(why)
        for stream in self._streams.values():
            stream.queue.put_nowait(err)
        for f in self._stats_waiters:
            if not f.done():
                f.set_exception(err)
        self._stats_waiters = []


def spawn_engine_process(args: EngineArgs, input_addr: str, output_addr: str,
                         target=run_engine_process, extra_args: tuple = ()) -> multiprocessing.process.BaseProcess:
    """Starts the engine process (multiprocessing spawn: safe with torch/CUDA in the parent)."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=target, args=(args.to_dict(), input_addr, output_addr, None, *extra_args),
                       name=f"wideep-engine-dp{args.data_parallel_rank}", daemon=True)
    proc.start()
    return proc


async def start_engine(args: EngineArgs, timeout: float = 600.0, env: dict[str, str] | None = None) -> AsyncEngineClient:
    """Spawns an engine process for `args` and returns a ready client (raises EngineDeadError with the
    engine's traceback if it fails to start). `env` entries are set in the child (e.g. CUDA_VISIBLE_DEVICES)."""
    input_addr, output_addr = ipc_addresses()
    client = AsyncEngineClient(input_addr, output_addr)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        client.process = spawn_engine_process(args, input_addr, output_addr)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        await client.wait_ready(timeout)
    except BaseException:
        if client.process.is_alive():
            client.process.kill()
        client.process.join(timeout=5)
        client.close()
        raise
    return client
