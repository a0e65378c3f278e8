"""One rank of an EP=N DeepSeek-R1 group, at full depth and width, on one GPU.

The rank is the real engine (EngineCore: its model runner, CUDA graphs, KV cache and sampler) over the
project's model with random weights made directly on the device (no checkpoint files). It holds
256/N routed experts per MoE layer; an emulated dispatcher delivers to them the rows that routing over N
ranks would deliver (uniform: B*8 rows spread evenly; zipf: the hottest rank of a Zipf-skewed expert
popularity) and groups them with the same permutation the EP backends use. Communication is not run: a
table of published DeepEP low-latency figures is added per MoE layer, unoverlapped and fully overlapped.

--dbo measures what dual-batch overlap costs at this shape: the same decode step with the engine's DBO on (two
micro-batches of B/2, each re-reading every weight), and models the overlap from measured parts: each
micro-batch's dispatch and combine (the published per-layer figure scaled to its B/2 tokens, linearly: the
published rates are at the link's bandwidth) hides under the other micro-batch's stage that runs while it is in
flight; exposed = max(0, comm - that stage's measured compute), and the overlapped step = split step x (1 +
--comm-slowdown, what transfers beside it cost the compute, measured on 2x H200) + exposed.

Decode is measured twice: one step as `ModelRunner.execute` (host prep + graph replay + sampling + the tokens
back on the host: the synchronous step), and the engine loop in steady state (`EngineCore.step()`: schedule ->
launch -> apply, the B sequences admitted as running decodes), synchronous and with async scheduling (the
host schedules and prepares step n+1 while the device runs step n, vLLM's --async-scheduling).

Reports decode tok/s/GPU at B sequences x ctx, prefill tok/s/GPU at P tokens/rank, a per-phase breakdown
(torch profiler over one eager step: every kernel tied to its launch by correlation id and given the phase of
the innermost module range around that launch, so phases sum to the step) beside each phase's roofline, bf16 and
FP8 side by side, and a plain-PyTorch version of the same shape measured in the same run. Beside each roofline
stands the phase's floor: the roofline or its launch count x the measured cost of a near-empty kernel on this GPU
(measure_launch_floor), whichever is larger, so the table says which phases are launch-bound. Beside that stands a
measured reference per phase: for GEMM phases cuBLAS timed on the phase's own shapes in a CUDA graph (the vendor
library's best at that shape on this GPU), for the small phases the same number of launches each copying its
kernel's bytes (the same-work floor); the ratio to it is the phase's measured explanation. On a GPU it first
checks the step's fused kernels against their torch references at the model's sizes (check_fused_ops), times the launch
settings of the RoPE and grouping kernels (check_small_kernels) and the router's kernel settings (check_router)
against each other, bit for bit, and times the small phases' kernels at 1 to 256 tokens (small_kernel_latency:
a time that does not grow with the tokens is the kernel's own latency, not its bytes); the run uses the
committed settings.

  python benchmarks/rank.py --ep 32                      # H200: full R1 rank, bf16 and fp8
  python benchmarks/rank.py --size tiny --device cpu     # smoke run (tiny dims, few layers)
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import functools
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wideep.engine.api import EngineRequest, SamplingParams  # noqa: E402
from wideep.engine.config import EngineArgs  # noqa: E402
from wideep.engine.core import EngineCore  # noqa: E402
from wideep.engine.request import Request, RequestStatus  # noqa: E402
from wideep.engine.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402
from wideep.model.config import ModelConfig  # noqa: E402
from wideep.model.deepseek_v3 import DeepseekV3ForCausalLM, materialize  # noqa: E402
from wideep.model.fp8 import FP8_DTYPE, Fp8Linear, fp8_linear, quantize_block_fp8, scale_row_index  # noqa: E402
from wideep.model.layers import RMSNorm  # noqa: E402
from wideep.model.make_model import FP8_QUANT_CONFIG, PRESETS  # noqa: E402
from wideep.model.rope import RotaryEmbedding  # noqa: E402
from wideep.model import fused_ops  # noqa: E402
from wideep.model.triton_compat import tl, triton  # noqa: E402
from wideep.model.moe import fuse_shared_expert  # noqa: E402
from wideep.model.moe_permute import gather_sum  # noqa: E402
from wideep.model.moe_permute import group_pairs, own_then  # noqa: E402
from wideep.model.dispatch import DispatchResult, MoEDispatcher, Pending, done  # noqa: E402
from wideep.model.ubatch import DBOConfig  # noqa: E402

# Published DeepEP low-latency dispatch / combine per MoE layer, 128 tokens per rank, FP8 dispatch and
# BF16 combine, H800 + CX7 InfiniBand (DeepEP README, June 2025), in microseconds. Scaled linearly in B.
DEEPEP_LL_US = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314)}
# How much slower a DBO split step's compute runs with transfers beside it (a share of the step): measured on
# 2x H200 against a compute twin (benchmarks/ep_overlap_check.py): 0.4-0.5% for symm_mem_ll, whose copy-engine
# writes leave the SMs to compute as DeepEP LL's receive hooks do; 2% for NCCL's collective kernels.
COMM_SLOWDOWN = 0.005
# Prefill (high-throughput kernels): published internode RDMA bandwidth of DeepEP HT, GB/s (low end).
DEEPEP_HT_RDMA_GBPS = 43.0


# ---- the emulated dispatcher ---------------------------------------------------------------------------

class EmulatedEPDispatcher(MoEDispatcher):
    """This rank of an EP group without peers: every step, the rank's experts receive the rows routing over
    `ep_size` ranks would bring them (taken from this rank's own tokens: the same count, the same shapes),
    grouped by local expert with the EP backends' permutation, and combined back with routing weights."""

    name = "emulated"
    graph_capturable = True

    def __init__(self, num_experts: int, ep_size: int, top_k: int, routing: str = "uniform",
                 zipf_s: float = 1.0, **options):
        super().__init__(num_experts, 0, ep_size, None, **options)
        if routing not in ("uniform", "zipf"):
            raise ValueError(f"routing must be uniform or zipf, got {routing!r}")
        self.top_k, self.routing, self.zipf_s = top_k, routing, zipf_s
        self._maps: dict[tuple[int, str], torch.Tensor] = {}
        self.load_factor = 1.0 if routing == "uniform" else self._zipf_share() * ep_size

    def _zipf_share(self) -> float:
        """Share of all routed rows that land on rank 0 when expert popularity is Zipf(s) over the global
        experts and expert e lives on rank e % N (round-robin placement): rank 0 holds the hottest one."""
        p = [1.0 / (i + 1) ** self.zipf_s for i in range(self.num_experts)]
        return sum(p[0::self.ep_size]) / sum(p)

    def _local_ids(self, t: int, device) -> torch.Tensor:
        """[T, S] local expert of each received row slot (-1: empty slot); S >= top_k when rows > T*K."""
        key = (t, str(device))
        if key not in self._maps:
            nl = self.num_local_experts
            rows = max(1, round(t * self.top_k * self.load_factor))
            if self.routing == "uniform":
                assign = torch.arange(rows) % nl
            else:  # this rank's experts: global ids 0, N, 2N ... with Zipf weights
                w = torch.tensor([1.0 / (e * self.ep_size + 1) ** self.zipf_s for e in range(nl)])
                counts = torch.floor(w / w.sum() * rows).long()
                counts[0] += rows - int(counts.sum())
                assign = torch.repeat_interleave(torch.arange(nl), counts)
                assign = assign[torch.randperm(rows, generator=torch.Generator().manual_seed(0))]
            slots = -(-rows // t)
            ids = torch.full((t * slots,), -1, dtype=torch.long)
            ids[:rows] = assign
            # row r of the flat slot list belongs to token r % T (rows spread over all tokens)
            self._maps[key] = ids.view(slots, t).t().contiguous().to(device)
        return self._maps[key]

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self._dispatch(x, topk_weights, own_first=False)

    def dispatch_with_own(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self._dispatch(x, topk_weights, own_first=True)

    def _dispatch(self, x: torch.Tensor, topk_weights: torch.Tensor, own_first: bool) -> DispatchResult:
        t = x.shape[0]
        ids = self._local_ids(t, x.device)
        slots = ids.shape[1]
        w = topk_weights
        if slots != w.shape[1]:
            w = w.repeat(1, -(-slots // w.shape[1]))[:, :slots]
        g, pairs, weights = group_pairs(ids, self.num_local_experts, w)
        rows = own_then(g.rows, t) if own_first else g.rows
        return DispatchResult(x=x[rows], tokens_per_expert=g.tokens_per_expert, weights=weights, handle=pairs)

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return gather_sum(y, result.handle)

    def combine_weighted(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return gather_sum(y, result.handle, weights=result.weights)

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        """Dual-batch overlap: the grouping and row gather run at wait(), where the EP backends run theirs (on
        the received rows, after the transfer), so the split step's stages hold the same work as a real rank's."""
        return Pending(lambda: self._dispatch(x, topk_weights, own_first=False))

    def combine_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        """The per-token sum runs at issue, as the EP backends sum their partial rows before sending them."""
        return done(gather_sum(y, result.handle))

    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        """dispatch_async with the own rows in front, gathered at wait() with the rest (one row gather)."""
        return Pending(lambda: self._dispatch(x, topk_weights, own_first=True))

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        """combine_async with the routing weight folded into the sum, at issue."""
        return done(gather_sum(y, result.handle, weights=result.weights))


# ---- model -----------------------------------------------------------------------------------------------

def rank_config(size: str, layers: int | None, dense: int | None, fp8: bool) -> ModelConfig:
    fields = dict(PRESETS["layer-slice" if size == "full" else "tiny"])
    fields["num_hidden_layers"] = layers or (61 if size == "full" else 4)
    fields["first_k_dense_replace"] = 3 if dense is None and size == "full" else (1 if dense is None else dense)
    cfg = ModelConfig(**fields, torch_dtype="bfloat16")
    if fp8:
        cfg.quantization_config = dict(FP8_QUANT_CONFIG)
    return cfg


@torch.no_grad()
def build_rank_model(cfg: ModelConfig, dispatcher: MoEDispatcher, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> DeepseekV3ForCausalLM:
    """Random weights made on the device: N(0, 0.02) projections (FP8: e4m3 codes ~N(0,1) with block
    scales 0.02), unit norms, zero router bias."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, dispatcher, dispatcher.num_local_experts)
    materialize(model, device, dtype)
    model.model.rotary_emb = RotaryEmbedding(cfg).to(device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype == FP8_DTYPE:
            for i in range(p.shape[0]) if p.dim() == 3 else [None]:
                dst = p if i is None else p[i]
                dst.copy_(torch.randn(dst.shape, device=device, dtype=torch.bfloat16, generator=g).to(FP8_DTYPE))
        elif name.endswith("_scale_inv"):
            p.fill_(0.02)
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.data = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            p.data = (torch.randn(p.shape, device=device, dtype=torch.float32, generator=g) * 0.02).to(dtype)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    model.requires_grad_(False)
    model.eval()
    return model


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the parameters; with dtype, as materialize() would allocate them (meta models)."""
    if dtype is None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        keep = p.dtype == FP8_DTYPE or name.endswith("_scale_inv")
        total += p.numel() * (p.element_size() if keep else size)
    return total


# ---- measurement helpers -----------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 2) -> float:
    """Median seconds of fn() (host clock around a device sync: what a caller of the engine sees)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def measure_ceilings(device) -> dict:
    """Copy bandwidth (read+write bytes / time) and dense matmul rates on this device."""
    if device.type != "cuda":
        return {"copy_GBps": float("nan"), "bf16_TFLOPs": float("nan"), "fp8_TFLOPs": float("nan")}
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    best = []
    for _ in range(10):
        st.record()
        b.copy_(a)
        en.record()
        torch.cuda.synchronize()
        best.append(st.elapsed_time(en) / 1e3)
    bw = 2 * n / sorted(best)[len(best) // 2]
    del a, b
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    tb = timed(lambda: x @ y, device, 10)
    fp8 = float("nan")
    try:
        xq, yq = x.to(FP8_DTYPE), y.t().contiguous().to(FP8_DTYPE).t()
        one = torch.ones((), device=device)
        tf = timed(lambda: torch._scaled_mm(xq, yq, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device, 10)
        fp8 = 2 * m**3 / tf / 1e12
    except (RuntimeError, TypeError):
        pass
    return {"copy_GBps": bw / 1e9, "bf16_TFLOPs": 2 * m**3 / tb / 1e12, "fp8_TFLOPs": fp8}


if triton is not None:

    @triton.jit
    def _touch_kernel(p_ptr):
        """The least a Triton kernel can do: each program reads and writes one 4-byte word."""
        i = tl.program_id(0)
        tl.store(p_ptr + i, tl.load(p_ptr + i) + 1)


def _kernel_durations_us(fn, n: int, cats: tuple[str, ...] = ("kernel",)) -> list[float]:
    """Device durations (us) of the kernels (cats: also copies) n eager calls of fn launch, as the torch
    profiler reports them (the same measure the per-phase table sums)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    path = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    finally:
        path.unlink(missing_ok=True)
    return [float(e["dur"]) for e in events if e.get("ph") == "X" and e.get("cat") in cats]


def measure_launch_floor(device, n: int = 500) -> dict:
    """What one kernel costs when it does (almost) nothing, on this GPU, in us: n back-to-back launches
    replayed from one CUDA graph (per launch: what a graph-replayed step pays at least for each kernel), and
    the profiler's device duration of one such kernel (what the eager per-phase table counts for it).
    Kernels: torch's add on a 1-element tensor, a Triton kernel of 1 program and one of 128 programs (a
    per-token kernel's grid at B=128) each touching 4 bytes. `per_launch_us` is the smallest of all: a floor."""
    if device.type != "cuda":
        return {"per_launch_us": float("nan")}
    buf = torch.zeros(256, dtype=torch.int32, device=device)
    one = buf[:1]
    kinds = {"torch_add_1elem": lambda: one.add_(1)}
    if triton is not None:
        kinds["triton_1prog"] = lambda: _touch_kernel[(1,)](buf)
        kinds["triton_128prog"] = lambda: _touch_kernel[(128,)](buf)
    out: dict = {}
    for name, fn in kinds.items():
        out[f"{name}_graph_us"] = _graph_us(fn, n)
        d = sorted(_kernel_durations_us(fn, 200))
        out[f"{name}_kernel_us"] = d[len(d) // 2] if d else float("nan")
    out["per_launch_us"] = min(v for v in out.values() if v == v)
    out["launches_per_graph"] = n
    return out


def phase_floors(roof: dict, launches: dict, per_launch_us: float) -> dict:
    """Each phase's floor (ms): its roofline (bytes / copy bandwidth or FLOPs / peak) or its launch count x
    the measured per-launch floor, whichever is larger (NaN without a measured launch floor, i.e. on a CPU)."""
    out = {}
    for p, n in launches.items():
        r = roof.get(p, float("nan"))
        lf = n * per_launch_us / 1e3
        out[p] = max(r, lf) if r == r and lf == lf else lf
    return out


def _graph_us(fn, reps: int = 20) -> float:
    """Median device us per call of fn, replayed as reps back-to-back calls from one CUDA graph."""
    return _event_ms(_graph_of([fn] * reps, warm=1), reps=7) * 1e3 / reps


# ---- measured explanations: a vendor reference for each GEMM phase, a same-work floor for each small one ------
# A phase above 1.5x its roofline is explained by a measurement on the same GPU: for GEMM phases, cuBLAS (the
# vendor's library) timed on the phase's own shapes in a CUDA graph - the best this GPU's library reaches at that
# shape; for the small memory-bound phases, a CUDA graph of the same number of launches, each a device copy of
# that kernel's own bytes (an empty kernel where they are tiny) - what the same launches and bytes cost at least.

GEMM_PHASES = ("attention_proj", "routed_experts", "shared_expert", "dense_mlp", "lm_head_sampling")
SMALL_PHASES = ("rope_cache_write", "norms_residual", "router", "dispatch_combine_glue")
TINY_BYTES = 64 * 1024   # below this a same-work launch is an empty kernel (its bytes take < 20 ns at copy speed)


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a step: rows [m] (grouped: one entry per group) x weight [n, k]; kind mm / grouped / bmm
    (bf16, `batch` independent products); fp8: the weight is e4m3; `count`: how many times per step."""
    kind: str
    rows: tuple[int, ...]
    n: int
    k: int
    fp8: bool
    count: int
    batch: int = 1


def step_gemms(cfg: ModelConfig, counts: list[int], fp8: bool, tokens: int) -> dict[str, list[Gemm]]:
    """The GEMMs of one decode step per phase, as the model code runs them (counts: rows per local expert)."""
    h, nh, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    dense_layers = layers - moe_layers
    t, lat, nope, v = tokens, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    attn = [Gemm("mm", (t,), cfg.q_lora_rank + cfg.kv_cache_dim, h, fp8, layers),
            Gemm("mm", (t,), nh * cfg.qk_head_dim, cfg.q_lora_rank, fp8, layers)] if cfg.q_lora_rank else \
        [Gemm("mm", (t,), nh * cfg.qk_head_dim, h, fp8, layers), Gemm("mm", (t,), cfg.kv_cache_dim, h, fp8, layers)]
    attn += [Gemm("bmm", (t,), lat, nope, False, layers, nh),    # absorbed W_UK (bf16, dequantized kv_b)
             Gemm("bmm", (t,), v, lat, False, layers, nh),       # absorbed W_UV
             Gemm("mm", (t,), h, nh * v, fp8, layers)]
    inter = cfg.moe_intermediate_size
    fused = fuse_shared_expert(cfg)
    groups = tuple(([t] if fused else []) + list(counts))
    out = {"attention_proj": attn,
           "routed_experts": [Gemm("grouped", groups, 2 * inter, h, fp8, moe_layers),
                              Gemm("grouped", groups, h, inter, fp8, moe_layers)],
           "shared_expert": [] if fused else [
               Gemm("mm", (t,), inter * cfg.n_shared_experts, h, fp8, 2 * moe_layers),
               Gemm("mm", (t,), h, inter * cfg.n_shared_experts, fp8, moe_layers)],
           "dense_mlp": [Gemm("mm", (t,), cfg.intermediate_size, h, fp8, 2 * dense_layers),
                         Gemm("mm", (t,), h, cfg.intermediate_size, fp8, dense_layers)],
           "lm_head_sampling": [Gemm("mm", (t,), cfg.vocab_size, h, False, 1)]}
    return {p: g for p, g in out.items() if g}


def norm_work(cfg: ModelConfig, t: int, fp8_out: bool) -> list[tuple]:
    """The norm kernels of one step over t tokens: (label, launches, bytes each). fp8_out: the input and q_a norms
    write the next FP8 projection's e4m3 codes (RMSNorm + quantization in one kernel) instead of bf16 rows."""
    h, layers, ql = cfg.hidden_size, cfg.num_hidden_layers, cfg.q_lora_rank or 0
    o = 1 if fp8_out and ql else 2   # bytes per channel of the input norm's output
    out = [("add_norm hidden, input (x, r in; s, y out)", layers - 1, (6 * h + o * h) * t),
           ("norm hidden, layer 0 input (x in, y out)", 1, (2 * h + o * h) * t),
           ("add_norm hidden, post-attention", layers, 8 * h * t)]
    if ql:
        out.append(("q_a norm", layers, (2 * ql + (1 if fp8_out else 2) * ql) * t))
    return out


def small_phase_work(cfg: ModelConfig, tokens: int, pairs: int, own_rows: int,
                     fp8: bool = False) -> dict[str, list[tuple]]:
    """The kernels of each small phase in one decode step: (label, launches, bytes each: read + written), from
    the shapes the model code runs (pairs: routed (token, slot) pairs per MoE layer; own_rows: rows of the
    fused shared slot gathered beside them; fp8: the FP8 model, whose norms write e4m3 codes where fused)."""
    h, nh, layers, t = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, tokens
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    slices = fused_ops.gate_slices(h)
    return {
        "rope_cache_write": [("rope q_pe + latent norm + cache row", layers,
                              t * (2 * nh * cfg.qk_rope_head_dim + 2 * cfg.kv_cache_dim) * 2)],
        "norms_residual": norm_work(cfg, t, fp8),
        "router": [("gate GEMM: weight + x in, fp32 partials out", moe_layers, (e * h + t * h) * 2 + slices * t * e * 4),
                   ("selection: partials in, ids + weights out", moe_layers, slices * t * e * 4 + e * 4 + t * k * 16)],
        "dispatch_combine_glue": [
            ("group pairs (ids, weights in; order, rows, slot, valid, weight out)", moe_layers, pairs * 41),
            ("row gather x[rows]", moe_layers, (own_rows + pairs) * h * 2 * 2),
            ("weighted gather-sum (rows in, token rows out)", moe_layers, pairs * (h * 2 + 8) + t * h * 2),
            ("add shared-slot output", moe_layers, 3 * t * h * 2)],
    }


def _event_ms(g: "torch.cuda.CUDAGraph", reps: int = 5) -> float:
    """Median ms of a replay of g over reps replays."""
    ts = []
    for _ in range(reps):
        st, en = torch.cuda.Event(True), torch.cuda.Event(True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        ts.append(st.elapsed_time(en))
    return sorted(ts)[len(ts) // 2]


def _graph_of(fns: list, warm: int = 2) -> "torch.cuda.CUDAGraph":
    """fns captured back to back in one CUDA graph (after `warm` eager passes on a side stream), replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    return g


def _gemm_variants(gm: Gemm, device, copies: int) -> dict[str, list]:
    """Callables (one per weight copy) of each cuBLAS way to run gm; variants this torch refuses are left out.
    fp8: per-tensor scales (cuBLAS's fastest FP8 path) and DeepSeek's block scales (1x128 activation, 128x128
    weight), as one call per group or torch._scaled_grouped_mm (rowwise scales); bf16: mm / bmm / _grouped_mm."""
    f8, bf = FP8_DTYPE, torch.bfloat16
    m = sum(gm.rows)
    a = torch.randn(m, gm.k, device=device).to(f8 if gm.fp8 else bf)
    groups = len(gm.rows)
    ws = [torch.randn(groups * gm.n, gm.k, device=device).to(f8 if gm.fp8 else bf) for _ in range(copies)]
    starts = [sum(gm.rows[:i]) for i in range(groups)]
    out: dict[str, list] = {}
    if gm.kind == "bmm":
        qa = torch.randn(gm.batch, m, gm.k, device=device, dtype=bf)
        wb = [torch.randn(gm.batch, gm.k, gm.n, device=device, dtype=bf) for _ in range(copies)]
        out["bmm"] = [lambda w=w: torch.bmm(qa, w) for w in wb]
        return out
    if not gm.fp8:
        if gm.kind == "grouped":
            offs = torch.tensor([s + r for s, r in zip(starts, gm.rows)], dtype=torch.int32, device=device)
            out["_grouped_mm"] = [lambda w=w: torch._grouped_mm(a, w.view(groups, gm.n, gm.k).transpose(1, 2), offs=offs)
                                  for w in ws]
        out["mm"] = [lambda w=w: [a[s:s + r] @ w[i * gm.n:(i + 1) * gm.n].t()
                                  for i, (s, r) in enumerate(zip(starts, gm.rows))] for w in ws]
        return out
    one = torch.ones((), device=device)
    pt = [lambda w=w: [torch._scaled_mm(a[s:s + r], w[i * gm.n:(i + 1) * gm.n].t(), scale_a=one, scale_b=one,
                                        out_dtype=bf) for i, (s, r) in enumerate(zip(starts, gm.rows))] for w in ws]
    out["scaled_mm per-tensor"] = pt
    if gm.n % 128 == 0 and gm.k % 128 == 0 and all(r % 16 == 0 for r in gm.rows):
        sa = [torch.ones(gm.k // 128, r, device=device).t() for r in gm.rows]
        sb = torch.ones(gm.n // 128, gm.k // 128, device=device)
        out["scaled_mm block"] = [
            lambda w=w: [torch._scaled_mm(a[s:s + r], w[i * gm.n:(i + 1) * gm.n].t(), scale_a=sa[i], scale_b=sb.t(),
                                          out_dtype=bf) for i, (s, r) in enumerate(zip(starts, gm.rows))] for w in ws]
    if gm.kind == "grouped" and hasattr(torch, "_scaled_grouped_mm") and all(r % 16 == 0 for r in gm.rows):
        offs = torch.tensor([s + r for s, r in zip(starts, gm.rows)], dtype=torch.int32, device=device)
        ra = torch.ones(m, device=device)
        rb = torch.ones(groups, gm.n, device=device)
        out["_scaled_grouped_mm rowwise"] = [
            lambda w=w: torch._scaled_grouped_mm(a, w.view(groups, gm.n, gm.k).transpose(1, 2), ra, rb, offs=offs,
                                                 out_dtype=bf) for w in ws]
    return out


def gemm_reference(gemms: dict[str, list[Gemm]], device, l2_bytes: int) -> dict[str, dict]:
    """Per GEMM phase: the fastest cuBLAS variant of each of its GEMMs, timed in a CUDA graph over enough weight
    copies that no weight is still in L2 when it is read again (the step reads every layer's weights once), and
    summed over the step (ms). Each GEMM's variants and times are kept."""
    out: dict[str, dict] = {}
    for phase, gs in gemms.items():
        total, detail = 0.0, []
        for gm in gs:
            wbytes = len(gm.rows) * gm.n * gm.k * (1 if gm.fp8 else 2) * gm.batch
            copies = max(1, min(8, -(-3 * l2_bytes // max(wbytes, 1))))
            best, times = float("inf"), {}
            try:
                variants = _gemm_variants(gm, device, copies)
            except (RuntimeError, TypeError) as exc:
                variants, times["error"] = {}, f"{type(exc).__name__}: {exc}"[:120]
            for name, fns in variants.items():
                try:
                    reps = max(2, 4 // copies) * copies
                    g = _graph_of([fns[i % copies] for i in range(reps)])
                    us = _event_ms(g) * 1e3 / reps
                    del g
                except (RuntimeError, TypeError, ValueError) as exc:
                    times[name] = f"refused: {type(exc).__name__}: {str(exc)[:80]}"
                    continue
                times[name] = round(us, 2)
                best = min(best, us)
            del variants
            total += best * gm.count / 1e3 if best < float("inf") else float("nan")
            detail.append({"kind": gm.kind, "rows": list(gm.rows) if len(gm.rows) <= 12 else sum(gm.rows), "n": gm.n,
                           "k": gm.k, "fp8": gm.fp8, "batch": gm.batch, "per_step": gm.count, "us": times,
                           "best_us": round(best, 2)})
        out[phase] = {"ms": total, "gemms": detail}
        torch.cuda.empty_cache()
    return out


def same_work_floor(work: dict[str, list[tuple]], launches: dict[str, int], device) -> dict[str, dict]:
    """Per small phase: its kernels' launches, each a device copy of that kernel's bytes (an empty kernel below
    TINY_BYTES), plus empty kernels for the phase's launches beyond those listed; run back to back eagerly
    (the profiler's summed device durations: the measure the phase column sums) and as one CUDA graph (its
    replay time). The copies reuse one buffer pair, so bytes that fit stay in L2, as the step's activations
    mostly do: a floor, not an estimate of the kernels."""
    out: dict[str, dict] = {}
    for phase, items in work.items():
        listed = sum(n for _, n, _ in items)
        extra = max(0, launches.get(phase, 0) - listed)
        big = max([b for _, _, b in items if b >= TINY_BYTES] + [2])
        src = torch.empty(big // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        one = torch.zeros(1, dtype=torch.int32, device=device)
        fns = []
        for _, n, b in items:
            if b >= TINY_BYTES:
                s, d = src[: b // 2], dst[: b // 2]
                fns += [lambda s=s, d=d: d.copy_(s)] * n
            else:
                fns += [lambda: one.add_(1)] * n
        fns += [lambda: one.add_(1)] * extra

        def run_all():
            for f in fns:
                f()
        run_all()
        dur = _kernel_durations_us(run_all, 1, DEVICE_CATS)
        g = _graph_of(fns, warm=1)
        out[phase] = {"ms": sum(dur) / 1e3, "graph_ms": _event_ms(g), "launches": len(fns), "listed": listed,
                      "bytes": sum(n * b for _, n, b in items),
                      "items": [[lbl, n, b] for lbl, n, b in items] + ([["empty (unlisted launches)", extra, 0]]
                                                                       if extra else [])}
        del g, src, dst
    return out


def expert_counts(cfg: ModelConfig, a, tokens: int) -> tuple[list[int], int]:
    """Rows per local expert and routed (token, slot) pairs per MoE layer, as the emulated dispatcher delivers them."""
    disp = EmulatedEPDispatcher(cfg.n_routed_experts, a.ep, cfg.num_experts_per_tok, a.routing, a.zipf_s)
    ids = disp._local_ids(tokens, torch.device("cpu"))
    valid = ids[(ids >= 0) & (ids < disp.num_local_experts)]
    return torch.bincount(valid, minlength=disp.num_local_experts).tolist(), ids.numel()


def vendor_references(cfg_of, precisions: list[str], a, device) -> dict:
    """{precision: {B: gemm_reference(...)}} for the decode batch sizes, measured before any model is built."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    out: dict = {}
    for prec in precisions:
        cfg = cfg_of(prec)
        for b in a.batch:
            counts, _ = expert_counts(cfg, a, b)
            out.setdefault(prec, {})[b] = gemm_reference(step_gemms(cfg, counts, prec == "fp8", b), device, l2)
    return out


def explain_phases(res: dict, cfg: ModelConfig, a, tokens: int, device, vendor: dict | None) -> None:
    """Adds res['reference'] = {phase: {'ms', 'kind': vendor | same-work, ...}} (decode; on a GPU)."""
    ref: dict = {}
    for p, v in (vendor or {}).items():
        ref[p] = {"kind": "vendor", **v}
    counts, pairs = expert_counts(cfg, a, tokens)
    own = tokens if fuse_shared_expert(cfg) else 0
    fp8 = cfg.quantization_config is not None
    for p, v in same_work_floor(small_phase_work(cfg, tokens, pairs, own, fp8), res["launches"], device).items():
        ref[p] = {"kind": "same-work", **v}
    res["reference"] = ref

# router kernel settings timed by check_router (fused_ops' two-kernel path): the selection program at 4 or 1
# warps, the gate GEMM's K loop unrolled or software-pipelined (the committed default: 1 warp, pipelined)
ROUTER_VARIANTS = {
    "sel4w_unrolled": dict(select_warps=4, unroll=True),   # the earlier path: the reference
    "sel1w_unrolled": dict(select_warps=1, unroll=True),
    "sel1w_pipelined": dict(select_warps=1, unroll=False),
}


def set_router(v: dict) -> None:
    """Installs one router variant's settings into fused_ops for this process."""
    fused_ops.GATE_UNROLL = v["unroll"]
    fused_ops.GATE_SELECT_WARPS = v["select_warps"]


def check_router(cfg: ModelConfig, device, tokens=(128, 256)) -> dict:
    """The router kernel settings at R1 sizes against the earlier ones (ROUTER_VARIANTS' first): ids and weights
    bit for bit (also on a second call and after graph replays), a token's bits independent of the batch, the
    graph-replayed time per call, and which passing variant is fastest. The committed settings are restored:
    the run measures what ships."""
    h, e = cfg.hidden_size, cfg.n_routed_experts
    args = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    g = torch.Generator(device=device)
    g.manual_seed(2)
    w = (torch.randn(e, h, device=device, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(e, device=device, generator=g) * 0.01
    saved = dict(unroll=fused_ops.GATE_UNROLL, select_warps=fused_ops.GATE_SELECT_WARPS)
    ref = next(iter(ROUTER_VARIANTS.values()))
    out: dict = {"variants": {}}
    try:
        for t in tokens:
            x = torch.randn(t, h, device=device, generator=g).to(torch.bfloat16)
            set_router(ref)
            ids0, w0 = fused_ops.gate_route(x, w, bias, *args)
            rid, _ = fused_ops.route_ref(x.float() @ w.float().t(), bias, *args)
            out[f"T{t}_present_ids_vs_fp32_ref_rows_equal"] = int((ids0.sort(1)[0] == rid.sort(1)[0]).all(1).sum())
            for name, v in ROUTER_VARIANTS.items():
                r = out["variants"].setdefault(name, {})
                try:
                    set_router(v)
                    fn = lambda: fused_ops.gate_route(x, w, bias, *args)  # noqa: E731
                    ids1, w1 = fn()
                    again = fn()
                    exact = bool(torch.equal(ids1, ids0) and torch.equal(w1, w0) and torch.equal(again[0], ids0)
                                 and torch.equal(again[1], w0))
                    inv = all(torch.equal(fused_ops.gate_route(x[lo:hi], w, bias, *args)[1], w0[lo:hi])
                              for lo, hi in [(5, 12), (40, 111)])
                    r[f"T{t}"] = {"us": round(_graph_us(fn), 2), "bit_exact": exact, "batch_invariant": inv}
                    r[f"T{t}"]["after_graph_exact"] = bool(torch.equal(fn()[1], w0))
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is reported
                    r[f"T{t}"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    finally:
        set_router(saved)
    ok = {n: sum(r[f"T{t}"]["us"] for t in tokens) for n, r in out["variants"].items()
          if all(r[f"T{t}"].get("bit_exact") and r[f"T{t}"].get("batch_invariant")
                 and r[f"T{t}"].get("after_graph_exact") for t in tokens)}
    if ok:
        out["fastest"] = min(ok, key=ok.get)
    return out


# launch settings of two small kernels whose results do not depend on them (check_small_kernels times them):
# RoPE + cache write (heads per program, warps; the first is the committed default) and the grouping kernel
# (pairs per program, pairs per histogram step, warps)
ROPE_VARIANTS = [(8, 1), (16, 4), (8, 4), (4, 1), (8, 2), (16, 1), (16, 2), (32, 4), (128, 8)]
GROUP_VARIANTS = [(32, 1024, 4), (128, 512, 4), (64, 1024, 8), (16, 1024, 4), (32, 1024, 8), (32, 2048, 8),
                  (128, 1024, 8), (32, 512, 2)]


def check_small_kernels(cfg: ModelConfig, device, tokens=(128, 256)) -> dict:
    """RoPE + cache write and the grouping kernel at R1 sizes under each launch setting: outputs bit for bit
    against the committed setting's, graph-replayed us per call; the fastest setting that passes at every size
    is installed for this run (printed, so the run says what it measured)."""
    from wideep.model import moe_permute

    g = torch.Generator(device=device)
    g.manual_seed(3)
    dt = torch.bfloat16
    nh, d, half, lat = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim // 2, cfg.kv_lora_rank
    out: dict = {"rope": {}, "group": {}}
    saved_rope = (fused_ops.ROPE_BLOCK_H, fused_ops.ROPE_WARPS)
    saved_group = (moe_permute.GROUP_BLOCK, moe_permute.GROUP_SCAN, moe_permute.GROUP_WARPS)
    for t in tokens:
        q0 = torch.randn(t, nh, d, device=device, generator=g).to(dt)
        kv = torch.randn(t, lat + 2 * half, device=device, generator=g).to(dt)
        w = torch.rand(lat, device=device, generator=g).to(dt) + 0.5
        ang = torch.randn(t, half, device=device, generator=g) * 3
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        cache0 = torch.zeros(8 * t // 64 + 1, 64, lat + 2 * half, device=device, dtype=dt)
        slots = torch.randperm(8 * t, device=device, generator=g)[:t]
        ref = None
        for bh, nw in ROPE_VARIANTS:
            fused_ops.ROPE_BLOCK_H, fused_ops.ROPE_WARPS = bh, nw
            try:
                qx, cx = q0.clone(), cache0.clone()
                fused_ops.rope_cache_write(qx, kv, w, 1e-6, cos, sin, cx, slots)
                ref = ref or (qx.clone(), cx.clone())   # the timing below ropes qx again, in place
                exact = bool(torch.equal(qx, ref[0]) and torch.equal(cx, ref[1]))
                us = _graph_us(lambda: fused_ops.rope_cache_write(qx, kv, w, 1e-6, cos, sin, cx, slots))
                res = {"us": round(us, 2), "exact": exact}
            except Exception as exc:  # noqa: BLE001 - a setting that fails to compile or run is reported
                res = {"us": float("inf"), "exact": False, "error": f"{type(exc).__name__}: {exc}"[:160]}
            out["rope"].setdefault(f"{bh}h/{nw}w", {})[f"T{t}"] = res
        ids = torch.randint(-1, 9, (t, cfg.num_experts_per_tok), device=device, generator=g)
        tw = torch.rand(t, cfg.num_experts_per_tok, device=device, generator=g)
        ref = None
        for blk, scan, nw in GROUP_VARIANTS:
            moe_permute.GROUP_BLOCK, moe_permute.GROUP_SCAN, moe_permute.GROUP_WARPS = blk, scan, nw
            try:
                gr, pr, wr = group_pairs(ids, 8, tw)
                got = (gr.order, gr.rows, gr.valid, gr.tokens_per_expert, pr, wr)
                ref = ref or got
                exact = all(torch.equal(a_, b_) for a_, b_ in zip(got, ref))
                res = {"us": round(_graph_us(lambda: group_pairs(ids, 8, tw)), 2), "exact": exact}
            except Exception as exc:  # noqa: BLE001
                res = {"us": float("inf"), "exact": False, "error": f"{type(exc).__name__}: {exc}"[:160]}
            out["group"].setdefault(f"{blk}/{scan}/{nw}w", {})[f"T{t}"] = res
    for name, variants, committed in (("rope", ROPE_VARIANTS, saved_rope), ("group", GROUP_VARIANTS, saved_group)):
        keys = list(out[name])
        ok = {k: sum(v["us"] for v in out[name][k].values()) for k in keys if all(v["exact"] for v in out[name][k].values())}
        out[f"{name}_fastest"] = list(variants[keys.index(min(ok, key=ok.get))] if ok else committed)
    fused_ops.ROPE_BLOCK_H, fused_ops.ROPE_WARPS = saved_rope
    moe_permute.GROUP_BLOCK, moe_permute.GROUP_SCAN, moe_permute.GROUP_WARPS = saved_group
    return out


def small_kernel_latency(cfg: ModelConfig, device, tokens=(1, 32, 128, 256)) -> dict:
    """Graph-replayed us per call of the small phases' kernels at R1 sizes over 1..256 tokens, beside an empty
    kernel: where 128 tokens cost about what 1 token costs, the kernel's time is its own dependent chain
    (load, reduce, store of one row in one program), not the bytes a roofline counts."""
    g = torch.Generator(device=device)
    g.manual_seed(4)
    dt = torch.bfloat16
    h, ql = cfg.hidden_size, cfg.q_lora_rank or cfg.hidden_size
    nh, d, half, lat = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim // 2, cfg.kv_lora_rank
    e = cfg.n_routed_experts
    args = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=g).to(dt)  # noqa: E731
    wh, wq, wl = rnd(h) + 2, rnd(ql) + 2, rnd(lat) + 2
    gate_w, bias = rnd(e, h) * 0.02, torch.randn(e, device=device, generator=g) * 0.01
    one = torch.zeros(1, dtype=torch.int32, device=device)
    out: dict = {"empty kernel": {f"T{t}": round(_graph_us(lambda: one.add_(1)), 2) for t in tokens}}
    for t in tokens:
        x, r = rnd(t, h), rnd(t, h)
        xq = rnd(t, ql)
        q, kv = rnd(t, nh, d), rnd(t, lat + 2 * half)
        ang = torch.randn(t, half, device=device, generator=g)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        cache = torch.zeros(t // 64 + 1, 64, lat + 2 * half, device=device, dtype=dt)
        slots = torch.arange(t, device=device)
        cases = {"add + RMSNorm, hidden (bf16 out)": lambda: fused_ops.rms_norm(x, wh, 1e-6, r),
                 "add + RMSNorm + FP8 quant, hidden": lambda: fused_ops.rms_norm_quant(x, wh, 1e-6, r),
                 "RMSNorm + FP8 quant, q_a": lambda: fused_ops.rms_norm_quant(xq, wq, 1e-6),
                 "RoPE + latent norm + cache write": lambda: fused_ops.rope_cache_write(q, kv, wl, 1e-6, cos, sin,
                                                                                          cache, slots),
                 "router: gate GEMM + selection (2 launches)": lambda: fused_ops.gate_route(x, gate_w, bias, *args)}
        for name, fn in cases.items():
            out.setdefault(name, {})[f"T{t}"] = round(_graph_us(fn), 2)
    return out


def check_fused_ops(cfg: ModelConfig, device, tokens: int = 128) -> dict:
    """The step's fused kernels against their torch references at this model's sizes, on the device (the CPU
    tests run them under Triton's interpreter, whose float casts differ): counts of differing elements."""
    g = torch.Generator(device=device)
    g.manual_seed(1)
    dt = torch.bfloat16
    nh, d, half, lat = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim // 2, cfg.kv_lora_rank
    r = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    q, kv = r(tokens, nh, d).to(dt), (r(tokens, lat + 2 * half) * 2).to(dt)
    w = (r(lat).abs() + 0.5).to(dt)
    ang = r(tokens, half) * 3
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    slots = torch.randperm(4 * tokens, device=device, generator=g)[:tokens]
    slots[::7] = -1
    out: dict = {}
    for cdt in (dt, FP8_DTYPE):
        cache = r(4 * tokens, 1, lat + 2 * half).to(cdt)
        qa, qb, ca, cb = q.clone(), q.clone(), cache.clone(), cache.clone()
        pa = fused_ops.rope_cache_write(qa, kv, w, 1e-6, cos, sin, ca, slots)
        pb = fused_ops.rope_cache_write_ref(qb, kv, w, 1e-6, cos, sin, cb, slots)
        fa, fb = ca.view(-1, ca.shape[-1]).float(), cb.view(-1, cb.shape[-1]).float()
        name = "bf16" if cdt == dt else "fp8"
        out[f"rope_q_pe_diff_{name}"] = int((pa != pb).sum())
        out[f"rope_q_pe_maxabs_{name}"] = float((pa.float() - pb.float()).abs().max())
        out[f"rope_k_pe_diff_{name}"] = int((fa[:, lat:] != fb[:, lat:]).sum())
        out[f"q_nope_untouched_{name}"] = bool(torch.equal(qa[..., :-2 * half], q[..., :-2 * half]))
        out[f"latent_diff_{name}"] = int((fa[:, :lat] != fb[:, :lat]).sum())
        out[f"latent_max_rel_{name}"] = float(((fa[:, :lat] - fb[:, :lat]).abs() / fb[:, :lat].abs().clamp_min(1e-3)).max())
    k, nl = cfg.num_experts_per_tok, 8   # an EP=32 rank's local experts
    ids = torch.randint(-1, nl + 1, (tokens, k), device=device, generator=g)
    tw = torch.rand(tokens, k, device=device, generator=g)
    ga, pa_, wa = group_pairs(ids, nl, tw)
    gb, pb_, wb = group_pairs(ids, nl, tw, impl="torch")
    out["group_pairs_equal"] = bool(torch.equal(ga.order, gb.order) and torch.equal(pa_, pb_) and torch.equal(wa, wb)
                                    and torch.equal(ga.tokens_per_expert, gb.tokens_per_expert))
    y = r(tokens * k, cfg.hidden_size).to(dt)
    out["weighted_combine_diff"] = int((gather_sum(y, pa_, weights=wa) !=
                                        gather_sum(y * wa.to(dt)[:, None], pb_, impl="torch")).sum())
    kvb = r(tokens, nh, cfg.qk_nope_head_dim + cfg.v_head_dim).to(dt)
    ka, va = fused_ops.mla_prefill_kv(kvb, kv[:, lat:], cfg.v_head_dim)
    kb, vb = fused_ops.mla_prefill_kv_ref(kvb, kv[:, lat:], cfg.v_head_dim)
    out["prefill_kv_equal"] = bool(torch.equal(ka, kb) and torch.equal(va, vb))
    if cfg.q_lora_rank:   # q_a ‖ kv_a stacked: one FP8 GEMM vs the two projections apart (their own configs)
        parts = (cfg.q_lora_rank, cfg.kv_cache_dim)
        ws = [quantize_block_fp8(r(p_, cfg.hidden_size) * 0.05) for p_ in parts]
        stacked = Fp8Linear(cfg.hidden_size, sum(parts), parts=parts).to(device)
        stacked.weight.data = torch.cat([w_ for w_, _ in ws])
        stacked.weight_scale_inv.data = torch.cat([s_ for _, s_ in ws])
        x = r(tokens, cfg.hidden_size).to(dt)
        rel = 0.0
        for y, (w_, s_), p_ in zip(stacked.forward_parts(x), ws, parts):
            sep = fp8_linear(x, w_, s_, scale_row_index([p_], 128, device)).float()
            rel = max(rel, float((y.float() - sep).abs().max() / sep.abs().max()))
        out["qkv_a_stacked_vs_separate_max_rel"] = rel
    # RMSNorm + FP8 activation quantization in one kernel against rms_norm then act_quant (codes, scales, sum)
    from wideep.model import fp8_triton
    nq = 0
    for d, res, pad in [(cfg.hidden_size, True, 1), (cfg.hidden_size, False, 16), (cfg.q_lora_rank or 0, False, 16)]:
        if not d:
            continue
        xs = (r(tokens, d + 64) * 3).to(dt)[:, :d]   # a strided view, as the q_a part of the stacked output
        rs = r(tokens, d).to(dt) if res else None
        wn = (r(d).abs() + 0.5).to(dt)
        got = fused_ops.rms_norm_quant(xs, wn, 1e-6, rs, pad_rows=pad)
        normed = fused_ops.rms_norm(xs, wn, 1e-6, rs)
        if res:
            normed, total = normed
            nq += int((got[2] != total).sum())
        qr, sr = fp8_triton.act_quant(normed, pad)
        nq += int((got[0][:tokens].view(torch.uint8) != qr[:tokens].view(torch.uint8)).sum())
        nq += int((got[1][:tokens] != sr[:tokens]).sum())
    out["norm_quant_diff"] = nq
    # the grouped FP8 expert MLP: every counted row written, the padding rows past them zero (zero_tail; the
    # output's memory held NaN just before), the values against the per-expert torch path
    from wideep.model.fp8 import fp8_grouped_mlp
    inter, hid, counts = cfg.moe_intermediate_size, cfg.hidden_size, [50, 0, 70]
    w13 = r(3, 2 * inter, hid).to(FP8_DTYPE)
    w2_ = r(3, hid, inter).to(FP8_DTYPE)
    s13 = torch.full((3, 2 * inter // 128, hid // 128), 0.02, device=device)
    s2_ = torch.full((3, hid // 128, inter // 128), 0.02, device=device)
    i13, i2 = scale_row_index([inter, inter], 128, device), scale_row_index([hid], 128, device)
    xg = r(136, hid).to(dt)
    tpe = torch.tensor(counts, device=device)
    del_me = torch.full((136, hid), float("nan"), dtype=dt, device=device)
    del del_me
    yg = fp8_grouped_mlp(xg, w13, s13, i13, w2_, s2_, i2, tpe, impl="triton")
    yr = fp8_grouped_mlp(xg, w13, s13, i13, w2_, s2_, i2, tpe, impl="torch")
    out["grouped_mlp_padding_zero"] = bool((yg[120:] == 0).all()) and not bool(yg.isnan().any())
    out["grouped_mlp_vs_torch_max_rel"] = float((yg.float() - yr.float()).abs().max() / yr.float().abs().max())
    wk = r(nh, cfg.qk_nope_head_dim, lat).to(dt)
    qn = q[..., : cfg.qk_nope_head_dim]
    out["absorbed_bmm_equal_einsum"] = bool(torch.equal(torch.bmm(qn.transpose(0, 1), wk).transpose(0, 1),
                                                        torch.einsum("bhn,hnl->bhl", qn, wk)))
    return out


# ---- the engine-driven rank ------------------------------------------------------------------------------

@dataclass
class RankRun:
    core: EngineCore
    cfg: ModelConfig
    dispatcher: EmulatedEPDispatcher
    fp8: bool


def make_rank(cfg: ModelConfig, a, device, dtype, fp8: bool, num_blocks: int) -> RankRun:
    disp = EmulatedEPDispatcher(cfg.n_routed_experts, a.ep, cfg.num_experts_per_tok, a.routing, a.zipf_s)
    model = build_rank_model(cfg, disp, device, dtype, a.seed)
    per_block = cfg.num_hidden_layers * a.block_size * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()
    args = EngineArgs(device=str(device), dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                      block_size=a.block_size, max_num_seqs=max(a.batch),
                      max_num_batched_tokens=max(a.prefill_tokens, max(a.batch)),
                      max_model_len=max(max(a.ctx) + 8 + engine_tokens(a), a.prefill_seq_len + 8),
                      kv_cache_memory_bytes=num_blocks * per_block, enable_prefix_caching=False,
                      enforce_eager=a.eager, cuda_graph_sizes=sorted(set(a.batch)), seed=a.seed,
                      async_scheduling=a.engine_steps > 0)
    core = EngineCore(args, model=model)
    return RankRun(core, cfg, disp, fp8)


def fake_requests(run: RankRun, n: int, ctx: int, tag: str, prefill: bool = False) -> list[Request]:
    """n requests of `ctx` known tokens holding their KV blocks; decode: ctx-1 computed (one new token)."""
    g = torch.Generator().manual_seed(n * 7919 + ctx)
    reqs = []
    for i in range(n):
        ids = torch.randint(10, run.cfg.vocab_size, (ctx,), generator=g).tolist()
        sp = SamplingParams(max_tokens=1 << 20, temperature=0.6, ignore_eos=True)
        r = Request(EngineRequest(f"{tag}-{i}", ids, sp), set(), 1 << 20)
        if not run.core.block_manager.allocate(r, ctx + 1):
            for q in reqs:
                run.core.block_manager.free(q)
            raise MemoryError(f"{n} x {ctx} tokens do not fit the KV cache")
        r.num_computed_tokens = 0 if prefill else ctx - 1
        reqs.append(r)
    return reqs


def release(run: RankRun, reqs: list[Request]) -> None:
    for r in reqs:
        run.core.block_manager.free(r)


ENGINE_WARMUP = 3   # engine steps before the timed ones (graph replay warm, async pipeline full)


def engine_tokens(a) -> int:
    """Tokens a sequence grows by in the engine steady-state runs (KV and max_model_len must hold them)."""
    return ENGINE_WARMUP + a.engine_steps + 2 if a.engine_steps else 0


def engine_steady_state(run: RankRun, b: int, ctx: int, steps: int, async_scheduling: bool, device) -> dict:
    """Per-step time of the engine loop (EngineCore.step(): schedule, launch, apply) over B running decodes
    that reach ctx tokens in the last timed step (the one-step figure's context; past a 2,048-token attention
    split the MLA kernel's work changes), with async scheduling on or off. The sequences enter the scheduler as
    running decodes whose tokens hold KV already (not computed: its values do not change the work); they are
    aborted through the engine afterwards (blocks freed)."""
    core = run.core
    free0 = core.num_free_blocks
    reqs = fake_requests(run, b, max(2, ctx + 1 - ENGINE_WARMUP - steps), f"e{int(async_scheduling)}-{b}-{ctx}")
    for r in reqs:
        r.status = RequestStatus.RUNNING
        core.scheduler.requests[r.request_id] = r
        core.scheduler.running.append(r)
    saved, core.async_scheduling = core.async_scheduling, async_scheduling
    try:
        for _ in range(ENGINE_WARMUP):
            core.step()
        _sync(device)
        wait0, tokens = core.runner.wait_s, 0
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens += sum(len(o.new_token_ids) for o in core.step())
        _sync(device)   # async: the last launched step included
        wall = (time.perf_counter() - t0) / steps
        wait = (core.runner.wait_s - wait0) / steps
    finally:
        for r in reqs:
            core.abort_request(r.request_id)
        core.step()     # applies the step in flight (async) and reports the aborts
        core.async_scheduling = saved
    return {"async_scheduling": async_scheduling, "steps": steps, "step_ms": wall * 1e3, "tok_s_gpu": b / wall,
            "host_wait_ms": wait * 1e3, "tokens_per_step": tokens / steps,
            "blocks_returned": core.num_free_blocks == free0, "unfinished": core.has_unfinished()}


# ---- per-phase attribution -----------------------------------------------------------------------------------

# Phases of a step, in print order. Every device kernel (or copy) of the profiled step lands in exactly one.
PHASES = ("mla_kernel", "attention_proj", "rope_cache_write", "norms_residual", "router", "dispatch_combine_glue",
          "routed_experts", "shared_expert", "dense_mlp", "lm_head_sampling", "other")
# the innermost profiler range enclosing a kernel's launch -> its phase
RANGE_PHASE = {"attention": "attention_proj", "norm": "norms_residual", "layer": "norms_residual",
               "router": "router", "moe": "dispatch_combine_glue", "routed_experts": "routed_experts",
               "shared_expert": "shared_expert", "dense_mlp": "dense_mlp", "lm_head": "lm_head_sampling",
               "sampling": "lm_head_sampling", "step": "other"}
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")   # cudaLaunchKernel / cuLaunchKernel (Triton) / cudaMemcpyAsync


def kernel_phase(name: str, range_name: str | None) -> str:
    """A kernel's phase: attention kernels and the fused RoPE + cache write by their names (they run inside
    the attention range), everything else by the innermost range that launched it."""
    low = name.lower()
    if not low.startswith("aten::") and any(s in low for s in ("mla_decode", "flash", "fmha", "sdpa")):
        return "mla_kernel"
    if "rope_cache" in low:
        return "rope_cache_write"
    return RANGE_PHASE.get(range_name or "", "other")


def _innermost(ranges: list[tuple[float, float, str]], points: list[tuple[float, int]]) -> dict[int, str | None]:
    """Nested ranges (start, end, name) of one thread and points (t, key): key -> innermost range name at t."""
    ranges = sorted(ranges, key=lambda r: (r[0], -r[1]))
    out: dict[int, str | None] = {}
    stack: list[tuple[float, float, str]] = []
    i = 0
    for t, key in sorted(points):
        while i < len(ranges) and ranges[i][0] <= t:
            while stack and stack[-1][1] < ranges[i][0]:
                stack.pop()
            stack.append(ranges[i])
            i += 1
        while stack and stack[-1][1] < t:
            stack.pop()
        out[key] = stack[-1][2] if stack else None
    return out


def attribute_trace(events: list[dict]) -> dict:
    """Chrome-trace events of one profiled step -> device ms per phase (they sum to the total), launches per
    phase and the top kernels of each phase.

    On a GPU the items are the device kernels and copies; each is tied to its host launch call by the
    trace's correlation id (Triton kernels too: they launch through cuLaunchKernel), and the launch's
    innermost `phase::` range names its phase. Without device events (CPU) the items are the outermost
    host ops, placed by their own start. Nothing is subtracted, so no phase can be negative."""
    ranges: dict[tuple, list] = {}
    launch_at: dict[int, tuple[tuple, float]] = {}
    device, cpu_ops = [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, tid, ts = e.get("cat", ""), (e.get("pid"), e.get("tid")), float(e.get("ts", 0.0))
        dur = float(e.get("dur", 0.0))
        if cat == "user_annotation" and e.get("name", "").startswith("phase::"):
            ranges.setdefault(tid, []).append((ts, ts + dur, e["name"][7:]))
        elif cat in LAUNCH_CATS and "correlation" in e.get("args", {}):
            launch_at[e["args"]["correlation"]] = (tid, ts)
        elif cat in DEVICE_CATS:
            device.append((e.get("name", "?"), dur, e.get("args", {}).get("correlation")))
        elif cat == "cpu_op":
            cpu_ops.append((tid, ts, dur, e.get("name", "?")))
    items: list[tuple[str, float, tuple | None, float]] = []   # (name, ms, thread, t)
    if device:
        for name, dur, corr in device:
            tid, t = launch_at.get(corr, (None, 0.0))
            items.append((name, dur / 1e3, tid, t))
    else:
        end: dict[tuple, float] = {}
        for tid, ts, dur, name in sorted(cpu_ops, key=lambda o: (o[0], o[1], -o[2])):
            if ts >= end.get(tid, float("-inf")):   # outermost op of its thread
                items.append((name, dur / 1e3, tid, ts))
                end[tid] = ts + dur
    where: dict[int, str | None] = {}
    by_tid: dict[tuple, list] = {}
    for i, (_, _, tid, t) in enumerate(items):
        if tid is not None:
            by_tid.setdefault(tid, []).append((t, i))
    for tid, pts in by_tid.items():
        where.update(_innermost(ranges.get(tid, []), pts))
    phases = {p: 0.0 for p in PHASES}
    launches = {p: 0 for p in PHASES}
    per_kernel: dict[tuple[str, str], list] = {}
    for i, (name, ms, _, _) in enumerate(items):
        p = kernel_phase(name, where.get(i))
        phases[p] += ms
        launches[p] += 1
        k = per_kernel.setdefault((p, name), [0.0, 0])
        k[0] += ms
        k[1] += 1
    top: dict[str, list] = {p: [] for p in PHASES}
    for (p, name), (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        if len(top[p]) < 5:
            top[p].append([name[:90], round(ms, 4), n])
    return {"phases_ms": phases, "launches": launches, "total_ms": sum(phases.values()),
            "top_kernels_by_phase": top}


class PhaseRanges:
    """Profiler ranges named by phase around the modules of the step (forward hooks) and the sampler."""

    def __init__(self, model: DeepseekV3ForCausalLM, sampler=None):
        self.handles = []
        for layer in model.model.layers:
            self._wrap(layer, "layer")
            self._wrap(layer.self_attn, "attention")
            if hasattr(layer.mlp, "experts"):
                self._wrap(layer.mlp, "moe")
                self._wrap(layer.mlp.gate, "router")
                self._wrap(layer.mlp.experts, "routed_experts")
                if layer.mlp.shared_experts is not None:
                    self._wrap(layer.mlp.shared_experts, "shared_expert")
            else:
                self._wrap(layer.mlp, "dense_mlp")
        for mod in model.modules():
            if isinstance(mod, RMSNorm):
                self._wrap(mod, "norm")
        self._wrap(model.lm_head, "lm_head")
        self.sampler = sampler
        if sampler is not None:
            inner = sampler.sample

            def sample(*args, **kw):
                with torch.profiler.record_function("phase::sampling"):
                    return inner(*args, **kw)
            sampler.sample = sample

    def _wrap(self, mod, name):
        stack = []

        def pre(_m, _i):
            rf = torch.profiler.record_function(f"phase::{name}")
            rf.__enter__()
            stack.append(rf)

        def post(_m, _i, _o):
            stack.pop().__exit__(None, None, None)

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()
        if self.sampler is not None:
            del self.sampler.sample   # back to the class's method


def _step_events(run: RankRun, out: SchedulerOutput, device, extra_marks: tuple = (),
                 trace_dir: str | None = None) -> list[dict]:
    """The trace events of one eager step (after one warm-up step) under the profiler, with PhaseRanges and then
    each of `extra_marks` (classes taking the run, with remove()) installed for its duration."""
    runner = run.core.runner
    hooks = [PhaseRanges(run.core.model, runner.sampler)]
    hooks += [m(run) for m in extra_marks]
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        runner.execute(out, use_graphs=False)
        _sync(device)
        with torch.profiler.profile(activities=acts) as prof:
            with torch.profiler.record_function("phase::step"):
                runner.execute(out, use_graphs=False)
            _sync(device)
    finally:
        for h in reversed(hooks):
            h.remove()
    path = Path(tempfile.mkstemp(suffix=".json", dir=trace_dir)[1])
    try:
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text()).get("traceEvents", [])
    finally:
        path.unlink(missing_ok=True)


def profile_phases(run: RankRun, out: SchedulerOutput, device, trace_dir: str | None = None) -> dict:
    """Device time per phase of one eager step (ms): every kernel attributed once (attribute_trace)."""
    res = attribute_trace(_step_events(run, out, device, trace_dir=trace_dir))
    return {"phases_ms": res["phases_ms"], "launches": res["launches"], "step_gpu_ms": res["total_ms"],
            "top_kernels_by_phase": res["top_kernels_by_phase"]}


def _profile_into(res: dict, run: RankRun, out: SchedulerOutput, device, ceil: dict) -> None:
    try:
        res.update(profile_phases(run, out, device))
        res["floor_ms"] = phase_floors(res["roofline_ms"], res["launches"], ceil["launch"]["per_launch_us"])
    except Exception as exc:  # noqa: BLE001 - the throughput numbers stand without the breakdown
        res["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"    profile FAILED: {res['profile_error']}", flush=True)


def rooflines(cfg: ModelConfig, n_local: int, fp8: bool, b: int, ctx: int | None, ceil: dict,
              prefill_tokens: int = 0) -> dict:
    """Floor of each phase (ms): bytes / copy bandwidth, or FLOPs / matmul rate, whichever is larger."""
    bw = ceil["copy_GBps"] * 1e9
    peak = (ceil["fp8_TFLOPs"] if fp8 else ceil["bf16_TFLOPs"]) * 1e12
    peak_bf16 = ceil["bf16_TFLOPs"] * 1e12
    wb = 1 if fp8 else 2
    h, nh, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    dense_layers = layers - moe_layers
    qk, v, lat = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    attn_w = (cfg.q_lora_rank * h + nh * qk * cfg.q_lora_rank if cfg.q_lora_rank else nh * qk * h) + \
        cfg.kv_cache_dim * h + nh * (cfg.qk_nope_head_dim + v) * lat + h * nh * v
    tokens = prefill_tokens or b
    t = lambda nbytes, flops, rate=peak: max(nbytes / bw, flops / rate) * 1e3  # noqa: E731
    expert_w = 3 * cfg.moe_intermediate_size * h
    rows = tokens * cfg.num_experts_per_tok
    fused = int(fuse_shared_expert(cfg))   # the shared expert runs as one more group of the routed experts
    # decode runs kv_b as the absorbed bmm's over its bf16 copy (the FP8 weight is not read); prefill as kv_b_proj
    kvb = nh * (cfg.qk_nope_head_dim + v) * lat
    out = {
        "attention_proj": t(layers * (attn_w * wb if prefill_tokens else (attn_w - kvb) * wb + kvb * 2),
                             layers * 2 * tokens * attn_w),
        "router": t(moe_layers * cfg.n_routed_experts * h * 2, moe_layers * 2 * tokens * cfg.n_routed_experts * h, peak_bf16),
        "routed_experts": t(moe_layers * (n_local + fused) * expert_w * wb, moe_layers * 2 * (rows + fused * tokens) * expert_w),
        "shared_expert": 0.0 if fused else t(moe_layers * expert_w * cfg.n_shared_experts * wb,
                                             moe_layers * 2 * tokens * expert_w),
        "dense_mlp": t(dense_layers * 3 * cfg.intermediate_size * h * wb, dense_layers * 6 * tokens * cfg.intermediate_size * h),
        # gather rows in, weighted rows out, summed back: ~3 passes over rows x hidden in bf16
        "dispatch_combine_glue": t(moe_layers * 3 * rows * h * 2, 0),
        "lm_head_sampling": t(cfg.vocab_size * h * 2, 2 * b * cfg.vocab_size * h, peak_bf16),
        # per layer: 2 hidden norms, each with the residual add (x, r in; s, y out: 4h) except layer 0's input
        # norm (x in, y out), + the q_a latent norm (in, out); FP8 decode: the input and q_a norms write their
        # output as the next projection's e4m3 codes (1 byte; the scales, 1/32 of that, not counted)
        "norms_residual": t(sum(n * b for _, n, b in norm_work(cfg, tokens, fp8 and not prefill_tokens)), 0),
        # q_pe read + written, the kv_a output read, the cache row written (bf16 cache)
        "rope_cache_write": t(layers * tokens * (2 * nh * cfg.qk_rope_head_dim + 2 * cfg.kv_cache_dim) * 2, 0),
        "other": float("nan"),
    }
    if ctx:
        kv = layers * b * ctx * cfg.kv_cache_dim * 2
        flops = layers * 2 * b * nh * ctx * (cfg.kv_cache_dim + lat)
        out["mla_kernel"] = t(kv, flops, peak_bf16)
    else:  # prefill attention (MHA form, causal): 2 * T^2/2 * heads * (qk + v) per sequence
        out["mla_kernel"] = t(0, layers * tokens * ctx_or(prefill_tokens, b) * nh * (qk + v), peak_bf16)
    return out


def ctx_or(prefill_tokens: int, seqs: int) -> int:
    return prefill_tokens // max(seqs, 1)


def decode_case(run: RankRun, b: int, ctx: int, a, device, ceil: dict) -> dict:
    reqs = fake_requests(run, b, ctx, f"d{b}-{ctx}")
    try:
        return _decode_case(run, reqs, b, ctx, a, device, ceil)
    finally:
        release(run, reqs)


def _decode_case(run: RankRun, reqs: list[Request], b: int, ctx: int, a, device, ceil: dict) -> dict:
    out = SchedulerOutput(seqs=[ScheduledSeq(r, ctx - 1, 1, samples=True) for r in reqs], num_decodes=b, num_tokens=b)
    runner = run.core.runner
    step = timed(lambda: runner.execute(out), device, a.iters)
    res = {"B": b, "ctx": ctx, "step_ms": step * 1e3, "tok_s_gpu": b / step,
           "graph": bool(runner.graph_for(out))}
    if device.type == "cuda" and res["graph"]:
        g = runner.graph_for(out)
        res["graph_replay_ms"] = timed(lambda: runner._replay_graph(g, b), device, a.iters) * 1e3
    res["roofline_ms"] = rooflines(run.cfg, run.dispatcher.num_local_experts, run.fp8, b, ctx, ceil)
    if a.profile:
        _profile_into(res, run, out, device, ceil)
    return res


def engine_case(run: RankRun, b: int, ctx: int, a, device) -> dict:
    """The engine loop's steady state, synchronous then with async scheduling (engine_steady_state)."""
    return {"sync": engine_steady_state(run, b, ctx, a.engine_steps, False, device),
            "async": engine_steady_state(run, b, ctx, a.engine_steps, True, device)}


def prefill_case(run: RankRun, tokens: int, seq_len: int, a, device, ceil: dict) -> dict:
    n = max(1, tokens // seq_len)
    reqs = fake_requests(run, n, seq_len, f"p{tokens}", prefill=True)
    try:
        return _prefill_case(run, reqs, n, seq_len, a, device, ceil)
    finally:
        release(run, reqs)


def _prefill_case(run: RankRun, reqs: list[Request], n: int, seq_len: int, a, device, ceil: dict) -> dict:
    out = SchedulerOutput(seqs=[ScheduledSeq(r, 0, seq_len, samples=True) for r in reqs], num_decodes=0, num_tokens=n * seq_len)
    runner = run.core.runner
    step = timed(lambda: runner.execute(out), device, max(2, a.iters // 4), warmup=1)
    res = {"tokens": n * seq_len, "seqs": n, "step_ms": step * 1e3, "tok_s_gpu": n * seq_len / step}
    res["roofline_ms"] = rooflines(run.cfg, run.dispatcher.num_local_experts, run.fp8, n, None, ceil,
                                   prefill_tokens=n * seq_len)
    if a.profile:
        _profile_into(res, run, out, device, ceil)
    return res


def with_comm(res: dict, ep: int, moe_layers: int, prefill: bool, hidden: int, top_k: int) -> None:
    """Adds communication from published figures: unoverlapped (step + comm) and fully overlapped (max)."""
    if prefill:
        fanout = ep * (1 - (1 - 1 / ep) ** top_k)  # expected distinct destination ranks per token
        comm = moe_layers * res["tokens"] * fanout * hidden * (1 + 2) / (DEEPEP_HT_RDMA_GBPS * 1e9)
        n = res["tokens"]
    else:
        if ep not in DEEPEP_LL_US:
            return
        d, c = DEEPEP_LL_US[ep]
        comm = moe_layers * (d + c) * 1e-6 * res["B"] / 128
        n = res["B"]
    step = res["step_ms"] / 1e3
    res["comm_ms"] = comm * 1e3
    res["tok_s_gpu_comm_unoverlapped"] = n / (step + comm)
    res["tok_s_gpu_comm_overlapped"] = n / max(step, comm)


# ---- dual-batch overlap at the rank's shape (--dbo) ------------------------------------------------------------

def set_dbo(run: RankRun, enabled: bool) -> None:
    """Turns the engine's dual-batch overlap on or off (what --enable-dbo sets, with the engine's thresholds:
    decode steps above 32 tokens split, vLLM's default) and recaptures the decode graphs, whose forward is
    chosen at capture."""
    runner = run.core.runner
    runner.dbo = DBOConfig.from_args(dataclasses.replace(run.core.args, enable_dbo=enabled))
    if runner.graphs:
        # a fresh memory pool: the old graphs were the old pool's only users, and capturing into a pool whose
        # graphs are all freed trips the caching allocator's use-count assert
        runner.graphs, runner.graph_pool = {}, None
        gc.collect()
        runner.capture_cuda_graphs()
        if not runner.graphs:   # the runner logged why; timing an eager step as the graph step would mislead
            raise RuntimeError(f"decode graphs could not be recaptured with enable_dbo={enabled}")


@torch.inference_mode()
def step_hidden(run: RankRun, out: SchedulerOutput) -> torch.Tensor:
    """The final hidden states of one decode step (graph replay where a graph holds the batch, else eager)."""
    runner = run.core.runner
    b = len(out.seqs)
    g = runner.graph_for(out)
    if g is not None:
        runner.execute(out)
        return g.hidden[:b].clone()
    ids, pos, attn, _ = runner._prepare(out)
    return runner._forward(ids, pos, attn, True).clone()


def compare_steps(model, ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Split vs unsplit step: greedy tokens (argmax of the logits) equal, rows bit-equal, the largest hidden
    difference relative to the largest |hidden|, and for rows whose greedy token differs, the unsplit top-1 vs
    top-2 logit gap (a flip within that gap is rounding, not a wrong row)."""
    la, lb = model.compute_logits(ref), model.compute_logits(other)
    ta, tb = la.argmax(-1), lb.argmax(-1)
    flip = ta != tb
    top2 = la[flip].topk(2, dim=-1).values if bool(flip.any()) else None
    return {"rows": int(ref.shape[0]), "finite": bool(torch.isfinite(ref).all() and torch.isfinite(other).all()),
            "greedy_tokens_equal": int((~flip).sum()),
            "rows_bit_equal": int((ref == other).all(-1).sum()),
            "hidden_max_rel": float((ref.float() - other.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)),
            "logits_max_abs_diff": float((la - lb).abs().max()),
            "flipped_rows_top2_gap_max": float((top2[:, 0] - top2[:, 1]).max()) if top2 is not None else 0.0}


class DBOStageMarks:
    """Profiler marks of a split step's stages: one at each micro-batch switch (the driver calls the
    dispatcher's set_ubatch before every stage, and once with defaults after the last) and one right after each
    dispatch / combine is issued. Each MoE layer's stages run in a `moe` phase range, as its forward does in an
    unsplit step (there the module's hooks open it), and each layer's in a `layer` range (the fused add + norms),
    so the per-phase tables of both steps place the same kernels alike. Installed on the instances for one
    profiled step, then removed. The emulated dispatcher's four async methods do not call one another, so each
    issue is marked once."""

    ISSUES = {"dispatch_async": "dispatch", "dispatch_with_own_async": "dispatch",
              "combine_async": "combine", "combine_weighted_async": "combine"}

    def __init__(self, run: RankRun):
        self.disp = disp = run.dispatcher
        self.layers = list(run.core.model.model.layers)
        self.moes = [layer.mlp for layer in self.layers if hasattr(layer.mlp, "experts")]
        set_ubatch = disp.set_ubatch

        def marked_set_ubatch(row_offset: int = 0, max_tokens: int | None = None, index: int = 0) -> None:
            _mark(f"dbo::stage{index}")
            set_ubatch(row_offset, max_tokens, index)

        def marked(method, kind):
            def issue(*args) -> Pending:
                p = method(*args)
                _mark(f"dbo::issue_{kind}")
                return p
            return issue

        disp.set_ubatch = marked_set_ubatch  # type: ignore[method-assign]
        for name, kind in self.ISSUES.items():
            setattr(disp, name, marked(getattr(disp, name), kind))
        for m in self.layers + self.moes:
            m.forward_stages = functools.partial(_ranged_stages, "moe" if m in self.moes else "layer", m.forward_stages)

    def remove(self) -> None:
        del self.disp.set_ubatch
        for name in self.ISSUES:
            delattr(self.disp, name)
        for m in self.layers + self.moes:
            del m.forward_stages


def _ranged_stages(phase: str, stages, *args):
    """A stage generator whose every resumption runs inside a `phase::` profiler range."""
    gen = stages(*args)
    while True:
        try:
            _in_range(phase, next, gen)
        except StopIteration as stop:
            return stop.value
        yield


def _mark(name: str) -> None:
    with torch.profiler.record_function(name):
        pass


def _in_range(phase: str, fn, *args):
    with torch.profiler.record_function(f"phase::{phase}"):
        return fn(*args)


def profile_dbo_step(run: RankRun, out: SchedulerOutput, device) -> dict:
    """One eager split step under the profiler: device ms per phase (attribute_trace) and per stage
    (dbo_stage_times)."""
    events = _step_events(run, out, device, (DBOStageMarks,))
    res = attribute_trace(events)
    return {"phases_ms": res["phases_ms"], "launches": res["launches"], "step_gpu_ms": res["total_ms"],
            "top_kernels_by_phase": res["top_kernels_by_phase"], **dbo_stage_times(events)}


def dbo_stage_times(events: list[dict]) -> dict:
    """Device ms of each stage of a profiled split step, from DBOStageMarks' marks. A device kernel (or copy)
    belongs to the stage in which the host launched it (correlation id; on a CPU the outermost host ops, by
    their start). Stages alternate micro-batches A, B, A, B...; the last mark (the driver's reset) starts the
    tail (final norm's successors: lm_head, sampling). `after_issue_ms`: the stage's time after its transfer
    was issued (the shared expert after a combine), which runs beside that transfer too."""
    marks = sorted((float(e["ts"]), e["name"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name", "").startswith("dbo::"))
    launch_at = {e["args"]["correlation"]: float(e["ts"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    items = [(launch_at.get(e.get("args", {}).get("correlation"), float("-inf")), float(e.get("dur", 0.0)) / 1e3)
             for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    if not items:   # CPU: outermost host ops of each thread
        end: dict = {}
        for e in sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                        key=lambda e: (e.get("tid"), float(e["ts"]), -float(e.get("dur", 0.0)))):
            ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
            if ts >= end.get(e.get("tid"), float("-inf")):
                items.append((ts, dur / 1e3))
                end[e.get("tid")] = ts + dur
    starts = [(t, n) for t, n in marks if n.startswith("dbo::stage")]
    if len(starts) < 2:
        raise ValueError(f"a split step has at least 2 stage marks; found {len(starts)} (was the step split?)")
    bounds = [t for t, _ in starts]
    stages: list[dict[str, Any]] = [{"ubatch": int(n[len("dbo::stage"):]), "ms": 0.0, "issues": []}
                                    for _, n in starts[:-1]]
    for t, n in marks:
        if n.startswith("dbo::issue_"):
            j = bisect.bisect_right(bounds, t) - 1
            if 0 <= j < len(stages):
                stages[j]["issues"].append({"kind": n[len("dbo::issue_"):], "t": t, "after_ms": 0.0})
    head = tail = 0.0
    for t, ms in items:
        j = bisect.bisect_right(bounds, t) - 1
        if j < 0:
            head += ms
        elif j >= len(stages):
            tail += ms
        else:
            stages[j]["ms"] += ms
            for iss in stages[j]["issues"]:
                if t >= iss["t"]:
                    iss["after_ms"] += ms
    for st in stages:
        for iss in st["issues"]:
            del iss["t"]
    return {"stages": stages, "head_ms": head, "tail_ms": tail,
            "stage_sum_ms": sum(st["ms"] for st in stages)}


def dbo_overlap(stages: list[dict], comm_us: dict[tuple[str, int], float]) -> dict:
    """Exposed communication of a split step, from its measured stages. A transfer issued in stage s (micro-batch
    u's dispatch or combine, comm_us[(kind, u)] us) runs beside the rest of stage s after its issue and the
    whole next stage, the other micro-batch's, and is waited for when u's next stage starts: exposed =
    max(0, comm - that compute), summed over transfers. An idle wait for one transfer also covers the other
    micro-batch's transfer in flight; that is not credited (an upper bound on the exposure), and two
    transfers in flight at once are not slowed by sharing the link (a lower bound)."""
    out = {"dispatch_ms": 0.0, "combine_ms": 0.0, "exposed_dispatch_ms": 0.0, "exposed_combine_ms": 0.0,
           "transfers": 0}
    for s, st in enumerate(stages):
        nxt = stages[s + 1]["ms"] if s + 1 < len(stages) else 0.0
        for iss in st["issues"]:
            comm = comm_us[(iss["kind"], st["ubatch"])] / 1e3
            out[f"{iss['kind']}_ms"] += comm
            out[f"exposed_{iss['kind']}_ms"] += max(0.0, comm - iss["after_ms"] - nxt)
            out["transfers"] += 1
    out["comm_ms"] = out["dispatch_ms"] + out["combine_ms"]
    out["exposed_ms"] = out["exposed_dispatch_ms"] + out["exposed_combine_ms"]
    out["hidden_frac"] = 1 - out["exposed_ms"] / out["comm_ms"] if out["comm_ms"] else float("nan")
    return out


def dbo_case(run: RankRun, b: int, ctx: int, a, device, unsplit: dict) -> dict:
    """The same decode step with the engine's dual-batch overlap on: the split step's time (ModelRunner.execute,
    its graph replayed), per phase and per stage (one eager step), its outputs against the unsplit step's, and
    the step with published LL communication overlapped as dbo_overlap models it (each micro-batch's transfer
    the published per-layer figure for 128 tokens x its tokens / 128: linear, as with_comm scales B)."""
    threshold = DBOConfig.from_args(dataclasses.replace(run.core.args, enable_dbo=True)).decode_token_threshold
    if b <= threshold:
        return {"B": b, "ctx": ctx, "split": False, "why": f"B={b} <= the decode threshold {threshold}"}
    reqs = fake_requests(run, b, ctx, f"dbo{b}-{ctx}")
    runner = run.core.runner
    out = SchedulerOutput(seqs=[ScheduledSeq(r, ctx - 1, 1, samples=True) for r in reqs], num_decodes=b, num_tokens=b)
    try:
        ref = step_hidden(run, out)
        again = step_hidden(run, out)
        set_dbo(run, True)
        try:
            split_before = runner.split_steps
            res: dict = {"B": b, "ctx": ctx, "split": True, "ubatch_tokens": [-(-b // 2), b // 2]}
            res["compare"] = compare_steps(run.core.model, ref, step_hidden(run, out))
            res["compare"]["unsplit_repeat_bit_equal"] = bool(torch.equal(ref, again))
            res["graph_split"] = runner.dbo.should_split(b, True)
            step = timed(lambda: runner.execute(out), device, a.iters)
            res.update(step_ms=step * 1e3, tok_s_gpu=b / step, graph=bool(runner.graph_for(out)))
            g = runner.graph_for(out)
            if device.type == "cuda" and g is not None:
                res["graph_replay_ms"] = timed(lambda: runner._replay_graph(g, b), device, a.iters) * 1e3
            res.update(profile_dbo_step(run, out, device))
            res["eager_split_steps"] = runner.split_steps - split_before
            if a.engine_steps:   # the split step as a served decode pod runs it: async scheduling, graphs
                release(run, reqs)
                reqs = []
                split_before = runner.split_steps
                res["engine_async"] = engine_steady_state(run, b, ctx, a.engine_steps, True, device)
                res["engine_async"]["eager_split_steps"] = runner.split_steps - split_before
        finally:
            set_dbo(run, False)
    finally:
        release(run, reqs)
    if a.ep in DEEPEP_LL_US:
        d, c = DEEPEP_LL_US[a.ep]
        comm = {(kind, u): us * n / 128 for kind, us in (("dispatch", d), ("combine", c))
                for u, n in enumerate(res["ubatch_tokens"])}
        m = dbo_overlap(res["stages"], comm)
        res["overlap"] = m
        m["slowdown_ms"] = res["step_ms"] * a.comm_slowdown
        res["step_overlapped_ms"] = res["step_ms"] + m["slowdown_ms"] + m["exposed_ms"]
        res["tok_s_gpu_overlapped"] = b / (res["step_overlapped_ms"] / 1e3)
        if "engine_async" in res:
            loop = res["engine_async"]["step_ms"]
            res["engine_async"]["step_overlapped_ms"] = ms = loop * (1 + a.comm_slowdown) + m["exposed_ms"]
            res["engine_async"]["tok_s_gpu_overlapped"] = b / (ms / 1e3)
    res["unsplit"] = {k: unsplit[k] for k in ("step_ms", "tok_s_gpu", "graph_replay_ms", "comm_ms",
                                               "tok_s_gpu_comm_unoverlapped", "phases_ms", "launches",
                                               "step_gpu_ms") if k in unsplit}
    return res


def stage_summary(stages: list[dict]) -> dict:
    """Mean device us per micro-batch stage by what it issues: the attention stage (ends with a dispatch) and
    the experts stage (ends with a combine; whatever runs after the issue, e.g. an unfused shared expert, runs
    beside it)."""
    out = {}
    for kind in ("dispatch", "combine"):
        sel = [st for st in stages if any(i["kind"] == kind for i in st["issues"])]
        if sel:
            out[f"{kind}_stage_us"] = 1e3 * sum(st["ms"] for st in sel) / len(sel)
            out[f"{kind}_after_issue_us"] = 1e3 * sum(i["after_ms"] for st in sel for i in st["issues"]) / len(sel)
    return out


def print_dbo(res: dict) -> None:
    if not res.get("split"):
        print(f"    DBO: not split ({res.get('why', res.get('error'))})", flush=True)
        return
    cmp_ = res["compare"]
    u = res["unsplit"]
    print(f"    DBO split {res['ubatch_tokens'][0]}+{res['ubatch_tokens'][1]}: step {res['step_ms']:.2f} ms -> "
          f"{res['tok_s_gpu']:,.0f} tok/s/GPU (unsplit {u['step_ms']:.2f} ms -> {u['tok_s_gpu']:,.0f}; split graph: "
          f"{res['graph'] and res['graph_split']})"
          + (f"; graph replay {res['graph_replay_ms']:.2f} ms" if "graph_replay_ms" in res else ""), flush=True)
    print(f"    DBO vs unsplit outputs: greedy tokens equal {cmp_['greedy_tokens_equal']}/{cmp_['rows']}, rows bit-equal "
          f"{cmp_['rows_bit_equal']}, hidden max rel {cmp_['hidden_max_rel']:.2e}, logits max |diff| "
          f"{cmp_['logits_max_abs_diff']:.3g} (flipped rows' top-2 gap <= {cmp_['flipped_rows_top2_gap_max']:.3g}); "
          f"unsplit twice bit-equal: {cmp_['unsplit_repeat_bit_equal']}, finite: {cmp_['finite']}", flush=True)
    s = stage_summary(res["stages"])
    print(f"    DBO eager device total {res['step_gpu_ms']:.2f} ms: {len(res['stages'])} stages {res['stage_sum_ms']:.2f}"
          f" + head {res['head_ms']:.3f} + tail {res['tail_ms']:.3f} ms; per micro-batch stage (us): "
          + ", ".join(f"{k} {v:.1f}" for k, v in s.items()), flush=True)
    if "overlap" in res:
        m = res["overlap"]
        print(f"    DBO + LL comm modeled: comm {m['comm_ms']:.2f} ms ({m['transfers']} transfers), exposed "
              f"{m['exposed_ms']:.2f} ms (dispatch {m['exposed_dispatch_ms']:.2f}, combine {m['exposed_combine_ms']:.2f}; "
              f"hidden {100 * m['hidden_frac']:.0f}%), compute slowed beside them {m['slowdown_ms']:.2f} ms -> step "
              f"{res['step_overlapped_ms']:.2f} ms -> "
              f"{res['tok_s_gpu_overlapped']:,.0f} tok/s/GPU; unsplit + comm unoverlapped "
              f"{u.get('tok_s_gpu_comm_unoverlapped', float('nan')):,.0f}", flush=True)
    if "tok_s_gpu_overlapped" in res.get("engine_async", {}):
        e = res["engine_async"]
        print(f"    DBO in the engine loop with async scheduling, {e['steps']} steps: {e['step_ms']:.2f} ms; + the same "
              f"modeled comm -> {e['step_overlapped_ms']:.2f} ms -> {e['tok_s_gpu_overlapped']:,.0f} tok/s/GPU", flush=True)
    up, ul = u.get("phases_ms", {}), u.get("launches", {})
    print(f"    {'phase (eager device ms)':<24} {'unsplit':>9} {'launches':>8} {'split':>9} {'launches':>8}", flush=True)
    for k, v in res["phases_ms"].items():
        print(f"    {k:<24} {up.get(k, float('nan')):9.3f} {ul.get(k, 0):8d} {v:9.3f} {res['launches'][k]:8d}", flush=True)
    print(f"    {'sum = device total':<24} {u.get('step_gpu_ms', float('nan')):9.3f} {sum(ul.values()):8d} "
          f"{res['step_gpu_ms']:9.3f} {sum(res['launches'].values()):8d}", flush=True)


# ---- plain PyTorch, same shape ---------------------------------------------------------------------------

def plain_torch(cfg: ModelConfig, n_local: int, b: int, ctx: int, device, dtype, iters: int) -> dict:
    """The same decode step written directly in torch (bf16, no fusion, contiguous per-sequence cache, bmm
    attention, torch._grouped_mm experts): one layer of each kind timed in a CUDA graph, scaled to depth."""
    h, nh, lat, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v, ql, inter = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank or h, cfg.moe_intermediate_size
    k = cfg.num_experts_per_tok
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.02  # noqa: E731
    x = r(b, h)
    cache = r(b, ctx, lat + rope)
    wq_a, wq_b, wkv_a, wkv_b, wo = r(ql, h), r(nh * (nope + rope), ql), r(lat + rope, h), r(nh, nope + v, lat), r(h, nh * v)
    wg, w13, w2 = r(cfg.n_routed_experts, h), r(n_local, 2 * inter, h), r(n_local, h, inter)
    ws13, ws2 = r(2 * inter, h), r(h, inter)
    wd13, wd2 = r(2 * cfg.intermediate_size, h), r(h, cfg.intermediate_size)
    head = r(cfg.vocab_size, h)
    rows = r(b * k, h)
    counts = torch.full((n_local,), b * k // n_local, dtype=torch.int32, device=device)
    counts[-1] += b * k - int(counts.sum())
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rms = lambda t: F.rms_norm(t, (t.shape[-1],))  # noqa: E731
    scale = 1.0 / math.sqrt(nope + rope)

    def swiglu(t, w_in, w_out):
        u = F.linear(t, w_in)
        return F.linear(F.silu(u[:, : w_out.shape[1]]) * u[:, w_out.shape[1]:], w_out)

    def attention():
        q = F.linear(rms(F.linear(rms(x), wq_a)), wq_b).view(b, nh, nope + rope)
        new = F.linear(x, wkv_a)
        cache[:, -1] = torch.cat([rms(new[:, :lat]), new[:, lat:]], -1)
        q_lat = torch.einsum("bhn,hnl->bhl", q[..., :nope], wkv_b[:, :nope])
        s = torch.bmm(torch.cat([q_lat, q[..., nope:]], -1), cache.transpose(1, 2)) * scale
        o = torch.bmm(torch.softmax(s.float(), -1).to(dtype), cache[..., :lat])
        return x + F.linear(torch.einsum("bhl,hvl->bhv", o, wkv_b[:, nope:]).reshape(b, nh * v), wo)

    def moe():
        t = rms(x)
        torch.topk(torch.sigmoid(F.linear(t, wg).float()), k, -1)
        if device.type == "cuda":
            u = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)
            y = torch._grouped_mm(F.silu(u[:, :inter]) * u[:, inter:], w2.transpose(1, 2), offs=offs)
        else:
            y = torch.cat([swiglu(c, w13[i], w2[i]) for i, c in enumerate(rows.split(counts.tolist()))])
        return x + y.view(b, k, h).sum(1) + swiglu(t, ws13, ws2)

    def dense():
        return x + swiglu(rms(x), wd13, wd2)

    def lm_head():
        return torch.argmax(F.linear(rms(x), head).float(), -1)

    def graph_time(fn):
        if device.type != "cuda":
            return timed(fn, device, iters)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        return timed(gr.replay, device, iters)

    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    t_attn, t_moe, t_dense, t_head = (graph_time(f) for f in (attention, moe, dense, lm_head))
    step = cfg.num_hidden_layers * t_attn + moe_layers * t_moe + (cfg.num_hidden_layers - moe_layers) * t_dense + t_head
    return {"B": b, "ctx": ctx, "step_ms": step * 1e3, "tok_s_gpu": b / step,
            "attention_ms_per_layer": t_attn * 1e3, "moe_ms_per_layer": t_moe * 1e3,
            "dense_ms_per_layer": t_dense * 1e3, "lm_head_ms": t_head * 1e3}


def ep8_fit(cfg_full: ModelConfig, block_size: int, hbm_bytes: int, util: float = 0.9) -> dict:
    """Weights of an EP=8 rank of R1 in FP8 (counted on the meta device) and what KV fits beside them."""
    cfg = rank_config("full", None, None, fp8=True)
    disp = EmulatedEPDispatcher(cfg.n_routed_experts, 8, cfg.num_experts_per_tok)
    with torch.device("meta"):
        m8 = DeepseekV3ForCausalLM(cfg, disp, disp.num_local_experts)
        m16 = DeepseekV3ForCausalLM(rank_config("full", None, None, fp8=False), disp, disp.num_local_experts)
    w8, w16 = weight_bytes(m8, torch.bfloat16), weight_bytes(m16, torch.bfloat16)
    # + the bf16 copies of kv_b kept for absorbed decode
    w8 += cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 2
    kv_seq_4k = cfg.num_hidden_layers * 4096 * cfg.kv_cache_dim * 2
    free = hbm_bytes * util - w8
    return {"weights_GiB_fp8": w8 / 2**30, "weights_GiB_bf16": w16 / 2**30,
            "kv_GiB_at_util": max(free, 0) / 2**30, "kv_MiB_per_4k_seq": kv_seq_4k / 2**20,
            "max_seqs_4k": int(max(free, 0) // kv_seq_4k), "hbm_GiB": hbm_bytes / 2**30, "util": util}


# ---- main ----------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=32, help="EP size of the group this rank belongs to")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256], help="decode sequences per rank")
    p.add_argument("--ctx", type=int, nargs="+", default=[2048, 4096], help="decode context lengths")
    p.add_argument("--prefill-tokens", type=int, default=8192, help="prefill tokens per rank (0: skip)")
    p.add_argument("--prefill-seq-len", type=int, default=2048, help="prompt length of the prefill sequences")
    p.add_argument("--precision", nargs="+", default=None, choices=["bf16", "fp8"],
                   help="default: bf16 and fp8 on CUDA, fp8 on CPU (its reference path)")
    p.add_argument("--routing", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="full: R1 dims; tiny: smoke run")
    p.add_argument("--layers", type=int, default=None, help="default 61 (full) / 4 (tiny)")
    p.add_argument("--dense-layers", type=int, default=None, help="leading dense layers: 3 (full) / 1 (tiny)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--engine-steps", type=int, default=16, help="timed steps of the engine loop's decode steady "
                   "state, synchronous and with async scheduling (0: skip)")
    p.add_argument("--dbo", action="store_true", help="also run each decode step (B > 32) with the engine's "
                   "dual-batch overlap (two micro-batches) and report the split step's compute per phase and per "
                   "stage, its outputs against the unsplit step's, and the step with the published LL comm "
                   "overlapped: each micro-batch's dispatch / combine (the published per-layer time x its tokens / "
                   "128) hides under the other micro-batch's next stage; exposed = max(0, comm - that stage's "
                   "compute); step = split step x (1 + --comm-slowdown) + exposed")
    p.add_argument("--comm-slowdown", type=float, default=COMM_SLOWDOWN,
                   help="share by which the split step's compute runs slower beside the transfers (default: "
                        "symm_mem_ll's, measured on 2x H200; NCCL's collectives measured 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-phase profile")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the plain-torch baseline")
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default: what the cases need, "
                   "capped by free memory)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--fp8-configs", default=None, help="a JSON written by benchmarks/fp8_gemm.py --sweep --json: "
                   "its picks replace the FP8 GEMM decode configs (and cuBLAS choices) for this run")
    a = p.parse_args(argv)
    if a.ep < 1 or 256 % a.ep:
        p.error("--ep must divide 256")
    if not 0 <= a.comm_slowdown < 1:
        p.error("--comm-slowdown must be in [0, 1)")
    if a.engine_steps < 0:
        p.error("--engine-steps must be >= 0")
    return a


def install_fp8_configs(path: str) -> None:
    """Installs a sweep's picks (fp8_gemm.py --sweep --json) as the FP8 GEMM decode configs of this process."""
    from wideep.model import fp8 as fp8mod
    from wideep.model import fp8_triton

    sweep = json.loads(Path(path).read_text())["sweep"]
    for r in sweep["plain"].values():
        fp8mod.CUBLAS_DECODE[(r["n"], r["k"])] = r["pick"] == "cublas"
        if r["triton_us"] < float("inf"):   # else every Triton candidate failed: the committed one stays
            fp8_triton.DECODE_CONFIGS[("plain", r["n"], r["k"])] = fp8_triton.GemmConfig.parse(r["triton"])
    for name, r in sweep["grouped"].items():
        if "pick" not in r:   # the whole-MLP timings beside the GEMM picks
            continue
        experts = int(name.split()[0][1:])   # "E8 w13"
        fp8_triton.DECODE_CONFIGS[("grouped", experts, r["n"], r["k"])] = fp8_triton.GemmConfig.parse(r["pick"])
    print(f"# FP8 decode configs from {path}: "
          + ", ".join(f"{k}={v}" for k, v in fp8_triton.DECODE_CONFIGS.items()), flush=True)


def main(argv=None) -> dict:
    a = parse(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precisions = a.precision or (["bf16", "fp8"] if device.type == "cuda" else ["fp8"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.fp8_configs:
        install_fp8_configs(a.fp8_configs)
    ceil = measure_ceilings(device)
    ceil["launch"] = measure_launch_floor(device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ceilings": ceil,
                    "ep": a.ep, "routing": a.routing, "runs": {}}
    print(f"# {report['device']}  copy {ceil['copy_GBps']:.0f} GB/s  bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s  "
          f"fp8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s  EP={a.ep}  routing={a.routing}", flush=True)
    print("# launch floor (us per near-empty kernel; graph replay / profiler duration): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ceil["launch"].items() if k.endswith("_us")), flush=True)
    if device.type == "cuda":
        report["fused_check"] = check_fused_ops(rank_config(a.size, a.layers, a.dense_layers, False), device)
        print(f"# fused ops vs torch references: {report['fused_check']}", flush=True)
        report["small_kernels"] = check_small_kernels(rank_config(a.size, a.layers, a.dense_layers, False), device)
        print(f"# small-kernel launch settings (graph us per call, bits vs the committed setting, which runs): "
              f"{json.dumps(report['small_kernels'])}", flush=True)
        report["small_latency"] = small_kernel_latency(rank_config(a.size, a.layers, a.dense_layers, False), device)
        print("# small kernels, graph us per call at 1 / 32 / 128 / 256 tokens: " + "; ".join(
            f"{k} " + " / ".join(f"{v:.2f}" for v in row.values()) for k, row in report["small_latency"].items()),
            flush=True)
        report["router_check"] = check_router(rank_config(a.size, a.layers, a.dense_layers, False), device)
        print(f"# router kernel settings (graph us per call; bit-exact vs the 4-warp unrolled path): "
              f"{json.dumps(report['router_check'])}", flush=True)
    vendor: dict = {}
    if device.type == "cuda" and a.profile:
        vendor = vendor_references(lambda p: rank_config(a.size, a.layers, a.dense_layers, p == "fp8"), precisions,
                                   a, device)
        report["vendor_reference"] = vendor
    for prec in precisions:
        cfg = rank_config(a.size, a.layers, a.dense_layers, prec == "fp8")
        bs = a.block_size
        need_blocks = max([b * -(-(c + 1 + engine_tokens(a)) // bs) for b in a.batch for c in a.ctx] +
                          [-(-a.prefill_tokens // a.prefill_seq_len) * -(-(a.prefill_seq_len + 1) // bs)])
        per_block = cfg.num_hidden_layers * bs * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()
        if a.kv_gib:
            blocks = int(a.kv_gib * 2**30 // per_block)
        else:
            blocks = need_blocks
            if device.type == "cuda":
                with torch.device("meta"):
                    probe = DeepseekV3ForCausalLM(cfg, EmulatedEPDispatcher(cfg.n_routed_experts, a.ep, 8), 256 // a.ep)
                free, _ = torch.cuda.mem_get_info(device)
                room = free - weight_bytes(probe, dtype) - 12 * 2**30  # activations, graphs, lm_head logits
                blocks = max(1, min(need_blocks, int(room // per_block)))
                del probe
        t0 = time.perf_counter()
        run = make_rank(cfg, a, device, dtype, prec == "fp8", blocks)
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        res = {"weights_GiB": weight_bytes(run.core.model) / 2**30, "kv_blocks": blocks,
               "kv_GiB": blocks * per_block / 2**30, "build_s": time.perf_counter() - t0,
               "local_experts": run.dispatcher.num_local_experts, "load_factor": run.dispatcher.load_factor,
               "decode": [], "prefill": None}
        print(f"## {prec}: weights {res['weights_GiB']:.1f} GiB, KV {res['kv_GiB']:.1f} GiB "
              f"({blocks} blocks), built in {res['build_s']:.0f}s", flush=True)
        for ctx in a.ctx:
            for b in a.batch:
                if b * -(-(ctx + 1 + engine_tokens(a)) // bs) > blocks:
                    res["decode"].append({"B": b, "ctx": ctx, "skipped": "KV does not fit beside the weights"})
                    print(f"  decode B={b} ctx={ctx}: skipped (KV does not fit)", flush=True)
                    continue
                try:
                    d = decode_case(run, b, ctx, a, device, ceil)
                except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others' numbers
                    d = {"B": b, "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"[:400]}
                    res["decode"].append(d)
                    print(f"  decode B={b} ctx={ctx}: FAILED {d['error']}", flush=True)
                    continue
                with_comm(d, a.ep, moe_layers, False, cfg.hidden_size, cfg.num_experts_per_tok)
                if device.type == "cuda" and "launches" in d:
                    try:
                        explain_phases(d, cfg, a, b, device, vendor.get(prec, {}).get(b))
                    except Exception as exc:  # noqa: BLE001 - the step's numbers stand without the explanation
                        d["reference_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        print(f"    reference FAILED: {d['reference_error']}", flush=True)
                res["decode"].append(d)
                print(f"  decode B={b:4d} ctx={ctx}: step {d['step_ms']:.2f} ms -> {d['tok_s_gpu']:,.0f} tok/s/GPU"
                      + (f" (graph replay {d['graph_replay_ms']:.2f} ms)" if "graph_replay_ms" in d else "")
                      + (f"; +LL comm {d['tok_s_gpu_comm_unoverlapped']:,.0f} unoverlapped, "
                         f"{d['tok_s_gpu_comm_overlapped']:,.0f} overlapped" if "comm_ms" in d else ""), flush=True)
                print_phases(d)
                if a.dbo:
                    try:
                        d["dbo"] = dbo_case(run, b, ctx, a, device, d)
                    except Exception as exc:  # noqa: BLE001 - the unsplit numbers stand without it
                        d["dbo"] = {"B": b, "ctx": ctx, "split": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                    print_dbo(d["dbo"])
                if a.engine_steps:
                    try:
                        d["engine"] = engine_case(run, b, ctx, a, device)
                    except Exception as exc:  # noqa: BLE001
                        d["engine"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                        print(f"    engine loop: FAILED {d['engine']['error']}", flush=True)
                    else:
                        e_s, e_a = d["engine"]["sync"], d["engine"]["async"]
                        print(f"    engine loop, {a.engine_steps} steps: sync {e_s['step_ms']:.2f} ms -> "
                              f"{e_s['tok_s_gpu']:,.0f} tok/s/GPU; async scheduling {e_a['step_ms']:.2f} ms -> "
                              f"{e_a['tok_s_gpu']:,.0f} tok/s/GPU (host waited {e_s['host_wait_ms']:.2f} / "
                              f"{e_a['host_wait_ms']:.2f} ms per step)", flush=True)
        if a.prefill_tokens:
            try:
                pr = prefill_case(run, a.prefill_tokens, a.prefill_seq_len, a, device, ceil)
            except Exception as exc:  # noqa: BLE001
                pr = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                print(f"  prefill: FAILED {pr['error']}", flush=True)
        if a.prefill_tokens and "error" not in pr:
            with_comm(pr, a.ep, moe_layers, True, cfg.hidden_size, cfg.num_experts_per_tok)
            res["prefill"] = pr
            print(f"  prefill {pr['tokens']} tokens ({pr['seqs']} x {a.prefill_seq_len}): {pr['step_ms']:.1f} ms -> "
                  f"{pr['tok_s_gpu']:,.0f} tok/s/GPU; +HT comm est. {pr['tok_s_gpu_comm_unoverlapped']:,.0f} "
                  f"unoverlapped, {pr['tok_s_gpu_comm_overlapped']:,.0f} overlapped", flush=True)
            print_phases(pr)
        report["runs"][prec] = res
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.baseline:
        cfg = rank_config(a.size, a.layers, a.dense_layers, False)
        base = []
        for ctx in a.ctx:
            for b in a.batch:
                try:
                    r = plain_torch(cfg, cfg.n_routed_experts // a.ep, b, ctx, device, dtype, a.iters)
                except Exception as exc:  # noqa: BLE001
                    r = {"B": b, "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(f"  plain torch B={b} ctx={ctx}: FAILED {r['error']}", flush=True)
                base.append(r)
                if "tok_s_gpu" in r:
                    print(f"  plain torch B={b:4d} ctx={ctx}: step {r['step_ms']:.2f} ms -> {r['tok_s_gpu']:,.0f} "
                          f"tok/s/GPU (attn {r['attention_ms_per_layer']:.3f} moe {r['moe_ms_per_layer']:.3f} "
                          f"ms/layer)", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        report["plain_torch"] = base
    if a.size == "full":
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 141 * 10**9
        report["ep8_fp8_fit"] = ep8_fit(rank_config("full", None, None, True), a.block_size, total)
        f = report["ep8_fp8_fit"]
        print(f"  EP=8 rank, FP8: weights {f['weights_GiB_fp8']:.1f} GiB (bf16 {f['weights_GiB_bf16']:.1f}), KV "
              f"{f['kv_GiB_at_util']:.1f} GiB at util {f['util']} -> {f['max_seqs_4k']} sequences of 4k", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=float))
    return report


def _rows_text(rows) -> str:
    if isinstance(rows, int):
        return str(rows)
    return str(rows[0]) if len(rows) == 1 else (f"{len(rows)}x{rows[0]}" if len(set(rows)) == 1 else
                                                 f"{sum(rows)} in {len(rows)} groups")


def print_phases(res: dict) -> None:
    """The per-phase table: eager-step device ms, launches, roofline ms and the ratio; then the floor
    (max of the roofline and launches x the measured per-launch floor), the ratio to it and which term
    bounds the phase; then the measured reference (GEMM phases: cuBLAS on the same shapes, "vendor"; small
    phases: the same launches copying the same bytes, "same-work") and the ratio to it. The phases sum to the
    step's device total (every kernel counted once). Below it, each phase's largest kernels (launches, us)."""
    if "phases_ms" not in res:
        return
    roof = res["roofline_ms"]
    floor = res.get("floor_ms", {})
    ref = res.get("reference", {})
    print(f"    {'phase':<22} {'eager ms':>9} {'launches':>8} {'roofline ms':>11} {'ratio':>6} {'floor ms':>9} "
          f"{'x floor':>7} {'bound':>7} {'ref ms':>8} {'x ref':>6} {'ref':>9}", flush=True)
    for k, v in res["phases_ms"].items():
        r = roof.get(k, float("nan"))
        ratio = v / r if r == r and r > 0 else float("nan")
        f = floor.get(k, float("nan"))
        fr = v / f if f == f and f > 0 else float("nan")
        bound = "-" if f != f else ("launch" if not (r == r) or f > r else "bytes")
        rf = ref.get(k, {})
        rm = rf.get("ms", float("nan"))
        xr = v / rm if rm == rm and rm > 0 else float("nan")
        print(f"    {k:<22} {v:9.3f} {res['launches'][k]:8d} {r:11.3f} {ratio:6.2f} {f:9.3f} {fr:7.2f} {bound:>7} "
              f"{rm:8.3f} {xr:6.2f} {rf.get('kind', '-'):>9}", flush=True)
    print(f"    {'sum = device total':<22} {res['step_gpu_ms']:9.3f} {sum(res['launches'].values()):8d}", flush=True)
    for k, ks in res.get("top_kernels_by_phase", {}).items():
        if ks:
            print(f"      {k}: " + "; ".join(f"{n[:48]} x{c} {ms * 1e3:.0f} us" for n, ms, c in ks), flush=True)
    for k, rf in ref.items():
        if rf.get("kind") == "vendor":
            print(f"      {k} vendor: " + "; ".join(
                f"{g['kind']}{'/' + str(g['batch']) if g['batch'] > 1 else ''} M={_rows_text(g['rows'])} N={g['n']} "
                f"K={g['k']}{' fp8' if g['fp8'] else ''} x{g['per_step']}: {g['best_us']} us" for g in rf["gemms"]),
                flush=True)
        else:
            print(f"      {k} same-work: {rf['launches']} launches ({rf['listed']} listed), "
                  f"{rf['bytes'] / 1e6:.1f} MB, graph {rf['graph_ms']:.3f} ms", flush=True)

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
