"""symm_mem_ll: a low-latency decode dispatch/combine on torch symmetric memory (GPU peer-to-peer writes).

Each rank writes its tokens straight into every peer's receive buffer (NVLink loads/stores through
torch symmetric memory; NVLink multicast is never used), then a device-side barrier says the data
landed. Dispatch moves each token packed into one row with its routing (one copy per peer): FP8 (e4m3)
with an fp32 scale per 128 channels when the model's experts take FP8 (a native FP8 checkpoint, as vLLM
dispatches FP8 there; the experts' own activation quantization, so they re-quantize the rows to the same
codes), BF16 otherwise, so a bf16 model's activations are not quantized on the way.
Combine sends each rank's BF16 partial sums for the peer's tokens home, where they are summed in fp32.

Fixed shapes: receive buffers hold `capacity` tokens per source rank; a step uses the first
`max_tokens_per_rank` of them (the same bound on every rank, set by the DP lockstep; a forward outside
it, such as the engine's start-up memory profile, agrees on it by an all-reduce), padding rows route
nowhere. No host synchronization, so it is CUDA-graph capturable. A larger step grows the buffers
eagerly; graphs captured before keep the old ones. The device barrier gives up after the EP group's
timeout (WIDEEP_DIST_TIMEOUT_S) and traps, so a dead peer brings the engine down instead of hanging
it. Issue and completion are split: the writes and barrier run on a side stream and `wait()` joins it,
so with dual-batch overlap one micro-batch's transfer proceeds while the other computes. Separate
buffers and barrier channels per micro-batch.

Every token goes to every rank (like allgather_reducescatter, but written by the sender): at EP=2 with
top-8 routing nearly every token touches both ranks anyway. Sending only the routed rows (per-expert
slots, as DeepEP's low-latency kernels do) is the next step for wide EP.

`deepep_low_latency` (vLLM's name) resolves to this backend on CUDA with an NCCL group and to
allgather_reducescatter elsewhere (CPU/gloo), with a log line naming the backend that runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wideep import envs
from wideep.model.dispatch import DispatchResult, MoEDispatcher, Pending
from wideep.model.fp8 import GROUP, act_quant_ref, dequant_act
from wideep.model.moe_permute import gather_sum, group_pairs
from wideep.model.triton_compat import constexpr, tl, triton
from wideep.parallel import _comm

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
DEFAULT_CAPACITY = 256      # tokens per rank the receive buffers hold (grown outside graph capture)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (fp8 [T, H], fp32 scales [T, ceil(H/128)]): the experts' activation quantization (per token
    and 128-channel group, act_quant's arithmetic), so an FP8 expert re-quantizing the received rows gets
    the same codes back."""
    return act_quant_ref(x)


def dequantize_rows_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequant_act(q, scale).to(dtype)


def row_bytes(hidden: int, k: int, fp8: bool = True) -> int:
    """One dispatched token: hidden FP8 bytes and an fp32 scale per 128 channels (fp8), or hidden BF16 values;
    then K int32 expert ids and K fp32 weights."""
    return (hidden + 4 * -(-hidden // GROUP) if fp8 else 2 * hidden) + 8 * k


def row_fields(buf: torch.Tensor, hidden: int, k: int, fp8: bool = True):
    """Views (x fp8 or bf16 [.., H], scales fp32 [.., ceil(H/128)] or None, ids int32 [.., K], weights fp32
    [.., K]) of packed rows."""
    if fp8:
        end = hidden + 4 * -(-hidden // GROUP)
        x, scale = buf[..., :hidden].view(FP8), buf[..., hidden:end].view(torch.float32)
    else:
        x, scale, end = buf[..., :2 * hidden].view(torch.bfloat16), None, 2 * hidden
    ids = buf[..., end:end + 4 * k].view(torch.int32)
    weights = buf[..., end + 4 * k:].view(torch.float32)
    return x, scale, ids, weights


if triton is not None:

    @triton.jit
    def _pack_rows_kernel(x_ptr, ids_ptr, w_ptr, q_ptr, s_ptr, sid_ptr, sw_ptr, T, H, stride_x, stride_q, stride_s,
                          stride_sid, K: constexpr, KP: constexpr, BLOCK_H: constexpr, GROUP_: constexpr,
                          FP8_: constexpr):
        """Row r of the staging buffer: token r's FP8 row and its scale per GROUP_ channels (act_quant's
        arithmetic) or its BF16 row, and its routing; or for r >= T a padding row (zeros, ids -1)."""
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK_H)
        kk = tl.arange(0, KP)
        h_real = tl.where(r < T, H, 0)     # a padding row loads nothing
        k_real = tl.where(r < T, K, 0)
        x = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=offs < h_real, other=0.0).to(tl.float32)
        if FP8_:
            xg = tl.reshape(x, (BLOCK_H // GROUP_, GROUP_))
            scale = tl.maximum(tl.max(tl.abs(xg), axis=1), 1e-10) / 448.0
            q = tl.reshape(tl.clamp(xg / scale[:, None], -448.0, 448.0), (BLOCK_H,))
            gi = tl.arange(0, BLOCK_H // GROUP_)
            tl.store(s_ptr + r * stride_s + gi, tl.where(r < T, scale, 0.0), mask=gi * GROUP_ < H)
        else:
            q = x
        tl.store(q_ptr + r.to(tl.int64) * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=offs < H)
        ids = tl.load(ids_ptr + r * K + kk, mask=kk < k_real, other=-1)
        w = tl.load(w_ptr + r * K + kk, mask=kk < k_real, other=0.0)
        tl.store(sid_ptr + r * stride_sid + kk, ids.to(tl.int32), mask=kk < K)
        tl.store(sw_ptr + r * stride_sid + kk, w.to(tl.float32), mask=kk < K)

    @triton.jit
    def _dequant_gather_kernel(q_ptr, s_ptr, rows_ptr, own_ptr, out_ptr, T_OWN, H, BOUND, stride_qp, stride_qt,
                               stride_sp, stride_st, stride_own, stride_out, BLOCK_H: constexpr, GROUP_: constexpr,
                               FP8_: constexpr):
        """Output row r: own row r (r < T_OWN), else received row g = rows[r - T_OWN] (source rank g // BOUND,
        its token g % BOUND), dequantized (q * scale in fp32, rounded once to the output's dtype) or as sent."""
        r = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        if r < T_OWN:
            v = tl.load(own_ptr + r.to(tl.int64) * stride_own + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(rows_ptr + r - T_OWN)
            p, t = (g // BOUND).to(tl.int64), (g % BOUND).to(tl.int64)
            v = tl.load(q_ptr + p * stride_qp + t * stride_qt + offs, mask=mask, other=0.0).to(tl.float32)
            if FP8_:
                v = v * tl.load(s_ptr + p * stride_sp + t * stride_st + offs // GROUP_, mask=mask, other=0.0)
        # (own rows: bf16 -> fp32 -> bf16, exact)
        tl.store(out_ptr + r.to(tl.int64) * stride_out + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, staging: torch.Tensor,
              impl: str = "auto", fp8: bool = True) -> None:
    """Writes tokens x [T, H] (as FP8 with a scale, or as BF16) with their routing (ids, weights [T, K]) into
    the first T packed rows of staging [bound, row_bytes] and padding rows (zeros, ids -1) after them: one
    kernel on CUDA (impl: auto, triton, torch; the same bytes)."""
    t, hidden = x.shape
    k = ids.shape[1]
    sx, sscale, sids, sw = row_fields(staging, hidden, k, fp8)
    if impl == "triton" or (impl == "auto" and x.is_cuda and triton is not None):
        if staging.shape[0]:
            s_arg = sscale if fp8 else sx
            _pack_rows_kernel[(staging.shape[0],)](
                x.contiguous(), ids.contiguous(), weights.float().contiguous(), sx, s_arg, sids, sw, t, hidden,
                x.stride(0), sx.stride(0), s_arg.stride(0), sids.stride(0), K=k, KP=triton.next_power_of_2(k),
                BLOCK_H=triton.next_power_of_2(hidden), GROUP_=min(GROUP, triton.next_power_of_2(hidden)),
                FP8_=fp8, num_warps=8)
        return
    if impl not in ("auto", "torch"):
        raise ValueError(f"pack_rows: unknown impl {impl!r}")
    if fp8:
        sx[:t], sscale[:t] = quantize_rows_fp8(x)
    else:
        sx[:t] = x.to(torch.bfloat16)
    sids[:t] = ids.to(torch.int32)
    sw[:t] = weights.float()
    if t < staging.shape[0]:
        staging[t:].zero_()
        sids[t:] = -1


def dequant_gather(q: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor, own: torch.Tensor | None,
                   dtype: torch.dtype, impl: str = "auto") -> torch.Tensor:
    """[own rows; received rows `rows` dequantized] as one [T_own + len(rows), H] tensor of `dtype`: the grouped
    MLP's input. q [P, B, H] fp8 with scale [P, B], or bf16 with scale None: the received rows of P source
    ranks, B each (strided views of the receive buffer); rows index them as p * B + t; own: this rank's own
    tokens, for a shared expert run as one more group, or None. One kernel on CUDA (impl: auto, triton, torch;
    the same bits)."""
    t_own = 0 if own is None else own.shape[0]
    n, (ranks, bound, hidden) = t_own + rows.shape[0], q.shape
    if impl == "triton" or (impl == "auto" and q.is_cuda and triton is not None):
        out = torch.empty((n, hidden), dtype=dtype, device=q.device)
        own_t = own if own is not None else out
        if n:
            bh = 1024
            s_arg = scale if scale is not None else q
            _dequant_gather_kernel[(n, triton.cdiv(hidden, bh))](
                q, s_arg, rows.contiguous(), own_t, out, t_own, hidden, bound, q.stride(0), q.stride(1),
                s_arg.stride(0), s_arg.stride(1), own_t.stride(0), out.stride(0), BLOCK_H=bh, GROUP_=GROUP,
                FP8_=scale is not None, num_warps=4)
        return out
    if impl not in ("auto", "torch"):
        raise ValueError(f"dequant_gather: unknown impl {impl!r}")
    flat = q.reshape(ranks * bound, hidden)
    got = (dequantize_rows_fp8(flat, scale.reshape(ranks * bound, -1), dtype) if scale is not None
           else flat.to(dtype))[rows]
    return got if own is None else torch.cat([own.to(dtype), got])


@dataclass
class _Slot:
    """One micro-batch's symmetric buffers (every rank holds the same shapes)."""
    rows: torch.Tensor        # [ep, C, row_bytes] uint8: row block s written by rank s (one copy per peer)
    out: torch.Tensor         # [ep, C, H] bf16: rank s's partial sums for this rank's tokens
    handles: tuple            # symmetric-memory handles of the two buffers
    peers: list               # peers[which][p]: buffer `which` as mapped from rank p's memory

    def buffer(self, which: int) -> torch.Tensor:
        """This rank's receive buffer `which` (0: rows, 1: out)."""
        return (self.rows, self.out)[which]


@dataclass
class _Handle:
    num_tokens: int
    bound: int
    pair_rows: torch.Tensor   # [ep * bound, K] grouped row of each received (token, slot), -1 when not here
    slot: int


class SymmMemDispatcher(MoEDispatcher):
    name = "symm_mem_ll"
    graph_capturable = True

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1, group=None,
                 capacity: int = DEFAULT_CAPACITY, **options):
        super().__init__(num_experts, ep_rank, ep_size, group, **options)
        if not _nccl_group(group):
            raise ValueError("symm_mem_ll needs CUDA GPUs and an NCCL EP group; on CPU/gloo use "
                             "deepep_low_latency (falls back to allgather_reducescatter) or allgather_reducescatter")
        self.capacity = int(capacity)
        self.static_shapes = True       # always fixed-shape; graph_mode sets it too
        self._slots: dict[int, _Slot] = {}
        # buffers replaced by larger ones: CUDA graphs captured before still write and read them, and
        # their barriers wait on these buffers' signal pads, so they stay mapped for the process's life
        self._retired: list[_Slot] = []
        self._sum_index: dict[tuple, torch.Tensor] = {}
        self._slot_key: tuple | None = None
        self._stream: torch.cuda.Stream | None = None
        self._ubatch_index = 0
        self.fp8_payload = True     # until the model says its experts take bf16 (set_fp8_payload)

    def set_fp8_payload(self, enabled: bool) -> None:
        self.fp8_payload = bool(enabled)   # the next dispatch sizes its buffers for it (_slot's key)

    def set_ubatch(self, row_offset: int = 0, max_tokens: int | None = None, index: int = 0) -> None:
        super().set_ubatch(row_offset, max_tokens, index)
        self._ubatch_index = index     # micro-batches use separate buffers and barrier channels

    # ---- buffers ------------------------------------------------------------------------------
    def _slot(self, index: int, hidden: int, k: int, device: torch.device, bound: int) -> _Slot:
        """The micro-batch's buffers; (re)allocated (a collective rendezvous) when the shape grows,
        which must happen outside CUDA-graph capture (the runner warms every size up eagerly first).
        Growth at least doubles the capacity; the buffers it replaces are retired, never freed."""
        key = (hidden, k, self.fp8_payload, device)
        if self._slot_key != key or bound > self.capacity:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"symm_mem_ll: buffers for {bound} tokens/rank must exist before capture")
            if bound > self.capacity:
                self.capacity = max(bound, 2 * self.capacity)
                log.info("symm_mem_ll: receive buffers grow to %d tokens per rank", self.capacity)
            self._retired.extend(self._slots.values())
            self._slots.clear()
            self._slot_key = key
        if index not in self._slots:
            self._slots[index] = self._allocate(hidden, k, device)
        return self._slots[index]

    def _allocate(self, hidden: int, k: int, device: torch.device) -> _Slot:
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            try:
                enable((self.group if self.group is not None else dist.group.WORLD).group_name)
            except Exception as exc:  # noqa: BLE001 - newer torch enables it on rendezvous
                log.debug("enable_symm_mem_for_group: %s", exc)
        if hidden % 4:
            raise ValueError(f"symm_mem_ll needs a hidden size divisible by 4, got {hidden}")
        ep, c = self.ep_size, self.capacity
        bufs = [symm_mem.empty(ep, c, row_bytes(hidden, k, self.fp8_payload), dtype=torch.uint8, device=device),
                symm_mem.empty(ep, c, hidden, dtype=torch.bfloat16, device=device)]
        group = self.group if self.group is not None else dist.group.WORLD
        handles = tuple(symm_mem.rendezvous(b, group) for b in bufs)
        peers = [[h.get_buffer(p, tuple(b.shape), b.dtype) for p in range(ep)] for b, h in zip(bufs, handles)]
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device, priority=-1)   # ahead of queued compute blocks
        return _Slot(*bufs, handles=handles, peers=peers)

    @staticmethod
    def _peer(slot: _Slot, which: int, peer: int) -> torch.Tensor:
        return slot.peers[which][peer]

    def _send(self, slot: _Slot, which: int, rows_for, bound: int, channel: int) -> None:
        """The transfer, on the side stream: rows_for(p) [bound, ...] into this rank's block of rank p's buffer
        `which` (0: dispatch rows, 1: combine sums) for every p, then the barrier after which every rank's rows
        have landed in this rank's buffer."""
        for p in range(self.ep_size):
            self._peer(slot, which, p)[self.ep_rank, :bound].copy_(rows_for(p))
        # a peer that never arrives (dead, or stuck) traps this device after the EP group's timeout
        # instead of spinning forever: the engine's next synchronization fails and it goes down
        slot.handles[which].barrier(channel=channel, timeout_ms=int(envs.WIDEEP_DIST_TIMEOUT_S * 1000))

    def _bound(self, t: int, device: torch.device) -> int:
        bound = self.step_max_tokens
        if bound is None:
            # a forward outside the DP lockstep (the engine's memory-profiling run at start-up): the ranks
            # agree on the bound here, as allgather_reducescatter does
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("symm_mem_ll: a captured step needs its max tokens per rank set beforehand")
            return _comm.all_reduce_max_int(t, device, self.group)
        if t > bound:
            raise ValueError(f"{t} tokens on rank {self.ep_rank} exceed max_tokens_per_rank={bound}")
        return bound

    def _on_side_stream(self, work, keep: tuple) -> Pending:
        """Runs `work()` (peer writes + barrier) on the side stream after everything queued so far;
        wait() makes the current stream wait for it. `keep`: tensors made on the current stream that
        the side stream reads; referenced until wait() so their memory is not reused meanwhile."""
        main = torch.cuda.current_stream()
        side = self._stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            finish = work()
        ev = torch.cuda.Event()
        ev.record(side)

        def joined():
            main.wait_event(ev)
            del keep_alive[:]
            return finish()
        keep_alive = list(keep)
        return Pending(joined)

    # ---- dispatch / combine ----------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self.dispatch_async(x, topk_ids, topk_weights).wait()

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return self.combine_async(y, result).wait()

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       own_first: bool = False) -> Pending:
        """own_first: this rank's own tokens (x itself) head the rows (dispatch_with_own), in the same kernel
        that dequantizes the received ones."""
        t, hidden = x.shape
        k = topk_ids.shape[1]
        bound = self._bound(t, x.device)
        index = self._ubatch_index
        slot = self._slot(index, hidden, k, x.device, bound)
        ep = self.ep_size
        dtype, fp8 = x.dtype, self.fp8_payload
        # pack the tokens on this stream: FP8 rows with a scale per 128 channels (or BF16 rows), routing (padding
        # routes nowhere)
        staging = torch.empty((bound, row_bytes(hidden, k, fp8)), dtype=torch.uint8, device=x.device)
        pack_rows(x, topk_ids, topk_weights, staging, fp8=fp8)

        def work():
            self._send(slot, 0, lambda p: staging, bound, 2 * index)

            def finish() -> DispatchResult:
                first, _ = self.local_expert_range
                rx, rscale, rids, rw = row_fields(slot.rows[:, :bound], hidden, k, fp8)
                recv_ids = rids.reshape(ep * bound, k).to(torch.int64)
                # one kernel on CUDA: the grouping, each grouped row's weight, and each (token, slot)'s row
                g, pairs, weights = group_pairs(recv_ids - first, self.num_local_experts, rw.reshape(ep * bound, k))
                xs = dequant_gather(rx, rscale, g.rows, x if own_first else None, dtype)
                return DispatchResult(x=xs, tokens_per_expert=g.tokens_per_expert, weights=weights,
                                      handle=_Handle(t, bound, pairs, index))
            return finish
        return self._on_side_stream(work, (staging,))

    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        return self.dispatch_async(x, topk_ids, topk_weights, own_first=True)

    def combine_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self._combine(y, result, None)

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self._combine(y, result, result.weights)

    def _combine(self, y: torch.Tensor, result: DispatchResult, weights: torch.Tensor | None) -> Pending:
        h: _Handle = result.handle
        slot = self._slots[h.slot]
        ep, bound = self.ep_size, h.bound
        # each source token's BF16 partial sum over its slots here (fp32 in slot order, one rounding; the
        # routing weight folded in), one kernel on CUDA; padding rows and other ranks' slots add nothing
        part = gather_sum(y, h.pair_rows, torch.bfloat16, weights=weights).view(ep, bound, -1)
        dtype, rows = y.dtype, self._sum_rows(h.num_tokens, y.device)

        def work():
            self._send(slot, 1, lambda p: part[p], bound, 2 * h.slot + 1)
            # each own token's sum over the ranks' partials, fp32 in rank order, one rounding; one kernel on CUDA
            return lambda: gather_sum(slot.out.view(-1, slot.out.shape[-1]), rows, dtype)
        return self._on_side_stream(work, (part,))

    def _sum_rows(self, t: int, device: torch.device) -> torch.Tensor:
        """[t, ep]: the row of token i's partial sum from rank p in the flattened combine buffer (p * C + i)."""
        key = (t, self.capacity, device)
        rows = self._sum_index.get(key)
        if rows is None:
            ranks = torch.arange(self.ep_size, dtype=torch.int32, device=device) * self.capacity
            rows = torch.arange(t, dtype=torch.int32, device=device)[:, None] + ranks[None, :]
            if not torch.cuda.is_current_stream_capturing():    # made inside a capture it is filled only by replays
                self._sum_index[key] = rows
        return rows


def _nccl_group(group) -> bool:
    """The EP group talks NCCL between CUDA GPUs (group None: the default group)."""
    return torch.cuda.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl"


def make_low_latency_dispatcher(num_experts: int, ep_rank: int = 0, ep_size: int = 1, group=None,
                                **options) -> MoEDispatcher:
    """vLLM's `deepep_low_latency`: symm_mem_ll where GPUs talk over NCCL, else allgather_reducescatter."""
    if ep_size > 1 and _nccl_group(group):
        d: MoEDispatcher = SymmMemDispatcher(num_experts, ep_rank, ep_size, group, **options)
        why = "torch symmetric memory, FP8 dispatch / BF16 combine, multicast off"
    else:
        from wideep.parallel.allgather_dispatch import AllGatherReduceScatterDispatcher

        d = AllGatherReduceScatterDispatcher(num_experts, ep_rank, ep_size, group, **options)
        why = "symmetric memory needs CUDA GPUs and an NCCL group" if ep_size > 1 else "EP size 1"
    if ep_rank == 0:
        log.info("all2all backend deepep_low_latency runs as %s (%s)", d.name, why)
    return d
