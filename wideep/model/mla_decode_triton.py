"""Fused paged MLA decode (absorbed form) in Triton: flash-decoding over the latent cache.

WHY: the torch reference (`attention.paged_mla_decode`) gathers every sequence's pages into a contiguous
copy, materializes fp32 scores and runs two bmm's - ~10x the bytes the math needs. Absorbed MLA decode
is MQA with one 576-wide latent head (K = c_kv ‖ k_pe, V = c_kv) shared by all H query heads, so one
program loads a tile of latent rows straight from the pages once and scores it against a whole block
of heads with tensor-core dots, keeping an online softmax in fp32 registers.

Shape of the work: grid (head groups, batch, splits). Each program walks its share of one sequence's
context (split-K over the context, "flash decoding") so small batches still fill the GPU; a second tiny
kernel merges the splits through their log-sum-exp. Head groups are the fastest grid axis so the
programs reading the same latent rows run together and share them through L2.

CUDA-graph safety: the grid depends only on static shapes (batch, heads, block-table width); the
per-sequence context range is computed on device from seq_lens. seq_len 0 rows produce zeros, and
rows past seq_len are never read (masked loads), so stale or NaN pages cannot leak into results.

Without CUDA the kernels run under the Triton interpreter (numpy), which is what the unit tests use.
"""
import functools
import logging
import os
import sys
from dataclasses import dataclass

import torch

from wideep import envs

# Without a GPU the kernels can only run under Triton's interpreter, which must be chosen before triton is
# first imported (its own library functions are wrapped at import time). Nothing else here uses triton.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # triton is optional: the CPU path and the oracle are the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
# real class (not a string) so both the JIT and the interpreter see the parameters as compile-time constants
constexpr = tl.constexpr if tl is not None else "constexpr"

log = logging.getLogger(__name__)
_broken = False   # auto mode saw the kernel fail: the torch reference serves from then on

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
BACKEND_ENV = "WIDEEP_MLA_DECODE"          # auto (default) | torch | triton
CONFIG_ENV = "WIDEEP_MLA_DECODE_CONFIG"    # "block_h,block_n,num_warps,num_stages" to force a tile config


@dataclass(frozen=True)
class DecodeConfig:
    block_h: int      # query heads per program (tensor-core M; >= 16)
    block_n: int      # context tokens per loop iteration (>= 16)
    num_warps: int
    num_stages: int   # software-pipelining depth of the latent tile loads

    def __str__(self) -> str:
        return f"{self.block_h},{self.block_n},{self.num_warps},{self.num_stages}"

    @classmethod
    def parse(cls, text: str) -> "DecodeConfig":
        try:
            bh, bn, w, s = (int(x) for x in text.split(","))
        except ValueError as exc:
            raise ValueError(f"{CONFIG_ENV} must be 'block_h,block_n,num_warps,num_stages', got {text!r}") from exc
        if bh < 16 or bn < 16 or bh & (bh - 1) or bn & (bn - 1):
            raise ValueError(f"{CONFIG_ENV}: block_h and block_n must be powers of two >= 16, got {text!r}")
        return cls(bh, bn, w, s)


# Candidates in order of preference; a config that fails to compile (e.g. out of shared memory) is
# skipped once and the next is used. Wide head blocks reuse each latent tile for more heads.
# Measured on an H100 (benchmarks/mla_decode.py, 2026-11-23): 64 heads x 64 tokens won 9 of 10 shapes,
# 0.345 ms at B=128 ctx 2048 against 0.453 ms for 64x32 and 1.86 ms for the torch reference.
CUDA_CONFIGS_MANY_HEADS = (
    DecodeConfig(64, 64, 8, 2),
    DecodeConfig(64, 32, 8, 2),
    DecodeConfig(32, 32, 4, 2),
    DecodeConfig(16, 32, 4, 2),
    DecodeConfig(16, 16, 4, 1),
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
    """Backend choice: env WIDEEP_MLA_DECODE=torch|triton forces one; auto = triton on CUDA if importable."""
    mode = _mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if triton is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        return True
    if mode != "auto":
        raise ValueError(f"{BACKEND_ENV} must be auto, torch or triton, got {mode!r}")
    return q.is_cuda and triton is not None and not _broken


# ---- kernels (plain functions, wrapped per target in _kernels) ------------------------------------

def _mla_decode_split_kernel(
    Q_LAT, Q_PE, KV, BLOCK_TABLES, SEQ_LENS, OUT, LSE,
    sm_scale_log2, num_splits, H,
    stride_ql_b, stride_ql_h, stride_qp_b, stride_qp_h,
    stride_kv_blk, stride_kv_tok, stride_bt_b,
    stride_o_b, stride_o_h, stride_o_s, stride_lse_b, stride_lse_h,
    L: constexpr, R: constexpr, PAGE: constexpr, BLOCK_L: constexpr, BLOCK_R: constexpr,
    BLOCK_H: constexpr, BLOCK_N: constexpr, SPLIT: constexpr, IEEE: constexpr,
    DOT_F32: constexpr,  # interpreter only: its bf16 dot is wrong, so dots run on fp32 copies
):
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    per_split = (seq_len + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(seq_len, start + chunk)

    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    q = tl.load(Q_LAT + b * stride_ql_b + heads[:, None] * stride_ql_h + offs_l[None, :],
                mask=hmask[:, None] & lmask[None, :], other=0.0)
    qp = tl.load(Q_PE + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_r[None, :],
                 mask=hmask[:, None] & rmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        qp = qp.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    bt_row = BLOCK_TABLES + b * stride_bt_b
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        page = tl.load(bt_row + toks // PAGE, mask=tmask, other=0).to(tl.int64)
        row = page * stride_kv_blk + (toks % PAGE).to(tl.int64) * stride_kv_tok
        if BLOCK_L == L:   # R1: whole rows, a mask constant along them keeps the loads 16-byte wide
            kv_mask = tmask[:, None]
        else:
            kv_mask = tmask[:, None] & lmask[None, :]
        if BLOCK_R == R:
            pe_mask = tmask[:, None]
        else:
            pe_mask = tmask[:, None] & rmask[None, :]
        kv = tl.load(KV + row[:, None] + offs_l[None, :], mask=kv_mask, other=0.0)
        kpe = tl.load(KV + row[:, None] + L + offs_r[None, :], mask=pe_mask, other=0.0)
        if DOT_F32:
            kv = kv.to(tl.float32)
            kpe = kpe.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(kv), input_precision="ieee")
            s = tl.dot(qp, tl.trans(kpe), s, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kv))
            s = tl.dot(qp, tl.trans(kpe), s)
        s = tl.where(tmask[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every iteration has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        pv = p.to(KV.dtype.element_ty)   # probabilities in the cache dtype, as the reference does
        if DOT_F32:
            pv = pv.to(tl.float32)
        if IEEE:
            acc = tl.dot(pv, kv, acc, input_precision="ieee")
        else:
            acc = tl.dot(pv, kv, acc)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]   # empty range: acc is 0 -> zeros
    omask = hmask[:, None] & lmask[None, :]
    if SPLIT:
        o_ptr = OUT + b * stride_o_b + heads[:, None] * stride_o_h + split * stride_o_s + offs_l[None, :]
        tl.store(o_ptr, out, mask=omask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * stride_lse_b + heads * stride_lse_h + split, lse, mask=hmask)
    else:
        o_ptr = OUT + b * stride_o_b + heads[:, None] * stride_o_h + offs_l[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=omask)


def _mla_decode_combine_kernel(
    PART, LSE, OUT, num_splits, L,
    stride_p_b, stride_p_h, stride_p_s, stride_lse_b, stride_lse_h, stride_o_b, stride_o_h,
    BLOCK_S: constexpr, BLOCK_L: constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < num_splits
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    lse = tl.load(LSE + b * stride_lse_b + h * stride_lse_h + offs_s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)    # all splits empty (seq_len 0): weights all 0
    w = tl.exp2(lse - mx)
    denom = tl.sum(w, 0)
    part = tl.load(PART + b * stride_p_b + h * stride_p_h + offs_s[:, None] * stride_p_s + offs_l[None, :],
                   mask=smask[:, None] & lmask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + b * stride_o_b + h * stride_o_h + offs_l, out.to(OUT.dtype.element_ty), mask=lmask)


def interpreter_active() -> bool:
    return triton is not None and envs.TRITON_INTERPRET in ("1", "true", "True")


@functools.cache
def _kernels(interpret: bool):
    if triton is None:
        raise RuntimeError("triton is not installed")
    if interpret != interpreter_active():
        raise RuntimeError("the Triton MLA decode runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                           "triton is imported) and on CUDA tensors only without it")
    # num_splits varies with the batch size: one compiled variant for all of its values
    return (triton.jit(_mla_decode_split_kernel, do_not_specialize=["num_splits"]),
            triton.jit(_mla_decode_combine_kernel, do_not_specialize=["num_splits"]))


# ---- launch -----------------------------------------------------------------------------------------

@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def choose_num_splits(batch: int, head_groups: int, max_ctx: int, block_n: int, num_sms: int) -> int:
    """Splits of each context so batch*head_groups*splits fills (without exceeding) one wave of SMs.

    Rounded down: a wave and a half costs two waves. Depends only on static shapes (graph safe).
    Each split keeps >= 2 tiles of the padded context.
    """
    programs = batch * head_groups
    want = num_sms // programs
    cap = max(1, max_ctx // (2 * block_n))
    return max(1, min(want, cap, MAX_SPLITS))


_chosen: dict[tuple, DecodeConfig] = {}


def _candidates(num_heads: int, interpret: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[DecodeConfig, ...]:
    forced = envs.WIDEEP_MLA_DECODE_CONFIG
    if forced:
        return (DecodeConfig.parse(forced),)
    if interpret:
        return (INTERPRET_CONFIG,)
    if num_heads >= 64 and dtype in (torch.bfloat16, torch.float16):
        return CUDA_CONFIGS_MANY_HEADS
    return CUDA_CONFIGS_FEW_HEADS   # few heads, or fp32 (tests): no tensor-core path, keep tiles small


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q_lat [B, H, L], q_pe [B, H, R], kv_cache [num_blocks, page, L+R] -> o_lat [B, H, L] (q_lat's dtype).

    block_tables [B, max_blocks] (int32), seq_lens [B] (int32, 0 = padding row -> zeros).
    `config`/`num_splits` override the heuristics (benchmarks, tests).
    """
    if q_lat.dim() != 3 or q_pe.dim() != 3 or q_pe.shape[:2] != q_lat.shape[:2]:
        raise ValueError(f"q_lat [B,H,L] and q_pe [B,H,R] must agree: {tuple(q_lat.shape)} vs {tuple(q_pe.shape)}")
    b, h, lat = q_lat.shape
    rope = q_pe.shape[2]
    if kv_cache.dim() != 3 or kv_cache.shape[2] != lat + rope:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {lat + rope}], got {tuple(kv_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [{b}, max_blocks], got {tuple(block_tables.shape)}")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be [{b}], got {tuple(seq_lens.shape)}")
    out = torch.empty((b, h, lat), dtype=q_lat.dtype, device=q_lat.device)
    if b == 0 or h == 0:
        return out

    dt = kv_cache.dtype
    q_lat = q_lat.to(dt)
    q_pe = q_pe.to(dt)
    if q_lat.stride(2) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(2) != 1:
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

    interpret = not q_lat.is_cuda
    page = kv_cache.shape[1]
    max_ctx = block_tables.shape[1] * page
    ieee = dt == torch.float32 or interpret
    key = (q_lat.device, h, lat, rope, page, dt)
    if config is not None:
        candidates = (config,)
    else:  # the config that worked before first; the rest still back it up (a new variant may not compile)
        candidates = _candidates(h, interpret, dt)
        if key in _chosen:
            candidates = (_chosen[key],) + tuple(c for c in candidates if c != _chosen[key])
    num_sms = 4 if interpret else _num_sms(q_lat.device.index if q_lat.device.index is not None
                                           else torch.cuda.current_device())
    last_exc: Exception | None = None
    for cfg in candidates:
        try:
            _launch(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, scale, cfg, num_splits, max_ctx,
                    num_sms, interpret, ieee)
        except Exception as exc:  # compile failure (e.g. out of resources): try the next tile config
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            last_exc = exc
            continue
        if config is None:
            _chosen[key] = cfg
        return out
    raise RuntimeError(f"no MLA decode tile config compiled (tried {[str(c) for c in candidates]})") from last_exc


def _launch(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, scale, cfg: DecodeConfig, num_splits,
            max_ctx, num_sms, interpret, ieee):
    dot_f32 = interpret and kv_cache.dtype != torch.float32
    split_kernel, combine_kernel = _kernels(interpret)
    b, h, lat = q_lat.shape
    rope = q_pe.shape[2]
    block_l, block_r = _pow2(lat), _pow2(rope)
    head_groups = -(-h // cfg.block_h)
    splits = num_splits or choose_num_splits(b, head_groups, max_ctx, cfg.block_n, num_sms)
    grid = (head_groups, b, splits)
    common = dict(L=lat, R=rope, PAGE=kv_cache.shape[1], BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_H=cfg.block_h,
                  BLOCK_N=cfg.block_n, IEEE=ieee, DOT_F32=dot_f32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        split_kernel[grid](
            q_lat, q_pe, kv_cache, block_tables, seq_lens, out, out,
            scale * _LOG2E, 1, h,
            q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0,
            SPLIT=False, **common,
        )
        return
    part = torch.empty((b, h, splits, lat), dtype=torch.float32, device=q_lat.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q_lat.device)
    split_kernel[grid](
        q_lat, q_pe, kv_cache, block_tables, seq_lens, part, lse,
        scale * _LOG2E, splits, h,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        SPLIT=True, **common,
    )
    combine_kernel[(h, b)](
        part, lse, out, splits, lat,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=_pow2(splits, 2), BLOCK_L=block_l, num_warps=4,
    )


def paged_mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank: int, scale: float):
    """Drop-in for `attention.paged_mla_decode` (same signature).

    In auto mode a kernel that cannot run here (no config compiles, a launcher error) must not take the
    engine down: warn once and use the torch reference from then on. Forced mode (=triton) raises.
    """
    global _broken
    if q_lat.shape[-1] != kv_lora_rank:
        raise ValueError(f"q_lat's last dim {q_lat.shape[-1]} != kv_lora_rank {kv_lora_rank}")
    try:
        return mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, scale)
    except Exception as exc:
        capturing = q_lat.is_cuda and torch.cuda.is_current_stream_capturing()
        if _mode() == "triton" or capturing or isinstance(exc, ValueError):
            raise
        _broken = True
        log.warning("Triton MLA decode failed (%s); falling back to the torch reference", exc)
        from .attention import paged_mla_decode_torch

        return paged_mla_decode_torch(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale)
