"""The nouns every router part shares: an endpoint (one DP rank's HTTP port), its metrics, a request."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from wideep.errors import WideepError

T = TypeVar("T")


class StateKey(str, Generic[T]):
    """The typed name of one piece of per-request plugin state (LLMRequest.data): the producer sets a
    value of type T under it, consumers read it back typed. Equal to its name, so the state stays a
    plain mapping from names (what logs and tests see)."""

    __slots__ = ()


class PluginState(dict):
    """Per-request plugin state keyed by StateKey."""

    @overload
    def get(self, key: StateKey[T]) -> T | None: ...
    @overload
    def get(self, key: StateKey[T], default: T) -> T: ...

    def get(self, key, default=None):
        return super().get(key, default)

    def put(self, key: StateKey[T], value: T) -> None:
        self[key] = value

    def take(self, key: StateKey[T], default: T) -> T:
        return self.pop(key, default)


PARSED: StateKey[bool] = StateKey("parsed")   # the body parsed as JSON (else: routed at random)

ROLE_LABEL = "llm-d.ai/role"
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both"})    # or no role label at all
PREFILL_ROLES = frozenset({"prefill", "prefill-decode", "both"})


@dataclass
class EndpointMetrics:
    """What the scraper last read from the endpoint's /metrics (vLLM names)."""

    waiting: int = 0                 # vllm:num_requests_waiting
    running: int = 0                 # vllm:num_requests_running
    kv_usage: float = 0.0            # vllm:kv_cache_usage_perc (0..1)
    block_size: int | None = None    # vllm:cache_config_info{block_size}
    num_gpu_blocks: int | None = None
    running_lora: frozenset[str] = frozenset()   # vllm:lora_requests_info{running_lora_adapters}
    waiting_lora: frozenset[str] = frozenset()   # vllm:lora_requests_info{waiting_lora_adapters}
    max_lora: int = 0                            # vllm:lora_requests_info{max_lora}
    updated_at: float = 0.0          # monotonic time of the last good scrape


@dataclass(eq=False)
class Endpoint:
    """One schedulable target: a pod IP plus one targetPort (`<pod>-rank-<i>`)."""

    name: str
    address: str                      # "ip:port"
    labels: dict[str, str] = field(default_factory=dict)
    rank: int = 0                     # DP rank: picks the KV-events port (base + rank)
    kv_events: str | None = None      # explicit ZMQ endpoint for KV events, overrides base + rank
    kv_events_replay: str | None = None   # explicit ZMQ ROUTER replay endpoint (else replayPort + rank)
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    healthy: bool = False             # last scrape succeeded and is fresh
    inflight_requests: int = 0        # maintained by inflight-load-producer
    inflight_tokens: int = 0

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    # role / can_decode / can_prefill are derived from the labels once, not per request (the role
    # filters read them for every candidate): assigning `labels` (as the datastore does on every
    # refresh) re-derives them; change the role label by assigning a new dict, not in place.
    def __setattr__(self, key, value):
        object.__setattr__(self, key, value)
        if key == "labels":
            self._derive()

    def _derive(self) -> None:
        role = self.labels.get(ROLE_LABEL)
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "can_decode", role is None or role in DECODE_ROLES)
        object.__setattr__(self, "can_prefill", role in PREFILL_ROLES)

    def __repr__(self) -> str:
        return f"Endpoint({self.name}@{self.address})"


@dataclass(eq=False)
class LLMRequest:
    """A parsed inference request as plugins see it; `data` carries per-request plugin state."""

    body: dict[str, Any]
    headers: dict[str, str]                      # lower-case names
    path: str = "/v1/completions"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    model: str = ""
    prompt_text: str = ""                        # completions prompt or rendered chat text
    token_ids: list[int] | None = None           # filled by token-producer
    data: PluginState = field(default_factory=PluginState)
    arrived_at: float = field(default_factory=time.monotonic)
    prompt_bytes: bytes = b""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else max(1, len(self.prompt_bytes) // 4)


@dataclass
class ProfileRunResult:
    """One profile's outcome: endpoints in preference order plus every candidate's total score
    (kept as two aligned lists; the name -> score dict is built only when someone asks)."""

    targets: list[Endpoint]
    candidates: list[Endpoint] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)

    @property
    def scores(self) -> dict[str, float]:
        return {e.name: s for e, s in zip(self.candidates, self.totals)}


@dataclass
class SchedulingResult:
    primary_profile: str
    profile_results: dict[str, ProfileRunResult | None]
    # Where to send the request when it is not the primary target's own address (the deprecated
    # deprecated v0.5 handlers with primaryPort route to the pod's primary port and name the rank in a header).
    destination_override: str | None = None

    @property
    def primary(self) -> ProfileRunResult:
        res = self.profile_results[self.primary_profile]
        assert res is not None
        return res

    @property
    def target(self) -> Endpoint:
        return self.primary.targets[0]


class SchedulingError(WideepError):
    """A request the router cannot place; `status` and `reason` become the HTTP answer."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def no_endpoints(message: str = "no ready endpoint in the pool") -> SchedulingError:
    return SchedulingError(503, "no-endpoints", message)


def saturated(message: str, reason: str = "rejected-saturated") -> SchedulingError:
    return SchedulingError(429, reason, message)
