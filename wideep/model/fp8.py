"""DeepSeek's FP8 checkpoint format: e4m3 weights in 128x128 blocks, each with an fp32 `weight_scale_inv`
(the multiplier that restores the block: w ≈ fp8 × scale_inv), and the native FP8 compute on it.

Native FP8 (vLLM semantics: a checkpoint whose quantization_config says fp8 runs in FP8): weights stay e4m3
with their block scales; activations are quantized on the fly per token per 128-channel group; GEMMs are
block-scaled. On CUDA the Triton kernels of fp8_triton.py run; elsewhere the same quantization is applied
and the product is taken over dequantized operands (the correctness reference of the kernels).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype=torch.float32
) -> torch.Tensor:
    """weight fp8 [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)] -> dequantized [out, in] in dtype."""
    expect = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {expect})")
    return (weight.to(torch.float32) * _expand(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (fp8 weight, fp32 scale_inv) with scale_inv = block amax / 448."""
    out_f, in_f = weight.shape
    nb0, nb1 = -(-out_f // block[0]), -(-in_f // block[1])
    w = weight.float()
    padded = torch.zeros(nb0 * block[0], nb1 * block[1], dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w
    blocks = padded.view(nb0, block[0], nb1, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


GROUP = 128


def _use_kernels(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from . import fp8_triton

    return fp8_triton.available()


def act_quant_ref(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)]): per token, per `group` channels."""
    m, k = x.shape
    ng = -(-k // group)
    xf = torch.nn.functional.pad(x.float(), (0, ng * group - k)).view(m, ng, group)
    scale = xf.abs().amax(-1).clamp(min=1e-10) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, ng * group)[:, :k]
    return q, scale


def dequant_act(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(group, 1)[:, : q.shape[1]]


def dequant_rows(w: torch.Tensor, scale: torch.Tensor, sidx: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """w [N, K] e4m3, scale [R, ceil(K/group)], sidx [N] scale row of each output row -> fp32 [N, K]."""
    return w.float() * scale[sidx.long()].repeat_interleave(group, 1)[:, : w.shape[1]]


# scale_row_index's results -> the width of the aligned column windows over which each is constant (weakly
# keyed by the tensor itself, so a freed index's entry goes with it): lets the GEMM load one weight scale per
# tile and K block instead of a vector, without reading the index on the host (graph capture)
_UNIFORM_COLS = WeakIdKeyDictionary()


def scale_row_index(rows: list[int], block: int, device=None) -> torch.Tensor:
    """Scale row of each output row of a weight stacked from parts of `rows` rows, each in its own blocks
    (non-decreasing)."""
    idx, base = [], 0
    for r in rows:
        idx.append(torch.arange(r) // block + base)
        base += -(-r // block)
    out = torch.cat(idx).to(device=device, dtype=torch.int32)
    _UNIFORM_COLS[out] = uniform_width(rows, block)
    return out


def uniform_width(rows: list[int], block: int) -> int:
    """The largest power of two W <= block such that scale_row_index(rows, block) is constant over every
    column window [j*W, (j+1)*W): W divides the block (when block is a power of two) and every part start."""
    w = block & -block   # the largest power of two dividing the block
    start = 0
    for r in rows[:-1]:
        start += r
        w = min(w, start & -start)
    return w


def uniform_scale_cols(sidx: torch.Tensor) -> int:
    """uniform_width of an index made by scale_row_index; 0 for any other tensor (nothing is known of it)."""
    return _UNIFORM_COLS.get(sidx, 0)


# cuBLAS's block-scaled FP8 GEMM (torch._scaled_mm, 1x128 activation and 128x128 weight scales, both
# outer-dim major) against our Triton tiles, measured on an H200 (benchmarks/fp8_gemm.py, docs/perf.md):
# cuBLAS wins at prefill sizes and, at decode sizes, for big weights; it has a ~16-22 us floor that our
# kernel undercuts on the small ones. Decode-regime choices are per weight shape (never per row count). The
# Triton kernels are batch-invariant by construction; cuBLAS picks its kernel by M, so projections it serves
# carry no such guarantee (o_proj measured not bit-identical across M; q_b and shared w2 were).
CUBLAS_MIN_ROWS = 512            # rows from which a projection is a prefill GEMM (cuBLAS when it accepts)
CUBLAS_MIN_WEIGHT = 12 * 2**20   # weight elements (N*K) from which cuBLAS serves decode, for shapes not in
CUBLAS_DECODE: dict[tuple[int, int], bool] = {   # ... this table of measured R1 (N, K) -> cuBLAS or not
    (1536, 7168): False, (576, 7168): False, (24576, 1536): True, (7168, 16384): True, (4096, 7168): True,
    (7168, 2048): True, (36864, 7168): True, (7168, 18432): True,
    (2112, 7168): False}   # q_a ‖ kv_a stacked: cuBLAS needs whole 128-row blocks
CUBLAS_PAD_ROWS = 16             # activation rows are padded to this for cuBLAS (aligned scale columns)
# (device index, N, K) -> why cuBLAS refused block scaling for that weight shape (Triton serves it from then on)
CUBLAS_REFUSED: dict[tuple[int | None, int, int], str] = {}


def _cublas_block_fp8_ok(w: torch.Tensor, scale: torch.Tensor) -> bool:
    n, k = w.shape
    return ((w.device.index, n, k) not in CUBLAS_REFUSED and n % 128 == 0 and k % 128 == 0
            and scale.shape == (n // 128, k // 128) and hasattr(torch, "_scaled_mm"))


def _cublas_block_fp8(q: torch.Tensor, s: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                      out_dtype: torch.dtype, rows: int) -> torch.Tensor | None:
    """The first `rows` rows of q (padded by act_quant(..., CUBLAS_PAD_ROWS)) times W^T; None (and never again
    for this weight shape on this device) when this torch/cuBLAS refuses block scaling."""
    try:
        return torch._scaled_mm(q, w.t(), scale_a=s, scale_b=scale.t(), out_dtype=out_dtype)[:rows]
    except (RuntimeError, TypeError, ValueError) as exc:
        CUBLAS_REFUSED[(w.device.index, *w.shape)] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _decode_uses_cublas(w: torch.Tensor) -> bool:
    n, k = w.shape
    return CUBLAS_DECODE.get((n, k), w.numel() >= CUBLAS_MIN_WEIGHT)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, sidx: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T with W block-FP8 and x quantized per token per 128 channels; y in x.dtype. x [..., K]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:   # an empty micro-batch: no GEMM (a 0-row cuBLAS call would retire the shape)
        return x.new_empty(*lead, w.shape[0])
    if _use_kernels(x2):
        from . import fp8_triton

        large = x2.shape[0] >= CUBLAS_MIN_ROWS
        y = None
        if (large or _decode_uses_cublas(w)) and _cublas_block_fp8_ok(w, scale):
            q, s = fp8_triton.act_quant(x2, CUBLAS_PAD_ROWS)
            y = _cublas_block_fp8(q, s, w, scale, x.dtype, x2.shape[0])
        if y is None:
            cfg = fp8_triton.pick_config(w.shape[0], w.shape[1], large=large, device=x2.device)
            q, s = (x2, None) if cfg.fuse_quant else fp8_triton.act_quant(x2)
            y = fp8_triton.fp8_gemm(q, s, w, scale, sidx, x.dtype, cfg)
    else:
        q, s = act_quant_ref(x2)
        y = (dequant_act(q, s) @ dequant_rows(w, scale, sidx).t()).to(x.dtype)
    return y.view(*lead, w.shape[0])


class Fp8Rows(NamedTuple):
    """Activation rows already quantized for an Fp8Linear (a fused norm made them): e4m3 codes [M', K] and fp32
    scales [M', K/128] laid out as fp8_triton.act_quant lays them out, M' = rows padded as fp8_linear_quant_pad
    said; `rows` real rows; `dtype` of the projection's output."""
    q: torch.Tensor
    s: torch.Tensor
    rows: int
    dtype: torch.dtype


def fp8_linear_quant_pad(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> int | None:
    """The row padding of the e4m3 activations fp8_linear(x, w, ...) quantizes in a separate kernel
    (CUBLAS_PAD_ROWS where cuBLAS serves the weight, 1 for a Triton GEMM), or None where it makes none (no
    kernels; a Triton config that quantizes inside the GEMM): where not None, a caller may hand it Fp8Rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or not _use_kernels(x):
        return None
    from . import fp8_triton

    large = rows >= CUBLAS_MIN_ROWS
    if (large or _decode_uses_cublas(w)) and _cublas_block_fp8_ok(w, scale):
        return CUBLAS_PAD_ROWS
    return None if fp8_triton.pick_config(w.shape[0], w.shape[1], large=large, device=x.device).fuse_quant else 1


def fp8_linear_rows(x: Fp8Rows, w: torch.Tensor, scale: torch.Tensor, sidx: torch.Tensor) -> torch.Tensor:
    """fp8_linear over pre-quantized rows [x.rows, N]: the same GEMM fp8_linear would run on the same codes."""
    from . import fp8_triton

    large = x.rows >= CUBLAS_MIN_ROWS
    y = None
    if x.q.shape[0] % CUBLAS_PAD_ROWS == 0 and (large or _decode_uses_cublas(w)) and _cublas_block_fp8_ok(w, scale):
        y = _cublas_block_fp8(x.q, x.s, w, scale, x.dtype, x.rows)
    if y is None:   # a Triton GEMM (or cuBLAS refused this shape just now): the codes as they are
        cfg = fp8_triton.pick_config(w.shape[0], w.shape[1], large=large, device=x.q.device)._replace(fuse_quant=False)
        y = fp8_triton.fp8_gemm(x.q, x.s, w, scale, sidx, x.dtype, cfg)[: x.rows]
    return y


def _grouped_mlp_cublas(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, sidx13: torch.Tensor,
                        w2: torch.Tensor, s2: torch.Tensor, sidx2: torch.Tensor, counts: list[int],
                        y: torch.Tensor) -> torch.Tensor:
    """Eager prefill: each expert's rows through cuBLAS block-scaled FP8 (Triton where cuBLAS refuses)."""
    from . import fp8_triton

    def mm(q, s, w, ws, sidx, rows):
        out = _cublas_block_fp8(q, s, w, ws, x.dtype, rows) if _cublas_block_fp8_ok(w, ws) else None
        if out is None:
            out = fp8_triton.fp8_gemm(q, s, w, ws, sidx, x.dtype,
                                      fp8_triton.pick_config(w.shape[0], w.shape[1], large=True))[:rows]
        return out

    start = 0
    for e, n in enumerate(counts):
        if n:
            q, s = fp8_triton.act_quant(x[start : start + n], CUBLAS_PAD_ROWS)
            q2, s2a = fp8_triton.silu_mul_quant(mm(q, s, w13[e], s13[e], sidx13, n), CUBLAS_PAD_ROWS)
            y[start : start + n] = mm(q2, s2a, w2[e], s2[e], sidx2, n)
            start += n
    return y


def fp8_grouped_mlp(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, sidx13: torch.Tensor,
                    w2: torch.Tensor, s2: torch.Tensor, sidx2: torch.Tensor,
                    tokens_per_expert: torch.Tensor, impl: str = "auto",
                    config_experts: int | None = None) -> torch.Tensor:
    """SiLU-gated expert MLPs in block FP8 over expert-contiguous rows (see moe.grouped_mlp); rows past
    sum(tokens_per_expert) come out as zeros. w13 [E, 2I, H], w2 [E, H, I] e4m3 with per-expert scales.
    config_experts: the expert count whose measured tile configs apply (default E; a fused shared slot makes
    E = routed + 1 groups of the same shape, served by the routed count's configs).
    impl: auto, triton (the sync-free grouped kernel), cublas (one cuBLAS GEMM per expert: reads the counts
    on the host), or torch. auto on CUDA: cublas for eager prefill (>= LARGE_ROWS rows per expert on average,
    not inside a CUDA graph), else triton; without CUDA torch.
    Batch invariance: the triton path's configs depend on the weight shapes and the expert count only, so a
    row's result does not depend on the rows beside it; the prefill regime (cublas) computes differently."""
    if impl not in ("auto", "triton", "cublas", "torch"):
        raise ValueError(f"fp8_grouped_mlp: unknown impl {impl!r}")
    n_rows = x.shape[0]
    inter = w2.shape[-1]
    e = w13.shape[0]
    kernels = _use_kernels(x)
    if impl == "auto" and kernels:
        from . import fp8_triton

        large = n_rows >= fp8_triton.LARGE_ROWS * e and not _capturing(x)
        impl = "cublas" if large else "triton"
    if impl == "triton":   # the GEMM writes the counted rows; only the padding rows past them are zeroed
        from . import fp8_triton

        y = fp8_triton.zero_tail(torch.empty((n_rows, w2.shape[1]), dtype=x.dtype, device=x.device),
                                 tokens_per_expert)
    else:
        y = torch.zeros((n_rows, w2.shape[1]), dtype=x.dtype, device=x.device)
    if impl == "cublas":
        if not kernels or _capturing(x):
            raise ValueError("fp8_grouped_mlp: impl 'cublas' needs CUDA and an eager (not captured) step")
        return _grouped_mlp_cublas(x, w13, s13, sidx13, w2, s2, sidx2, tokens_per_expert.tolist(), y)
    if impl == "triton":
        from . import fp8_triton

        ce = config_experts or e
        c13 = fp8_triton.pick_config(w13.shape[1], w13.shape[2], ce, device=x.device)
        c2 = fp8_triton.pick_config(w2.shape[1], w2.shape[2], ce, device=x.device)
        q, s = (x, None) if c13.fuse_quant else fp8_triton.act_quant(x)
        h = fp8_triton.fp8_gemm(q, s, w13, s13, sidx13, x.dtype, c13, counts=tokens_per_expert)
        q2, s2a = fp8_triton.silu_mul_quant(h)
        return fp8_triton.fp8_gemm(q2, s2a, w2, s2, sidx2, x.dtype, c2, counts=tokens_per_expert, out=y)
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            rows = x[start : start + n]
            h = fp8_linear(rows, w13[e], s13[e], sidx13)
            a = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
            y[start : start + n] = fp8_linear(a, w2[e], s2[e], sidx2)
            start += n
    return y


class Fp8Linear(nn.Module):
    """A bias-free projection whose weight stays block-FP8: `weight` e4m3 [out, in] and `weight_scale_inv`
    fp32 [ceil(out/bo), ceil(in/bi)], named as in DeepSeek's checkpoints so loading is a name match.
    parts: row counts of projections stacked into one weight (q_a ‖ kv_a), each in its own scale blocks
    (scale rows = sum of ceil(part/bo)); one GEMM serves them all at decode sizes (forward_parts)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128),
                 parts: tuple[int, ...] | None = None):
        super().__init__()
        if block[1] != GROUP:
            raise ValueError(f"native FP8 needs 128-wide input blocks (activation groups); got {block}")
        self.parts = tuple(parts) if parts else (out_features,)
        if sum(self.parts) != out_features:
            raise ValueError(f"Fp8Linear: parts {self.parts} do not add up to out_features {out_features}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(sum(-(-r // block[0]) for r in self.parts), -(-in_features // block[1]), dtype=torch.float32),
            requires_grad=False)
        self._sidx: torch.Tensor | None = None  # made on first use, on the weight's device (not state)
        self._part_sidx: list[torch.Tensor] = []   # per part, for forward_parts' prefill path (same)

    @property
    def scale_row(self) -> torch.Tensor:
        if self._sidx is None or self._sidx.device != self.weight.device:
            self._sidx = scale_row_index(list(self.parts), self.block[0], self.weight.device)
        return self._sidx

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            return fp8_linear_rows(x, self.weight, self.weight_scale_inv, self.scale_row)
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.scale_row)

    def quant_pad(self, x: torch.Tensor) -> int | None:
        """The row padding of Fp8Rows this projection takes for input x (fp8_linear_quant_pad), None where it
        takes none: an input larger than one GEMM of the stacked parts serves (forward_parts) takes none."""
        if len(self.parts) > 1 and x.numel() // x.shape[-1] >= CUBLAS_MIN_ROWS:
            return None
        return fp8_linear_quant_pad(x, self.weight, self.weight_scale_inv)

    def forward_parts(self, x: torch.Tensor | Fp8Rows) -> tuple[torch.Tensor, ...]:
        """Each stacked projection's output. Decode sizes: one activation quantization and one GEMM, split
        into views. Prefill sizes (>= CUBLAS_MIN_ROWS rows): one GEMM per part, so cuBLAS serves the parts
        whose rows fill whole 128-row blocks (the stacked weight's rows need not)."""
        if isinstance(x, Fp8Rows) or len(self.parts) == 1 or x.reshape(-1, x.shape[-1]).shape[0] < CUBLAS_MIN_ROWS:
            return self(x).split(self.parts, dim=-1)
        if not self._part_sidx or self._part_sidx[0].device != self.weight.device:
            self._part_sidx = [scale_row_index([r], self.block[0], self.weight.device) for r in self.parts]
        outs, r0, b0 = [], 0, 0
        for r, sidx in zip(self.parts, self._part_sidx):
            nb = -(-r // self.block[0])
            outs.append(fp8_linear(x, self.weight[r0:r0 + r], self.weight_scale_inv[b0:b0 + nb], sidx))
            r0, b0 = r0 + r, b0 + nb
        return tuple(outs)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequant_rows(self.weight, self.weight_scale_inv, self.scale_row).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block={self.block}"


class StackedLinear(nn.Linear):
    """nn.Linear whose output rows are several projections stacked (parts, as Fp8Linear's): forward_parts
    gives each one's output, as views of one GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parts: tuple[int, ...]):
        super().__init__(in_features, out_features, bias=bias)
        self.parts = tuple(parts)
        if sum(self.parts) != out_features:
            raise ValueError(f"StackedLinear: parts {self.parts} do not add up to out_features {out_features}")

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.parts, dim=-1)


def make_linear(in_features: int, out_features: int, bias: bool = False,
                fp8_block: tuple[int, int] | None = None, parts: tuple[int, ...] | None = None) -> nn.Module:
    """nn.Linear, or Fp8Linear when the model runs natively in FP8 (no FP8 projection has a bias in R1).
    parts: row counts of stacked projections (their FP8 scale blocks stay separate); either class then has
    forward_parts."""
    if fp8_block is None:
        return StackedLinear(in_features, out_features, bias, parts) if parts else nn.Linear(in_features, out_features,
                                                                                             bias=bias)
    if bias:
        raise ValueError("native FP8 projections with a bias are not supported (attention_bias must be false)")
    return Fp8Linear(in_features, out_features, fp8_block, parts)
