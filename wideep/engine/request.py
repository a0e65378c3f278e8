"""The engine's view of one request: its tokens, how many have KV in the cache, its blocks.

The scheduler's one invariant: `num_tokens - num_computed_tokens` tokens still need a forward pass.
A running request in decode has exactly one (the token sampled last step); a preempted request
has all of them again (recompute).
"""
from __future__ import annotations

import enum
from typing import Any

from wideep.engine.api import EngineRequest, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # P/D consumer: blocks allocated, KV arriving
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, req: EngineRequest, eos_token_ids: set[int], max_tokens: int):
        self.request_id = req.request_id
        self.prompt_token_ids = list(req.prompt_token_ids)
        self.sampling_params: SamplingParams = req.sampling_params
        self.kv_transfer_params: dict[str, Any] | None = req.kv_transfer_params
        self.arrival_time = req.arrival_time
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens            # resolved (never None)
        self.all_token_ids: list[int] = list(req.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1             # prompt tokens found in the prefix cache at first schedule
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []       # hashes of this request's full, computed blocks
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.num_remote_tokens_total = 0       # P/D: computed tokens once remote KV has landed
        self.kv_remote_done = False             # P/D consumer: remote KV handled (no re-pull after preemption)
        self.generator = None                   # torch.Generator for seeded sampling, made by the runner
        self.num_emitted = 0                    # output tokens already reported
        # async scheduling: tokens scheduled in a step whose result is not applied yet, and how many of
        # those steps sample (their tokens exist only on the device until the step is applied)
        self.num_inflight_tokens = 0
        self.num_pending_samples = 0
        self.grammar = None                     # structured.RequestGrammar of a constrained request
        self.pending_logprobs: list[list] = []  # sampler -> next output: one entry per new token
        self.prompt_logprobs: list[list] = []   # entries for prompt positions 1.. (prompt_logprobs)
        self.prompt_logprobs_sent = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Needs the logits of every prompt position: no prefix-cache hit and no remote KV for it."""
        return self.sampling_params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def needs_sampled_tokens(self) -> bool:
        """Its next step's sampling depends on the tokens so far (grammar state, penalties, bad words),
        so async scheduling must not launch it while a sample of it is still on the device."""
        sp = self.sampling_params
        return self.grammar is not None or sp.needs_penalties or bool(sp.bad_words_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """num_tokens plus the samples of steps still in flight (async scheduling)."""
        return len(self.all_token_ids) + self.num_pending_samples

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Sets finish_reason after a token was appended; True when the request is done."""
        sp = self.sampling_params
        tokens = self.all_token_ids
        last = tokens[-1]
        if self.grammar is not None and self.grammar.terminated:
            self.finish_reason, self.stop_reason = "stop", (last if last in sp.stop_token_ids else None)
            return True
        num_output = len(tokens) - len(self.prompt_token_ids)
        if num_output >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if last in sp.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", last
                return True
        if num_output >= self.max_tokens or len(tokens) >= max_model_len:
            self.finish_reason = "length"
            return True
        return False

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
