"""Plugin roles (docs/protocols.md, "Router") and the scheduling cycle that strings them together.

A request goes: screeners (intersected) -> producers -> profile handler picks profiles -> each profile runs its filters
(in order, stop when empty), its weighted scorers (each clamped to [0,1], times weight, summed),
then its picker -> handler.process_results -> pre-request hooks -> response hooks per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wideep.router.registry import Plugin
from wideep.router.types import Endpoint, LLMRequest, ProfileRunResult, SchedulingResult, saturated


class Filter(Plugin):
    def filter(self, req: LLMRequest, eps: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    """Implement `score_values` (one float per endpoint, aligned with `eps`: the scheduler's fast
    path) or `score` (a dict); each is derived from the other."""

    category = "distribution"   # or "affinity" (prefix, session): informative, as in llm-d
    bounded = False             # True: score_values is always within [0, 1], the scheduler skips the clamp

    def score(self, req: LLMRequest, eps: list[Endpoint]) -> dict[Endpoint, float]:
        if type(self).score_values is Scorer.score_values:
            raise NotImplementedError(f"{type(self).__name__} implements neither score nor score_values")
        return dict(zip(eps, self.score_values(req, eps)))

    def score_values(self, req: LLMRequest, eps: list[Endpoint]) -> list[float]:
        d = self.score(req, eps)
        return [d.get(e, 0.0) for e in eps]


class Picker(Plugin):
    def pick(self, req: LLMRequest, scored: list[tuple[Endpoint, float]]) -> list[Endpoint]:
        raise NotImplementedError

    def pick_values(self, req: LLMRequest, eps: list[Endpoint], totals: list[float]) -> list[Endpoint]:
        """Fast path with aligned lists; pickers may override to skip building the pairs."""
        return self.pick(req, list(zip(eps, totals)))


class Screener(Plugin):
    """Runs on the pool's candidates before producers and profiles; the director intersects the
    sets of all screeners (llm-d: results are intersected)."""

    def screen(self, req: LLMRequest, eps: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class DataProducer(Plugin):
    """Runs before scheduling to attach data (token ids, prefix matches) to the request."""

    def produce(self, req: LLMRequest, eps: list[Endpoint]) -> None:
        raise NotImplementedError

    async def produce_async(self, req: LLMRequest, eps: list[Endpoint]) -> None:
        """Optional I/O step the director awaits before scheduling (e.g. remote tokenization);
        `produce` then runs synchronously inside the scheduling cycle."""


class PreRequest(Plugin):
    """Runs once the endpoints are chosen: records state and may add request headers."""

    def pre_request(self, req: LLMRequest, result: SchedulingResult, headers: dict[str, str]) -> None:
        raise NotImplementedError


class ResponseHooks(Plugin):
    def on_response_headers(self, req: LLMRequest, result: SchedulingResult, headers: dict[str, str]) -> None:
        pass

    def on_response_body(self, req: LLMRequest, result: SchedulingResult, chunk: bytes, end_of_stream: bool) -> None:
        pass


@dataclass
class ScoredPlugin:
    plugin: Scorer
    weight: float = 1.0


@dataclass
class Profile:
    """One named scheduling profile: filters -> weighted scorers -> picker."""

    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[ScoredPlugin] = field(default_factory=list)
    picker: Picker | None = None

    def run(self, req: LLMRequest, candidates: list[Endpoint]) -> ProfileRunResult | None:
        eps = candidates
        for f in self.filters:
            eps = f.filter(req, eps)
            if not eps:
                return None
        totals: list[float] | None = None
        for sp in self.scorers:
            w = sp.weight
            vals = sp.plugin.score_values(req, eps)
            if len(vals) != len(eps):
                raise ValueError(f"scorer {sp.plugin.name} returned {len(vals)} scores for {len(eps)} endpoints")
            if not sp.plugin.bounded:   # clamp to [0, 1]
                vals = [v if 0.0 <= v <= 1.0 else (0.0 if v < 0.0 else 1.0) for v in vals]
            # times the weight, summed
            if totals is None:
                totals = [v * w for v in vals] if w != 1.0 else list(vals)
            else:
                totals = [t + v * w for t, v in zip(totals, vals)] if w != 1.0 else [t + v for t, v in zip(totals, vals)]
        if totals is None:
            totals = [0.0] * len(eps)
        assert self.picker is not None
        targets = self.picker.pick_values(req, eps, totals)
        if not targets:
            return None
        return ProfileRunResult(targets=targets, candidates=eps, totals=totals)


class PDDecider(Plugin):
    """Decides whether a request gets a separate prefill leg, given the decode endpoint picked."""

    def disaggregate(self, req: LLMRequest, decode: Endpoint) -> bool:
        raise NotImplementedError


class ProfileHandler(Plugin):
    # P/D handlers: requests the prefill profile found no endpoint for, served decode-only (a metric)
    fallbacks: int = 0

    def pick(self, req: LLMRequest, profiles: dict[str, Profile],
             results: dict[str, ProfileRunResult | None]) -> dict[str, Profile]:
        raise NotImplementedError

    def process_results(self, req: LLMRequest, results: dict[str, ProfileRunResult | None]) -> SchedulingResult:
        raise NotImplementedError


class Scheduler:
    """Loops handler.pick until it returns nothing, running each picked profile on the candidates."""

    def __init__(self, handler: ProfileHandler, profiles: dict[str, Profile]):
        self.handler = handler
        self.profiles = profiles

    def schedule(self, req: LLMRequest, candidates: list[Endpoint]) -> SchedulingResult:
        results: dict[str, ProfileRunResult | None] = {}
        for _ in range(len(self.profiles) + 1):
            picked = self.handler.pick(req, self.profiles, results)
            if not picked:
                break
            for name, profile in picked.items():
                results[name] = profile.run(req, candidates)
        return self.handler.process_results(req, results)


def profile_failed(name: str) -> Exception:
    return saturated(f"scheduling profile {name!r} found no endpoint that fits the request")
