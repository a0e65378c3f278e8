"""benchmarks/rank.py at tiny size on the CPU: the engine-driven rank, the emulated dispatcher, the phase
breakdown, the engine loop's steady state (sync and async scheduling), the plain-torch baseline and the
communication columns all run and report (no timing asserted)."""
from __future__ import annotations

import json

import pytest
import torch


def test_tiny_rank_smoke(rank, tmp_path):
    out = tmp_path / "r.json"
    rep = rank.main(["--size", "tiny", "--device", "cpu", "--layers", "2", "--ep", "4", "--batch", "3",
                     "--ctx", "20", "--prefill-tokens", "24", "--prefill-seq-len", "12", "--iters", "1",
                     "--engine-steps", "3", "--json", str(out)])
    assert json.loads(out.read_text())["ep"] == 4
    run = rep["runs"]["fp8"]
    assert run["local_experts"] == 4 and run["load_factor"] == 1.0
    (d,) = run["decode"]
    assert d["B"] == 3 and d["tok_s_gpu"] > 0 and d["step_ms"] > 0
    # the engine loop's steady state, synchronous and with async scheduling: every timed step reports one
    # token per sequence (async: the previous step's), and the sequences' blocks come back afterwards
    for mode, e in d["engine"].items():
        assert e["async_scheduling"] == (mode == "async") and e["steps"] == 3
        assert e["step_ms"] > 0 and e["tok_s_gpu"] == pytest.approx(3 / (e["step_ms"] / 1e3))
        assert e["tokens_per_step"] == 3 and e["blocks_returned"] and not e["unfinished"]
    for res in (d, run["prefill"]):
        ph = res["phases_ms"]
        assert tuple(ph) == rank.PHASES and set(res["roofline_ms"]) == set(rank.PHASES)
        assert all(v >= 0 for v in ph.values())
        assert sum(ph.values()) == pytest.approx(res["step_gpu_ms"])
        for p in ("attention_proj", "norms_residual", "router", "dispatch_combine_glue", "routed_experts",
                  "dense_mlp", "lm_head_sampling"):
            assert ph[p] > 0 and res["launches"][p] > 0, p
        # the shared expert runs inside the routed grouped MLP (its floor counted there)
        assert ph["shared_expert"] == 0 and res["launches"]["shared_expert"] == 0
        assert res["roofline_ms"]["shared_expert"] == 0
        assert set(res["floor_ms"]) == set(rank.PHASES)   # NaN on a CPU: no launch floor measured there
    assert "tok_s_gpu_comm_unoverlapped" not in d  # no published LL figure for EP=4
    p = run["prefill"]
    assert p["tokens"] == 24 and p["seqs"] == 2 and p["tok_s_gpu_comm_overlapped"] >= p["tok_s_gpu_comm_unoverlapped"]
    (b,) = rep["plain_torch"]
    assert b["tok_s_gpu"] > 0


def test_emulated_dispatcher_delivers_uniform_and_zipf_rows(rank):
    x = torch.randn(10, 8)
    ids = torch.zeros(10, 4, dtype=torch.long)
    w = torch.rand(10, 4)
    uni = rank.EmulatedEPDispatcher(64, 16, 4)
    r = uni.dispatch(x, ids, w)
    assert r.tokens_per_expert.tolist() == [10, 10, 10, 10]  # 10 tokens x 4 slots over 4 local experts
    own = uni.dispatch_with_own(x, ids, w)   # the rank's own tokens first (the fused shared expert's rows)
    assert torch.equal(own.x, torch.cat([x, r.x])) and torch.equal(own.weights, r.weights)
    y = uni.combine(r.x * r.weights[:, None], r)
    torch.testing.assert_close(y, x * w.sum(1, keepdim=True))  # every slot came back with its weight
    zipf = rank.EmulatedEPDispatcher(64, 16, 4, routing="zipf", zipf_s=1.0)
    assert zipf.load_factor > 1.0  # rank 0 holds the hottest expert
    rz = zipf.dispatch(x, ids, w)
    counts = rz.tokens_per_expert.tolist()
    assert sum(counts) == round(40 * zipf.load_factor) and counts[0] == max(counts)


def _x(name, cat, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_attribute_trace_gives_every_kernel_one_phase(rank):
    """Nested ranges: a kernel belongs to the innermost range around its launch (Triton launches through
    the driver API), attention kernels go by name, a kernel without a known launch is 'other'; the phases
    add up to the device total."""
    ev = [
        _x("phase::step", "user_annotation", 0, 1000),
        _x("phase::layer", "user_annotation", 10, 800),
        _x("phase::attention", "user_annotation", 20, 300),
        _x("phase::norm", "user_annotation", 30, 20),
        _x("phase::moe", "user_annotation", 400, 400),
        _x("phase::router", "user_annotation", 410, 50),
        _x("phase::routed_experts", "user_annotation", 500, 100),
        _x("cudaLaunchKernel", "cuda_runtime", 35, 2, corr=1),        # in norm, inside attention
        _x("cudaLaunchKernel", "cuda_runtime", 60, 2, corr=2),        # attention projection
        _x("cuLaunchKernel", "cuda_driver", 100, 2, corr=3),          # Triton MLA kernel
        _x("cuLaunchKernel", "cuda_driver", 120, 2, corr=4),          # fused rope + cache write
        _x("cuLaunchKernel", "cuda_driver", 420, 2, corr=5),          # Triton router
        _x("cudaLaunchKernel", "cuda_runtime", 470, 2, corr=6),       # moe glue (after router ended)
        _x("cudaLaunchKernel", "cuda_runtime", 550, 2, corr=7),       # grouped GEMM
        _x("cudaLaunchKernel", "cuda_runtime", 900, 2, corr=8),       # step only: other
        _x("cudaMemcpyAsync", "cuda_runtime", 1500, 2, corr=9),       # outside every range
        _x("rms", "kernel", 2000, 5, tid=7, corr=1),
        _x("gemm", "kernel", 2010, 40, tid=7, corr=2),
        _x("_mla_decode_split_kernel", "kernel", 2060, 300, tid=7, corr=3),
        _x("_rope_cache_kernel", "kernel", 2400, 3, tid=7, corr=4),
        _x("_route_kernel", "kernel", 2410, 4, tid=7, corr=5),
        _x("index", "kernel", 2420, 6, tid=7, corr=6),
        _x("grouped", "kernel", 2430, 70, tid=7, corr=7),
        _x("argmax", "kernel", 2510, 1, tid=7, corr=8),
        _x("Memcpy HtoD", "gpu_memcpy", 2520, 2, tid=7, corr=9),
        _x("orphan", "kernel", 2530, 8, tid=7, corr=99),
    ]
    r = rank.attribute_trace(ev)
    ph = r["phases_ms"]
    assert ph["norms_residual"] == pytest.approx(0.005) and ph["attention_proj"] == pytest.approx(0.040)
    assert ph["mla_kernel"] == pytest.approx(0.300) and ph["rope_cache_write"] == pytest.approx(0.003)
    assert ph["router"] == pytest.approx(0.004) and ph["dispatch_combine_glue"] == pytest.approx(0.006)
    assert ph["routed_experts"] == pytest.approx(0.070) and ph["other"] == pytest.approx(0.011)
    assert r["total_ms"] == pytest.approx(0.439) and sum(ph.values()) == pytest.approx(r["total_ms"])
    assert r["launches"]["other"] == 3 and sum(r["launches"].values()) == 10


def test_phase_floor_is_roofline_or_launches_times_floor(rank):
    """A phase's floor: its roofline, or launches x the measured per-launch floor where that is larger
    (launch-bound); a phase without a roofline gets the launch term alone."""
    roof = {"router": 0.05, "routed_experts": 5.0, "other": float("nan")}
    launches = {"router": 116, "routed_experts": 290, "other": 10}
    f = rank.phase_floors(roof, launches, 2.0)
    assert f["router"] == pytest.approx(0.232) and f["routed_experts"] == 5.0 and f["other"] == pytest.approx(0.02)
    assert all(v != v for v in rank.phase_floors(roof, launches, float("nan")).values())


def test_check_router_compares_variants_bit_for_bit(rank, monkeypatch):
    """check_router at tiny sizes (Triton interpreter): every variant runs and matches the reference path's
    bits, and the committed settings are back afterwards (the run measures what ships)."""
    from wideep.model import fused_ops

    if fused_ops.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setattr(rank, "_graph_us", lambda fn, reps=20: 1.0)
    before = (fused_ops.GATE_UNROLL, fused_ops.GATE_SELECT_WARPS)
    out = rank.check_router(rank.rank_config("tiny", None, None, False), torch.device("cpu"), tokens=(8,))
    assert set(out["variants"]) == set(rank.ROUTER_VARIANTS)
    assert all(r["T8"]["bit_exact"] and r["T8"]["after_graph_exact"] for r in out["variants"].values())
    assert (fused_ops.GATE_UNROLL, fused_ops.GATE_SELECT_WARPS) == before


@pytest.mark.parametrize("fp8", [True, False])
def test_reference_work_matches_the_roofline_bytes(rank, fp8):
    """The vendor reference's GEMMs and the same-work floor's kernels move the bytes the roofline counts: the
    GEMM weights of each GEMM phase, and the norm / RoPE kernels' reads and writes (R1 at full size, B=128)."""
    cfg = rank.rank_config("full", None, None, fp8)
    a = rank.parse(["--ep", "32"])
    t = 128
    counts, pairs = rank.expert_counts(cfg, a, t)
    assert counts == [128] * 8 and pairs == t * 8
    ceil = {"copy_GBps": 1.0, "bf16_TFLOPs": 1e9, "fp8_TFLOPs": 1e9}   # bytes bind: roofline ms = bytes / 1e6
    roof = rank.rooflines(cfg, 8, fp8, t, 2048, ceil)
    for phase, gs in rank.step_gemms(cfg, counts, fp8, t).items():
        wbytes = sum(len(g.rows) * g.n * g.k * g.batch * (1 if g.fp8 else 2) * g.count for g in gs)
        assert wbytes == pytest.approx(roof[phase] * 1e6, rel=1e-9), phase
    work = rank.small_phase_work(cfg, t, pairs, t, fp8)
    for phase in ("norms_residual", "rope_cache_write"):
        assert sum(n * b for _, n, b in work[phase]) == pytest.approx(roof[phase] * 1e6, rel=1e-9), phase
    assert sum(n for _, n, _ in work["norms_residual"]) == 3 * cfg.num_hidden_layers
    # the bf16 rows the unfused norms wrote: 2 bytes a channel of the input and q_a norms' outputs
    saved = (cfg.num_hidden_layers * (cfg.hidden_size + cfg.q_lora_rank) * t) if fp8 else 0
    assert sum(n * b for _, n, b in rank.norm_work(cfg, t, False)) - sum(n * b for _, n, b in work["norms_residual"]) == saved
    assert set(work) == set(rank.SMALL_PHASES)


def test_check_small_kernels_compares_launch_settings_bit_for_bit(rank, monkeypatch):
    """check_small_kernels at tiny sizes (Triton interpreter): every RoPE and grouping launch setting gives the
    committed setting's bits; the fastest is reported and the committed setting restored (timings made up)."""
    from wideep.model import fused_ops, moe_permute

    if fused_ops.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setattr(fused_ops, "use_triton", lambda x, impl: impl != "torch")
    real = moe_permute.group_pairs
    monkeypatch.setattr(rank, "group_pairs", lambda ids, nl, w: real(ids, nl, w, impl="triton"))
    for mod, names in ((fused_ops, ("ROPE_BLOCK_H", "ROPE_WARPS")),
                       (moe_permute, ("GROUP_BLOCK", "GROUP_SCAN", "GROUP_WARPS"))):
        for n in names:
            monkeypatch.setattr(mod, n, getattr(mod, n))   # restored after the test
    fake = iter(range(100, 0, -1))
    monkeypatch.setattr(rank, "_graph_us", lambda fn, reps=20: (fn(), next(fake))[1])   # later = faster
    out = rank.check_small_kernels(rank.rank_config("tiny", None, None, False), torch.device("cpu"), tokens=(8,))
    assert all(v["T8"]["exact"] for k in ("rope", "group") for v in out[k].values())
    assert out["rope_fastest"] == list(rank.ROPE_VARIANTS[-1]) and out["group_fastest"] == list(rank.GROUP_VARIANTS[-1])
    assert (fused_ops.ROPE_BLOCK_H, fused_ops.ROPE_WARPS) == rank.ROPE_VARIANTS[0]


def test_small_kernel_latency_runs_each_kernel_at_each_size(rank, monkeypatch):
    """small_kernel_latency at tiny sizes (Triton interpreter): every kernel is called at every token count."""
    from wideep.model import fused_ops

    if fused_ops.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setattr(fused_ops, "use_triton", lambda x, impl: impl != "torch")
    calls = []
    monkeypatch.setattr(rank, "_graph_us", lambda fn, reps=20: (calls.append(fn()), 1.0)[1])
    out = rank.small_kernel_latency(rank.rank_config("tiny", None, None, False), torch.device("cpu"), tokens=(1, 8))
    assert len(out) == 6 and all(set(row) == {"T1", "T8"} for row in out.values())
    assert len(calls) == 2 + 5 * 2
