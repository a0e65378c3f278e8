"""The engine's public contract: what a caller (offline LLM, HTTP frontend, P/D connector) sends in
and gets back. Token ids only; text lives in the frontend. Shared by engine, server and kv_transfer.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol

from wideep.engine.structured import StructuredOutputsParams


class InvalidRequest(ValueError):
    """A request field is out of range or malformed; `param` names the field (OpenAI error body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int | None = 16          # None: up to max_model_len
    temperature: float = 1.0             # 0 = greedy
    top_p: float = 1.0                   # in (0, 1]
    top_k: int = 0                       # 0 or -1 = off
    seed: int | None = None              # per-request generator: reproducible
    stop: list[str] = field(default_factory=list)        # stop strings (checked on text by the output processor)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    # Distribution transforms, applied by the batched sampler in vLLM's order (sampler.py).
    presence_penalty: float = 0.0        # -= p for each token already in the output
    frequency_penalty: float = 0.0       # -= f * count in the output
    repetition_penalty: float = 1.0      # tokens in prompt or output: logit / r if > 0 else logit * r
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    min_p: float = 0.0                   # drop tokens with prob < min_p * max prob
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # banned token sequences
    allowed_token_ids: list[int] | None = None
    # Logprobs: None = none; k = the sampled token's plus the top k (vLLM's raw logprobs).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}, got {getattr(self, param)!r}", param)

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or a positive integer")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not all(isinstance(t, int) and t >= 0 for t in self.logit_bias):
            raise bad("logit_bias", "keys must be non-negative token ids")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids or not all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids")
        if not all(isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w)
                   for w in self.bad_words_token_ids):
            raise bad("bad_words_token_ids", "must be non-empty lists of token ids")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < -1):
                raise bad(name, "must be an integer >= 0 (or -1: the whole vocabulary)")
        if self.structured_outputs is not None:
            try:
                self.structured_outputs.validate()
            except ValueError as e:
                raise InvalidRequest(str(e), "structured_outputs") from None

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)


FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # NixlConnector-compatible P/D parameters (docs/protocols.md, "P/D disaggregation"); None for a plain request.
    kv_transfer_params: dict[str, Any] | None = None
    arrival_time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineRequest":
        d = dict(d)
        d["sampling_params"] = SamplingParams.from_dict(d["sampling_params"])
        return cls(**d)


@dataclass
class RequestOutput:
    """One step's news about one request: the tokens generated since the last output."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None          # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                     # prompt tokens served from the prefix cache / remote KV
    kv_transfer_params: dict[str, Any] | None = None  # set on the producer's final output
    error: str | None = None                       # set with finish_reason "error"
    # One entry per new token when sampling_params.logprobs is set: [logprob, rank, top ids, top logprobs].
    logprobs: list[list[Any]] | None = None
    # Once, with the first output, when prompt_logprobs is set: one entry per prompt token after the
    # first, same shape as `logprobs` (the token is the prompt's).
    prompt_logprobs: list[list[Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestOutput":
        return cls(**d)


@dataclass
class EngineStats:
    """Gauges and cumulative counters one engine (one DP rank) reports; the frontend exports them as vllm: metrics."""

    dp_rank: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0       # 0..1, share of blocks in use
    num_blocks: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0     # tokens looked up
    prefix_cache_hits: int = 0        # tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0            # computed prompt tokens
    generation_tokens: int = 0
    kv_transfer: dict[str, Any] = field(default_factory=dict)   # the connector's transfer_stats()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineStats":
        return cls(**d)


# KV cache events, recorded by the block manager in the order they happen and published by the
# engine process over ZMQ in vLLM's format (docs/protocols.md, "KV events").
@dataclass
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"


@dataclass
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"


@dataclass
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EngineClient(Protocol):
    """What an HTTP frontend (or the offline LLM with several ranks) uses to talk to one engine process."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yields outputs until one with finished=True. Raises InvalidRequest before the first output
        if the engine rejects the request (e.g. prompt longer than max_model_len)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> EngineStats: ...

    def is_alive(self) -> bool: ...
