"""Screeners: cut the pool's candidates before any profile runs (results of all are intersected).

`disaggregatedset-rollout-screener`: while a DisaggregatedSet rolls out, its pods carry two values
of the revision label. Prefill and decode legs of one request must come from the same revision
(a new model/config cannot take KV blocks from the old one), so when the candidates mix revisions
only one revision is kept:

1. `currentRevision` pins it when given (and present among the candidates);
2. else among *complete* revisions (at least one decode-capable endpoint, and at least one prefill
   endpoint when the pool has any prefill endpoints at all): the highest when every value is an
   integer, else the one with the most endpoints (ties: the greatest value);
3. no complete revision: nothing is cut (fail open).
One revision (or none): nothing is cut; with mixed revisions, unlabelled endpoints are cut too.
"""
from __future__ import annotations

from dataclasses import dataclass

from wideep.router.framework import Screener
from wideep.router.registry import PluginParams, register

REVISION_LABEL = "disaggregatedset.x-k8s.io/revision"


@dataclass
class RolloutParams(PluginParams):
    revision_label: str = REVISION_LABEL
    current_revision: str = ""
    disaggregated_set_name: str = ""    # informational (the pool already selects one set)

    def validate(self):
        if not self.revision_label:
            raise ValueError("revisionLabel must not be empty")


@register("disaggregatedset-rollout-screener")
class DisaggregatedSetRolloutScreener(Screener):
    Params = RolloutParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.current: str | None = None     # the revision last chosen (for /metrics and logs)

    def choose(self, by_rev: dict[str, list]) -> str | None:
        p = self.params
        if p.current_revision and p.current_revision in by_rev:
            return p.current_revision
        pool_has_prefill = any(e.can_prefill for eps in by_rev.values() for e in eps)

        def complete(eps):
            return any(e.can_decode for e in eps) and (not pool_has_prefill or any(e.can_prefill for e in eps))

        done = [r for r, eps in by_rev.items() if complete(eps)]
        if not done:
            return None
        if all(r.lstrip("-").isdigit() for r in done):
            return max(done, key=int)
        return max(done, key=lambda r: (len(by_rev[r]), r))

    def screen(self, req, eps):
        label = self.params.revision_label
        by_rev: dict[str, list] = {}
        for e in eps:
            r = e.labels.get(label)
            if r is not None:
                by_rev.setdefault(r, []).append(e)
        if not by_rev:
            return eps
        if len(by_rev) == 1:
            self.current = next(iter(by_rev))
            return eps
        rev = self.choose(by_rev)
        if rev is None:
            return eps
        self.current = rev
        return by_rev[rev]
