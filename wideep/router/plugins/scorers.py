"""Load scorers: each maps candidates to [0,1], higher = better (llm-d's formulas)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from wideep.router.framework import ResponseHooks, Scorer
from wideep.router.registry import PluginParams, register


def min_max_inverse(values: list) -> list[float]:
    """(max - v) / (max - min), or 1 for everyone when all are equal."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


@register("queue-scorer")
class QueueScorer(Scorer):
    bounded = True

    def score_values(self, req, eps):
        return min_max_inverse([e.metrics.waiting for e in eps])


@register("running-requests-size-scorer")
class RunningRequestsSizeScorer(Scorer):
    bounded = True

    def score_values(self, req, eps):
        return min_max_inverse([e.metrics.running for e in eps])


@register("kv-cache-utilization-scorer")
class KVCacheUtilizationScorer(Scorer):
    def score_values(self, req, eps):
        return [1.0 - e.metrics.kv_usage for e in eps]


@dataclass
class LoadAwareParams(PluginParams):
    threshold: int = 128

    def validate(self):
        if self.threshold <= 0:
            raise ValueError("threshold must be > 0")


@register("load-aware-scorer")
class LoadAwareScorer(Scorer):
    """0.5 for an empty queue, then linearly down to 0 at `threshold` waiting requests."""

    Params = LoadAwareParams
    bounded = True

    def score_values(self, req, eps):
        t = self.params.threshold
        return [0.5 if (q := e.metrics.waiting) == 0 else max(0.0, 0.5 * (1.0 - q / t)) for e in eps]


@dataclass
class ActiveRequestParams(PluginParams):
    idle_threshold: int = 0
    max_busy_score: float = 1.0
    request_timeout: str = "2m"

    def validate(self):
        if self.idle_threshold < 0:
            raise ValueError("idleThreshold must be >= 0")
        if not 0.0 <= self.max_busy_score <= 1.0:
            raise ValueError("maxBusyScore must be in [0, 1]")


@register("active-request-scorer")
class ActiveRequestScorer(Scorer):
    """In-flight requests the router sent (inflight-load-producer counts them): 1 when idle,
    else (max - c) / max * maxBusyScore."""

    Params = ActiveRequestParams
    bounded = True

    def score_values(self, req, eps):
        if not eps:
            return []
        p = self.params
        counts = [e.inflight_requests for e in eps]
        mx = max(counts)
        idle = p.idle_threshold
        if mx <= idle:
            return [1.0] * len(counts)
        k = p.max_busy_score / mx
        return [1.0 if c <= idle else (mx - c) * k for c in counts]


@dataclass
class TokenLoadParams(PluginParams):
    max_tokens: int = 4194304

    def validate(self):
        if self.max_tokens <= 0:
            raise ValueError("maxTokens must be > 0")


@register("token-load-scorer")
class TokenLoadScorer(Scorer):
    Params = TokenLoadParams
    bounded = True

    def score_values(self, req, eps):
        m = self.params.max_tokens
        return [1.0 - min(1.0, e.inflight_tokens / m) for e in eps]


SESSION_HEADER = "x-session-token"


@register("session-affinity-scorer")
class SessionAffinityScorer(Scorer, ResponseHooks):
    """Sends a session back to the endpoint that served it: the token is base64(endpoint name),
    handed to the client in the response header and echoed by it on the next request."""

    category = "affinity"

    def score(self, req, eps):
        tok = req.headers.get(SESSION_HEADER)
        want = None
        if tok:
            try:
                want = base64.b64decode(tok, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                want = None
        return {e: 1.0 if e.name == want else 0.0 for e in eps} if want else dict.fromkeys(eps, 0.0)

    def on_response_headers(self, req, result, headers):
        headers[SESSION_HEADER] = base64.b64encode(result.target.name.encode()).decode()
