"""Expert placement for EPLB (docs/protocols.md, "MoE dispatch backends and EPLB"): which logical expert each physical slot holds.

Hierarchical when expert groups divide evenly over nodes (groups packed onto nodes first, so a
token's limited set of groups stays on few nodes), global otherwise. Pure function of the load
matrix: every rank computes the same plan from the same all-reduced load.
"""
from __future__ import annotations

import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's n items into num_packs packs of n/num_packs items with balanced weight sums.

    Greedy: heaviest item first, into the lightest pack that still has room.
    weight [rows, n] -> (pack_index [rows, n], rank_in_pack [rows, n]).
    """
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items cannot be split into {num_packs} equal packs")
    per_pack = n // num_packs
    if per_pack == 1:
        idx = torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
        return idx, torch.zeros_like(idx)
    pack_index = torch.empty((rows, n), dtype=torch.int64)
    rank_in_pack = torch.empty((rows, n), dtype=torch.int64)
    order = torch.sort(weight.float(), dim=-1, descending=True, stable=True).indices
    for r in range(rows):
        load = [0.0] * num_packs
        count = [0] * num_packs
        w = weight[r].tolist()
        for item in order[r].tolist():
            pack = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
            pack_index[r, item] = pack
            rank_in_pack[r, item] = count[pack]
            load[pack] += w[item]
            count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each of num_physical slots a logical expert: one each, then extra replicas to the expert
    with the highest load per replica.  weight [rows, n_logical] ->
    (phy2log [rows, num_physical], replica_rank [rows, num_physical], logcnt [rows, n_logical])."""
    rows, n_log = weight.shape
    if num_physical < n_log:
        raise ValueError(f"{num_physical} physical slots cannot hold {n_log} logical experts")
    phy2log = torch.arange(num_physical, dtype=torch.int64).expand(rows, -1).clone()
    replica_rank = torch.zeros((rows, num_physical), dtype=torch.int64)
    logcnt = torch.ones((rows, n_log), dtype=torch.int64)
    all_rows = torch.arange(rows)
    w = weight.float()
    for slot in range(n_log, num_physical):
        hottest = (w / logcnt).argmax(dim=-1)
        phy2log[:, slot] = hottest
        replica_rank[:, slot] = logcnt[all_rows, hottest]
        logcnt[all_rows, hottest] += 1
    return phy2log, replica_rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand(perm.shape[0], -1).contiguous())
    return inv


def rebalance_hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [layers, n_logical] -> (phy2log, replica_rank [layers, num_physical], logcnt [layers, n_logical])."""
    layers, n_log = weight.shape
    for what, num, den in (("logical experts", n_log, num_groups), ("expert groups", num_groups, num_nodes),
                           ("GPUs", num_gpus, num_nodes), ("physical experts", num_physical, num_gpus)):
        if num % den:
            raise ValueError(f"hierarchical EPLB: {what} ({num}) must divide evenly by {den}")
    group_size = n_log // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_physical // num_gpus
    log_per_node = n_log // num_nodes

    # 1. expert groups -> nodes; "mlog" numbering = logical experts renumbered node-major
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node (rows = layer × node)
    mlog_load = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. physical replicas -> GPUs of the node, equal count per GPU
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(phy_load, gpus_per_node)
    phy2slot = pack * phy_per_gpu + rank_in_pack
    slot2phy = _inverse(phy2slot)
    slot2mlog = phy2mlog.gather(-1, slot2phy)
    node_offset = torch.arange(0, n_log, log_per_node, dtype=torch.int64).view(1, -1, 1)
    slot2mlog = (slot2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog2log.gather(-1, slot2mlog)
    replica_rank = phy_rank.gather(-1, slot2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return phy2log, replica_rank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The EPLB entry point. weight [layers, n_logical] load per logical expert.

    Returns phy2log [layers, num_replicas], log2phy [layers, n_logical, max_replicas] (-1 padded),
    logcnt [layers, n_logical].
    """
    weight = weight.float().cpu()
    layers, n_log = weight.shape
    if num_groups >= 1 and n_log % num_groups == 0 and num_groups % num_nodes == 0:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_replicas = num_replicas - n_log + 1
    log2phy = torch.full((layers, n_log, max_replicas), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(-1, phy2log * max_replicas + rank,
                                     torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1).contiguous())
    return phy2log, log2phy, logcnt
