"""Pickers: turn scores into the chosen endpoint(s)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from wideep.router.framework import Picker
from wideep.router.registry import PluginParams, register


@dataclass
class PickerParams(PluginParams):
    max_num_of_endpoints: int = 1

    def validate(self):
        if self.max_num_of_endpoints < 1:
            raise ValueError("maxNumOfEndpoints must be >= 1")


@register("max-score-picker")
class MaxScorePicker(Picker):
    """Shuffle, then stable sort by score: the best wins and ties are broken at random
    (no hot-spotting on the first endpoint when scores tie, R#2515)."""

    Params = PickerParams

    def pick_values(self, req, eps, totals):
        if self.params.max_num_of_endpoints == 1 and eps:
            best = max(totals)
            winners = [e for e, s in zip(eps, totals) if s == best]
            return [winners[0] if len(winners) == 1 else random.choice(winners)]
        return self.pick(req, list(zip(eps, totals)))

    def pick(self, req, scored):
        if self.params.max_num_of_endpoints == 1 and scored:
            best = max(s for _, s in scored)
            return [random.choice([e for e, s in scored if s == best])]
        scored = list(scored)
        random.shuffle(scored)
        scored.sort(key=lambda x: x[1], reverse=True)
        return [e for e, _ in scored[: self.params.max_num_of_endpoints]]


@register("random-picker")
class RandomPicker(Picker):
    Params = PickerParams

    def pick_values(self, req, eps, totals):
        return random.sample(eps, min(len(eps), self.params.max_num_of_endpoints))

    def pick(self, req, scored):
        eps = [e for e, _ in scored]
        return random.sample(eps, min(len(eps), self.params.max_num_of_endpoints))


@register("weighted-random-picker")
class WeightedRandomPicker(Picker):
    """A-Res (Efraimidis-Spirakis): key = U^(1/w), keep the largest keys; weight 0 is never
    preferred over a positive weight; all-zero falls back to uniform."""

    Params = PickerParams

    def pick(self, req, scored):
        if not scored:
            return []
        if all(s <= 0 for _, s in scored):
            keyed = [(random.random(), e) for e, _ in scored]
        else:
            keyed = [((random.random() ** (1.0 / s)) if s > 0 else -1.0, e) for e, s in scored]
        keyed.sort(key=lambda x: x[0], reverse=True)
        return [e for _, e in keyed[: self.params.max_num_of_endpoints]]
