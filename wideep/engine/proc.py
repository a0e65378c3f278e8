"""The engine process: an EngineCore driven by requests arriving over ZMQ (vLLM v1 shape).

Messages are wideep.engine.wire's dataclasses, one msgpack map per ZMQ message. The client binds
both sockets (client -> engine PUSH/PULL at input_addr, engine -> client at output_addr); the engine
connects, sends Ready first, then Outputs / Rejected / Stats, and Fatal when it goes down. A thread
of the engine sends a Heartbeat every HEARTBEAT_S, and the loop a Stats at least as often.

The loop blocks on the input socket while there is no work (no busy loop). Each iteration it asks a
StepCoordinator what to do: the default runs a step whenever this rank has work; the DP-lockstep one
(parallel/) may pad the batch or run a dummy batch so every rank joins the MoE collectives.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import zmq

from wideep.utils.threads import apply_engine_threads
from wideep.logs import setup_logging
from wideep.engine.api import InvalidRequest
from wideep.engine.config import EngineArgs
from wideep.engine.wire import (Abort, Add, BadMessage, Fatal, Heartbeat, Outputs, Ready, Rejected, ResetPrefixCache,
                                Shutdown, Stats, StatsRequest, ToEngine, decode_to_engine, encode, pack)

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1
PARENT_CHECK_S = 1.0
HEARTBEAT_S = 1.0   # heartbeat period, and the longest the loop goes without sending fresh stats


__all__ = ["EngineLoop", "StepCoordinator", "StepDecision", "pack", "run_engine_process"]


@dataclass
class StepDecision:
    run_step: bool                # execute the scheduled batch (it may be empty)
    pad_to: int | None = None     # pad a decode-only batch to at least this many sequences
    dummy_batch: int = 0          # if > 0 and nothing real runs: a dummy forward over this many tokens
    use_graphs: bool = True       # False: decode runs eagerly (the same answer on every DP rank)
    # the group's (max tokens per rank, decode-only): dual-batch overlap splits the same steps on every rank
    dbo_group: tuple[int, bool] | None = None


class StepCoordinator:
    """The engine loop's seam for ranks that must step together; the defaults are one rank on its own."""

    def idle_timeout_s(self, core) -> float | None:
        """How long the loop may block waiting for input when this rank has no work (None: until input)."""
        return None

    def decide(self, core, scheduled) -> StepDecision:
        """Called every iteration with this rank's scheduled batch (None when it has no work)."""
        return StepDecision(run_step=scheduled is not None)

    def explain_failure(self, exc: Exception) -> Exception:
        """The error to report when a forward raised `exc` (exc itself when there is nothing to add)."""
        return exc

    def poll_sockets(self) -> list[Any]:
        """Extra sockets whose messages end the loop's idle wait."""
        return []


SingleRankCoordinator = StepCoordinator


def _make_kv_event_publisher(args: EngineArgs):
    """KV events leave from the engine process (wideep.engine.kv_events); None when they are off."""
    if not args.kv_events_config:
        return None
    from wideep.engine.kv_events import create_publisher
    return create_publisher(args.kv_events_config, args.data_parallel_rank)


def run_engine_process(args: EngineArgs | dict, input_addr: str, output_addr: str, ready=None,
                       coordinator: StepCoordinator | None = None, core_factory=None) -> None:
    """Entry point of the engine process. `ready`: optional multiprocessing Connection that receives
    {"ok": True, "info": {...}} or {"ok": False, "error": str} once the engine is up (or failed).
    `core_factory(args) -> EngineCore` lets the DP launcher build the core with its dispatcher."""
    if isinstance(args, dict):
        args = EngineArgs.from_dict(args)
    setup_logging("engine")
    threads = apply_engine_threads(args.device)
    log.info("engine dp rank %d: %d torch threads", args.data_parallel_rank, threads)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    outp = ctx.socket(zmq.PUSH)
    outp.setsockopt(zmq.LINGER, 2000)
    outp.connect(output_addr)
    publisher = None
    try:
        if core_factory is None:
            from wideep.engine.core import EngineCore
            core = EngineCore(args)
        else:
            core = core_factory(args)
        publisher = _make_kv_event_publisher(args)
        info = engine_info(core)
    except BaseException as exc:
        msg = f"engine failed to start: {exc!r}\n{traceback.format_exc()}"
        log.error(msg)
        if ready is not None:
            ready.send({"ok": False, "error": msg})
        outp.send(encode(Fatal(msg)))
        outp.close()
        ctx.term()
        raise SystemExit(1)
    if ready is not None:
        ready.send({"ok": True, "info": info})
    outp.send(encode(Ready(info)))
    loop = EngineLoop(core, inp, outp, coordinator or SingleRankCoordinator(), publisher)
    heartbeat = HeartbeatThread(ctx, output_addr, loop)
    heartbeat.start()
    try:
        loop.run()
    except BaseException as exc:
        msg = f"engine loop died: {exc!r}\n{traceback.format_exc()}"
        log.error(msg)
        try:
            outp.send(encode(Fatal(msg)))
        except zmq.ZMQError:
            pass
        raise
    finally:
        heartbeat.stop()
        if publisher is not None:
            publisher.close()
        inp.close(linger=0)
        outp.close()
        ctx.term()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def engine_info(core) -> dict[str, Any]:
    return {"num_blocks": core.num_blocks, "block_size": core.args.block_size,
            "max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
            "eos_token_ids": sorted(core.eos_token_ids), "device": str(core.device),
            "dp_rank": core.args.data_parallel_rank, "pid": os.getpid(), "torch_threads": _torch_threads()}


class HeartbeatThread(threading.Thread):
    """Beats every HEARTBEAT_S on a socket of its own, with the loop's step counter and how long the
    current step has run. A frozen process (SIGSTOP, a GIL held for seconds) goes silent; a long
    step (a kernel compile, a collective waiting for a stuck peer) keeps beating and says so; the
    frontend tells the two apart."""

    def __init__(self, ctx: zmq.Context, output_addr: str, loop: "EngineLoop"):
        super().__init__(name="engine-heartbeat", daemon=True)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(output_addr)
        self.loop = loop
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.wait(HEARTBEAT_S):
                started = self.loop.step_started
                busy = 0.0 if started is None else time.monotonic() - started
                try:
                    self.sock.send(encode(Heartbeat(self.loop.steps, busy)), zmq.NOBLOCK)
                except zmq.Again:   # the frontend is not reading: a beat lost is no harm
                    pass
        finally:
            self.sock.close(linger=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class EngineLoop:
    def __init__(self, core, inp: zmq.Socket, outp: zmq.Socket, coordinator: StepCoordinator, publisher=None):
        self.core = core
        self.inp = inp
        self.outp = outp
        self.coordinator = coordinator
        self.publisher = publisher
        self.poller = zmq.Poller()
        self.poller.register(inp, zmq.POLLIN)
        # DP lockstep: a peer's "wake up" message must end the idle wait too (engine/lockstep.py)
        for sock in coordinator.poll_sockets():
            self.poller.register(sock, zmq.POLLIN)
        # P/D consumer: a finished KV pull ends the wait too (its request is scheduled in this iteration)
        self.kv_wakeup_fd = core.kv_wakeup_fd()
        if self.kv_wakeup_fd is not None:
            self.poller.register(self.kv_wakeup_fd, zmq.POLLIN)
        self.parent_pid = os.getppid()
        self.last_stats = 0.0
        self.last_heartbeat = 0.0
        self.steps = 0
        self.step_started: float | None = None   # monotonic start of the step in progress (Heartbeat reads it)
        self.running = True

    def run(self) -> None:
        while self.running:
            has_work = self.core.has_unfinished()
            kv_wait = self.core.kv_transfer_wait_s()
            if kv_wait is not None:
                # P/D: only KV transfers pending; nap on input instead of spinning (no longer than the
                # DP-lockstep coordinator allows: peers may need this rank's dummy batch), then poll them.
                timeout = self.coordinator.idle_timeout_s(self.core)
                wait = min(kv_wait, HEARTBEAT_S) if timeout is None else min(kv_wait, timeout, HEARTBEAT_S)
                if not self._drain_inputs(int(wait * 1000)) and os.getppid() != self.parent_pid:
                    log.warning("parent process went away; engine exiting")
                    return
                self.core.poll_kv_transfers()
            elif has_work:
                self._drain_inputs(0)
            else:
                timeout = self.coordinator.idle_timeout_s(self.core)
                wait = min(PARENT_CHECK_S, HEARTBEAT_S) if timeout is None else min(timeout, PARENT_CHECK_S, HEARTBEAT_S)
                if not self._drain_inputs(int(wait * 1000)) and os.getppid() != self.parent_pid:
                    log.warning("parent process went away; engine exiting")
                    return
            if not self.running:
                return
            scheduled = self.core.schedule() if self.core.has_unfinished() else None
            decision = self.coordinator.decide(self.core, scheduled)
            outputs = []
            ran_real = False
            try:
                if scheduled is not None and decision.run_step:
                    outputs = self.core.execute(scheduled, decision.pad_to, decision.use_graphs, decision.dbo_group)
                    ran_real = not scheduled.is_empty
                    self.steps += 1
                if decision.dummy_batch and not ran_real:
                    self.core.execute_dummy_batch(decision.dummy_batch, use_graphs=decision.use_graphs,
                                                 dbo_group=decision.dbo_group)
            except Exception as exc:
                # A forward's collectives (MoE dispatch/combine) fail when a peer rank dies: let the
                # coordinator name that, so the error says which group was lost rather than "gloo read error".
                explained = self.coordinator.explain_failure(exc)
                if explained is exc:
                    raise
                raise explained from exc
            self._publish(outputs)

    def _drain_inputs(self, timeout_ms: int) -> bool:
        """Handles every pending input message, waiting up to timeout_ms for the first one."""
        got = False
        events = self.poller.poll(timeout_ms)
        if events:
            if self.kv_wakeup_fd is not None and any(s == self.kv_wakeup_fd for s, _ in events):
                self.core.poll_kv_transfers()   # drains the wakeup pipe; the landed request waits in the queue
            while True:
                try:
                    data = self.inp.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = True
                self._receive(data)
        return got

    def _receive(self, data: bytes) -> None:
        try:
            msg = decode_to_engine(data)
        except BadMessage as exc:
            if exc.request_id:
                self.outp.send(encode(Rejected(exc.request_id, str(exc))))
            else:
                log.warning("%s", exc)
            return
        self._handle(msg)

    def _handle(self, msg: ToEngine) -> None:
        if isinstance(msg, Add):
            try:
                self.core.add_request(msg.request)
            except InvalidRequest as exc:
                self.outp.send(encode(Rejected(msg.request.request_id, str(exc), exc.param)))
            except (TypeError, ValueError, KeyError) as exc:
                self.outp.send(encode(Rejected(msg.request.request_id, f"bad request: {exc}")))
        elif isinstance(msg, Abort):
            for rid in msg.request_ids:
                self.core.abort_request(rid)
        elif isinstance(msg, StatsRequest):
            self.outp.send(encode(Stats(self.core.stats())))
        elif isinstance(msg, ResetPrefixCache):
            self.core.reset_prefix_cache()
        elif isinstance(msg, Shutdown):
            self.running = False

    def _publish(self, outputs) -> None:
        events = self.core.take_kv_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)
        now = time.monotonic()
        stats = None
        if outputs and now - self.last_stats >= STATS_INTERVAL_S:
            stats = self.core.stats()
            self.last_stats = now
        if outputs:
            self.outp.send(encode(Outputs(outputs, stats)))
        self.step_started = None
        if now - self.last_heartbeat >= HEARTBEAT_S:   # fresh queue numbers for /metrics, busy or idle
            self.last_heartbeat = now
            self.outp.send(encode(Stats(self.core.stats())))
