"""Fused paged MLA decode (absorbed form) in Triton: flash-decoding over the latent cache.

WHY: the torch reference (`attention.paged_mla_decode`) gathers every sequence's pages into a contiguous
copy, materializes fp32 scores and runs two bmm's - ~10x the bytes the math needs. Absorbed MLA decode
is MQA with one 576-wide latent head (K = c_kv ‖ k_pe, V = c_kv) shared by all H query heads, so one
program loads a tile of latent rows straight from the pages once and scores it against a whole block
of heads with tensor-core dots, keeping an online softmax in fp32 registers.

Shape of the work: grid (head groups, batch, splits). Each program walks one split of one sequence's
context ("flash decoding"); a second small kernel merges a sequence's splits through their log-sum-exp,
in split order. The split schedule is attention.split_plan: fixed tokens per split, capped at MAX_SPLITS,
a function of the sequence's own length only, so the bits of a sequence's output do not depend on the
batch it shares or on the graph size it is padded to (batch invariance). Head groups are the fastest grid
axis so the programs reading the same latent rows run together and share them through L2.

CUDA-graph safety: the grid depends only on static shapes (batch, heads, block-table width); the
per-sequence context range is computed on device from seq_lens. seq_len 0 rows produce zeros, and
rows past seq_len are never read (masked loads), so stale or NaN pages cannot leak into results.

fp8 cache (float8_e4m3fn holding value / k_scale): tiles are widened to the query dtype in registers and
k_scale is applied once to the scores' scale and once to the output.

Without CUDA the kernels run under the Triton interpreter (numpy), which is what the unit tests use.
"""
import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch

from wideep import envs
from wideep.model.triton_compat import constexpr, tl, triton

from . import mla_decode_flashmla, mla_decode_hopper
from .mla_decode_hopper import _store_halves
from .attention import MAX_SPLITS, SPLIT_ALIGN, is_fp8, split_tokens

log = logging.getLogger(__name__)
_broken = False   # auto mode saw the kernel fail: the torch reference serves from then on

_LOG2E = 1.4426950408889634
BACKEND_ENV = "WIDEEP_MLA_DECODE"          # auto (default) | torch | triton | flashmla
CONFIG_ENV = "WIDEEP_MLA_DECODE_CONFIG"    # "block_h,block_n,num_warps,num_stages[,sv]" to force a tile config
COMBINE_ROWS = 8   # rows (heads x query tokens) of one sequence per merge program


@dataclass(frozen=True)
class DecodeConfig:
    block_h: int      # query rows (heads x query tokens) per program (tensor-core M; >= 16)
    block_n: int      # context tokens per loop iteration (>= 16, <= SPLIT_ALIGN)
    num_warps: int
    num_stages: int   # software-pipelining depth of the latent tile loads
    split_v: bool = False   # the Hopper variant: value accumulator as two 256-wide halves
    f16: bool = False       # fp8 cache only: widen tiles to fp16 (one conversion instruction) instead of bf16
    tma: bool = False       # Hopper: whole pages by bulk tensor copies (mla_decode_hopper); needs block_n == page, sv
    gluon: bool = False     # Hopper: the warp-specialized Gluon kernel (mla_decode_gluon); 64,64,4,<stages>
    halfpage: bool = False  # gluon only: the warpgroups score the two halves of each page (mla_decode_halfpage)
    e4m3: bool = False      # gluon,hp only: e4m3 cache, pages widened to bf16 in shared memory (mla_decode_e4m3)
    scorer: bool = False    # gluon only: warpgroup 0 scores each page, both accumulate values (mla_decode_scorer)
    persistent: bool = False   # gluon,sc only: one program per SM walks the work items (mla_decode_scorer.schedule)

    def __str__(self) -> str:
        return (f"{self.block_h},{self.block_n},{self.num_warps},{self.num_stages}" + (",sv" if self.split_v else "")
                + (",f16" if self.f16 else "") + (",tma" if self.tma else "") + (",gluon" if self.gluon else "")
                + (",hp" if self.halfpage else "") + (",e4m3" if self.e4m3 else "") + (",sc" if self.scorer else "")
                + (",ps" if self.persistent else ""))

    @classmethod
    def parse(cls, text: str) -> "DecodeConfig":
        parts = [x.strip() for x in text.split(",")]
        flags = set(parts[4:])
        try:
            if len(parts) < 4 or flags - {"sv", "f16", "tma", "gluon", "hp", "e4m3", "sc", "ps"}:
                raise ValueError(text)
            bh, bn, w, st = (int(x) for x in parts[:4])
        except ValueError as exc:
            raise ValueError(f"{CONFIG_ENV} must be 'block_h,block_n,num_warps,num_stages[,sv][,f16][,tma]', got "
                             f"{text!r}") from exc
        if bh < 16 or bn < 16 or bh & (bh - 1) or bn & (bn - 1) or bn > SPLIT_ALIGN:
            raise ValueError(f"{CONFIG_ENV}: block_h and block_n must be powers of two >= 16 (block_n <= "
                             f"{SPLIT_ALIGN}), got {text!r}")
        if "tma" in flags and "sv" not in flags:
            raise ValueError(f"{CONFIG_ENV}: the tma variant is a split-value kernel (add sv), got {text!r}")
        if "gluon" in flags and (bh, bn, w) != (64, 64, 4) or "gluon" in flags and flags & {"sv", "f16", "tma"}:
            raise ValueError(f"{CONFIG_ENV}: the gluon kernel is '64,64,4,<stages>,gluon[,hp]', got {text!r}")
        if "hp" in flags and ("gluon" not in flags or st != 2):
            raise ValueError(f"{CONFIG_ENV}: the half-page kernel is '64,64,4,2,gluon,hp', got {text!r}")
        if "e4m3" in flags and "hp" not in flags:
            raise ValueError(f"{CONFIG_ENV}: the e4m3-cache Gluon kernel is '64,64,4,2,gluon,hp,e4m3', got {text!r}")
        if "sc" in flags and ("gluon" not in flags or st != 2 or "hp" in flags):
            raise ValueError(f"{CONFIG_ENV}: the one-scorer kernel is '64,64,4,2,gluon,sc', got {text!r}")
        if "ps" in flags and "sc" not in flags:
            raise ValueError(f"{CONFIG_ENV}: the persistent one-scorer kernel is '64,64,4,2,gluon,sc,ps', got {text!r}")
        return cls(bh, bn, w, st, "sv" in flags, "f16" in flags, "tma" in flags, "gluon" in flags, "hp" in flags,
                   "e4m3" in flags, "sc" in flags, "ps" in flags)


# Candidates in order of preference; a config that fails to compile (e.g. out of shared memory) is
# skipped once and the next is used, and that fallback is logged once. Wide head blocks reuse each latent
# tile for more heads. Present kernel, measured on an H100 (benchmarks/mla_decode.py, 2026-11-23): 64 heads
# x 64 tokens won 9 of 10 shapes, 0.345 ms at B=128 ctx 2048 against 0.453 ms for 64x32.
CUDA_CONFIGS_MANY_HEADS = (
    DecodeConfig(64, 64, 8, 2),
    DecodeConfig(64, 32, 8, 2),
    DecodeConfig(32, 32, 4, 2),
    DecodeConfig(16, 32, 4, 2),
    DecodeConfig(16, 16, 4, 1),
)
# Hopper (sm_90): tried first there; the configs above are the fallback. Measured on an H200
# (benchmarks/mla_decode.py --suite/--study, 2026-11-30): the split-value variant beat the present tile at
# every bf16 shape (0.318 ms vs 0.344 at B=128 ctx 2048, 2048 tokens per split); over an fp8 cache it needs
# the fp16 widening to beat the bf16 one (0.371 ms vs 0.464).
# Over a bf16 cache the warp-specialized Gluon kernels come first. The one-scorer one (mla_decode_scorer:
# warpgroup 0 scores each whole page and runs the softmax, both warpgroups accumulate half of the value
# columns) beat the half-page one at every measured shape, 11-16% less time: 0.145 ms at B=128 ctx 2048
# against 0.169, 0.287 against 0.338 at B=256, 1.30 against 1.46 at B=256 ctx 8192 (H200, 2026-11-30,
# docs/perf.md, fifth pass). The half-page one (mla_decode_halfpage: each warpgroup scores 32 tokens of the
# page, no duplicated QK^T) follows; it beat the full-tile one (mla_decode_gluon) on average at every measured
# shape (0.170 ms against 0.182). Two more variants measured slower and were removed: the full-tile kernel
# with a page's PV behind the next page's scores (0.247 ms) and the seesaw schedule (the warpgroups score
# alternate pages, FlashMLA's published scheme; 0.215 ms, no prefetch fits).
# The TMA tile (whole pages by bulk tensor copies, mla_decode_hopper) backs them where Gluon is missing or
# does not apply. Over an fp8 cache the Gluon half-page kernel over e4m3 pages comes first (mla_decode_e4m3:
# each warpgroup widens its 32 rows of the page to bf16 in shared memory): 0.280 ms at B=128 ctx 2048
# against 0.371 for the pointer-load tile with fp16 widening, 21-27% less time at every measured shape
# (H200, 2026-11-30); that tile backs it (TMA lost over fp8: 0.421 ms vs 0.371, the e4m3 tile is widened
# in registers either way and spills). A cache the bulk copy cannot describe (unaligned strides,
# page != 64), fp16 queries over fp8, or a Triton without Gluon fall back to the next config, logged once.
HOPPER_CONFIGS_MANY_HEADS = (
    DecodeConfig(64, 64, 4, 2, gluon=True, scorer=True),
    DecodeConfig(64, 64, 4, 2, gluon=True, halfpage=True),
    DecodeConfig(64, 64, 4, 2, gluon=True),
    DecodeConfig(64, 64, 8, 2, split_v=True, tma=True),
    DecodeConfig(64, 64, 8, 2, split_v=True),
)
HOPPER_CONFIGS_FP8 = (
    DecodeConfig(64, 64, 4, 2, gluon=True, halfpage=True, e4m3=True),
    DecodeConfig(64, 64, 8, 2, split_v=True, f16=True),
    DecodeConfig(64, 64, 8, 2, split_v=True),
)
CUDA_CONFIGS_FEW_HEADS = (
    DecodeConfig(16, 32, 4, 2),
    DecodeConfig(16, 16, 4, 1),
)
INTERPRET_CONFIG = DecodeConfig(16, 16, 1, 1)


def triton_available() -> bool:
    return triton is not None


def _mode() -> str:
    return envs.WIDEEP_MLA_DECODE.strip().lower()


def use_triton(q: torch.Tensor) -> bool:
    """Backend choice: env WIDEEP_MLA_DECODE=torch|triton forces one (triton: wideep's kernels only); auto = these
    kernels on CUDA if triton imports, with FlashMLA where it applies; flashmla = that, FlashMLA required."""
    mode = _mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if triton is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        return True
    if mode not in ("auto", "flashmla"):
        raise ValueError(f"{BACKEND_ENV} must be auto, torch, triton or flashmla, got {mode!r}")
    return q.is_cuda and triton is not None and not _broken


# ---- kernels (plain functions, wrapped per target in _kernels) ------------------------------------

def _mla_decode_split_kernel(
    Q_LAT, Q_PE, KV, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
    sm_scale_log2, out_scale, chunk, max_splits, H,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h,
    stride_kv_blk, stride_kv_tok, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
    L: constexpr, R: constexpr, PAGE: constexpr, BLOCK_L: constexpr, BLOCK_R: constexpr,
    BLOCK_H: constexpr, BLOCK_N: constexpr, HALF: constexpr, NUM_Q: constexpr, ALIGN: constexpr, SPLIT: constexpr,
    IEEE: constexpr, SPLIT_V: constexpr, KV_FP8: constexpr,
    DOT_F32: constexpr,  # interpreter only: its bf16 dot is wrong, so dots run on fp32 copies
):
    """One (head block, sequence, split): online softmax over the split's tokens.

    Rows are (query token, head) pairs, NUM_Q * H of them. SPLIT_V keeps the 512-wide value accumulator as
    two 256-wide halves (two tensor-core dots of the maximal wgmma width instead of one the compiler must
    cut); KV_FP8 reads an e4m3 cache and widens tiles to bf16 in registers (the scale is folded into
    sm_scale_log2 and out_scale).
    """
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    # the split schedule of attention.split_plan: a function of this sequence's length only
    n_splits = tl.minimum(tl.maximum((seq_len + chunk - 1) // chunk, 1), max_splits)
    per = (seq_len + n_splits - 1) // n_splits
    per = tl.maximum((per + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    start = split * per
    end = tl.minimum(seq_len, start + per)
    n_splits = tl.where(seq_len < 0, 0, n_splits)   # a row another kernel writes (negative length): no store
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask_h = rows < H * NUM_Q
    live = rmask_h & ((rows * 0 + split) < n_splits)   # programs past this sequence's splits store nothing
    qi = rows // H
    head = rows % H
    row_end = seq_len - (NUM_Q - 1 - qi)
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    q_row = Q_LAT + b * stride_ql_b + qi * stride_ql_q + head * stride_ql_h
    qp = tl.load(Q_PE + b * stride_qp_b + qi[:, None] * stride_qp_q + head[:, None] * stride_qp_h + offs_r[None, :],
                 mask=rmask_h[:, None] & rmask[None, :], other=0.0)
    if SPLIT_V:
        offs_a = tl.arange(0, HALF)
        q0 = tl.load(q_row[:, None] + offs_a[None, :], mask=rmask_h[:, None], other=0.0)
        q1 = tl.load(q_row[:, None] + HALF + offs_a[None, :], mask=rmask_h[:, None], other=0.0)
        acc0 = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        if DOT_F32:
            q0 = q0.to(tl.float32)
            q1 = q1.to(tl.float32)
    else:
        q = tl.load(q_row[:, None] + offs_l[None, :], mask=rmask_h[:, None] & lmask[None, :], other=0.0)
        acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
        if DOT_F32:
            q = q.to(tl.float32)
    if DOT_F32:
        qp = qp.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    bt_row = BLOCK_TABLES + b * stride_bt_b
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        page = tl.load(bt_row + toks // PAGE, mask=tmask, other=0).to(tl.int64)
        row = page * stride_kv_blk + (toks % PAGE).to(tl.int64) * stride_kv_tok
        if BLOCK_R == R:
            pe_mask = tmask[:, None]
        else:
            pe_mask = tmask[:, None] & rmask[None, :]
        kpe = tl.load(KV + row[:, None] + L + offs_r[None, :], mask=pe_mask, other=0.0)
        if KV_FP8:
            kpe = kpe.to(Q_LAT.dtype.element_ty)
        if DOT_F32:
            kpe = kpe.to(tl.float32)
        if SPLIT_V:
            kv0 = tl.load(KV + row[:, None] + offs_a[None, :], mask=tmask[:, None], other=0.0)
            kv1 = tl.load(KV + row[:, None] + HALF + offs_a[None, :], mask=tmask[:, None], other=0.0)
            if KV_FP8:
                kv0 = kv0.to(Q_LAT.dtype.element_ty)
                kv1 = kv1.to(Q_LAT.dtype.element_ty)
            if DOT_F32:
                kv0 = kv0.to(tl.float32)
                kv1 = kv1.to(tl.float32)
            if IEEE:
                s = tl.dot(q0, tl.trans(kv0), input_precision="ieee")
                s = tl.dot(q1, tl.trans(kv1), s, input_precision="ieee")
                s = tl.dot(qp, tl.trans(kpe), s, input_precision="ieee")
            else:
                s = tl.dot(q0, tl.trans(kv0))
                s = tl.dot(q1, tl.trans(kv1), s)
                s = tl.dot(qp, tl.trans(kpe), s)
        else:
            if BLOCK_L == L:   # R1: whole rows, a mask constant along them keeps the loads 16-byte wide
                kv_mask = tmask[:, None]
            else:
                kv_mask = tmask[:, None] & lmask[None, :]
            kv = tl.load(KV + row[:, None] + offs_l[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:
                kv = kv.to(Q_LAT.dtype.element_ty)
            if DOT_F32:
                kv = kv.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(kv), input_precision="ieee")
                s = tl.dot(qp, tl.trans(kpe), s, input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kv))
                s = tl.dot(qp, tl.trans(kpe), s)
        if NUM_Q == 1:
            s = tl.where(tmask[None, :], s * sm_scale_log2, float("-inf"))
        else:
            s = tl.where(toks[None, :] < row_end[:, None], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(Q_LAT.dtype.element_ty)   # probabilities in the compute dtype, as the reference does
        if DOT_F32:
            pv = pv.to(tl.float32)
        if SPLIT_V:
            if IEEE:
                acc0 = tl.dot(pv, kv0, acc0 * alpha[:, None], input_precision="ieee")
                acc1 = tl.dot(pv, kv1, acc1 * alpha[:, None], input_precision="ieee")
            else:
                acc0 = tl.dot(pv, kv0, acc0 * alpha[:, None])
                acc1 = tl.dot(pv, kv1, acc1 * alpha[:, None])
        else:
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(pv, kv, acc, input_precision="ieee")
            else:
                acc = tl.dot(pv, kv, acc)
        m_i = m_new

    has = l_i > 0.0
    inv = out_scale / tl.where(has, l_i, 1.0)   # empty range: acc is 0 -> zeros
    partial = False
    if SPLIT:
        partial = n_splits > 1   # else one split: the output itself (the combine kernel skips the row)
    if SPLIT_V:
        out0 = acc0 * inv[:, None]
        out1 = acc1 * inv[:, None]
        _store_halves(OUT, LSE, FIN, out0, out1, m_i, l_i, has, live, rows, offs_a, b, split, partial,
                      stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, HALF)
    else:
        out = acc * inv[:, None]
        omask = live[:, None] & lmask[None, :]
        if partial:
            tl.store(LSE + b * stride_lse_b + rows * stride_lse_r + split,
                     tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=live)
            tl.store(OUT + b * stride_o_b + rows[:, None] * stride_o_r + split * stride_o_s + offs_l[None, :], out,
                     mask=omask)
        else:
            tl.store(FIN + b * stride_f_b + rows[:, None] * stride_f_r + offs_l[None, :],
                     out.to(FIN.dtype.element_ty), mask=omask)


def _mla_decode_combine_kernel(
    PART, LSE, SEQ_LENS, OUT, chunk, max_splits, H_ROWS, L,
    stride_p_b, stride_p_r, stride_p_s, stride_lse_b, stride_lse_r, stride_o_b, stride_o_r,
    BLOCK_L: constexpr, ROWS: constexpr,
):
    """Merge a sequence's splits in split order (a loop, not a tree whose shape follows the grid), ROWS rows of
    one sequence per program. A decode graph merges every row of every sequence, and at short contexts no
    sequence has a second split (the split kernel wrote their rows itself): a program per row only to find that
    cost ~11 us per layer at 128 x 128 rows."""
    b = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + b)
    n_splits = tl.minimum((seq_len + chunk - 1) // chunk, max_splits)   # 0 for a padding row
    # one split: the split kernel wrote the rows' output itself; a negative length: another kernel did
    if (n_splits != 1) & (seq_len >= 0):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < H_ROWS
        offs_l = tl.arange(0, BLOCK_L)
        mask = rmask[:, None] & (offs_l < L)[None, :]
        lse_rows = LSE + b * stride_lse_b + rows * stride_lse_r
        mx = tl.full([ROWS], float("-inf"), tl.float32)
        for s in range(0, n_splits):
            mx = tl.maximum(mx, tl.load(lse_rows + s, mask=rmask, other=float("-inf")))
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        acc = tl.zeros([ROWS, BLOCK_L], dtype=tl.float32)
        den = tl.zeros([ROWS], dtype=tl.float32)
        for s in range(0, n_splits):
            w = tl.exp2(tl.load(lse_rows + s, mask=rmask, other=float("-inf")) - mx)
            part = tl.load(PART + b * stride_p_b + rows[:, None] * stride_p_r + s * stride_p_s + offs_l[None, :],
                           mask=mask, other=0.0)
            acc = acc + w[:, None] * part
            den = den + w
        out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
        tl.store(OUT + b * stride_o_b + rows[:, None] * stride_o_r + offs_l[None, :], out.to(OUT.dtype.element_ty),
                 mask=mask)


def interpreter_active() -> bool:
    return triton is not None and envs.TRITON_INTERPRET in ("1", "true", "True")


@functools.cache
def _kernels(interpret: bool):
    if triton is None:
        raise RuntimeError("triton is not installed")
    if interpret != interpreter_active():
        raise RuntimeError("the Triton MLA decode runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                           "triton is imported) and on CUDA tensors only without it")
    # chunk / max_splits are runtime values: one compiled variant for all of them
    return (triton.jit(_mla_decode_split_kernel, do_not_specialize=["chunk", "max_splits"]),
            triton.jit(_mla_decode_combine_kernel, do_not_specialize=["chunk", "max_splits"]),
            triton.jit(mla_decode_hopper._mla_decode_tma_kernel, do_not_specialize=["chunk", "max_splits"]))


# ---- launch -----------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def grid_splits(max_ctx: int, chunk: int) -> int:
    """The grid's split axis: enough for the longest sequence the block table can hold. Static (graph
    safe); programs past a sequence's own split count do nothing."""
    return max(1, min(MAX_SPLITS, -(-max_ctx // chunk)))


_chosen: dict[tuple, DecodeConfig] = {}
_logged: set[tuple] = set()


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def _candidates(num_heads: int, interpret: bool, dtype: torch.dtype = torch.bfloat16,
                hopper: bool = False, fp8: bool = False) -> tuple[DecodeConfig, ...]:
    forced = envs.WIDEEP_MLA_DECODE_CONFIG
    if forced:
        return (DecodeConfig.parse(forced),)
    if interpret:
        return (INTERPRET_CONFIG,)
    if num_heads >= 64 and dtype in (torch.bfloat16, torch.float16):
        first = (HOPPER_CONFIGS_FP8 if fp8 else HOPPER_CONFIGS_MANY_HEADS) if hopper else ()
        return first + CUDA_CONFIGS_MANY_HEADS
    return CUDA_CONFIGS_FEW_HEADS   # few heads, or fp32 (tests): no tensor-core path, keep tiles small


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    *,
    config: DecodeConfig | None = None,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
    plans: dict | None = None,
) -> torch.Tensor:
    """q_lat [B, H, L] or [B, Q, H, L] (Q query tokens per sequence), q_pe likewise with R, kv_cache
    [num_blocks, page, L+R] (model dtype, or float8_e4m3fn holding value / k_scale) -> o_lat like q_lat.

    block_tables [B, max_blocks] (int32), seq_lens [B] (int32, 0 = padding row -> zeros; negative: the row is
    left as it is in `out`, which another kernel wrote). `config` / `chunk` (tokens per split, see
    attention.split_plan) override the defaults (benchmarks, tests). Where FlashMLA applies
    (mla_decode_flashmla; not with a forced config) it takes the sequences of at most one split and these
    kernels the rest; `plans` is the step's memo for its schedule (AttentionMetadata.plans).
    """
    squeeze = q_lat.dim() == 3
    if squeeze and q_pe.dim() == 3:
        q_lat, q_pe = q_lat[:, None], q_pe[:, None]
    if q_lat.dim() != 4 or q_pe.dim() != 4 or q_pe.shape[:3] != q_lat.shape[:3]:
        raise ValueError(f"q_lat [B,(Q,)H,L] and q_pe [B,(Q,)H,R] must agree: {tuple(q_lat.shape)} vs "
                         f"{tuple(q_pe.shape)}")
    b, nq, h, lat = q_lat.shape
    rope = q_pe.shape[3]
    if not 1 <= nq <= 4:
        raise ValueError(f"1 to 4 query tokens per sequence, got {nq}")
    if kv_cache.dim() != 3 or kv_cache.shape[2] != lat + rope:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {lat + rope}], got {tuple(kv_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [{b}, max_blocks], got {tuple(block_tables.shape)}")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be [{b}], got {tuple(seq_lens.shape)}")
    if out is not None and out.shape != (b, nq, h, lat):
        out = out.view(b, nq, h, lat)
    if b == 0 or h == 0:
        out = torch.empty((b, nq, h, lat), dtype=q_lat.dtype, device=q_lat.device) if out is None else out
        return out[:, 0] if squeeze else out

    dt = kv_cache.dtype
    fp8 = is_fp8(dt)
    cdt = q_lat.dtype if fp8 else dt   # compute dtype: the cache's, or the query's over an fp8 cache
    if fp8 and cdt not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"an fp8 cache needs bf16/fp16/fp32 queries, got {cdt}")
    q_lat = q_lat.to(cdt)
    q_pe = q_pe.to(cdt)
    if q_lat.stride(3) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(3) != 1:
        q_pe = q_pe.contiguous()
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    chunk = chunk or split_tokens()
    if chunk <= 0 or chunk % SPLIT_ALIGN:
        raise ValueError(f"chunk must be a positive multiple of {SPLIT_ALIGN}, got {chunk}")
    interpret = not q_lat.is_cuda
    dev_index = None if interpret else (q_lat.device.index if q_lat.device.index is not None
                                        else torch.cuda.current_device())
    hopper = dev_index is not None and _is_hopper(dev_index)
    page = kv_cache.shape[1]
    max_ctx = block_tables.shape[1] * page
    rest_persistent = False
    if config is None and mla_decode_flashmla.applies(q_lat, kv_cache, hopper):
        try:
            plan = mla_decode_flashmla.plan_for(seq_lens, nq * h, chunk, plans, dev_index)
            mine = mla_decode_flashmla.decode(q_lat, q_pe, kv_cache, block_tables, plan, scale)
        except Exception as exc:   # a library that loads but cannot run here: wideep's kernels take over
            if q_lat.is_cuda and torch.cuda.is_current_stream_capturing() or _mode() == "flashmla":
                raise
            mla_decode_flashmla.disable(repr(exc))
        else:
            if out is None:
                out = mine
            else:
                out.copy_(mine)
            if max_ctx <= chunk:     # the table holds no sequence over one split: FlashMLA took every row
                return out[:, 0] if squeeze else out
            seq_lens = plan.rest
            rest_persistent = True   # the rows left are few or none: one wave of programs, not one per item
    elif config is None and _mode() == "flashmla" and q_lat.is_cuda:    # a forced config skips FlashMLA on purpose
        raise RuntimeError(f"{BACKEND_ENV}=flashmla but FlashMLA does not apply here (sgl-flash-mla installed? "
                           "sm_90, bf16 cache, 512 + 64 latent, 64-token pages, one query token, <= 128 heads)")

    if out is None:
        out = torch.empty((b, nq, h, lat), dtype=q_lat.dtype, device=q_lat.device)
    ieee = cdt == torch.float32 or interpret
    key = (q_lat.device, h * nq, lat, rope, page, dt, cdt)
    if config is not None:
        candidates = (config,)
    else:  # the config that worked before first; the rest still back it up (a new variant may not compile)
        candidates = _candidates(h * nq, interpret, cdt, hopper, fp8)
        if key in _chosen:
            candidates = (_chosen[key],) + tuple(c for c in candidates if c != _chosen[key])
    last_exc: Exception | None = None
    for i, cfg in enumerate(candidates):
        try:
            run_cfg = dataclasses.replace(cfg, persistent=True) if rest_persistent and cfg.scorer else cfg
            _launch(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, scale, k_scale, run_cfg, chunk, max_ctx,
                    interpret, ieee, fp8)
        except Exception as exc:  # compile failure (e.g. out of resources): try the next tile config
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            last_exc = exc
            continue
        if config is None:
            _chosen[key] = cfg
            if key not in _logged:
                _logged.add(key)
                if i:
                    log.warning("MLA decode: preferred tile config %s did not run here (%s); using %s",
                                candidates[0], last_exc, cfg)
                else:
                    log.info("MLA decode: Triton kernel, tile config %s (%s)", cfg,
                             "Hopper Gluon kernel, one scorer, persistent" if cfg.persistent
                             else "Hopper Gluon kernel, one scorer" if cfg.scorer
                             else "Hopper Gluon kernel, half pages, e4m3 cache" if cfg.e4m3
                             else "Hopper Gluon kernel, half pages" if cfg.halfpage
                             else "Hopper Gluon kernel" if cfg.gluon
                             else "Hopper TMA variant" if cfg.tma else "Hopper variant" if cfg.split_v
                             else "portable variant")
        return out[:, 0] if squeeze else out
    raise RuntimeError(f"no MLA decode tile config compiled (tried {[str(c) for c in candidates]})") from last_exc


def _launch(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, scale, k_scale, cfg: DecodeConfig, chunk,
            max_ctx, interpret, ieee, fp8):
    if fp8 and cfg.f16 and q_lat.dtype == torch.bfloat16:   # saturate rather than overflow to inf
        q_lat = q_lat.clamp(-65504.0, 65504.0).to(torch.float16)
        q_pe = q_pe.clamp(-65504.0, 65504.0).to(torch.float16)
    dot_f32 = interpret and q_lat.dtype != torch.float32
    split_kernel, combine_kernel, tma_kernel = _kernels(interpret)
    b, nq, h, lat = q_lat.shape
    rope = q_pe.shape[3]
    rows = nq * h
    page = kv_cache.shape[1]
    block_l, block_r = _pow2(lat), _pow2(rope)
    if cfg.split_v and block_l != lat:
        raise ValueError(f"the split-value variant needs a power-of-two kv_lora_rank, got {lat}")
    head_groups = -(-rows // cfg.block_h)
    splits = grid_splits(max_ctx, chunk)
    grid = (head_groups, b, splits)
    if cfg.gluon:
        _launch_gluon(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, scale * _LOG2E * k_scale, k_scale, cfg,
                      chunk, grid, fp8, combine_kernel)
        return
    if cfg.tma:
        why = mla_decode_hopper.tma_supported(kv_cache, page, lat, rope, cfg.block_n)
        if why is None and (q_lat.dtype == torch.float32 or rope != block_r or SPLIT_ALIGN % page):
            why = "fp32 compute, or a rope width / page size the TMA tile does not cover"
        if why is not None:
            raise ValueError(f"MLA decode config {cfg} does not apply: {why}")
        kernel = tma_kernel
        descs = mla_decode_hopper.make_descriptors(kv_cache, lat, rope)
        common = dict(L=lat, R=rope, PAGE=page, BLOCK_H=cfg.block_h, HALF=lat // 2, NUM_Q=nq, ALIGN=SPLIT_ALIGN,
                      KV_FP8=fp8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        kernel = split_kernel
        descs = ()
        common = dict(L=lat, R=rope, PAGE=page, BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_H=cfg.block_h,
                      BLOCK_N=cfg.block_n, HALF=block_l // 2, NUM_Q=nq, ALIGN=SPLIT_ALIGN, IEEE=ieee,
                      SPLIT_V=cfg.split_v, KV_FP8=fp8, DOT_F32=dot_f32, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
    qs = (q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2))
    kvs = (kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0))
    sm = scale * _LOG2E * k_scale

    def run(o, lse, fin, split):
        kernel[grid](q_lat, q_pe, kv_cache, *descs, block_tables, seq_lens, o, lse, fin, sm, k_scale, chunk,
                     MAX_SPLITS, h, *qs, *kvs, *_out_strides(o, lse, fin, split), SPLIT=split, **common)
    _split_and_merge(run, combine_kernel, out.view(b, rows, lat), seq_lens, splits, chunk)


def _out_strides(out, lse, fin, split: bool) -> tuple:
    """The split kernels' output strides: (b, row, split) of the fp32 partials, (b, row) of their log-sum-exps and
    (b, row) of the final output fin, which one-split sequences (and an unsplit launch, out = fin) write."""
    if split:
        return out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), fin.stride(0), fin.stride(1)
    return out.stride(0), out.stride(1), 0, 0, 0, fin.stride(0), fin.stride(1)


def _split_and_merge(run, combine_kernel, flat_out, seq_lens, splits: int, chunk: int) -> None:
    """run(out, lse, fin, split) launches a split kernel. One split: straight into flat_out [B, rows, L]; else into
    fp32 partials [B, rows, S, L] with their log-sum-exps, merged in split order by the combine kernel, except
    for the sequences that have one split, whose rows the split kernel writes into flat_out itself (a CUDA
    graph is captured with the splits its longest context needs: shorter sequences then skip the fp32 round
    trip and the merge)."""
    b, rows, lat = flat_out.shape
    if splits == 1:
        run(flat_out, flat_out, flat_out, False)
        return
    part = torch.empty((b, rows, splits, lat), dtype=torch.float32, device=flat_out.device)
    lse = torch.empty((b, rows, splits), dtype=torch.float32, device=flat_out.device)
    run(part, lse, flat_out, True)
    combine_kernel[(triton.cdiv(rows, COMBINE_ROWS), b)](
        part, lse, seq_lens, flat_out, chunk, MAX_SPLITS, rows, lat,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        flat_out.stride(0), flat_out.stride(1),
        BLOCK_L=_pow2(lat), ROWS=COMBINE_ROWS, num_warps=4,
    )


def _launch_gluon(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, sm, out_scale, cfg: DecodeConfig, chunk, grid,
                  fp8, combine_kernel):
    """The warp-specialized Gluon kernel; a ValueError says it does not apply here (the next config serves)."""
    if fp8 != cfg.e4m3 or not q_lat.is_cuda:
        raise ValueError(f"MLA decode config {cfg} does not apply: needs {'an e4m3' if cfg.e4m3 else 'a bf16'} "
                         f"cache on CUDA")
    try:
        from . import mla_decode_gluon
        if cfg.e4m3:
            from . import mla_decode_e4m3
        elif cfg.halfpage:
            from . import mla_decode_halfpage
        if cfg.scorer:
            from . import mla_decode_scorer
    except ImportError as exc:
        raise ValueError(f"MLA decode config {cfg} does not apply: Triton without Gluon ({exc})") from exc
    b, nq, h, lat = q_lat.shape
    splits = grid[2]
    check = mla_decode_e4m3.supported if cfg.e4m3 else mla_decode_gluon.supported
    why = check(kv_cache, q_lat.dtype, lat, q_pe.shape[3], kv_cache.shape[1], SPLIT_ALIGN)
    if why is not None:
        raise ValueError(f"MLA decode config {cfg} does not apply: {why}")
    # (the half-page and one-scorer kernels' stages are 2: parse checks)
    kernel = (mla_decode_e4m3._mla_decode_e4m3_kernel if cfg.e4m3
              else mla_decode_halfpage._mla_decode_halfpage_kernel if cfg.halfpage
              else mla_decode_scorer._mla_decode_scorer_kernel if cfg.scorer
              else mla_decode_gluon._mla_decode_gluon_kernel)

    extra: tuple = ()
    if cfg.scorer:   # a 1-D grid over the (head group, sequence, split) items
        q_lat, q_pe = mla_decode_scorer.aligned_queries(q_lat, q_pe)
        programs = mla_decode_scorer.sm_count(q_lat.device) if cfg.persistent else None
        grid, extra = mla_decode_scorer.schedule(*grid, programs)

    def run(o, lse, fin, split):
        mla_decode_gluon.launch(kernel, q_lat, q_pe, kv_cache, block_tables, seq_lens, o, lse, fin,
                                _out_strides(o, lse, fin, split), sm, out_scale, chunk, MAX_SPLITS, grid, split,
                                cfg.num_stages, SPLIT_ALIGN, extra)
    _split_and_merge(run, combine_kernel, out.view(b, nq * h, lat), seq_lens, splits, chunk)


def paged_mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank: int, scale: float,
                            k_scale: float = 1.0, plans: dict | None = None):
    """Drop-in for `attention.paged_mla_decode` (same signature).

    In auto mode a kernel that cannot run here (no config compiles, a launcher error) must not take the
    engine down: warn once and use the torch reference from then on. Forced mode (=triton) raises.
    """
    global _broken
    if q_lat.shape[-1] != kv_lora_rank:
        raise ValueError(f"q_lat's last dim {q_lat.shape[-1]} != kv_lora_rank {kv_lora_rank}")
    try:
        return mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, scale, k_scale, plans=plans)
    except Exception as exc:
        capturing = q_lat.is_cuda and torch.cuda.is_current_stream_capturing()
        if _mode() == "triton" or capturing or isinstance(exc, ValueError):
            raise
        _broken = True
        log.warning("Triton MLA decode failed (%s); falling back to the torch reference", exc)
        from .attention import paged_mla_decode_torch

        return paged_mla_decode_torch(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale, k_scale)
