"""benchmarks/rank.py --dbo on the CPU: the split step's outputs equal the unsplit step's, its stages are found
in the profile, and the overlap model's arithmetic on synthetic stage times (no timing asserted)."""
from __future__ import annotations

import pytest
import torch


def _stage(u, ms, kind=None, after=0.0):
    return {"ubatch": u, "ms": ms, "issues": [{"kind": kind, "after_ms": after}] if kind else []}


def test_overlap_model_hides_each_transfer_under_the_next_stage(rank):
    """One MoE layer: A's dispatch runs beside B's attention stage, B's beside A's experts stage, A's combine
    beside its own shared expert (after the issue) and B's experts stage, B's combine beside its shared expert
    and A's last stage; exposed = max(0, comm - that compute), summed."""
    stages = [_stage(0, 0.100, "dispatch"), _stage(1, 0.080, "dispatch"), _stage(0, 0.300, "combine", 0.050),
              _stage(1, 0.250, "combine", 0.040), _stage(0, 0.090), _stage(1, 0.010)]
    comm = {("dispatch", 0): 155.0, ("dispatch", 1): 155.0, ("combine", 0): 273.0, ("combine", 1): 273.0}
    m = rank.dbo_overlap(stages, comm)
    assert m["transfers"] == 4
    assert m["exposed_dispatch_ms"] == pytest.approx(0.155 - 0.080)            # B's stage too short; A's hides B's
    assert m["exposed_combine_ms"] == pytest.approx(0.273 - 0.040 - 0.090)     # A's fully hidden (0.05 + 0.25)
    assert m["comm_ms"] == pytest.approx(2 * 0.155 + 2 * 0.273)
    assert m["exposed_ms"] == pytest.approx(0.075 + 0.143)
    assert m["hidden_frac"] == pytest.approx(1 - 0.218 / 0.856)
    # long enough stages hide everything; no compute hides nothing
    assert rank.dbo_overlap([dict(s, ms=1.0) for s in stages], comm)["exposed_ms"] == 0.0
    bare = rank.dbo_overlap([dict(s, ms=0.0, issues=[dict(i, after_ms=0.0) for i in s["issues"]]) for s in stages], comm)
    assert bare["exposed_ms"] == pytest.approx(bare["comm_ms"])


def _x(name, cat, ts, dur, corr=None):
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 1}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_stage_times_place_kernels_by_their_launch(rank):
    """A kernel belongs to the stage in which it was launched (not when it ran); time after an issue mark is
    counted apart; before the first mark is the head, after the driver's reset mark the tail."""
    ev = [_x("cudaMemcpyAsync", "cuda_runtime", 5, 1, corr=1),
          _x("dbo::stage0", "user_annotation", 10, 0),
          _x("cudaLaunchKernel", "cuda_runtime", 12, 1, corr=2),
          _x("dbo::issue_dispatch", "user_annotation", 15, 0),
          _x("dbo::stage1", "user_annotation", 20, 0),
          _x("cuLaunchKernel", "cuda_driver", 22, 1, corr=3),
          _x("dbo::issue_combine", "user_annotation", 25, 0),
          _x("cudaLaunchKernel", "cuda_runtime", 27, 1, corr=4),
          _x("dbo::stage0", "user_annotation", 30, 0),     # the driver's reset: the tail follows
          _x("cudaLaunchKernel", "cuda_runtime", 32, 1, corr=5),
          _x("Memcpy HtoD", "gpu_memcpy", 100, 2000, corr=1),
          _x("k_attn", "kernel", 200, 300, corr=2),          # runs long after stage 1 began: still stage 0
          _x("k_experts", "kernel", 600, 500, corr=3),
          _x("k_shared", "kernel", 1200, 70, corr=4),
          _x("k_head", "kernel", 1300, 40, corr=5)]
    r = rank.dbo_stage_times(ev)
    assert [s["ubatch"] for s in r["stages"]] == [0, 1]
    a, b = r["stages"]
    assert a["ms"] == pytest.approx(0.300) and a["issues"] == [{"kind": "dispatch", "after_ms": 0.0}]
    assert b["ms"] == pytest.approx(0.570) and b["issues"] == [{"kind": "combine", "after_ms": pytest.approx(0.070)}]
    assert r["head_ms"] == pytest.approx(2.0) and r["tail_ms"] == pytest.approx(0.040)
    assert r["stage_sum_ms"] == pytest.approx(0.870)
    with pytest.raises(ValueError, match="split"):
        rank.dbo_stage_times([e for e in ev if not e["name"].startswith("dbo::stage")])


def test_emulated_dispatcher_async_equals_sync(rank):
    x = torch.randn(10, 8)
    ids = torch.zeros(10, 4, dtype=torch.long)
    w = torch.rand(10, 4)
    d = rank.EmulatedEPDispatcher(64, 16, 4)
    r, ra = d.dispatch(x, ids, w), d.dispatch_async(x, ids, w).wait()
    assert torch.equal(r.x, ra.x) and torch.equal(r.weights, ra.weights)
    assert torch.equal(r.tokens_per_expert, ra.tokens_per_expert)
    y = r.x * r.weights[:, None]
    assert torch.equal(d.combine(y, r), d.combine_async(y, ra).wait())
    # the fused shared expert's forms (the MoE layer's path, split or not)
    own, owna = d.dispatch_with_own(x, ids, w), d.dispatch_with_own_async(x, ids, w).wait()
    assert torch.equal(own.x, owna.x) and torch.equal(owna.x, torch.cat([x, r.x]))
    assert torch.equal(d.combine_weighted(r.x, r), d.combine_weighted_async(r.x, owna).wait())


def test_tiny_rank_dbo_split_equals_unsplit(rank):
    """The tiny rank on the CPU at B=40 (> the decode threshold 32): the engine splits the step into 20 + 20,
    the greedy tokens and hidden states equal the unsplit step's bit for bit, each micro-batch runs the unsplit
    step's kernels, every stage of both micro-batches is found
    (2 MoE layers: 2 x (2 x 2 + 1) stages, one dispatch and one combine per micro-batch and layer), and the
    published EP16 comm is modeled over them."""
    rep = rank.main(["--size", "tiny", "--device", "cpu", "--layers", "3", "--ep", "16", "--batch", "40", "8",
                     "--ctx", "20", "--prefill-tokens", "0", "--iters", "1", "--engine-steps", "2",
                     "--no-baseline", "--dbo"])
    by_b = {d["B"]: d for d in rep["runs"]["fp8"]["decode"]}
    assert by_b[8]["dbo"] == {"B": 8, "ctx": 20, "split": False, "why": "B=8 <= the decode threshold 32"}
    res = by_b[40]["dbo"]
    assert res["split"] and res["graph_split"] and res["ubatch_tokens"] == [20, 20], res.get("error")
    # no graphs on a CPU: every step ran eagerly and split (the compared step, 2 warm-up + 1 timed, the
    # profiled step and its warm-up)
    assert res["eager_split_steps"] == 6
    c = res["compare"]
    assert c["finite"] and c["greedy_tokens_equal"] == 40 and c["rows_bit_equal"] == 40 and c["unsplit_repeat_bit_equal"]
    st = res["stages"]
    assert [s["ubatch"] for s in st] == [0, 1] * 5
    kinds = [[i["kind"] for i in s["issues"]] for s in st]
    assert kinds == [["dispatch"], ["dispatch"], ["combine"], ["combine"]] * 2 + [[], []]
    assert sum(s["ms"] for s in st) + res["head_ms"] + res["tail_ms"] == pytest.approx(res["step_gpu_ms"])
    assert sum(res["phases_ms"].values()) == pytest.approx(res["step_gpu_ms"])
    # each micro-batch does the unsplit step's work in the MoE layers: there every phase has exactly twice its
    # launches (fused add + norms, the shared expert inside the routed grouped MLP, the weight inside the
    # combine); the dense prefix layer (tiny: 1 of 3) runs once on the whole batch
    n = {p: (res["unsplit"]["launches"][p], res["launches"][p]) for p in res["launches"]}
    for phase in ("router", "dispatch_combine_glue", "routed_experts"):
        assert n[phase][1] == 2 * n[phase][0] > 0, phase
    assert n["dense_mlp"][1] == n["dense_mlp"][0] > 0
    assert 3 * n["attention_proj"][1] == (1 + 2 * 2) * n["attention_proj"][0] > 0   # the same launches per layer
    assert n["norms_residual"][0] < n["norms_residual"][1] < 2 * n["norms_residual"][0]
    assert res["launches"]["shared_expert"] == res["unsplit"]["launches"]["shared_expert"] == 0
    m = res["overlap"]
    d16, c16 = rank.DEEPEP_LL_US[16]
    assert m["transfers"] == 8 and m["comm_ms"] == pytest.approx(2 * 2 * (d16 + c16) * 20 / 128 / 1e3)
    assert m["comm_ms"] == pytest.approx(by_b[40]["comm_ms"])   # linear: the two halves add up to the whole
    assert 0 <= m["exposed_ms"] <= m["comm_ms"]
    assert m["slowdown_ms"] == pytest.approx(res["step_ms"] * rank.COMM_SLOWDOWN)
    assert res["step_overlapped_ms"] == pytest.approx(res["step_ms"] + m["slowdown_ms"] + m["exposed_ms"])
    assert res["unsplit"]["tok_s_gpu_comm_unoverlapped"] == by_b[40]["tok_s_gpu_comm_unoverlapped"]
    e = res["engine_async"]   # the split step in the engine loop (async scheduling), the same comm modeled
    assert e["async_scheduling"] and e["steps"] == 2 and e["eager_split_steps"] >= 2 + rank.ENGINE_WARMUP
    assert e["step_overlapped_ms"] == pytest.approx(e["step_ms"] * (1 + rank.COMM_SLOWDOWN) + m["exposed_ms"])
