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
