"""benchmarks/ep_overlap_check.py's accounting of a profiled step: which device work is communication,
and how much of it no compute kernel overlaps (the exposed part DBO has to hide)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ep_overlap_check", ROOT / "benchmarks" / "ep_overlap_check.py")
eoc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eoc)


def _ev(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_comm_is_transfer_work_by_name_and_exposed_is_what_compute_does_not_cover():
    events = [_ev("gemm", 0, 100), _ev("_gather_sum_kernel", 150, 50),            # compute (glue too)
              _ev("ncclDevKernel_AllGather_RING_LL", 90, 40),                       # 30 us exposed
              _ev("c10d::symmetric_memory::barrier_kernel", 180, 40),              # 20 us exposed
              _ev("Memcpy PtoP (Device -> Device)", 300, 10, cat="gpu_memcpy"),    # 10 us exposed
              _ev("ncclDevKernel_ReduceScatter", 10, 20)]                           # hidden
    r = eoc.kernel_overlap(events, replays=2)
    assert r["comm_events_per_step"] == 2.0 and r["memcpy_per_step"] == 0.5
    assert abs(r["comm_ms"] - 0.11 / 2) < 1e-12
    assert abs(r["exposed_comm_ms"] - 0.06 / 2) < 1e-12
    assert abs(r["compute_ms"] - 0.15 / 2) < 1e-12


def test_a_local_copy_is_comm_only_where_the_backend_transfers_by_copies():
    """symm_mem_ll writes its own slot with a device-to-device copy; allgather_reducescatter's only copies are
    the compute path's own. A peer-to-peer copy is a transfer either way."""
    dtod, ptop = (_ev(f"Memcpy {k} (Device -> Device)", 0, 10, cat="gpu_memcpy") for k in ("DtoD", "PtoP"))
    assert eoc.is_comm_event(dtod) and eoc.is_comm_event(ptop)
    assert not eoc.is_comm_event(dtod, copies_are_comm=False) and eoc.is_comm_event(ptop, copies_are_comm=False)
    events = [dtod, _ev("gemm", 20, 10)]
    assert eoc.kernel_overlap(events, 1, copies_are_comm=False)["exposed_comm_ms"] == 0.0
    assert abs(eoc.kernel_overlap(events, 1)["exposed_comm_ms"] - 0.01) < 1e-12


def test_overlapping_comm_intervals_count_once():
    events = [_ev("ncclA", 0, 50), _ev("ncclB", 25, 50), _ev("mm", 60, 100)]
    r = eoc.kernel_overlap(events, replays=1)
    assert abs(r["comm_ms"] - 0.075) < 1e-12 and abs(r["exposed_comm_ms"] - 0.06) < 1e-12


def test_each_replay_is_accounted_apart_and_the_median_drops_a_late_peer():
    """Replays are the runs between idle gaps (the host barrier before each); one replay whose peer started late
    (a long exposed wait) moves the mean, not the median."""
    events = []
    for i, wait in enumerate((10, 12, 400, 11)):
        t = i * 5_000
        events += [_ev("gemm", t, 100), _ev("c10d::symmetric_memory::barrier_kernel", t + 100, wait),
                   _ev("gemm", t + 100 + wait, 50)]
    r = eoc.kernel_overlap(events, replays=4)
    assert [round(x * 1e3, 6) for x in r["exposed_comm_ms_per_replay"]] == [10, 12, 400, 11]
    assert abs(r["exposed_comm_ms_median"] - 0.0115) < 1e-12
    assert abs(r["exposed_comm_ms"] - 0.433 / 4) < 1e-12                               # the mean over all four
    assert eoc.kernel_overlap(events, replays=3)["exposed_comm_ms_per_replay"] == []   # runs != replays: no split


def test_summary_sums_both_ranks_with_and_without_dbo():
    def rank(no, yes, no_med, yes_med):
        return {"dbo": [{"comm": True, "dbo": d, "experts_per_gpu": 8, "backend": "symm_mem_ll", "step_ms": 1.0,
                         "profile": {"exposed_comm_ms": x, "exposed_comm_ms_median": m}}
                        for d, x, m in ((False, no, no_med), (True, yes, yes_med))]
                + [{"comm": False, "dbo": True, "experts_per_gpu": 8, "backend": "symm_mem_ll", "step_ms": 1.0,
                    "profile": {"exposed_comm_ms": 9.0}}]}
    (row,) = eoc.dbo_summary([rank(0.3, 0.1, 0.3, 0.06), rank(0.2, 0.1, 0.2, 0.04)])
    assert row["hidden"] == 0.6 and row["hidden_median_replay"] == 0.8


def test_summary_step_cost_is_real_minus_twin_over_both_ranks():
    """hidden_step = 1 - sum(real - twin, DBO) / sum(real - twin, no DBO): what comm adds to the step."""
    def rank(real_no, real_yes, twin_no, twin_yes):
        rows = [{"comm": True, "dbo": d, "experts_per_gpu": 8, "backend": "allgather_reducescatter", "step_ms": x,
                 "profile": {"exposed_comm_ms": 0.5 if not d else 0.2}} for d, x in ((False, real_no), (True, real_yes))]
        return {"dbo": rows + [{"comm": False, "dbo": d, "experts_per_gpu": 8, "backend": "allgather_reducescatter",
                                "step_ms": x, "delays": {"wait_ms": 0.01 if d else 0.5, "slowdown_ms": 0.1}}
                               for d, x in ((False, twin_no), (True, twin_yes))]}
    (row,) = eoc.dbo_summary([rank(7.5, 10.1, 7.0, 10.0), rank(7.7, 10.2, 7.2, 10.0)])
    assert row["hidden"] == 0.6 and row["hidden_step"] == 0.7          # (0.1 + 0.2) / (0.5 + 0.5)
    assert row["hidden_wait"] == 0.98 and row["slowdown_ms"] == [0.2, 0.2]
    assert row["twin_step_ms"] == [[7.0, 7.2], [10.0, 10.0]] and row["step_ms"] == [[7.5, 7.7], [10.1, 10.2]]
    (no_twin,) = eoc.dbo_summary([{"dbo": rank(7.5, 10.1, 7.0, 10.0)["dbo"][:2]}])
    assert "hidden_step" not in no_twin and "twin_step_ms" not in no_twin


def test_the_twin_replays_each_recorded_collective_in_call_order_and_restores_them(monkeypatch):
    import torch

    from wideep.parallel import _comm

    def fake(x, world, group=None, async_op=False):
        out = x * world
        return (out, None) if async_op else out
    monkeypatch.setattr(_comm, "all_gather_rows", fake)
    monkeypatch.setattr(_comm, "reduce_scatter_rows", fake)
    saved: list = []
    with eoc._transfers(None, saved, replay=False):
        _comm.all_gather_rows(torch.ones(2), 2, async_op=True)
        _comm.reduce_scatter_rows(torch.ones(2), 3)
    assert [t.tolist() for t in saved] == [[2.0, 2.0], [3.0, 3.0]]
    with eoc._transfers(None, saved, replay=True):
        got = [_comm.all_gather_rows(torch.zeros(2), 2, async_op=True), _comm.reduce_scatter_rows(torch.zeros(2), 3),
               _comm.all_gather_rows(torch.zeros(2), 2)]
    out, work = got[0]
    assert out.tolist() == [2.0, 2.0] and work.wait() is None and out.data_ptr() != saved[0].data_ptr()
    assert got[1].tolist() == [3.0, 3.0] and got[2].tolist() == [2.0, 2.0]      # the next step starts over
    assert _comm.all_gather_rows is fake and _comm.reduce_scatter_rows is fake


def test_twin_delays_split_what_comm_costs_into_waiting_and_slower_compute():
    """Per replay, the real step's compute kernels against the twin's: a longer gap before a kernel is waiting
    for a transfer, a longer kernel is compute slowed beside one; transfers and copies are left out."""
    def replay(t, wait, slow, comm):
        ev = [_ev("attn", t, 100), _ev("experts", t + 100 + wait, 50 + slow), _ev("norm", t + 160 + wait + slow, 10)]
        return ev + ([_ev("ncclDevKernel_AllGather", t + 100, 40 + wait)] if comm
                     else [_ev("Memcpy DtoD (Device -> Device)", t + 100, 2, cat="gpu_memcpy")])
    real = replay(0, 30, 4, True) + replay(10_000, 10, 6, True)
    twin = replay(0, 0, 0, False) + replay(10_000, 0, 0, False)
    d = eoc.twin_delays(real, twin, replays=2)
    assert d["compute_kernels"] == 3
    assert abs(d["wait_ms"] - 0.020) < 1e-12 and abs(d["slowdown_ms"] - 0.005) < 1e-12
    other = [dict(e, name="gemm") if e["name"] == "norm" else e for e in twin]
    assert "error" in eoc.twin_delays(real, other, replays=2)         # not the same kernels: no alignment
    assert "error" in eoc.twin_delays(real, twin, replays=3)          # replays not told apart


def test_the_twin_of_symm_mem_ll_replays_what_landed_in_the_receive_buffer():
    """symm_mem_ll's transfer (_send: peer writes + barrier) is recorded as what landed in this rank's buffer,
    then replayed as a local copy of it, without the peer writes; the class's _send is back afterwards."""
    import torch

    from wideep.parallel.symm_dispatch import SymmMemDispatcher

    class Slot:
        rows, out = torch.zeros(2, 4, 3), torch.zeros(2, 4, 5)

        def buffer(self, which):
            return (self.rows, self.out)[which]
    d, slot, sent = object.__new__(SymmMemDispatcher), Slot(), []

    def arrive(slot, which, rows_for, bound, channel):   # the peers' rows land (stands in for the transfer)
        sent.append(which)
        slot.buffer(which)[:, :bound] = rows_for(0) + 1
    d._send = arrive
    saved: list = []
    with eoc._transfers(d, saved, replay=False):
        d._send(slot, 0, lambda p: torch.full((2, 3), 2.0), 2, 0)
        d._send(slot, 1, lambda p: torch.full((3, 5), 4.0), 3, 1)
    assert sent == [0, 1] and [tuple(t.shape) for t in saved] == [(2, 2, 3), (2, 3, 5)]
    d._send = arrive
    slot.rows.zero_(), slot.out.zero_()
    with eoc._transfers(d, saved, replay=True):
        d._send(slot, 0, lambda p: torch.zeros(2, 3), 2, 0)
        d._send(slot, 1, lambda p: torch.zeros(3, 5), 3, 1)
    assert sent == [0, 1]                                       # nothing sent while replaying
    assert (slot.rows[:, :2] == 3).all() and (slot.rows[:, 2:] == 0).all() and (slot.out[:, :3] == 5).all()
    assert d._send.__func__ is SymmMemDispatcher._send
