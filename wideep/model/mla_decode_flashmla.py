"""DeepSeek's FlashMLA decode kernel for Hopper, behind a batch-invariant plan of wideep's own.

FlashMLA is DeepSeek's MLA decode kernel; the `sgl-flash-mla` wheel on the package index keeps its SM90 dense
(bf16 cache) kernel in a "legacy" extension built against PyTorch's stable ABI. It is optional: without it, or
off Hopper, or with an fp8 cache, wideep's own kernels (mla_decode_triton) run alone.

Why a plan of our own: FlashMLA's scheduler deals the batch's total work evenly over the SM parts and so splits
a sequence wherever the batch puts a part boundary: a sequence's bits would depend on the rest of the batch,
and wideep's decode graphs need them not to (a graph replayed at a padded size must give eager's tokens). Here
FlashMLA takes every sequence that fits one of wideep's splits (<= the split size, 2,048 tokens by default)
whole: one pass over its pages on one SM part, written directly, never split. Longer sequences go to wideep's
kernel, which cuts them at fixed boundaries of their own length, and which skips the rows FlashMLA wrote
(marked by a negative length). Which kernel takes a sequence, and how, depends on its length only.

The plan is FlashMLA's scheduling metadata, made on the device by one Triton program (make_plan is its torch
reference; fixed shapes, no host sync: CUDA-graph capturable) once per step and shared by every layer: the
sequences are dealt to the SM parts as contiguous runs of about equal cost (pages + a fixed per-sequence
overhead, FlashMLA's own cost model).
Metadata row of a part (FlashMLA's DecodingSchedMeta, int32 x 8): first and last sequence (inclusive; a first
sequence >= B means an empty part), the first sequence's first page, the last sequence's end page (exclusive),
the first sequence's split index, whether the first / last sequence is split, padding.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from wideep import envs
from wideep.model.triton_compat import constexpr, tl, triton

log = logging.getLogger(__name__)

PAGE = 64            # FlashMLA's only page size
LATENT, ROPE = 512, 64
ROWS_PER_PART = 64   # query rows (heads x query tokens) of one FlashMLA m-block
OVERHEAD_PAGES = 5   # FlashMLA's scheduler's fixed cost per sequence, in pages
META_INTS = 8        # int32s per DecodingSchedMeta


@dataclass(frozen=True)
class Plan:
    """One step's schedule: FlashMLA's metadata and lengths, and the lengths wideep's kernel runs with."""

    meta: torch.Tensor      # [parts, 8] int32
    splits: torch.Tensor    # [B + 1] int32: cumulative split count per sequence (each sequence has one)
    lens: torch.Tensor      # [B] int32: FlashMLA's lengths (0 for the sequences it leaves to wideep's kernel)
    rest: torch.Tensor      # [B] int32: wideep's kernel's lengths (-1: FlashMLA writes the row)


@functools.cache
def _ops():
    """FlashMLA's SM90 op namespace, or None where the wheel is absent or its extension does not load."""
    try:
        import flash_mla
    except Exception as exc:   # ImportError, or the extension failing to load (ABI, CUDA runtime)
        log.debug("FlashMLA not available: %s", exc)
        return None
    if not flash_mla.has_legacy():
        log.info("FlashMLA %s has no SM90 extension here; wideep's MLA decode kernels run alone",
                 getattr(flash_mla, "__version__", "?"))
        return None
    log.info("MLA decode: FlashMLA %s for sequences of at most one split, wideep's kernel beyond",
             getattr(flash_mla, "__version__", "?"))
    return torch.ops.flash_mla_legacy


_failed: list[str] = []   # why FlashMLA stopped being used in this process (a launch failed), if it did


def disable(reason: str) -> None:
    """A FlashMLA launch failed here: wideep's kernels take every sequence from now on (logged once)."""
    if not _failed:
        log.warning("FlashMLA decode failed (%s); wideep's MLA decode kernels take every sequence from now on", reason)
    _failed.append(reason)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def applies(q_lat: torch.Tensor, kv_cache: torch.Tensor, hopper: bool) -> bool:
    """FlashMLA can take this call: on an sm_90 device (`hopper`, which the caller has looked up), one query
    token, bf16 queries over a bf16 cache (what was checked on the device; fp16 builds of the wheel may leave that kernel out), R1's
    latent and rope widths, 64-token pages, at most 128 heads, and the library loads."""
    mode = envs.WIDEEP_MLA_DECODE.strip().lower()
    if mode not in ("auto", "flashmla") or not hopper or not q_lat.is_cuda or _failed:
        return False
    _, nq, h, lat = q_lat.shape
    shape_ok = (nq == 1 and 1 <= h <= 128 and lat == LATENT and kv_cache.shape[1:] == (PAGE, LATENT + ROPE)
                and kv_cache.dtype == q_lat.dtype == torch.bfloat16)
    return shape_ok and _ops() is not None


def _parts(rows: int, num_sms: int) -> int:
    """FlashMLA's num_sm_parts for one KV head (its kernel checks the metadata has exactly this many rows)."""
    return max(num_sms // -(-rows // ROWS_PER_PART), 1)


def make_plan(seq_lens: torch.Tensor, rows: int, chunk: int, num_sms: int) -> Plan:
    """The plan for these lengths [B] (int32, 0 = padding), `rows` query rows per sequence, wideep's split size
    `chunk` (the longest sequence FlashMLA takes) and the device's SM count."""
    b = seq_lens.shape[0]
    dev = seq_lens.device
    parts = _parts(rows, num_sms)
    lens = seq_lens.to(torch.int32)
    mine = lens <= chunk
    fl_lens = torch.where(mine, lens, 0)
    pages = (fl_lens + PAGE - 1) // PAGE
    cost = torch.where(mine, pages.to(torch.int64) + OVERHEAD_PAGES, 0)
    end = torch.cumsum(cost, 0)
    part_of = (end - cost) * parts // end[-1:].clamp_min(1)   # the part a sequence starts in: non-decreasing
    # each part runs from its first to its last own sequence: runs of the others (length 0 for FlashMLA, which
    # still loads their queries) at part boundaries are left out, and with none of its own a part is empty
    bucket = torch.where(mine, part_of, parts)
    idx = torch.arange(b, device=dev, dtype=torch.int64)
    first = torch.full((parts + 1,), b, device=dev, dtype=torch.int64).scatter_reduce(0, bucket, idx, "amin")
    last = torch.full((parts + 1,), -1, device=dev, dtype=torch.int64).scatter_reduce(0, bucket, idx, "amax")
    first, last = first[:parts], last[:parts]
    empty = last < first
    last = last.clamp(0, b - 1)
    zero = torch.zeros_like(first)
    meta = torch.stack([torch.where(empty, b, first), last, zero, pages[last].to(torch.int64),
                        zero, zero, zero, zero], 1).to(torch.int32)
    splits = torch.arange(b + 1, device=dev, dtype=torch.int32)
    return Plan(meta, splits, fl_lens, torch.where(mine, -1, lens))


if triton is not None:

    @triton.jit
    def _plan_kernel(SEQ_LENS, META, SPLITS, LENS, REST, B, parts, chunk,
                     BLOCK: constexpr, PARTS_STEP: constexpr, PAGE_: constexpr, OVERHEAD: constexpr,
                     INTS: constexpr):
        """make_plan in one program (one launch per step instead of ~30): the same integers."""
        idx = tl.arange(0, BLOCK)
        valid = idx < B
        lens = tl.load(SEQ_LENS + idx, mask=valid, other=0)
        mine = (lens <= chunk) & valid
        fl = tl.where(mine, lens, 0)
        pages = (fl + PAGE_ - 1) // PAGE_
        cost = tl.where(mine, pages + OVERHEAD, 0).to(tl.int64)
        end = tl.cumsum(cost, 0)
        part_of = tl.where(mine, (end - cost) * parts // tl.maximum(tl.sum(cost, 0), 1), -1)
        tl.store(LENS + idx, fl, mask=valid)
        tl.store(REST + idx, tl.where(mine, -1, lens), mask=valid)
        tl.store(SPLITS + idx, idx, mask=idx <= B)
        pages0 = tl.sum(tl.where(idx == 0, pages, 0), 0)
        for p0 in range(0, parts, PARTS_STEP):
            ps = p0 + tl.arange(0, PARTS_STEP)
            hit = part_of[None, :] == ps[:, None]
            first = tl.min(tl.where(hit, idx[None, :], B), 1)
            last = tl.max(tl.where(hit, idx[None, :], -1), 1)
            empty = last < first
            end_page = tl.sum(tl.where(idx[None, :] == last[:, None], pages[None, :], 0), 1)
            row = META + ps * INTS
            live = ps < parts
            tl.store(row, tl.where(empty, B, first), mask=live)
            tl.store(row + 1, tl.maximum(last, 0), mask=live)
            tl.store(row + 2, 0, mask=live)
            tl.store(row + 3, tl.where(empty, pages0, end_page), mask=live)
            for c in tl.static_range(4, INTS):
                tl.store(row + c, 0, mask=live)


def make_plan_on_device(seq_lens: torch.Tensor, rows: int, chunk: int, num_sms: int) -> Plan:
    """make_plan by _plan_kernel (CUDA, or Triton's interpreter): one launch."""
    b = seq_lens.shape[0]
    parts = _parts(rows, num_sms)
    dev = seq_lens.device
    meta = torch.empty((parts, META_INTS), dtype=torch.int32, device=dev)
    splits = torch.empty(b + 1, dtype=torch.int32, device=dev)
    lens = torch.empty(b, dtype=torch.int32, device=dev)
    rest = torch.empty(b, dtype=torch.int32, device=dev)
    _plan_kernel[(1,)](seq_lens.to(torch.int32).contiguous(), meta, splits, lens, rest, b, parts, chunk,
                       BLOCK=triton.next_power_of_2(b + 1), PARTS_STEP=8, PAGE_=PAGE, OVERHEAD=OVERHEAD_PAGES,
                       INTS=META_INTS, num_warps=4)
    return Plan(meta, splits, lens, rest)


def plan_for(seq_lens: torch.Tensor, rows: int, chunk: int, memo: dict | None, device_index: int) -> Plan:
    """The plan once per step: `memo` (the step's AttentionMetadata.plans, emptied by whoever reuses that object
    for another step) keeps it for the next layers, keyed by the lengths tensor's storage and size, and by
    whether a graph is being captured (a plan made eagerly in a warm-up must not stand in for the one a graph
    has to recompute at every replay)."""
    key = ("flashmla", seq_lens.data_ptr(), seq_lens.shape[0], rows, chunk, torch.cuda.is_current_stream_capturing())
    plan = memo.get(key) if memo is not None else None
    if plan is None:
        plan = make_plan_on_device(seq_lens, rows, chunk, _num_sms(device_index))
        if memo is not None:
            memo[key] = plan
    return plan


def _query(q_lat: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, 576]: the latent and rope parts as one row per head, as FlashMLA reads them. No copy when they
    are the two column ranges of one buffer (the model writes them so); else concatenated."""
    lat = q_lat.shape[3]
    if (q_pe.dtype == q_lat.dtype and q_pe.stride() == q_lat.stride() and q_lat.stride(3) == 1
            and q_pe.data_ptr() == q_lat.data_ptr() + lat * q_lat.element_size()):
        return q_lat.as_strided((*q_lat.shape[:3], lat + q_pe.shape[3]), q_lat.stride())
    return torch.cat([q_lat, q_pe], -1)


def decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           plan: Plan, scale: float) -> torch.Tensor:
    """[B, 1, H, L] output: the rows of the sequences FlashMLA takes (zeros for padding rows); the others are
    left for wideep's kernel to write."""
    ops = _ops()
    out, _, _, _ = ops.dense_decode_fwd(_query(q_lat, q_pe), kv_cache.unsqueeze(2), q_lat.shape[3], plan.lens,
                                        block_tables, scale, False, plan.meta, plan.splits)
    return out
