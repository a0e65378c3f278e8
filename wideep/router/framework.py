"""Plugin roles (router.md §1) and the scheduling cycle that strings them together.

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
    category = "distribution"   # or "affinity" (prefix, session): informative, as in llm-d

    def score(self, req: LLMRequest, eps: list[Endpoint]) -> dict[Endpoint, float]:
        raise NotImplementedError


class Picker(Plugin):
    def pick(self, req: LLMRequest, scored: list[tuple[Endpoint, float]]) -> list[Endpoint]:
        raise NotImplementedError


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
        totals = dict.fromkeys(eps, 0.0)
        for sp in self.scorers:
            w = sp.weight
            for ep, s in sp.plugin.score(req, eps).items():
                if ep in totals:
                    totals[ep] += (s if 0.0 <= s <= 1.0 else (0.0 if s < 0.0 else 1.0)) * w
        assert self.picker is not None
        targets = self.picker.pick(req, list(totals.items()))
        if not targets:
            return None
        return ProfileRunResult(targets=targets, scores={ep.name: s for ep, s in totals.items()})


class ProfileHandler(Plugin):
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
