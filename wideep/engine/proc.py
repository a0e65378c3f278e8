"""The engine process: an EngineCore driven by requests arriving over ZMQ (vLLM v1 shape).

Wire (msgpack maps, one per ZMQ message). The client binds both sockets; the engine connects.
  client -> engine (PUSH -> PULL at input_addr):
    {"type": "add", "request": EngineRequest.to_dict()}
    {"type": "abort", "request_ids": [str, ...]}
    {"type": "stats"}                       # answered by a "stats" message
    {"type": "reset_prefix_cache"}
    {"type": "shutdown"}
  engine -> client (PUSH -> PULL at output_addr):
    {"type": "ready", "info": {...}}        # first message: num_blocks, block_size, max_model_len, ...
    {"type": "outputs", "outputs": [RequestOutput.to_dict(), ...], "stats": EngineStats.to_dict() | None}
    {"type": "error", "request_id": str, "message": str, "param": str | None}   # request rejected
    {"type": "stats", "stats": EngineStats.to_dict()}
    {"type": "fatal", "message": str}       # the engine is going down

The loop blocks on the input socket while there is no work (no busy loop). Each iteration it asks a
StepCoordinator what to do: the default runs a step whenever this rank has work; the DP-lockstep one
(parallel/) may pad the batch or run a dummy batch so every rank joins the MoE collectives.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from wideep.engine.api import EngineRequest, InvalidRequest
from wideep.engine.config import EngineArgs

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1
PARENT_CHECK_S = 1.0


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class StepDecision:
    run_step: bool                # execute the scheduled batch (it may be empty)
    pad_to: int | None = None     # pad a decode-only batch to at least this many sequences
    dummy_batch: int = 0          # if > 0 and nothing real runs: a dummy forward over this many tokens
    use_graphs: bool = True       # False: decode runs eagerly (the same answer on every DP rank)


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
    _limit_cpu_threads(args)
    logging.basicConfig(level=os.environ.get("WIDEEP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s engine[%(process)d] %(message)s")
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
        outp.send(pack({"type": "fatal", "message": msg}))
        outp.close()
        ctx.term()
        raise SystemExit(1)
    if ready is not None:
        ready.send({"ok": True, "info": info})
    outp.send(pack({"type": "ready", "info": info}))
    try:
        EngineLoop(core, inp, outp, coordinator or SingleRankCoordinator(), publisher).run()
    except BaseException as exc:
        msg = f"engine loop died: {exc!r}\n{traceback.format_exc()}"
        log.error(msg)
        try:
            outp.send(pack({"type": "fatal", "message": msg}))
        except zmq.ZMQError:
            pass
        raise
    finally:
        if publisher is not None:
            publisher.close()
        inp.close(linger=0)
        outp.close()
        ctx.term()


def _limit_cpu_threads(args: EngineArgs) -> None:
    """CPU engines default to one intra-op thread unless OMP_NUM_THREADS says otherwise: several
    engine processes (DP ranks, P and D) share the host, and OpenMP threads spinning against each
    other made tiny-model steps ~25x slower on a 2-core machine."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(1)


def engine_info(core) -> dict[str, Any]:
    return {"num_blocks": core.num_blocks, "block_size": core.args.block_size,
            "max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
            "eos_token_ids": sorted(core.eos_token_ids), "device": str(core.device),
            "dp_rank": core.args.data_parallel_rank, "pid": os.getpid()}


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
        self.parent_pid = os.getppid()
        self.last_stats = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            has_work = self.core.has_unfinished()
            kv_wait = self.core.kv_transfer_wait_s() if hasattr(self.core, "kv_transfer_wait_s") else None
            if kv_wait is not None:
                # P/D: only KV transfers pending; nap on input instead of spinning (no longer than the
                # DP-lockstep coordinator allows: peers may need this rank's dummy batch), then poll them.
                timeout = self.coordinator.idle_timeout_s(self.core)
                wait = kv_wait if timeout is None else min(kv_wait, timeout)
                if not self._drain_inputs(int(wait * 1000)) and os.getppid() != self.parent_pid:
                    log.warning("parent process went away; engine exiting")
                    return
                self.core.poll_kv_transfers()
            elif has_work:
                self._drain_inputs(0)
            else:
                timeout = self.coordinator.idle_timeout_s(self.core)
                wait = PARENT_CHECK_S if timeout is None else min(timeout, PARENT_CHECK_S)
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
                    outputs = self.core.execute(scheduled, decision.pad_to, decision.use_graphs)
                    ran_real = not scheduled.is_empty
                if decision.dummy_batch and not ran_real:
                    self.core.execute_dummy_batch(decision.dummy_batch, use_graphs=decision.use_graphs)
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
        if self.poller.poll(timeout_ms):
            while True:
                try:
                    data = self.inp.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = True
                self._handle(unpack(data))
        return got

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "add":
            rid = msg.get("request", {}).get("request_id", "")
            try:
                self.core.add_request(EngineRequest.from_dict(msg["request"]))
            except InvalidRequest as exc:
                self.outp.send(pack({"type": "error", "request_id": rid, "message": str(exc), "param": exc.param}))
            except (TypeError, ValueError, KeyError) as exc:
                self.outp.send(pack({"type": "error", "request_id": rid, "message": f"bad request: {exc}", "param": None}))
        elif kind == "abort":
            for rid in msg.get("request_ids", []):
                self.core.abort_request(rid)
        elif kind == "stats":
            self.outp.send(pack({"type": "stats", "stats": self.core.stats().to_dict()}))
        elif kind == "reset_prefix_cache":
            self.core.reset_prefix_cache()
        elif kind == "shutdown":
            self.running = False
        else:
            log.warning("unknown engine message type %r", kind)

    def _publish(self, outputs) -> None:
        events = self.core.take_kv_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)
        now = time.monotonic()
        stats = None
        if outputs and now - self.last_stats >= STATS_INTERVAL_S:
            stats = self.core.stats().to_dict()
            self.last_stats = now
        if outputs:
            self.outp.send(pack({"type": "outputs", "outputs": [o.to_dict() for o in outputs], "stats": stats}))
