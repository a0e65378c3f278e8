"""Continuous batching with chunked prefill, decode-first batches and preemption by recompute.

Every step each scheduled request advances by `num_tokens - num_computed_tokens` tokens (capped
by the token budget): one for a decode, a chunk for a prefill. Running requests go first (oldest
first); if blocks run out, the newest running request is preempted (its blocks freed, its tokens
recomputed later). Waiting requests are admitted only in steps without preemption.

Async scheduling (engine/core.py): step n+1 is scheduled before step n's result is applied. A
request's in-flight tokens count as computed and each in-flight sample as one more token (its value
lives on the device; the runner feeds it to the next decode). A request that would reach max_tokens
or max_model_len with its in-flight samples is not scheduled again; one that stops on a sampled token
is found one step late and the extra step's sample is dropped. `update` applies steps in order, so
a request preempted or aborted while a step is in flight keeps that step's (valid) token or drops it.

P/D seam: an optional `SchedulerConnector` (kv_transfer/) can (a) say that a waiting request's
prefix will arrive from a remote engine: the request then parks in WAITING_FOR_REMOTE_KV with its
blocks allocated until the connector reports it loaded; (b) keep a finished request's blocks
held (producer side) until the connector reports them sent.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from wideep.engine.api import RequestOutput
from wideep.engine.block_manager import BlockManager
from wideep.engine.request import Request, RequestStatus
from wideep.kv_transfer.base import KVConnectorBase


SchedulerConnector = KVConnectorBase   # the seam (wideep.kv_transfer.base); None: no P/D


@dataclass
class ScheduledSeq:
    request: Request
    start: int            # first position computed this step (computed + in-flight tokens before it)
    num_new_tokens: int
    samples: bool = False  # reaches the end of the known tokens, so this step produces the next token
    epoch: int = 0        # request.num_preemptions when scheduled (a later preemption voids the KV progress)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)   # decodes (1 new token) first
    num_decodes: int = 0
    num_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def is_decode_only(self) -> bool:
        return bool(self.seqs) and self.num_decodes == len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, connector: SchedulerConnector | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}      # finished, blocks kept for a remote consumer
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.finished_outputs: list[RequestOutput] = []  # aborts etc. reported by the next step
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # ---- bookkeeping ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.finished_outputs)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.waiting_for_kv[request_id]
        else:
            self.waiting.remove(req)
        req.finish_reason = "abort"
        self._finish(req)
        self.finished_outputs.append(self._output(req, []))
        return True

    def _finish(self, req: Request) -> dict[str, Any] | None:
        req.status = RequestStatus.FINISHED
        self.requests.pop(req.request_id, None)
        params = None
        if self.connector is not None:
            hold, params = self.connector.request_finished(req)
            if hold:
                self.held[req.request_id] = req
                return params
        self.bm.free(req)
        return params

    def _preempt(self, req: Request) -> None:
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _poll_connector(self) -> None:
        if self.connector is None:
            return
        for rid in self.connector.finished_sending():
            req = self.held.pop(rid, None)
            if req is not None:
                self.bm.free(req)
        for rid in self.connector.finished_loading():
            req = self.waiting_for_kv.pop(rid, None)
            if req is not None:
                req.num_computed_tokens = req.num_remote_tokens_total
                req.status = RequestStatus.WAITING
                self.waiting.appendleft(req)
        # P/D (kv_transfer): a pull that failed under kv_load_failure_policy=fail ends the request.
        for rid, error in self.connector.failed_loading().items():
            req = self.waiting_for_kv.pop(rid, None)
            if req is not None:
                req.finish_reason = "error"
                self._finish(req)
                failed = self._output(req, [])
                failed.error = error
                self.finished_outputs.append(failed)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._poll_connector()
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []

        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            start = req.num_computed_tokens + req.num_inflight_tokens
            pending = req.num_pending_samples
            total = len(req.all_token_ids) + pending     # req.num_scheduled_tokens
            if start >= total or (pending and (self._reaches_limit(req, total) or req.needs_sampled_tokens)):
                idx += 1    # async: its in-flight step ends it (length), has not produced its token yet,
                continue    # or its next sampling needs that token on the host (grammar, penalties)
            n = min(total - start, budget)
            while not self.bm.allocate(req, n + req.num_inflight_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            scheduled.append(self._scheduled(req, start, n))
            budget -= n
            idx += 1

        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_inflight_tokens:
                break       # async: preempted while a step of it was in flight; wait for that step
            # prompt_logprobs need every prompt position's logits: such a request computes its prompt here.
            fresh = req.num_computed_tokens == 0 and not req.wants_prompt_logprobs
            cached = self.bm.find_cached_prefix(req) if fresh else []
            num_local = req.num_computed_tokens + len(cached) * self.bm.block_size
            num_remote, load_async = 0, False
            if self.connector is not None and fresh:
                num_remote, load_async = self.connector.get_num_remote_tokens(req, num_local)
            if num_remote and load_async:
                if not self.bm.allocate(req, num_remote, cached):
                    break
                self.waiting.popleft()
                req.num_remote_tokens_total = num_local + num_remote
                req.num_cached_tokens = num_local + num_remote
                req.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.waiting_for_kv[req.request_id] = req
                self.connector.on_blocks_allocated(req, num_remote)
                continue
            n = min(req.num_tokens - num_local, budget)
            if not self.bm.allocate(req, n, cached):
                break
            self.bm.record_lookup(req.num_tokens, len(cached) * self.bm.block_size)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(cached) * self.bm.block_size
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, req.num_computed_tokens, n))
            budget -= n

        num_decodes = sum(1 for s in scheduled if s.num_new_tokens == 1)
        if 0 < num_decodes < len(scheduled):
            scheduled.sort(key=lambda s: s.num_new_tokens != 1)   # stable: decodes first
        out.seqs = scheduled
        out.num_decodes = num_decodes
        out.num_tokens = sum(s.num_new_tokens for s in scheduled)
        return out

    def _scheduled(self, req: Request, start: int, n: int) -> ScheduledSeq:
        samples = start + n == req.num_scheduled_tokens
        req.num_inflight_tokens += n
        req.num_pending_samples += int(samples)
        return ScheduledSeq(req, start, n, samples, req.num_preemptions)

    def _reaches_limit(self, req: Request, scheduled_tokens: int) -> bool:
        """With its in-flight samples the request has max_tokens (or max_model_len) tokens: it ends there.
        scheduled_tokens: req.num_scheduled_tokens (the caller has it)."""
        return (scheduled_tokens - len(req.prompt_token_ids) >= req.max_tokens
                or scheduled_tokens >= self.max_model_len)

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        """Applies a step's result (steps in the order they were scheduled); `sampled` has one token
        per seq that samples, in batch order."""
        outputs: list[RequestOutput] = self.finished_outputs
        self.finished_outputs = []
        it = iter(sampled)
        finished, running = RequestStatus.FINISHED, RequestStatus.RUNNING
        cache_blocks = self.bm.cache_full_blocks if self.bm.enable_prefix_caching else None
        max_model_len = self.max_model_len
        for s in out.seqs:
            req = s.request
            req.num_inflight_tokens -= s.num_new_tokens
            if s.samples:
                token = next(it)
                req.num_pending_samples -= 1
            else:
                token = None
            if req.status is finished:
                continue    # aborted, or stopped by the previous step's token (async): the result is dropped
            if s.epoch == req.num_preemptions:
                computed = req.num_computed_tokens = s.start + s.num_new_tokens
                num_prompt = len(req.prompt_token_ids)
                if s.start < num_prompt:
                    self.prompt_tokens += min(computed, num_prompt) - s.start
                if cache_blocks is not None:
                    cache_blocks(req)
            if token is None:
                continue
            tokens = req.all_token_ids
            tokens.append(token)
            self.generation_tokens += 1
            new = tokens[len(req.prompt_token_ids) + req.num_emitted:]
            req.num_emitted = len(tokens) - len(req.prompt_token_ids)
            params = None
            if req.check_stop(max_model_len):
                if req.status is running:
                    self.running.remove(req)
                else:   # async: preempted after this step was launched
                    self.waiting.remove(req)
                params = self._finish(req)
            outputs.append(self._output(req, new, params, copy=False))
        return outputs

    def _output(self, req: Request, new_token_ids: list[int], params: dict[str, Any] | None = None,
                copy: bool = True) -> RequestOutput:
        """copy=False: new_token_ids is the caller's own fresh list, handed over."""
        fin = req.status is RequestStatus.FINISHED
        sp = req.sampling_params
        return RequestOutput(
            request_id=req.request_id, new_token_ids=list(new_token_ids) if copy else new_token_ids,
            finished=fin, finish_reason=req.finish_reason if fin else None,
            stop_reason=req.stop_reason if fin else None,
            num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=max(req.num_cached_tokens, 0),
            kv_transfer_params=params,
            logprobs=None if sp.logprobs is None else self._take_logprobs(req, len(new_token_ids)),
            prompt_logprobs=None if sp.prompt_logprobs is None else self._take_prompt_logprobs(req))

    @staticmethod
    def _take_logprobs(req: Request, n: int) -> list[list] | None:
        if req.sampling_params.logprobs is None:
            return None
        entries, req.pending_logprobs = req.pending_logprobs[:n], req.pending_logprobs[n:]
        return entries

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list[list] | None:
        if req.sampling_params.prompt_logprobs is None or req.prompt_logprobs_sent:
            return None
        if len(req.prompt_logprobs) < req.num_prompt_tokens - 1 and not req.is_finished:
            return None
        req.prompt_logprobs_sent = True
        return req.prompt_logprobs
