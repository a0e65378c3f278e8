"""DP lockstep: every rank of an EP group runs a forward whenever any rank has work.

The MoE layers of one forward are collectives over the whole group, so a rank with nothing to do
still runs a dummy batch (random routing) while others work. Shaped like vLLM's wave mechanism
(docs/protocols.md, "DP lockstep"):
- while a "wave" runs, each iteration all-reduces [has_work, tokens] over a gloo CPU group: the
  same answer on every rank says whether to step (and the group's max tokens per rank, which the
  dispatcher pads to) or to stop (everyone idle → the wave ends, wave += 1); the same all-reduce
  carries each rank's CUDA-graph proposal (step_shape.py): decode-only steps replay one agreed graph
  size on every rank, dummy ranks included, and one rank that cannot makes the step eager everywhere;
- while idle, the engine loop blocks on its request socket and on a small ZMQ wake socket; a rank
  that gets a request pushes "wake(wave)" to its peers, so nobody polls and nobody burns a core;
- a collective that fails (dead peer: connection closed, or the group timeout) raises EPGroupError,
  which brings the engine down with that message instead of hanging.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from wideep import envs
from wideep.engine.proc import StepCoordinator, StepDecision
from wideep.parallel.dist import EPGroup, EPGroupError
from wideep.model.ubatch import DBOConfig
from wideep.parallel.step_shape import StepProposal, StepShape, decide_shape

log = logging.getLogger(__name__)


def _advertised_host(dp_address: str) -> tuple[str, str]:
    """(bind address, address peers dial) for the wake socket."""

    if dp_address in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1", "127.0.0.1"
    host = envs.WIDEEP_HOST_IP or envs.VLLM_NIXL_SIDE_CHANNEL_HOST or \
        socket.gethostbyname(socket.gethostname())
    return "0.0.0.0", host


class DPLockstepCoordinator(StepCoordinator):
    """The engine loop's StepCoordinator for data_parallel_size > 1 (see wideep.engine.proc)."""

    def __init__(self, dp_address: str = "127.0.0.1", dummy_tokens: int = 1):
        self.dp_address = dp_address
        self.dummy_tokens = dummy_tokens
        self.group: EPGroup | None = None
        self.dispatcher = None
        self.eplb = None            # EplbState or None
        self.routers: list[Any] = []  # ExpertRouter hooks (random routing in dummy forwards)
        self.running = False
        self.wave = 0
        self.steps = 0              # lockstep forwards run in the current process
        self.dummy_steps = 0
        self.graph_steps = 0         # lockstep forwards that replayed a CUDA graph (all ranks agreed)
        self.eager_steps = 0
        self.split_steps = 0        # lockstep forwards run as two micro-batches (dual-batch overlap)
        self.graph_size_steps: dict[int, int] = {}
        # loop-iteration wall time (agreement + forward + sampling + output) per kind of lockstep step
        self.step_time_s: dict[str, list[float]] = {"decode_graph": [0.0, 0], "decode_eager": [0.0, 0],
                                                    "prefill_or_mixed": [0.0, 0]}
        self._step_started = 0.0
        self._leaving = False
        self.last_shape: StepShape | None = None
        self._ctx = None
        self._wake_in = None
        self._wake_out: list[Any] = []
        self._forward_pending = False

    # ---- set-up (in the engine process, once the group exists) -----------------------------------
    def attach(self, group: EPGroup, dispatcher=None, eplb=None, routers=None) -> None:
        import zmq

        self.group = group
        self.dispatcher = dispatcher
        self.eplb = eplb
        self.routers = list(routers or (eplb.routers if eplb is not None else []))
        self._ctx = zmq.Context()
        self._wake_in = self._ctx.socket(zmq.PULL)
        bind_host, dial_host = _advertised_host(self.dp_address)
        port = self._wake_in.bind_to_random_port(f"tcp://{bind_host}")
        addrs: list[Any] = [None] * group.size
        try:
            dist.all_gather_object(addrs, f"tcp://{dial_host}:{port}", group=group.cpu_group)
        except Exception as exc:  # noqa: BLE001
            raise EPGroupError(f"DP lockstep set-up failed on rank {group.rank}: {exc}") from exc
        for r, addr in enumerate(addrs):
            if r == group.rank:
                continue
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.connect(addr)
            self._wake_out.append(s)

    def poll_sockets(self) -> list[Any]:
        """Extra sockets the engine loop should wake up on while idle."""
        return [self._wake_in] if self._wake_in is not None else []

    def summary(self) -> dict[str, Any]:
        """Step counts of this rank's lockstep (how many forwards replayed which graph, how many ran eager)."""
        return {"rank": self.group.rank if self.group is not None else 0, "steps": self.steps,
                "dummy_steps": self.dummy_steps, "graph_steps": self.graph_steps, "eager_steps": self.eager_steps, "split_steps": self.split_steps,
                "graph_sizes": {str(k): v for k, v in sorted(self.graph_size_steps.items())},
                "step_ms": {k: {"count": int(n), "mean": (t / n * 1e3) if n else None}
                            for k, (t, n) in self.step_time_s.items()}}

    def close(self) -> None:
        if self.group is not None:
            info = self.summary()
            log.info("DP lockstep rank %d: %d forwards (%d dummy), %d replayed a graph %s, %d eager",
                     info["rank"], self.steps, self.dummy_steps, self.graph_steps, info["graph_sizes"],
                     self.eager_steps)
            _append_report(info)
        for s in self._wake_out + ([self._wake_in] if self._wake_in is not None else []):
            s.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    # ---- StepCoordinator ---------------------------------------------------------------------------
    def idle_timeout_s(self, core) -> float | None:
        # During a wave an idle rank must not block: the others wait for it in the next collective.
        return 0.0 if self.running else None

    def decide(self, core, scheduled) -> StepDecision:
        if self._forward_pending:
            self._record_step_time()
            self._after_forward()
        has_work = scheduled is not None and not scheduled.is_empty
        if not self.running:
            if has_work or scheduled is not None:
                self.running = True
                self._send_wake()
            elif self._take_wake():
                self.running = True
            else:
                return StepDecision(run_step=False)
        else:
            self._take_wake()  # drop duplicates of the current wave
        graph_sizes = self._graph_sizes(core)
        decode_only = has_work and scheduled.is_decode_only
        proposal = StepProposal(
            tokens=scheduled.num_tokens if has_work else self.dummy_tokens,
            graphable=bool(graph_sizes) and (decode_only or not has_work),   # a dummy batch replays too
            unfinished=not self._leaving and (scheduled is not None or core.has_unfinished()),
            prefill=has_work and not decode_only)
        shape = decide_shape(self._all_reduce_max(proposal.encode()), graph_sizes)
        if not shape.any_unfinished:
            self.running = False
            self.wave += 1
            return StepDecision(run_step=False)
        self.last_shape = shape
        # dual-batch overlap: every rank splits the same steps (model/ubatch.py)
        dbo_group = (max(shape.max_tokens, self.dummy_tokens), shape.decode_only)
        dbo = DBOConfig.from_args(core.args)
        self.split_steps += int(dbo.should_split(*dbo_group) if shape.eager
                                else dbo.should_split(shape.graph_size, True))
        if shape.eager:
            pad_to, dummy_tokens = None, self.dummy_tokens
            self.eager_steps += 1
            if self.dispatcher is not None:
                self.dispatcher.set_max_tokens_per_rank(max(shape.max_tokens, self.dummy_tokens))
        else:
            # every rank, dummy ones too, replays the graph of the agreed size
            pad_to = dummy_tokens = shape.graph_size
            self.graph_steps += 1
            self.graph_size_steps[shape.graph_size] = self.graph_size_steps.get(shape.graph_size, 0) + 1
            if self.dispatcher is not None:
                self.dispatcher.set_max_tokens_per_rank(shape.graph_size)
        dummy = not has_work
        for r in self.routers:
            r.dummy = dummy
        self._forward_pending = True
        self._step_started = time.perf_counter()
        self.steps += 1
        self.dummy_steps += int(dummy)
        # min cudagraph mode wins: one eager rank makes the step eager everywhere
        return StepDecision(run_step=scheduled is not None, pad_to=pad_to, dummy_batch=dummy_tokens,
                            use_graphs=not shape.eager, dbo_group=dbo_group)

    def leave_wave(self, core, timeout_s: float = 10.0) -> None:
        """On shutdown in the middle of a wave: keep joining the group's forwards with dummy batches
        (proposing "idle") until the group agrees the wave is over, so peers finish their step and see
        a clean end instead of a dead rank. Bounded; a peer that is gone ends it at once."""
        if self.group is None or not self.running:
            return
        self._leaving = True
        deadline = time.monotonic() + timeout_s
        try:
            while self.running and time.monotonic() < deadline:
                d = self.decide(core, None)
                if d.dummy_batch:
                    core.execute_dummy_batch(d.dummy_batch, use_graphs=d.use_graphs, dbo_group=d.dbo_group)
        except Exception as exc:  # noqa: BLE001 - a peer already left: nothing to wait for
            log.info("rank %d left the wave at shutdown: %s", self.group.rank, str(exc).splitlines()[0][:200])

    @staticmethod
    def _graph_sizes(core) -> list[int]:
        """Captured decode graph sizes (the same on every rank: build_ep_core checks); [] = eager only."""
        return core.graph_sizes()

    # ---- internals ---------------------------------------------------------------------------------
    def _record_step_time(self) -> None:
        shape = self.last_shape
        if shape is None:
            return
        kind = "prefill_or_mixed" if not shape.decode_only else "decode_eager" if shape.eager else "decode_graph"
        acc = self.step_time_s[kind]
        acc[0] += time.perf_counter() - self._step_started
        acc[1] += 1

    def _after_forward(self) -> None:
        """Runs at the top of the next iteration, on every rank at the same lockstep step."""
        self._forward_pending = False
        for r in self.routers:
            r.dummy = False
        if self.eplb is not None:
            try:
                self.eplb.step()
            except Exception as exc:  # noqa: BLE001
                raise EPGroupError(f"EPLB rebalance failed on rank {self.group.rank}: {exc}") from exc

    def explain_failure(self, exc: Exception) -> Exception:
        """A collective inside the forward (MoE dispatch/combine) failing means a peer rank is gone."""
        if isinstance(exc, EPGroupError) or not _is_collective_failure(exc):
            return exc
        return EPGroupError(
            f"DP lockstep: rank {self.group.rank} of {self.group.size} lost the EP group at wave {self.wave} "
            f"during a forward's MoE collective (a peer rank died or stopped responding): {exc}")

    def _all_reduce_max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group.cpu_group)
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError variants
            raise EPGroupError(
                f"DP lockstep: rank {self.group.rank} of {self.group.size} lost the EP group at wave {self.wave} "
                f"(a peer rank died or stopped responding within {self.group.timeout_s:.0f}s): {exc}") from exc
        return t.tolist()

    def _send_wake(self) -> None:
        import zmq

        msg = str(self.wave).encode()
        for s in self._wake_out:
            try:
                s.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("wake message to a peer rank dropped (peer not reading)")

    def _take_wake(self) -> bool:
        """Drain the wake socket; True if a peer started the current wave."""
        import zmq

        woke = False
        while self._wake_in is not None:
            try:
                w = int(self._wake_in.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            woke = woke or w == self.wave  # older waves are stale duplicates
        return woke


def _append_report(info: dict[str, Any]) -> None:
    """WIDEEP_LOCKSTEP_REPORT=<path>: one JSON line per rank at shutdown (observability for tests and runs)."""
    import json

    path = envs.WIDEEP_LOCKSTEP_REPORT
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(info) + "\n")


def _is_collective_failure(exc: Exception) -> bool:
    """gloo raises plain RuntimeErrors naming its transport; NCCL raises DistBackendError."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in text for m in ("gloo", "NCCL", "Connection reset", "Connection closed", "Socket Timeout"))
