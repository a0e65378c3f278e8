"""DeepSeek-V3 MoE layer: noaux_tc gate, routed experts behind the dispatch/combine seam, shared experts.

Routed experts run as one grouped GEMM over rows sorted by expert (torch._grouped_mm on CUDA bf16;
a per-expert loop elsewhere - never a loop over tokens).
"""
from __future__ import annotations

from typing import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from wideep.model.dispatch import MoEDispatcher

from .config import ModelConfig
from .fp8 import FP8_DTYPE, fp8_grouped_mlp, fp8_linear, scale_row_index
from .fused_ops import gate_route, gate_route_applies, route
from .layers import GatedMLP


class TopkRouter(nn.Module):
    """noaux_tc: sigmoid scores; the correction bias picks groups and experts but never weighs them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, K] int64 logical experts, topk_weights [T, K] float32)."""
        if gate_route_applies(x, self.weight, self.top_k, self.n_group):
            return gate_route(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group,
                              self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
        return route(gate_logits(x, self.weight), self.e_score_correction_bias, self.top_k, self.n_group,
                     self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)


_MM_FP32_OUT: dict[int | None, bool] = {}


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in fp32: on CUDA a bf16 GEMM with an fp32 accumulator and fp32 output (no upcast copy of
    the weight, no fp32 SIMT GEMM); elsewhere an fp32 product."""
    if x.is_cuda and x.dtype == weight.dtype == torch.bfloat16:
        key = x.device.index
        if _MM_FP32_OUT.get(key, True):
            try:
                out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
                _MM_FP32_OUT[key] = True
                return out
            except (RuntimeError, TypeError):
                _MM_FP32_OUT[key] = False
    return torch.nn.functional.linear(x.float(), weight.float())


_GROUPED_MM_WORKS: dict[int | None, bool] = {}


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """CUDA + bf16 + a GPU whose torch build runs _grouped_mm (probed once per device, on device-only tensors
    so the probe is legal even inside CUDA-graph capture)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    key = x.device.index
    if key not in _GROUPED_MM_WORKS:
        try:
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=x.device)
            b = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=x.device)
            offs = torch.arange(1, 3, dtype=torch.int32, device=x.device) * 8
            torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


def grouped_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """SiLU-gated expert MLPs over rows grouped by expert.

    x [N, H] (rows of expert e contiguous, in expert order), w13 [E, 2I, H] (gate ‖ up), w2 [E, H, I],
    tokens_per_expert [E]. Rows past sum(tokens_per_expert) are left as zeros (padded layouts).
    impl: "auto" (grouped_mm on CUDA bf16, else loop), "grouped_mm", or "loop".
    """
    if impl == "auto":
        impl = "grouped_mm" if _use_grouped_mm(x) else "loop"
    inter = w2.shape[-1]
    if impl == "grouped_mm":
        offs = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
        h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
        h = F.silu(h[:, :inter]) * h[:, inter:]
        y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        n_valid = offs[-1] if offs.numel() else torch.zeros((), dtype=torch.int32, device=x.device)
        row_ok = torch.arange(x.shape[0], device=x.device) < n_valid
        return torch.where(row_ok[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    if impl != "loop":
        raise ValueError(f"grouped_mlp: unknown impl {impl!r}")
    y = x.new_zeros(x.shape[0], w2.shape[1])
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            rows = x[start : start + n]
            h = F.linear(rows, w13[e])
            y[start : start + n] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
            start += n
    return y


class RoutedExperts(nn.Module):
    """This rank's routed experts, stacked: w13 [S + E_local, 2I, H] (gate ‖ up), w2 [S + E_local, H, I].

    S = n_shared (0 or 1): a shared expert of the routed experts' shape is stacked in slot 0, ahead of the
    routed slots, so it runs as one more group of the same grouped MLP (`forward(..., with_shared=True)`);
    stacked_tensors() are views of the routed slots (what dispatch counts and EPLB moves index), not copies.
    Native FP8 (fp8_block set): both stay e4m3 with per-slot block scales w13_scale_inv
    [S + E_local, 2*ceil(I/bo), ceil(H/bi)] (gate's blocks, then up's) and w2_scale_inv [S + E_local, ceil(H/bo), ceil(I/bi)].
    """

    def __init__(self, num_local: int, hidden: int, inter: int, fp8_block: tuple[int, int] | None = None,
                 n_shared: int = 0):
        super().__init__()
        if n_shared not in (0, 1):
            raise ValueError(f"RoutedExperts: n_shared must be 0 or 1 (one fused shared slot), got {n_shared}")
        self.fp8_block = fp8_block
        self.num_local, self.n_shared = num_local, n_shared
        slots = num_local + n_shared
        if fp8_block is None:
            self.w13 = nn.Parameter(torch.empty(slots, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.empty(slots, hidden, inter))
        else:
            bo, bi = fp8_block
            self.w13 = nn.Parameter(torch.empty(slots, 2 * inter, hidden, dtype=FP8_DTYPE), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(slots, hidden, inter, dtype=FP8_DTYPE), requires_grad=False)
            self.w13_scale_inv = nn.Parameter(
                torch.empty(slots, 2 * -(-inter // bo), -(-hidden // bi)), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(
                torch.empty(slots, -(-hidden // bo), -(-inter // bi)), requires_grad=False)
        self.inter, self.hidden = inter, hidden
        self._sidx: tuple[torch.Tensor, torch.Tensor] | None = None
        self.impl = "auto"

    def _all(self) -> list[torch.Tensor]:
        if self.fp8_block is None:
            return [self.w13, self.w2]
        return [self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv]

    def stacked_tensors(self) -> list[torch.Tensor]:
        """Every per-expert stacked tensor, routed slots only (what moving an expert between slots must move;
        views, so in-place moves land in the stacked parameters)."""
        return [t[self.n_shared:] for t in self._all()]

    def _scale_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.w13.device
        if self._sidx is None or self._sidx[0].device != dev:
            bo = self.fp8_block[0]
            self._sidx = (scale_row_index([self.inter, self.inter], bo, dev), scale_row_index([self.hidden], bo, dev))
        return self._sidx

    def _mlp(self, x: torch.Tensor, tokens_per_slot: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.fp8_block is None:
            return grouped_mlp(x, tensors[0], tensors[1], tokens_per_slot, self.impl)
        s13, s2 = self._scale_rows()
        # tile configs are the ones measured for this rank's routed expert count (the shared slot is one more
        # group of the same shape)
        return fp8_grouped_mlp(x, tensors[0], tensors[2], s13, tensors[1], tensors[3], s2, tokens_per_slot,
                               config_experts=self.num_local)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, with_shared: bool = False) -> torch.Tensor:
        """The routed experts over expert-contiguous rows (tokens_per_expert [E_local]); with_shared: the shared
        slot and the routed experts in one grouped MLP, x = [this rank's T tokens; dispatched rows] and
        tokens_per_expert [1 + E_local] = [T, routed counts...]."""
        if not with_shared:
            return self._mlp(x, tokens_per_expert, self.stacked_tensors())
        if not self.n_shared:
            raise ValueError("RoutedExperts: with_shared=True but no shared slot is stacked")
        return self._mlp(x, tokens_per_expert, self._all())

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared slot alone as a plain MLP: the unfused reference of the fused slot (tests, benchmarks)."""
        if self.fp8_block is None:
            h = F.linear(x, self.w13[0])
            return F.linear(F.silu(h[..., :self.inter]) * h[..., self.inter:], self.w2[0])
        s13, s2 = self._scale_rows()
        h = fp8_linear(x, self.w13[0], self.w13_scale_inv[0], s13)
        a = (F.silu(h[..., :self.inter]) * h[..., self.inter:]).to(x.dtype)
        return fp8_linear(a, self.w2[0], self.w2_scale_inv[0], s2)


def fuse_shared_expert(config: ModelConfig) -> bool:
    """The shared expert runs as one more slot of the routed grouped MLP when it has the routed experts'
    shape (n_shared_experts == 1, as in DeepSeek-V3/R1); otherwise it stays a separate MLP."""
    return config.n_shared_experts == 1


class DeepseekV3MoE(nn.Module):
    """Gate -> (expert_map) -> dispatch -> local grouped GEMM × weights -> combine, plus shared experts (a
    shared expert of the routed shape is one more slot of the grouped GEMM, fed this rank's own tokens).

    `expert_map` (None by default) is the EPLB hook: a callable taking logical topk_ids [T, K] and
    returning physical slot ids [T, K] (it may also record per-physical-expert load). Without it,
    physical id == logical id and rank r owns the contiguous slice of experts.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, dispatcher: MoEDispatcher, num_local_experts: int,
                 fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopkRouter(config)
        fused = fuse_shared_expert(config)
        self.experts = RoutedExperts(num_local_experts, config.hidden_size, config.moe_intermediate_size, fp8_block,
                                     n_shared=int(fused))
        self.shared_experts = (
            GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, fp8_block)
            if config.n_shared_experts and not fused
            else None
        )
        self.dispatcher = dispatcher
        self.expert_map: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.forward_stages(x))

    def forward_stages(self, x: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator that yields while its dispatch, then its combine, is in flight: dual-batch
        overlap (model/ubatch.py) runs the other micro-batch meanwhile; forward() runs it straight through, so
        a split step does exactly the unsplit math per micro-batch. Returns the output."""
        topk_ids, topk_weights = self.gate(x)
        if self.expert_map is not None:
            topk_ids = self.expert_map(topk_ids)
        d = self.dispatcher
        if self.experts.n_shared:
            # [own tokens; dispatched rows] through one grouped MLP, shared slot first: out = combine(routed)
            # + shared(x), the unfused math (the shared output is added unweighted)
            t = x.shape[0]
            pending = d.dispatch_with_own_async(x, topk_ids, topk_weights)
            yield
            result = pending.wait()
            counts = F.pad(result.tokens_per_expert, (1, 0), value=t)   # [T, routed counts...], one launch
            y = self.experts(result.x, counts, with_shared=True)
            pending, shared = d.combine_weighted_async(y[t:], result), y[:t]
        else:
            pending = d.dispatch_async(x, topk_ids, topk_weights)
            yield
            result = pending.wait()
            pending = d.combine_weighted_async(self.experts(result.x, result.tokens_per_expert), result)
            shared = self.shared_experts(x) if self.shared_experts is not None else None
        yield
        out = pending.wait()
        return out if shared is None else out + shared


def run_stages(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Runs a stage generator (forward_stages) to its end without interleaving: the unsplit forward."""
    while True:
        try:
            next(stages)
        except StopIteration as stop:
            return stop.value
