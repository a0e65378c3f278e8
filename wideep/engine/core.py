"""EngineCore: one rank, in-process. add_request / abort_request / step, and nothing else to know.

A step = schedule (scheduler.py) -> forward + sample (model_runner.py) -> update and report
(scheduler.py). `schedule()` and `execute()` are also exposed separately so a DP-lockstep loop can
agree on the step's shape across ranks between the two (pad decode batches, run dummy batches).

With `async_scheduling` (vLLM's flag), `execute` launches step n and then applies step n-1's result:
the host schedules and prepares step n+1 while the device runs step n, and a step's tokens are
reported one step late. An empty schedule (nothing left to launch) applies the step in flight.
"""
from __future__ import annotations

import array
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from wideep.engine.api import EngineRequest, EngineStats, InvalidRequest, KVEvent, RequestOutput
from wideep.engine.block_manager import BlockManager
from wideep.engine.config import EngineArgs
from wideep.engine.kv_cache import bytes_per_block, kv_cache_budget, num_blocks_for_budget
from wideep.engine.request import Request
from wideep.engine.scheduler import Scheduler, SchedulerConnector, SchedulerOutput
from wideep.utils.device import resolve_device

log = logging.getLogger(__name__)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "half": torch.float16, "fp16": torch.float16, "float32": torch.float32, "float": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def load_eos_token_ids(model_dir: str | Path, config=None) -> set[int]:
    """EOS ids from generation_config.json, else config.json (an int or a list in HF files)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        p = Path(model_dir) / name
        if p.exists():
            v = json.loads(p.read_text()).get("eos_token_id")
            if v is not None:
                ids.update(v if isinstance(v, list) else [v])
                break
    if not ids and config is not None and getattr(config, "eos_token_id", None) is not None:
        v = config.eos_token_id
        ids.update(v if isinstance(v, list) else [v])
    return ids



def token_ids_in_range(ids, vocab_size: int) -> bool:
    """All of ids are integers in [0, vocab_size). One C pass into an int64 array and two vectorized
    reductions: this runs on the engine loop for every request, and a Python loop over a 2k-token prompt
    cost ~0.25 ms of the loop's time (measured on a CPU; it is on P/D's decode-side TTFT path)."""
    try:
        a = np.frombuffer(array.array("q", ids), dtype=np.int64)
    except (TypeError, OverflowError):   # not an integer, or beyond int64
        return False
    return a.size == 0 or (int(a.min()) >= 0 and int(a.max()) < vocab_size)

class EngineCore:
    def __init__(self, args: EngineArgs, *, model=None, dispatcher=None, ep_rank: int = 0, ep_size: int = 1,
                 connector: SchedulerConnector | None = None):
        self.args = args
        self.device = resolve_device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_dtype(args.dtype, self.device)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        if model is None:
            from wideep.model.loader import load_model
            model = load_model(args.model, self.device, self.dtype, dispatcher=dispatcher,
                               ep_rank=ep_rank, ep_size=ep_size, quantization=args.quantization)
        self.model = model
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_model_len = int(args.max_model_len or min(int(cfg.max_position_embeddings), 8192))
        self.eos_token_ids = load_eos_token_ids(args.model, cfg) if args.model else set()

        from wideep.engine.model_runner import ModelRunner
        self.runner = ModelRunner(model, args, self.device, self.max_model_len)
        self.num_blocks = self._size_kv_cache()
        if connector is None and args.kv_transfer_config:
            # P/D (kv_transfer/): producer serves held blocks on the side channel, consumer pulls them.
            from wideep.kv_transfer.connector import make_connector
            connector = make_connector(args)
        self.connector = connector
        # The connector picks the cache layout: P/D engines keep all layers of a block together (one
        # NIXL descriptor per run of blocks instead of one per layer), see engine/kv_cache.py.
        self.runner.allocate_kv_cache(self.num_blocks,
                                      cross_layer=connector is not None and connector.wants_cross_layer_kv())
        self.runner.capture_cuda_graphs()
        if connector is not None:
            connector.register_kv_caches(self.runner.kv_caches)
        self.block_manager = BlockManager(self.num_blocks, args.block_size, args.enable_prefix_caching)
        self.grammar_engine = None   # structured.GrammarEngine, built on the first constrained request
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.max_model_len, connector)
        self.async_scheduling = bool(args.async_scheduling)
        self._inflight = None   # (SchedulerOutput, PendingTokens) of the launched, unapplied step
        log.info("engine ready in %.1fs: %d KV blocks of %d tokens, max_model_len %d, device %s",
                 time.perf_counter() - t0, self.num_blocks, args.block_size, self.max_model_len, self.device)

    def _size_kv_cache(self) -> int:
        per_block = bytes_per_block(self.model.num_layers, self.args.block_size, self.model.kv_cache_dim,
                                    self.runner.kv_dtype)
        peak = 0
        if self.device.type == "cuda" and not self.args.kv_cache_memory_bytes:
            # Profile the largest prefill (no cache yet: a one-block scratch cache, nothing written).
            self.runner.allocate_kv_cache(1)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.runner.dummy_run(min(self.args.max_num_batched_tokens, self.max_model_len))
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            self.runner.kv_caches = []
            torch.cuda.empty_cache()
        return num_blocks_for_budget(kv_cache_budget(self.args, self.device, peak), per_block)

    # ---- requests --------------------------------------------------------------------------------
    def validate(self, req: EngineRequest) -> int:
        """Raises InvalidRequest naming the field; returns the resolved max_tokens."""
        sp = req.sampling_params
        sp.validate()
        if not req.request_id:
            raise InvalidRequest("request_id must be a non-empty string", "request_id")
        if req.request_id in self.scheduler.requests:
            raise InvalidRequest(f"request_id {req.request_id!r} is already in use", "request_id")
        ids = req.prompt_token_ids
        if not ids:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if not token_ids_in_range(ids, self.vocab_size):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        V = self.vocab_size
        for name, toks in (("logit_bias", list(sp.logit_bias)), ("allowed_token_ids", sp.allowed_token_ids or []),
                           ("bad_words", [t for w in sp.bad_words_token_ids for t in w])):
            bad = next((t for t in toks if t >= V), None)
            if bad is not None:
                raise InvalidRequest(f"{name}: token id {bad} is out of range: the vocabulary has {V} tokens", name)
        n = len(ids)
        if n >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {n} tokens but max_model_len is {self.max_model_len}: shorten the prompt "
                "(it must leave room for at least one generated token)", "prompt")
        capacity = self.num_blocks * self.args.block_size        # tokens the whole cache holds
        if sp.max_tokens is None:   # "as many as fit": bounded by max_model_len and by the cache
            max_tokens = min(self.max_model_len, capacity + 1) - n
            if max_tokens < 1:
                raise InvalidRequest(f"prompt has {n} tokens but the KV cache holds only {capacity}", "prompt")
        else:
            max_tokens = sp.max_tokens
        if n + max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"max_tokens {max_tokens} plus the prompt's {n} tokens exceeds max_model_len "
                f"{self.max_model_len}: lower max_tokens to at most {self.max_model_len - n}", "max_tokens")
        need = self.block_manager.blocks_needed(n + max_tokens - 1)
        if need > self.num_blocks:
            raise InvalidRequest(
                f"prompt + max_tokens need {need} KV blocks but the cache holds {self.num_blocks}: "
                "lower max_tokens or give the engine more KV cache memory", "max_tokens")
        return max_tokens

    def add_request(self, req: EngineRequest) -> None:
        max_tokens = self.validate(req)
        request = Request(req, self.eos_token_ids, max_tokens)
        if req.sampling_params.structured_outputs is not None:
            request.grammar = self._grammar_for(req.sampling_params.structured_outputs)
        self.scheduler.add(request)

    def _grammar_for(self, params):
        """The request's grammar matcher; InvalidRequest (a 400) when it cannot be honored here."""
        from wideep.engine.structured import GrammarEngine, GrammarUnavailable
        try:
            if self.grammar_engine is None:
                if not self.args.model:
                    raise ValueError("structured output needs the model directory's tokenizer")
                self.grammar_engine = GrammarEngine.from_model_dir(self.args.model, self.vocab_size, self.eos_token_ids)
                self.runner.sampler.grammar_engine = self.grammar_engine
            return self.grammar_engine.matcher(params)
        except (GrammarUnavailable, ValueError) as e:
            raise InvalidRequest(str(e), "structured_outputs") from None

    def abort_request(self, request_id: str) -> bool:
        """Frees the request's blocks at once; its final output (finish_reason "abort") comes from the next step()."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- stepping --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def execute(self, out: SchedulerOutput, pad_to: int | None = None, use_graphs: bool = True,
                dbo_group: tuple[int, bool] | None = None) -> list[RequestOutput]:
        launched = (out, self.runner.launch(out, pad_to, use_graphs, dbo_group) if not out.is_empty else None)
        prev, self._inflight = self._inflight, launched
        outputs = self._apply(prev) if prev is not None else []
        if not self.async_scheduling or out.is_empty:
            outputs += self._apply(launched)
            self._inflight = None
        return outputs

    def _apply(self, launched) -> list[RequestOutput]:
        out, pending = launched
        return self.scheduler.update(out, pending.result() if pending is not None else [])

    def step(self) -> list[RequestOutput]:
        return self.execute(self.schedule())

    def graph_sizes(self) -> list[int]:
        """Batch sizes with a captured decode graph ([] = eager only)."""
        return sorted(self.runner.graphs)

    def execute_dummy_batch(self, num_tokens: int = 1, decode: bool = True, use_graphs: bool = True,
                            dbo_group: tuple[int, bool] | None = None) -> None:
        """A forward over dummy tokens that writes nothing to the cache (DP lockstep: ranks without
        work still join every MoE collective)."""
        self.runner.dummy_run(num_tokens, decode=decode, use_graphs=use_graphs, dbo_group=dbo_group)

    # ---- P/D KV transfer (kv_transfer/) ----------------------------------------------------------
    def kv_transfer_wait_s(self) -> float | None:
        """While KV transfers are all this rank waits on (held producer blocks, consumer pulls in
        flight), how long the loop may block on input before polling them; None otherwise."""
        s = self.scheduler
        if self.connector is None or s.running or s.waiting or s.finished_outputs or self._inflight is not None:
            return None
        if s.waiting_for_kv:
            return 0.002
        return 0.05 if s.held else None

    def kv_wakeup_fd(self) -> int | None:
        """Readable when a KV pull has finished: a loop waiting on input also waits on it (then calls
        poll_kv_transfers), so a landed pull is scheduled at once, not at the next timer tick."""
        return self.connector.wakeup_fd() if self.connector is not None else None

    def poll_kv_transfers(self) -> None:
        """Frees blocks the consumer has read (or that timed out) and wakes requests whose KV landed."""
        self.scheduler._poll_connector()

    # ---- observability ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            dp_rank=self.args.data_parallel_rank, num_running=len(s.running),
            num_waiting=len(s.waiting) + len(s.waiting_for_kv), kv_cache_usage=bm.usage,
            num_blocks=bm.num_blocks, block_size=bm.block_size,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=s.num_preemptions, prompt_tokens=s.prompt_tokens,
            generation_tokens=s.generation_tokens,
            kv_transfer=self.connector.transfer_stats() if self.connector is not None else {})

    def take_kv_events(self) -> list[KVEvent]:
        return self.block_manager.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks
