"""Turns a scheduled batch into the model's inputs, runs the forward and samples.

Decode-only batches on CUDA replay a CUDA graph captured for the next larger size in
`cuda_graph_sizes` (static input buffers, padding rows have slot -1 and seq_len 0); prefill and
mixed batches run eagerly. The graph's block table is `max_model_len / block_size` wide; where that
is more than one attention split (`split_tokens()`), each size also gets a twin whose table is one
split wide, replayed while every sequence fits in it: there the attention launches no merge of
splits (and, under FlashMLA, nothing for long sequences), which a wide graph must keep for any length.

`launch` queues a step and returns a `PendingTokens` without waiting for the device (async
scheduling): a decode whose input token is the previous step's sample (still on the device) reads
it from that step's output tensor, so the host never waits for it before preparing the next step.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from wideep.engine.config import EngineArgs
from wideep.engine.kv_cache import allocate_kv_caches
from wideep.engine.sampler import Sampler, logprob_entries
from wideep.engine.scheduler import SchedulerOutput
from wideep.model.attention import AttentionMetadata, resolve_kv_cache_dtype, split_tokens
from wideep.model.ubatch import DBOConfig, forward_dual_batch
from wideep.utils.device import host_to_device

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    hidden: torch.Tensor
    staging: list = field(default_factory=list)     # two _Staging sets of host input buffers, used in turn
    next_staging: int = 0
    host_table: "_HostBlockTable | None" = None     # the block table as last staged (host mirror)
    short: "_Graph | None" = None    # the same size with a one-split-wide block table (see the module doc)


class PendingTokens:
    """The sampled tokens of a launched step; `result()` waits for them (a device -> pinned host copy)."""

    def __init__(self, tokens: torch.Tensor | None, runner: "ModelRunner"):
        self._runner = runner
        self._event = None
        self._host = tokens
        if tokens is not None and tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> list[int]:
        if self._host is None:
            return []
        if self._event is not None:
            t0 = time.perf_counter()
            self._event.synchronize()
            self._runner.wait_s += time.perf_counter() - t0
        return self._host.tolist()


class ModelRunner:
    def __init__(self, model, args: EngineArgs, device: torch.device, max_model_len: int):
        self.model = model
        self.args = args
        self.device = device
        self.block_size = args.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        short = split_tokens() // self.block_size
        self.short_blocks = short if 0 < short < self.max_blocks_per_seq else 0   # 0: no narrow twins
        self.dtype = next(model.parameters()).dtype
        self.kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        self.sampler = Sampler(device, args.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: dict[int, _Graph] = {}
        self.graph_pool = None
        # EP: the dispatcher's graph_mode(size) context (static shapes, `size` tokens per rank) wraps
        # every capture and replay of a graph of that size (a no-op for single-rank dispatchers).
        # the last launched step's samples on the device, and the row of each request in them
        self._last_tokens: torch.Tensor | None = None
        self._last_reqs: list = []                    # the requests that sampled them, in row order
        self._last_rows: dict[str, int] | None = {}   # request id -> row (built when first needed)
        self.wait_s = 0.0   # host time spent waiting for sampled tokens (benchmarks: host time per step)
        self.dbo = DBOConfig.from_args(args)
        self.split_steps = 0    # forwards run as two micro-batches (eager; graphs count at capture)

    # ---- KV cache ----------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, cross_layer: bool = False) -> None:
        """cross_layer: block-major backing tensor, each layer's cache a view (engine/kv_cache.py)."""
        self.kv_caches = allocate_kv_caches(self.model.num_layers, num_blocks, self.block_size,
                                            self.model.kv_cache_dim, self.kv_dtype, self.device, cross_layer)

    # ---- inputs -------------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput, block_table_width: int | None = None):
        """The eager forward's inputs (prefill, mixed and eager decode batches): one Python pass over the
        sequences for what only the requests know (their new tokens, start, block list); positions,
        slots, lengths and the padded block table are numpy operations over all rows at once."""
        n = len(out.seqs)
        input_ids: list[int] = []
        starts = [0] * n
        qlens = [0] * n
        tables: list[list[int]] = [None] * n   # type: ignore[list-item]
        for i, s in enumerate(out.seqs):
            req = s.request
            end = s.start + s.num_new_tokens
            if end > req.num_tokens:    # a decode of the previous step's sample (async scheduling)
                input_ids.append(-1)
            else:
                input_ids.extend(req.all_token_ids[s.start:end])
            starts[i] = s.start
            qlens[i] = s.num_new_tokens
            tables[i] = req.block_ids
        bs = self.block_size
        start = np.array(starts, dtype=np.int64)
        q = np.array(qlens, dtype=np.int64)
        qsl_np = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q, out=qsl_np[1:])
        seq_lens_np = start + q
        row = np.repeat(np.arange(n), q)                          # each token's sequence
        positions = np.arange(int(qsl_np[-1]), dtype=np.int64) - qsl_np[:-1][row] + start[row]
        num_blocks = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        width = block_table_width or int(num_blocks.max())
        table = np.zeros((n, width), dtype=np.int32)
        table[np.arange(width) < num_blocks[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int32, count=int(num_blocks.sum()))
        blk = positions // bs
        if (blk >= num_blocks[row]).any():
            i = int(row[np.argmax(blk >= num_blocks[row])])
            raise RuntimeError(f"request {out.seqs[i].request.request_id!r}: a position past its KV blocks")
        slots = table[row, blk].astype(np.int64) * bs + positions % bs
        qsl = qsl_np.tolist()
        seq_lens = seq_lens_np.tolist()
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(qsl_np.astype(np.int32)).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(seq_lens_np.astype(np.int32)).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(table).to(dev, non_blocking=True),
            num_decodes=out.num_decodes, query_lens=qlens, seq_lens_cpu=seq_lens)
        ids = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        self._fill_pending_inputs(ids, out, qsl)
        pos = torch.from_numpy(positions).to(dev, non_blocking=True)
        return ids, pos, attn, qsl

    def _fill_pending_inputs(self, ids: torch.Tensor, out: SchedulerOutput, qsl: list[int]) -> None:
        """Rows whose token is still on the device (the last step's sample) take it from there."""
        rows, reqs = [], []
        for i, s in enumerate(out.seqs):
            if s.start >= s.request.num_tokens:
                rows.append(qsl[i])
                reqs.append(s.request)
        if rows:
            self._copy_last_tokens(ids, rows, reqs)

    def _copy_last_tokens(self, ids: torch.Tensor, rows: list[int], reqs: list, staging: "_Staging | None" = None) -> None:
        """ids[rows[j]] = the last step's sample of reqs[j], on the device. When row j takes the last
        step's row j for every j (a decode batch in the same order as the step before: async steady
        state) it is one slice copy, else an indexed copy (`staging`: the index lists go through its
        pinned buffers)."""
        n = len(rows)
        if rows[-1] == n - 1 and self._last_reqs[:n] == reqs:   # rows (increasing) are 0..n-1, so are their sources
            ids[:n].copy_(self._last_tokens[:n])
            return
        if self._last_rows is None:
            self._last_rows = {r.request_id: i for i, r in enumerate(self._last_reqs)}
        last = self._last_rows
        try:
            src = [last[r.request_id] for r in reqs]
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]!r}: input token was not sampled by the last step") from None
        dev = self.device
        if staging is not None:
            staging.arrays[5][:n] = rows
            staging.arrays[6][:n] = src
            dst_rows, src_rows = (t[:n].to(dev, non_blocking=True) for t in staging.tensors[5:])
        else:
            dst_rows, src_rows = (host_to_device(v, torch.long, dev) for v in (rows, src))
        ids[dst_rows] = self._last_tokens[src_rows]

    # ---- execution ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, pad_to: int | None = None, use_graphs: bool = True,
                dbo_group: tuple[int, bool] | None = None) -> list[int]:
        """Runs one scheduled step; returns the sampled token of each seq that samples, in order."""
        return self.launch(out, pad_to, use_graphs, dbo_group).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, pad_to: int | None = None, use_graphs: bool = True,
               dbo_group: tuple[int, bool] | None = None) -> PendingTokens:
        """Queues one scheduled step (forward + sampling) on the device without waiting for it.
        use_graphs=False runs a decode batch eagerly (DP lockstep: one eager rank makes the step eager);
        dbo_group: the EP group's (max tokens per rank, decode-only), so every rank splits the same
        steps into micro-batches (None: decide from this batch)."""
        graph = self.graph_for(out, pad_to) if use_graphs else None
        if graph is not None:
            hidden = self._replay(graph, out)
            qsl = list(range(len(out.seqs) + 1))
        else:
            ids, pos, attn, qsl = self._prepare(out)
            hidden = self._forward(ids, pos, attn, out.is_decode_only, dbo_group)
        sampling, sample_rows, prompt_lp = [], [], False
        for i, s in enumerate(out.seqs):
            if s.samples:
                sampling.append(s.request)
                sample_rows.append(qsl[i + 1] - 1)
            if s.request.sampling_params.prompt_logprobs is not None:
                prompt_lp = True
        if prompt_lp:
            self._prompt_logprobs(out, hidden, qsl)
        if not sample_rows:
            self._last_tokens, self._last_reqs, self._last_rows = None, [], {}
            return PendingTokens(None, self)
        n = len(sample_rows)
        if sample_rows[-1] == n - 1:   # rows 0..n-1 (every decode row samples): no index to copy over
            rows = hidden[:n]
        else:
            rows = hidden[host_to_device(sample_rows, torch.long, self.device)]
        logits = self.model.compute_logits(rows)
        tokens = self.sampler.sample(logits, sampling)
        self._last_tokens, self._last_reqs, self._last_rows = tokens, sampling, None
        return PendingTokens(tokens, self)

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, qsl: list[int]) -> None:
        """Raw logprobs of each prompt token (position p's logits score token p+1) for the requests
        that asked, from the hidden states of the step that computed those positions."""
        for i, s in enumerate(out.seqs):
            req = s.request
            if not req.wants_prompt_logprobs:
                continue
            first = 1 + len(req.prompt_logprobs)          # next prompt token without an entry
            last = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)  # positions first-1 .. last-1
            for lo in range(max(first - 1, s.start), last, 256):   # bounded [rows, vocab] at a time
                hi = min(lo + 256, last)
                rows = torch.arange(qsl[i] + lo - s.start, qsl[i] + hi - s.start, device=hidden.device)
                lp = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
                targets = req.prompt_token_ids[lo + 1:hi + 1]
                req.prompt_logprobs.extend(logprob_entries(lp, targets, [req.sampling_params.prompt_logprobs] * len(targets)))

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, decode: bool = False, use_graphs: bool = True,
                  dbo_group: tuple[int, bool] | None = None) -> None:
        """A forward over `num_tokens` dummy tokens that writes nothing to the cache (slot -1):
        keeps MoE collectives in step across DP ranks, and profiles activation memory."""
        if decode:
            graph = self._graph_for(num_tokens, None, 0) if use_graphs else None   # no sequence: a narrow twin
            if graph is not None:
                self._fill_graph_padding(graph, 0)
                self._replay_graph(graph, 0)
                return
            q = [1] * num_tokens
            seq_lens = [1] * num_tokens
            nd = num_tokens
        else:
            q, seq_lens, nd = [num_tokens], [num_tokens], 0
        nb = -(-max(seq_lens) // self.block_size)
        attn = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
            query_start_loc=torch.tensor([0] + list(_cumsum(q)), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(q), nb), dtype=torch.int32, device=self.device),
            num_decodes=nd, query_lens=q, seq_lens_cpu=seq_lens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.zeros(num_tokens, dtype=torch.long, device=self.device) if decode else \
            torch.arange(num_tokens, dtype=torch.long, device=self.device)
        self._forward(ids, pos, attn, decode, dbo_group)

    def _forward(self, ids, pos, attn: AttentionMetadata, decode_only: bool,
                 dbo_group: tuple[int, bool] | None = None) -> torch.Tensor:
        """An eager forward, as two micro-batches when dual-batch overlap says this step splits."""
        tokens, dec = dbo_group or (int(ids.shape[0]), decode_only)
        if not self.dbo.should_split(tokens, dec):
            return self.model.forward(ids, pos, attn, self.kv_caches)
        self.split_steps += 1
        bound = DBOConfig.ubatch_max_tokens(tokens, dec) if dbo_group is not None else None
        return forward_dual_batch(self.model, ids, pos, attn, self.kv_caches, bound)

    def _graph_forward(self, size: int):
        """The forward a decode graph of `size` captures: split when `size` is above the decode threshold
        (the same on every rank, since all replay one agreed size)."""
        if not self.dbo.should_split(size, True):
            return lambda ids, pos, attn: self.model.forward(ids, pos, attn, self.kv_caches)
        bound = DBOConfig.ubatch_max_tokens(size, True)
        return lambda ids, pos, attn: forward_dual_batch(self.model, ids, pos, attn, self.kv_caches, bound)

    # ---- CUDA graphs -----------------------------------------------------------------------------
    def graph_for(self, out: SchedulerOutput, pad_to: int | None = None) -> _Graph | None:
        """The graph this step replays; None: it runs eagerly (not decode-only, or no graph holds it)."""
        if not (out.is_decode_only and self.graphs):
            return None
        return self._graph_for(len(out.seqs), pad_to, max((s.start + s.num_new_tokens for s in out.seqs), default=0))

    def _graph_for(self, batch: int, pad_to: int | None, longest: int | None = None) -> _Graph | None:
        """The graph of the next size up; its narrow twin when `longest` (the longest sequence after the
        step) fits the twin's table."""
        need = max(batch, pad_to or 0)
        for size in sorted(self.graphs):
            if size >= need:
                g = self.graphs[size]
                if g.short is not None and longest is not None and longest <= self.short_blocks * self.block_size:
                    return g.short
                return g
        return None

    def _dispatch_mode(self, size: int, num_real: int | None = None):
        return self.model.dispatcher.graph_mode(size, num_real)

    def _replay_graph(self, g: _Graph, num_real: int) -> None:
        """num_real: rows [num_real, size) are padding (EP: they skip the routed experts)."""
        with self._dispatch_mode(g.input_ids.shape[0], num_real):
            g.graph.replay()

    def _fill_graph_padding(self, g: _Graph, start: int) -> None:
        g.input_ids[start:].zero_()
        g.positions[start:].zero_()
        g.slot_mapping[start:].fill_(-1)
        g.seq_lens[start:].zero_()
        g.block_tables[start:].zero_()

    def _staging(self, g: _Graph) -> "_Staging":
        """The next of the graph's two host staging sets (pinned on CUDA, allocated once). Two, so a
        step's inputs are written while the previous step's copies may still be queued (async
        scheduling); a set's copies are waited for (an event, two steps old) before it is rewritten."""
        if not g.staging:
            g.staging = [_Staging(g.input_ids.shape[0], g.block_tables.shape[1], self.device) for _ in range(2)]
        g.next_staging = 1 - g.next_staging
        st = g.staging[g.next_staging]
        st.ready()
        return st

    def _replay(self, g: _Graph, out: SchedulerOutput) -> torch.Tensor:
        """Fills the graph's static inputs (real rows, then padding rows: slot -1, seq_len 0) from one
        host staging buffer per input, copied without blocking the host, and replays."""
        b = len(out.seqs)
        st = self._staging(g)
        pending_rows, pending_reqs = self._stage(g, out, st)
        for dst, src in zip((g.input_ids, g.positions, g.slot_mapping, g.seq_lens, g.block_tables), st.tensors[:5]):
            dst.copy_(src, non_blocking=True)
        if pending_rows:
            self._copy_last_tokens(g.input_ids, pending_rows, pending_reqs, st)
        st.issued()
        self._replay_graph(g, b)
        return g.hidden[:b]

    def _stage(self, g: _Graph, out: SchedulerOutput, st: "_Staging") -> tuple[list[int], list]:
        """Writes the step's decode inputs into `st`: one Python pass over the rows for what only the
        requests know (input token, position, block list), the rest vectorized; the block table from
        the graph's host mirror, which rewrites a row only where its blocks changed. Returns the rows
        whose input token is the last step's sample (still on the device) and their requests."""
        b = len(out.seqs)
        bs = self.block_size
        if g.host_table is None:
            g.host_table = _HostBlockTable(g.input_ids.shape[0], g.block_tables.shape[1])
        ht = g.host_table
        src, written = ht.src, ht.written
        starts = [0] * b
        tokens = [-1] * b
        pending_rows: list[int] = []
        pending_reqs: list = []
        for i, s in enumerate(out.seqs):
            req = s.request
            p = s.start
            starts[i] = p
            known = req.all_token_ids
            if p < len(known):
                tokens[i] = known[p]
            else:
                pending_rows.append(i)
                pending_reqs.append(req)
            blocks = req.block_ids
            if src[i] is not blocks or written[i] != len(blocks):
                ht.set_row(i, blocks)
        ht.clear_from(b)
        ids, pos, slots, lens, table = st.arrays[:5]
        p = np.array(starts, dtype=np.int64)
        blk = p // bs
        if b and (blk >= ht.num_blocks[:b]).any():
            i = int(np.argmax(blk >= ht.num_blocks[:b]))
            raise RuntimeError(f"request {out.seqs[i].request.request_id!r}: position {starts[i]} has no KV block")
        ids[:b] = tokens
        ids[b:] = 0
        pos[:b] = p
        pos[b:] = 0
        slots[:b] = ht.table[np.arange(b), blk].astype(np.int64) * bs + p % bs
        slots[b:] = -1
        lens[:b] = p + 1
        lens[b:] = 0
        table[:] = ht.table
        return pending_rows, pending_reqs

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.args.enforce_eager:
            return
        sizes = sorted({s for s in self.args.cuda_graph_sizes if 0 < s <= self.args.max_num_seqs}, reverse=True)
        t0 = time.perf_counter()
        for size in sizes:
            try:
                with self._dispatch_mode(size):
                    self.graphs[size] = self._capture_size(size)
            except Exception as exc:  # a non-capturable model/dispatcher: stay eager
                log.warning("CUDA graph capture failed at batch %d (%s); decode runs eagerly", size, exc)
                self.graphs.clear()
                return
        log.info("captured %d CUDA graphs in %.1fs (sizes %s%s)", len(self.graphs) * (1 + bool(self.short_blocks)),
                 time.perf_counter() - t0, sorted(self.graphs),
                 f", each also with a {self.short_blocks}-block table" if self.short_blocks else "")

    def _capture_size(self, size: int, capture: bool = True) -> _Graph:
        """The graph of `size` and, where `max_model_len` is over one split, its narrow twin."""
        g = self._capture(size, capture)
        if self.short_blocks:
            g.short = self._capture(size, capture, self.short_blocks)
        return g

    def _capture(self, size: int, capture: bool = True, width: int | None = None) -> _Graph:
        """Static buffers for a decode batch of `size` (a block table `width` blocks wide, default the
        longest sequence's) and a CUDA graph of the forward over them. capture=False gives an eager
        stand-in with the same buffers (tests the static-shape path on CPU)."""
        dev = self.device
        ids = torch.zeros(size, dtype=torch.long, device=dev)
        pos = torch.zeros(size, dtype=torch.long, device=dev)
        slots = torch.full((size,), -1, dtype=torch.long, device=dev)
        seq_lens = torch.zeros(size, dtype=torch.int32, device=dev)
        width = width or self.max_blocks_per_seq
        tables = torch.zeros((size, width), dtype=torch.int32, device=dev)
        attn = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=dev),
            seq_lens=seq_lens, block_tables=tables, num_decodes=size,
            query_lens=[1] * size, seq_lens_cpu=[min(self.max_model_len, width * self.block_size)] * size)
        forward = self._graph_forward(size)
        if not capture:
            hidden = forward(ids, pos, attn)

            def replay():
                attn.plans.clear()   # the buffers hold a new step's values
                hidden.copy_(forward(ids, pos, attn))
            return _Graph(_EagerReplay(replay), ids, pos, slots, seq_lens, tables, hidden)
        for _ in range(2):  # warm up (allocator, lazy inits) outside the graph
            forward(ids, pos, attn)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            hidden = forward(ids, pos, attn)
        torch.cuda.synchronize(dev)
        return _Graph(graph, ids, pos, slots, seq_lens, tables, hidden)

    @torch.inference_mode()
    def use_static_decode(self, sizes: list[int]) -> None:
        """Eager stand-ins for CUDA graphs (same static buffers and padding): the graph path on CPU."""
        self.graphs = {}
        for size in sizes:
            with self._dispatch_mode(size):
                self.graphs[size] = self._capture_size(size, capture=False)


class _Staging:
    """Host buffers of one decode graph's inputs (ids, positions, slots, seq lens, block table, and the
    rows that take the previous step's sampled token): pinned
    memory on CUDA, so the copies to the device are asynchronous (a pageable source makes the copy
    wait for the stream, i.e. for the step still running)."""

    def __init__(self, size: int, width: int, device: torch.device):
        pin = device.type == "cuda"
        self.tensors = [torch.empty(size, dtype=torch.long, pin_memory=pin),
                        torch.empty(size, dtype=torch.long, pin_memory=pin),
                        torch.empty(size, dtype=torch.long, pin_memory=pin),
                        torch.empty(size, dtype=torch.int32, pin_memory=pin),
                        torch.empty((size, width), dtype=torch.int32, pin_memory=pin),
                        torch.empty(size, dtype=torch.long, pin_memory=pin),    # rows taking the last sample
                        torch.empty(size, dtype=torch.long, pin_memory=pin)]    # and its row in that sample
        self.arrays = [t.numpy() for t in self.tensors]
        self._event = torch.cuda.Event() if pin else None
        self._pending = False

    def issued(self) -> None:
        """The device copies from these buffers are queued."""
        if self._event is not None:
            self._event.record()
            self._pending = True

    def ready(self) -> None:
        """Waits until the copies queued from these buffers ran (so they may be rewritten)."""
        if self._pending:
            self._event.synchronize()
            self._pending = False


class _HostBlockTable:
    """A decode graph's block table on the host, kept across steps: row i remembers the block list it
    was written from and how much of it, so a step rewrites only the rows whose request changed and
    appends the blocks a running request gained (a request's `block_ids` only grows, or is replaced by
    a new list when its blocks are freed: preemption, abort, finish). Entries past a row's blocks are 0,
    as in a freshly built table."""

    def __init__(self, rows: int, width: int):
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int64)   # blocks in each row (= written, as an array)
        self.src: list = [None] * rows      # the block list each row was written from
        self.written: list[int] = [0] * rows   # len(self.src[i]) when written
        self._rows = 0                      # rows in use at the last step

    def set_row(self, i: int, blocks: list[int]) -> None:
        """Row i from `blocks`: its first `width` entries (a narrow graph's sequences use no more, though a
        request may hold blocks beyond them)."""
        n = len(blocks)
        w = self.table.shape[1]
        if self.src[i] is blocks:
            k = self.written[i]
            if n == k:
                return
            if n > k:
                if k < w:
                    self.table[i, k:min(n, w)] = blocks[k:w]
                self.written[i] = n
                self.num_blocks[i] = n
                return
        old, m = min(self.written[i], w), min(n, w)
        self.table[i, :m] = blocks[:m]
        if old > m:
            self.table[i, m:old] = 0
        self.src[i] = blocks
        self.written[i] = n
        self.num_blocks[i] = n

    def clear_from(self, b: int) -> None:
        """Rows b.. are padding this step: all zeros."""
        for i in range(b, self._rows):
            if self.written[i]:
                self.table[i, :self.written[i]] = 0
            self.src[i] = None
            self.written[i] = 0
            self.num_blocks[i] = 0
        self._rows = b


class _EagerReplay:
    def __init__(self, fn):
        self.replay = fn


def _cumsum(xs: list[int]):
    total = 0
    for x in xs:
        total += x
        yield total
