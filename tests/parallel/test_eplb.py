"""EPLB placement algorithm, routing hook and weight movement (the latter over real gloo processes)."""
from __future__ import annotations

import pytest
import torch

from wideep.parallel.eplb import (ExpertRouter, balancedness, check_eplb_sizes, maps_from_phy2log,
                                  move_expert_weights)
from wideep.parallel.eplb_algo import balanced_packing, rebalance_experts, replicate_experts
from wideep.parallel.launch import run_ranks


def _skewed(layers=3, n_log=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a few hot experts: heavy-tailed load
    return (torch.rand(layers, n_log, generator=g) ** 6 * 1000).round() + 1


@pytest.mark.parametrize("num_groups,num_nodes,num_gpus,num_phy", [(4, 2, 4, 20), (4, 1, 4, 16), (3, 2, 4, 24),
                                                                   (8, 4, 8, 24)])
def test_rebalance_places_every_expert_and_counts_add_up(num_groups, num_nodes, num_gpus, num_phy):
    n_log = 24 if num_groups in (3, 8) else 16
    w = _skewed(n_log=n_log)
    phy2log, log2phy, logcnt = rebalance_experts(w, num_phy, num_groups, num_nodes, num_gpus)
    layers = w.shape[0]
    assert phy2log.shape == (layers, num_phy)
    assert log2phy.shape == (layers, n_log, num_phy - n_log + 1)
    for layer in range(layers):
        # every logical expert is placed, and its count matches the physical slots holding it
        counts = torch.bincount(phy2log[layer], minlength=n_log)
        assert (counts >= 1).all()
        assert torch.equal(counts, logcnt[layer])
        assert int(logcnt[layer].sum()) == num_phy
        for e in range(n_log):
            slots = [p for p in log2phy[layer, e].tolist() if p >= 0]
            assert len(slots) == int(logcnt[layer, e])
            assert all(int(phy2log[layer, p]) == e for p in slots)


def test_hierarchical_keeps_expert_groups_on_one_node():
    n_log, num_groups, num_nodes, num_gpus, num_phy = 16, 4, 2, 4, 24
    w = _skewed(n_log=n_log, seed=3)
    phy2log, _, _ = rebalance_experts(w, num_phy, num_groups, num_nodes, num_gpus)
    group_size = n_log // num_groups
    per_node = num_phy // num_nodes
    for layer in range(w.shape[0]):
        node_of_group: dict[int, int] = {}
        for p, e in enumerate(phy2log[layer].tolist()):
            node = p // per_node
            assert node_of_group.setdefault(e // group_size, node) == node, "expert group split across nodes"
        # groups are shared out equally between nodes
        assert sorted(node_of_group.values()).count(0) == num_groups // num_nodes


def test_rebalance_improves_max_over_mean_on_skewed_load():
    n_log, ep, num_phy = 16, 4, 20
    w = _skewed(layers=4, n_log=n_log, seed=1)
    # before: default placement, rank r holds experts r*4..r*4+3
    before = balancedness(w, ep)
    phy2log, _, logcnt = rebalance_experts(w, num_phy, 4, 1, ep)
    after = balancedness((w / logcnt).gather(1, phy2log), ep)
    assert after > before
    assert after > 0.8


def test_packing_and_replication_basics():
    w = torch.tensor([[9.0, 1, 1, 1, 8, 2]])
    pack, rank = balanced_packing(w, 2)
    assert sorted(pack[0].tolist()) == [0, 0, 0, 1, 1, 1]
    loads = [sum(w[0, i].item() for i in range(6) if pack[0, i] == p) for p in range(2)]
    assert abs(loads[0] - loads[1]) <= 2
    phy2log, rk, cnt = replicate_experts(torch.tensor([[10.0, 1, 1]]), 5)
    assert cnt[0].tolist() == [3, 1, 1] and phy2log[0].tolist() == [0, 1, 2, 0, 0] and rk[0].tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="equal packs"):
        balanced_packing(torch.ones(1, 5), 2)


def test_eplb_size_check_is_clear():
    assert check_eplb_sizes(256, 32, 16) == 288
    with pytest.raises(ValueError, match=r"num_redundant_experts \(3\) = 11 must be divisible by the EP size"):
        check_eplb_sizes(8, 3, 2)


def test_router_maps_to_replicas_and_records_load():
    phy2log = torch.tensor([0, 1, 2, 3, 0, 0])   # expert 0 has three replicas
    l2p, cnt = maps_from_phy2log(phy2log, 4, 3)
    r = ExpertRouter(l2p, cnt, 6, salt=0, device=torch.device("cpu"))
    ids = torch.tensor([[0, 1], [0, 2], [0, 3]])
    phys = r(ids)
    assert torch.equal(phy2log[phys], ids)                       # every token lands on a replica of its expert
    assert len(set(phys[:, 0].tolist())) == 3                    # ... spread over the replicas
    assert int(r.load.sum()) == 6 and r.load.tolist() == torch.bincount(phys.flatten(), minlength=6).tolist()
    r.dummy = True
    assert r(ids).max() < 6


def _move_fn(rank, world, port, old, new):
    from wideep.parallel.config import ParallelConfig
    from wideep.parallel.dist import init_ep_group

    init_ep_group(ParallelConfig(data_parallel_size=world, data_parallel_size_local=world, data_parallel_rank=rank,
                                 data_parallel_rpc_port=port), device="cpu", timeout_s=60)
    per = len(old) // world
    # a recognizable "weight" per logical expert: w[e] is filled with e
    w13 = torch.stack([torch.full((3, 2), float(e)) for e in old[rank * per:(rank + 1) * per]])
    w2 = torch.stack([torch.full((2,), 10.0 + e) for e in old[rank * per:(rank + 1) * per]])
    move_expert_weights([w13, w2], old, new, rank, world)
    return w13[:, 0, 0].tolist(), w2[:, 0].tolist()


def test_move_expert_weights_between_ranks():
    old = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    new = [5, 0, 0, 1, 7, 2, 6, 3, 0, 4, 4, 1]
    outs = run_ranks(_move_fn, 4, args=(old, new), timeout_s=120)
    got = [e for w13, _ in outs for e in w13]
    assert got == [float(e) for e in new]
    assert [e for _, w2 in outs for e in w2] == [10.0 + e for e in new]
