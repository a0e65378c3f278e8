"""Dispatch/combine backends over real gloo processes against a single-process reference MoE."""
from __future__ import annotations

import pytest
import torch

from wideep.parallel.launch import run_ranks
from wideep.parallel.backends import available_dispatchers, get_dispatcher

H, K, E = 16, 3, 8


def _problem(tokens_per_rank: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    x = torch.randn(total, H, generator=g)
    logits = torch.randn(total, E, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    experts = torch.randn(E, H, H, generator=g) / H ** 0.5
    return x, ids, w, experts


def _expert(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ w)


def _reference(x, ids, w, experts) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            out[t] += w[t, j] * _expert(x[t], experts[ids[t, j]])
    return out


def _grouped_gemm(result, experts, first) -> torch.Tensor:
    """The experts' rows before weighting (what the MoE layer computes between dispatch and combine): rows
    past the counts are padding."""
    y = torch.zeros_like(result.x)
    start = 0
    for i, n in enumerate(result.tokens_per_expert.tolist()):
        y[start:start + n] = _expert(result.x[start:start + n], experts[first + i])
        start += n
    return y


MODES = [("allgather_reducescatter", False), ("allgather_reducescatter", True), ("all_to_all", False)]


def _rank_fn(rank, world, port, tokens_per_rank):
    """All backend modes in one process group (process start-up dominates CI time)."""
    from wideep.parallel.config import ParallelConfig
    from wideep.parallel.dist import init_ep_group

    cfg = ParallelConfig(data_parallel_size=world, data_parallel_size_local=world, data_parallel_rank=rank,
                         data_parallel_rpc_port=port)
    init_ep_group(cfg, device="cpu", timeout_s=60)
    return {f"{b}/{s}": _one_backend(rank, world, b, tokens_per_rank, s) for b, s in MODES}


def _one_backend(rank, world, backend, tokens_per_rank, static):
    import torch.distributed as dist

    x, ids, w, experts = _problem(tokens_per_rank)
    lo = sum(tokens_per_rank[:rank])
    hi = lo + tokens_per_rank[rank]
    opts = {"static_shapes": True} if static else {}
    d = get_dispatcher(backend, E, ep_rank=rank, ep_size=world, **opts)
    outs = []
    for step in range(2):  # twice: the second call reuses nothing stale from the first
        if step == 1 and backend == "allgather_reducescatter":
            d.set_max_tokens_per_rank(max(tokens_per_rank) + 2)
        res = d.dispatch(x[lo:hi], ids[lo:hi], w[lo:hi])
        first, _ = d.local_expert_range
        y = _grouped_gemm(res, experts, first)
        out = d.combine(y * res.weights.unsqueeze(1), res)
        # the weight folded into the combine gives the same bits as weighting the rows first
        assert torch.equal(d.combine_weighted(y, res), out), (backend, static)
        # a fused shared expert's input: this rank's own tokens, then the same dispatched rows
        own = d.dispatch_with_own(x[lo:hi], ids[lo:hi], w[lo:hi])
        assert torch.equal(own.x[:hi - lo], x[lo:hi]) and torch.equal(own.x[hi - lo:], res.x), (backend, static)
        assert torch.equal(own.tokens_per_expert, res.tokens_per_expert) and torch.equal(own.weights, res.weights)
        assert torch.equal(d.combine_weighted(y, own), out), (backend, static)
        # their async forms (the MoE layer's path, split into micro-batches or not) give the same bits
        owna = d.dispatch_with_own_async(x[lo:hi], ids[lo:hi], w[lo:hi]).wait()
        assert torch.equal(owna.x, own.x) and torch.equal(owna.weights, own.weights), (backend, static)
        assert torch.equal(d.combine_weighted_async(y, owna).wait(), out), (backend, static)
        outs.append(out)
    dist.barrier()
    return [o.tolist() for o in outs]


@pytest.mark.parametrize("tokens_per_rank", [[5, 0, 3, 9], [4, 7]])
def test_backends_match_reference(tokens_per_rank):
    """Uneven T per rank (and a rank with T=0): every backend mode equals the single-process MoE."""
    world = len(tokens_per_rank)
    x, ids, w, experts = _problem(tokens_per_rank)
    ref = _reference(x, ids, w, experts)
    outs = run_ranks(_rank_fn, world, args=(tokens_per_rank,), timeout_s=120)
    for backend, static in MODES:
        lo = 0
        for rank, n in enumerate(tokens_per_rank):
            for got in outs[rank][f"{backend}/{static}"]:
                got = torch.tensor(got).reshape(n, H)
                torch.testing.assert_close(got, ref[lo:lo + n], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{backend} static={static} rank {rank}: {m}")
            lo += n


@pytest.mark.parametrize("backend", ["allgather_reducescatter", "all_to_all"])
def test_single_rank_backend_is_local_moe(backend):
    x, ids, w, experts = _problem([6])
    d = get_dispatcher(backend, E)
    res = d.dispatch(x, ids, w)
    assert int(res.tokens_per_expert.sum()) == 6 * K
    torch.testing.assert_close(d.combine_weighted(_grouped_gemm(res, experts, 0), res), _reference(x, ids, w, experts))


def test_registry_names_and_errors():
    from wideep.model.dispatch import MoEDispatcher
    from wideep.parallel.backends import register_dispatcher

    assert {"allgather_reducescatter", "all_to_all"} <= set(available_dispatchers())
    assert get_dispatcher("deepep_high_throughput", E).name == "all_to_all"
    assert get_dispatcher("deepep_low_latency", E).name == "allgather_reducescatter"
    with pytest.raises(ValueError, match="unknown all2all_backend 'nope'"):
        get_dispatcher("nope", E)
    with pytest.raises(ValueError, match="divisible by the EP size"):
        get_dispatcher("all_to_all", 10, ep_rank=0, ep_size=4)

    @register_dispatcher("test_custom")
    class Custom(MoEDispatcher):
        name = "test_custom"

    assert isinstance(get_dispatcher("test_custom", E), Custom)


def test_allgather_packed_rows_are_exact():
    """allgather_reducescatter's one-collective dispatch row: x bytes, int32 ids (-1 kept), fp32 weights."""
    from wideep.parallel.allgather_dispatch import pack_rows, unpack_rows

    torch.manual_seed(3)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    ids = torch.randint(-1, 255, (6, 4))
    for w in (torch.rand(6, 4), torch.rand(6, 4).to(torch.bfloat16)):
        packed = torch.cat([pack_rows(x, ids, w)] * 2)          # what a 2-rank all-gather returns
        gx, gi, gw = unpack_rows(packed, x, ids, w)
        assert gx.dtype == x.dtype and gi.dtype == ids.dtype and gw.dtype == w.dtype
        assert torch.equal(gx[6:], x) and torch.equal(gi[:6], ids) and torch.equal(gw[6:], w)
    with pytest.raises(ValueError, match="4-byte multiples"):
        unpack_rows(pack_rows(x[:, :3], ids, w), x[:, :3], ids, w)
