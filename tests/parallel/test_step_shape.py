"""Per-step agreement on a CUDA-graph size (or eager) across EP ranks, and the graph-mode dispatcher."""
from __future__ import annotations

import pytest
import torch

from wideep.parallel.graph_dispatch import DECODE_BACKEND_ENV, GraphModeDispatcher, make_graph_mode_dispatcher
from wideep.parallel.backends import get_dispatcher
from wideep.parallel.step_shape import StepProposal, agree, decide_shape

SIZES = [1, 2, 4, 8, 16]


def decode(n):
    return StepProposal(tokens=n, graphable=True)


def dummy():
    return StepProposal(tokens=1, graphable=True, unfinished=False)


def test_decode_ranks_agree_on_the_smallest_graph_covering_the_max():
    shape = agree([decode(3), decode(1), dummy()], SIZES)
    assert shape.graph_size == 4 and not shape.eager and shape.any_unfinished and shape.max_tokens == 3
    assert agree([decode(8), decode(2)], SIZES).graph_size == 8          # exact size
    assert agree([dummy(), decode(5)], SIZES).graph_size == 8


def test_idle_ranks_replay_the_agreed_graph_too():
    # dummy batches propose graphs; the group still replays the smallest graph
    shape = agree([dummy(), dummy(), decode(1)], SIZES)
    assert shape.graph_size == 1


def test_one_prefill_rank_makes_the_whole_step_eager():
    prefill = StepProposal(tokens=2, graphable=False)
    shape = agree([decode(3), prefill, dummy()], SIZES)
    assert shape.eager and shape.graph_size is None and shape.max_tokens == 3


def test_more_tokens_than_the_largest_graph_is_eager_everywhere():
    shape = agree([decode(17), decode(1)], SIZES)
    assert shape.eager and shape.max_tokens == 17


def test_no_graphs_means_eager():
    assert agree([decode(1), decode(1)], []).eager


def test_all_idle_ends_the_wave():
    assert not agree([dummy(), dummy()], SIZES).any_unfinished
    assert agree([dummy(), StepProposal(tokens=1, graphable=True, unfinished=True)], SIZES).any_unfinished


def test_the_encoded_max_reduce_is_what_each_rank_decides_from():
    props = [decode(3), StepProposal(tokens=40, graphable=False), dummy()]
    reduced = [max(col) for col in zip(*(p.encode() for p in props))]
    assert decide_shape(reduced, SIZES) == agree(props, SIZES)
    assert reduced == [1, 40, 1, 0]
    with pytest.raises(ValueError):
        agree([], SIZES)


def test_graph_mode_switches_backend_and_restores():
    d = make_graph_mode_dispatcher("all_to_all", 8)
    assert d.eager.name == "all_to_all" and d.graph.name == "allgather_reducescatter"
    assert d.active is d.eager
    d.set_max_tokens_per_rank(5)
    assert d.eager.max_tokens_per_rank == 5
    with d.graph_mode(4):
        assert d.active is d.graph and d.graph.static_shapes and d.graph.max_tokens_per_rank == 4
        assert d.graph_size == 4
    assert d.active is d.eager and d.graph_size is None
    assert not d.graph.static_shapes and d.graph.max_tokens_per_rank is None


def test_capturable_backend_is_shared_between_modes():
    d = make_graph_mode_dispatcher("allgather_reducescatter", 8)
    assert d.graph is d.eager
    d.set_max_tokens_per_rank(3)
    with d.graph_mode(8):
        assert d.eager.static_shapes and d.eager.max_tokens_per_rank == 8
    assert not d.eager.static_shapes and d.eager.max_tokens_per_rank == 3   # eager state comes back


def test_decode_backend_override_and_non_capturable_rejected(monkeypatch):
    monkeypatch.setenv(DECODE_BACKEND_ENV, "deepep_low_latency")   # alias of allgather_reducescatter
    d = make_graph_mode_dispatcher("deepep_high_throughput", 8)
    assert (d.eager.name, d.graph.name) == ("all_to_all", "allgather_reducescatter")
    with pytest.raises(ValueError, match="not CUDA-graph capturable"):
        GraphModeDispatcher(get_dispatcher("all_to_all", 8), get_dispatcher("all_to_all", 8))


def test_graph_mode_dispatch_equals_eager_single_rank():
    """Static-shape dispatch of a padded batch gives the real rows' eager result (EP=1 group)."""
    torch.manual_seed(0)
    d = make_graph_mode_dispatcher("all_to_all", 8)
    x = torch.randn(4, 16)
    ids = torch.randint(0, 8, (4, 2))
    w = torch.rand(4, 2)

    def run():
        r = d.dispatch(x, ids, w)
        y = r.x * 2.0 * r.weights[:, None]
        return d.combine(y, r)

    eager = run()
    with d.graph_mode(4):
        static = run()
    torch.testing.assert_close(static, eager)


def test_decode_only_flag_separates_eager_decode_from_prefill():
    assert agree([decode(2), decode(1)], []).decode_only            # eager (no graphs) but decode-only
    mixed = agree([decode(2), StepProposal(tokens=7, graphable=False, prefill=True)], SIZES)
    assert mixed.eager and not mixed.decode_only


def test_a_capture_failing_on_another_rank_fails_here_too(monkeypatch):
    """The first graph_mode(size) is the capture: its outcome is agreed across ranks (here: a peer failed)."""
    d = make_graph_mode_dispatcher("allgather_reducescatter", 8)
    votes = []
    monkeypatch.setattr(d, "_all_ok", lambda ok: votes.append(ok) or False)
    with pytest.raises(RuntimeError, match="failed on another EP rank"):
        with d.graph_mode(4):
            pass
    with d.graph_mode(4):      # a replay: no vote, no error
        pass
    with pytest.raises(ZeroDivisionError):   # this rank's own failure propagates as is (and is voted)
        with d.graph_mode(2):
            1 / 0
    assert votes == [True, False]
    assert d.active is d.eager and not d.eager.static_shapes


def test_padding_rows_of_a_graph_forward_skip_the_experts():
    torch.manual_seed(1)
    d = make_graph_mode_dispatcher("allgather_reducescatter", 8)
    x, ids, w = torch.randn(4, 16), torch.randint(0, 8, (4, 2)), torch.rand(4, 2)

    def run():
        r = d.dispatch(x, ids, w)
        return d.combine(r.x * r.weights[:, None], r), int(r.tokens_per_expert.sum())

    eager, n_eager = run()
    with d.graph_mode(4, num_real=2):
        padded, n_padded = run()
    assert n_eager == 8 and n_padded == 4            # 2 real rows × top-2
    torch.testing.assert_close(padded[:2], eager[:2])
    assert torch.count_nonzero(padded[2:]) == 0
    with d.graph_mode(4, num_real=0):                 # a dummy batch: nothing reaches an expert
        dummy, n_dummy = run()
    assert n_dummy == 0 and torch.count_nonzero(dummy) == 0
    with d.graph_mode(4):                             # the capture: every row is real
        full, _ = run()
    torch.testing.assert_close(full, eager)


def test_eplb_load_ignores_padding_rows_of_graph_forwards():
    from wideep.parallel.eplb import ExpertRouter, maps_from_phy2log

    d = make_graph_mode_dispatcher("allgather_reducescatter", 8)
    l2p, cnt = maps_from_phy2log(torch.arange(8), 8, 1)
    r = ExpertRouter(l2p, cnt, 8, salt=0, device=torch.device("cpu"))
    r.real_rows = d.real_rows
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    r(ids)                                   # eager: every row counts
    with d.graph_mode(3, num_real=1):
        r(ids)                               # graph forward with 2 padding rows: only row 0 counts
    assert r.load.tolist() == [0, 2, 2, 1, 1, 1, 1, 0]
