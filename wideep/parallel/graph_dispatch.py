"""Two MoE dispatch backends behind one: a graph backend for captured decode, the configured one otherwise.

vLLM-style split (docs/protocols.md, "MoE dispatch backends and EPLB"): decode steps replay CUDA graphs, which need a dispatcher with fixed
shapes and no host sync (DeepEP low-latency; here allgather_reducescatter in static-shape mode);
prefill and mixed steps run eagerly with the configured backend (DeepEP high-throughput; here
all_to_all, or allgather). The model runner enters `graph_mode(size)` around capturing (and
replaying) a graph of `size` tokens per rank; everything else goes to the eager backend.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from wideep import envs
from wideep.model.dispatch import DispatchResult, MoEDispatcher, Pending
from wideep.parallel.backends import ALIASES, get_dispatcher

log = logging.getLogger(__name__)

# Overrides the decode (CUDA-graph) backend; it must be graph capturable.
DECODE_BACKEND_ENV = "WIDEEP_DECODE_ALL2ALL_BACKEND"
DEFAULT_GRAPH_BACKEND = "allgather_reducescatter"


class GraphModeDispatcher(MoEDispatcher):
    graph_capturable = True

    def __init__(self, eager: MoEDispatcher, graph: MoEDispatcher, agree_group=None):
        if not graph.graph_capturable:
            raise ValueError(f"decode backend {graph.name!r} is not CUDA-graph capturable")
        if (eager.num_experts, eager.ep_rank, eager.ep_size) != (graph.num_experts, graph.ep_rank, graph.ep_size):
            raise ValueError("eager and graph dispatchers must cover the same experts and EP group")
        super().__init__(eager.num_experts, eager.ep_rank, eager.ep_size, eager.group)
        self.eager = eager
        self.graph = graph
        self.active: MoEDispatcher = eager
        self.graph_size: int | None = None
        # gloo group: the first graph_mode(size) of each size is a capture (the runner captures every
        # size once, on all ranks in the same order); its outcome is agreed so that one rank failing
        # makes every rank give up graphs at the same size instead of leaving peers in a collective
        self.agree_group = agree_group
        self._seen: set[int] = set()
        # rows [num_real, size) of a graph forward are padding (a smaller batch, or a dummy batch: 0):
        # their routing is dropped so they cost no expert compute, and dummy ranks do not pile their
        # identical padding tokens onto one rank's experts. A device scalar, set before each replay.
        self._num_real = 0
        self._real: torch.Tensor | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.eager.name} (eager) + {self.graph.name} (graphs)"

    def set_max_tokens_per_rank(self, n: int | None) -> None:
        self.max_tokens_per_rank = n
        if self.graph_size is None:
            self.eager.set_max_tokens_per_rank(n)

    @contextmanager
    def graph_mode(self, size: int, num_real: int | None = None) -> Iterator[None]:
        """Inside: every rank runs a forward of exactly `size` tokens through the static graph backend,
        of which the first `num_real` are real (None: all; the capture)."""
        g = self.graph
        self._num_real = size if num_real is None else num_real
        if self._real is not None:
            with torch.inference_mode():   # the engine runs (and created it) in inference mode
                self._real.fill_(self._num_real)
        saved = (g.static_shapes, g.max_tokens_per_rank, self.active)
        g.static_shapes = True
        g.set_max_tokens_per_rank(size)
        self.active, self.graph_size = g, size
        first, ok = size not in self._seen, True
        try:
            yield
        except BaseException:
            ok = False
            raise
        finally:
            g.static_shapes = saved[0]
            g.set_max_tokens_per_rank(saved[1])
            self.active, self.graph_size = saved[2], None
            if first:
                self._seen.add(size)
                if not self._all_ok(ok) and ok:
                    raise RuntimeError(f"CUDA graph capture of size {size} failed on another EP rank")

    def _all_ok(self, ok: bool) -> bool:
        if self.agree_group is None:
            return ok
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.agree_group)
        return int(t.item()) == 0

    def set_fp8_payload(self, enabled: bool) -> None:
        self.eager.set_fp8_payload(enabled)
        if self.graph is not self.eager:
            self.graph.set_fp8_payload(enabled)

    def set_ubatch(self, row_offset: int = 0, max_tokens: int | None = None, index: int = 0) -> None:
        super().set_ubatch(row_offset, max_tokens, index)
        self.eager.set_ubatch(row_offset, max_tokens, index)
        if self.graph is not self.eager:
            self.graph.set_ubatch(row_offset, max_tokens, index)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self.active.dispatch(x, self._drop_padding_rows(topk_ids), topk_weights)

    def dispatch_with_own(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self.active.dispatch_with_own(x, self._drop_padding_rows(topk_ids), topk_weights)

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        return self.active.dispatch_async(x, self._drop_padding_rows(topk_ids), topk_weights)

    def combine_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self.active.combine_async(y, result)

    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        return self.active.dispatch_with_own_async(x, self._drop_padding_rows(topk_ids), topk_weights)

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self.active.combine_weighted_async(y, result)

    def real_rows(self, num_rows: int, device: torch.device) -> torch.Tensor | None:
        """Inside graph_mode: bool [num_rows], True for real rows (read from a device scalar at replay)."""
        if self.graph_size is None:
            return None
        if self._real is None or self._real.device != device:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("graph_mode: run one forward before capturing (the padding-row count "
                                   "must live outside the graph)")
            with torch.inference_mode():
                self._real = torch.full((), self._num_real, dtype=torch.int64, device=device)
        # a micro-batch's rows start at ubatch_row_offset of the step's batch (dual-batch overlap)
        return torch.arange(self.ubatch_row_offset, self.ubatch_row_offset + num_rows, device=device) < self._real

    def _drop_padding_rows(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Inside graph_mode, the padding rows' ids set to -1 (routed nowhere); outside it, topk_ids."""
        real = self.real_rows(topk_ids.shape[0], topk_ids.device)
        if real is None:
            return topk_ids
        return torch.where(real.unsqueeze(1), topk_ids, torch.full_like(topk_ids, -1))

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return self.active.combine(y, result)

    def combine_weighted(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return self.active.combine_weighted(y, result)


def graph_backend_name(eager_backend: str, eager: MoEDispatcher | None = None) -> str:
    """The decode backend: $WIDEEP_DECODE_ALL2ALL_BACKEND, else the configured backend when it is
    graph capturable, else allgather_reducescatter."""
    forced = envs.WIDEEP_DECODE_ALL2ALL_BACKEND
    if forced:
        return ALIASES.get(forced, forced)
    if eager is not None and eager.graph_capturable:
        return ALIASES.get(eager_backend, eager_backend)
    return DEFAULT_GRAPH_BACKEND


def make_graph_mode_dispatcher(backend: str, num_experts: int, ep_rank: int = 0, ep_size: int = 1,
                               group=None, agree_group=None, decode_mode: str | None = "CUDA graph"
                               ) -> GraphModeDispatcher:
    """The configured backend for eager steps plus a capturable one for CUDA-graph decode; shares one
    instance when the configured backend is itself capturable. Logs the choice; `decode_mode` names how
    decode steps run ("CUDA graph", "static-shape" CPU stand-ins, or None: eagerly, like prefill)."""
    eager = get_dispatcher(backend, num_experts, ep_rank=ep_rank, ep_size=ep_size, group=group)
    gname = graph_backend_name(backend, eager)
    if gname == ALIASES.get(backend, backend):
        graph = eager
    else:
        graph = get_dispatcher(gname, num_experts, ep_rank=ep_rank, ep_size=ep_size, group=group)
    d = GraphModeDispatcher(eager, graph, agree_group=agree_group if ep_size > 1 else None)
    if ep_rank == 0 and decode_mode is None:
        log.info("EP MoE dispatch: backend %s (every step eager)", eager.name)
    elif ep_rank == 0:
        log.info("EP MoE dispatch: prefill/mixed (eager) backend %s, decode (%s) backend %s%s",
                 eager.name, decode_mode, graph.name,
                 f" (from ${DECODE_BACKEND_ENV})" if envs.WIDEEP_DECODE_ALL2ALL_BACKEND else
                 "" if graph is eager else f" ({eager.name} is not graph capturable)")
    return d
