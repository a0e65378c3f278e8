"""EPLB at serving time: route each token to one replica of its logical expert, record per-physical-expert
load over a sliding window, and every step_interval lockstep steps re-place experts and move their weights.

All ranks step in lockstep (DP coordinator), so they rebalance at the same step, from the same
all-reduced load, with the same deterministic algorithm (eplb_algo): the plan needs no broadcast.
Weights move rank-to-rank with batched point-to-point sends; a slot whose expert is already on its
rank copies locally.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from wideep import envs
from wideep.parallel.eplb_algo import rebalance_experts

log = logging.getLogger(__name__)


def check_eplb_sizes(num_logical: int, num_redundant: int, ep_size: int) -> int:
    """Number of physical experts; a clear error when they cannot be spread evenly over the EP ranks."""
    if num_redundant < 0:
        raise ValueError(f"eplb_config.num_redundant_experts must be >= 0 (got {num_redundant})")
    total = num_logical + num_redundant
    if total % ep_size:
        raise ValueError(
            f"EPLB: num_experts ({num_logical}) + eplb_config.num_redundant_experts ({num_redundant}) = {total} "
            f"must be divisible by the EP size (data_parallel_size={ep_size}); pick num_redundant_experts so that "
            f"the sum is a multiple of {ep_size}")
    return total


def initial_placement(num_logical: int, num_physical: int, num_layers: int) -> torch.Tensor:
    """Before any load is known: slot p holds logical expert p mod num_logical (redundant slots wrap)."""
    return (torch.arange(num_physical, dtype=torch.int64) % num_logical).expand(num_layers, -1).clone()


def maps_from_phy2log(phy2log: torch.Tensor, num_logical: int, max_replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [P] -> log2phy [num_logical, max_replicas] (-1 padded, slots in ascending order), logcnt [num_logical]."""
    log2phy = torch.full((num_logical, max_replicas), -1, dtype=torch.int64)
    logcnt = torch.zeros(num_logical, dtype=torch.int64)
    for p, e in enumerate(phy2log.tolist()):
        log2phy[e, logcnt[e]] = p
        logcnt[e] += 1
    return log2phy, logcnt


class ExpertRouter:
    """The MoE layer's `expert_map` hook: logical topk ids [T, K] -> physical slot ids [T, K].

    Replica choice is deterministic and spreads a logical expert's tokens evenly over its replicas
    (position-based round robin, offset by rank). In a dummy forward (DP lockstep) routing is random
    (VLLM_RANDOMIZE_DP_DUMMY_INPUTS): dummy tokens should load experts like real ones, not hammer one.
    """

    def __init__(self, log2phy: torch.Tensor, logcnt: torch.Tensor, num_physical: int, salt: int,
                 device: torch.device):
        self.log2phy = log2phy.to(device)
        self.logcnt = logcnt.to(device)
        self.num_physical = num_physical
        self.salt = salt
        self.load = torch.zeros(num_physical, dtype=torch.int64, device=device)
        self.record = True
        self.dummy = False
        # graph forwards: (num_rows, device) -> bool mask of real rows (None outside graphs), so padding
        # and dummy rows, whose routing the dispatcher drops, are not counted as expert load either
        self.real_rows: Callable[[int, torch.device], torch.Tensor | None] | None = None

    def __call__(self, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.dummy:
            return torch.randint(0, self.num_physical, topk_ids.shape, device=topk_ids.device)
        t, k = topk_ids.shape
        pick = (torch.arange(t * k, device=topk_ids.device).view(t, k) + self.salt) % self.logcnt[topk_ids]
        phys = self.log2phy[topk_ids, pick]
        if self.record:
            flat = phys.reshape(-1)
            real = self.real_rows(t, topk_ids.device) if self.real_rows is not None else None
            ones = torch.ones_like(flat) if real is None else real.unsqueeze(1).expand(t, k).reshape(-1).to(flat.dtype)
            self.load.scatter_add_(0, flat, ones)  # no bincount: keeps it graph-capturable
        return phys

    def set_maps(self, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        # in place: captured CUDA graphs keep pointing at these tensors
        self.log2phy.copy_(log2phy)
        self.logcnt.copy_(logcnt)


@dataclass
class RebalanceReport:
    step: int
    balancedness_before: float   # mean/max load per rank under the old placement (1.0 = perfect)
    balancedness_after: float    # the same load under the new placement
    moved_experts: int           # physical slots whose logical expert changed


def rank_load(phys_load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[layers, P] physical load -> [layers, ep_size] load per rank."""
    return phys_load.view(phys_load.shape[0], ep_size, -1).sum(-1)


def balancedness(phys_load: torch.Tensor, ep_size: int) -> float:
    per_rank = rank_load(phys_load.float(), ep_size)
    mx = per_rank.max(-1).values
    mean = per_rank.mean(-1)
    ok = mx > 0
    return float((mean[ok] / mx[ok]).mean()) if ok.any() else 1.0


def move_expert_weights(tensors: Sequence[torch.Tensor], old: list[int], new: list[int], ep_rank: int,
                        ep_size: int, group: Any = None) -> int:
    """Re-fill this rank's slots of stacked expert tensors ([L_local, ...] each) from placement old to new.

    Every rank walks all slots in the same order, so sends and receives pair up without negotiation.
    Returns how many of this rank's slots changed.
    """
    per_rank = len(old) // ep_size
    first_holder: dict[int, tuple[int, int]] = {}
    for p, e in enumerate(old):
        first_holder.setdefault(e, divmod(p, per_rank))
    ops: list[dist.P2POp] = []
    received: list[tuple[int, int, torch.Tensor]] = []
    local_dst: list[int] = []
    local_src: list[int] = []
    for p, e in enumerate(new):
        dst, dslot = divmod(p, per_rank)
        if old[p] == e:
            continue
        dst_old = old[dst * per_rank:(dst + 1) * per_rank]
        if e in dst_old:
            if dst == ep_rank:
                local_dst.append(dslot)
                local_src.append(dst_old.index(e))
            continue
        src, sslot = first_holder[e]
        for i, t in enumerate(tensors):
            tag = p * len(tensors) + i
            if src == ep_rank:
                ops.append(dist.P2POp(dist.isend, t[sslot].contiguous(), src_or_peer(dst, group), group=group,
                                      tag=tag))
            if dst == ep_rank:
                buf = torch.empty_like(t[dslot])
                ops.append(dist.P2POp(dist.irecv, buf, src_or_peer(src, group), group=group, tag=tag))
                received.append((dslot, i, buf))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    with torch.no_grad():
        if local_dst:
            for t in tensors:
                t[local_dst] = t[local_src]
        for dslot, i, buf in received:
            tensors[i][dslot].copy_(buf)
    return len(local_dst) + len({d for d, _, _ in received})


def _append_report(report: RebalanceReport, rank: int) -> None:
    """WIDEEP_EPLB_REPORT=<path>: append one JSON line per rebalance (observability for tests and runs)."""
    import json

    path = envs.WIDEEP_EPLB_REPORT
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"rank": rank, **report.__dict__}) + "\n")


def src_or_peer(group_rank: int, group: Any) -> int:
    """P2P ops take global ranks; the EP group is WORLD in wideep, but map through the group if not."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


class EplbState:
    """Owns the ExpertRouter of every MoE layer and the load window; step() once per lockstep forward."""

    def __init__(self, moe_layers: list[Any], num_logical: int, num_physical: int, ep_rank: int, ep_size: int,
                 window_size: int, step_interval: int, num_groups: int = 1, num_nodes: int = 1,
                 group: Any = None, device: torch.device | str = "cpu", phy2log: torch.Tensor | None = None,
                 record: bool = True):
        if window_size < 1 or step_interval < 1:
            raise ValueError(f"eplb_config.window_size and step_interval must be >= 1 "
                             f"(got {window_size}, {step_interval})")
        self.layers = moe_layers
        self.num_logical = num_logical
        self.num_physical = num_physical
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.window_size = window_size
        self.step_interval = step_interval
        self.num_groups = num_groups
        self.num_nodes = num_nodes
        self.group = group
        self.device = torch.device(device)
        self.max_replicas = num_physical - num_logical + 1
        self.phy2log = (phy2log if phy2log is not None
                        else initial_placement(num_logical, num_physical, len(moe_layers))).clone()
        self.routers: list[ExpertRouter] = []
        for i, layer in enumerate(moe_layers):
            l2p, cnt = maps_from_phy2log(self.phy2log[i], num_logical, self.max_replicas)
            r = ExpertRouter(l2p, cnt, num_physical, salt=ep_rank * 7919 + i, device=self.device)
            r.record = record
            layer.expert_map = r
            self.routers.append(r)
        self.window = torch.zeros((window_size, len(moe_layers), num_physical), dtype=torch.int64, device=self.device)
        self.steps = 0
        self.reports: list[RebalanceReport] = []

    def local_expert_ids(self, moe_position: int) -> list[int]:
        """Logical experts in this rank's physical slots (what load_model should load)."""
        per = self.num_physical // self.ep_size
        return self.phy2log[moe_position, self.ep_rank * per:(self.ep_rank + 1) * per].tolist()

    def step(self) -> RebalanceReport | None:
        """After every lockstep forward (real or dummy) on every rank: record, and rebalance on schedule."""
        if self.routers:
            self.window[self.steps % self.window_size] = torch.stack([r.load for r in self.routers])
            for r in self.routers:
                r.load.zero_()
        self.steps += 1
        if self.step_interval and self.steps % self.step_interval == 0:
            return self.rebalance()
        return None

    def global_load(self) -> torch.Tensor:
        load = self.window.sum(0)
        if self.ep_size > 1:
            dist.all_reduce(load, group=self.group)
        return load.cpu()

    @torch.no_grad()
    def rebalance(self) -> RebalanceReport:
        phys_load = self.global_load()                                              # [layers, P]
        logical = torch.zeros((len(self.routers), self.num_logical), dtype=torch.int64)
        logical.scatter_add_(1, self.phy2log, phys_load)
        new_phy2log, log2phy, logcnt = rebalance_experts(logical, self.num_physical, self.num_groups,
                                                         self.num_nodes, self.ep_size)
        before = balancedness(phys_load, self.ep_size)
        # the same logical load spread evenly over each expert's new replicas
        after = balancedness((logical.float() / logcnt).gather(1, new_phy2log), self.ep_size)
        moved = 0
        for i, layer in enumerate(self.layers):
            old, new = self.phy2log[i].tolist(), new_phy2log[i].tolist()
            if old != new:
                experts = layer.experts
                moved += move_expert_weights(experts.stacked_tensors(), old, new, self.ep_rank, self.ep_size,
                                             self.group)
                self.routers[i].set_maps(*maps_from_phy2log(new_phy2log[i], self.num_logical, self.max_replicas))
        self.phy2log = new_phy2log
        self.window.zero_()
        report = RebalanceReport(self.steps, before, after, moved)
        self.reports.append(report)
        _append_report(report, self.ep_rank)
        log.info("EPLB rebalance at step %d: balancedness %.3f -> %.3f, %d local slots refilled",
                 report.step, before, after, moved)
        return report
