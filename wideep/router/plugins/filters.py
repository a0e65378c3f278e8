"""Filters: keep the endpoints a profile may use (roles, labels)."""
from __future__ import annotations

from dataclasses import dataclass, field

from wideep.router.framework import Filter
from wideep.router.registry import PluginParams, register


@register("decode-filter")
class DecodeFilter(Filter):
    """Decode-capable endpoints; an endpoint with no role label can do both."""

    def filter(self, req, eps):
        return [e for e in eps if e.can_decode]


@register("prefill-filter")
class PrefillFilter(Filter):
    """Prefill-capable endpoints; an endpoint with no role label can do both."""

    def filter(self, req, eps):
        return [e for e in eps if e.can_prefill]


@dataclass
class LabelSelectorParams(PluginParams):
    match_labels: dict = field(default_factory=dict)
    match_expressions: list = field(default_factory=list)

    def validate(self):
        for i, ex in enumerate(self.match_expressions):
            if not isinstance(ex, dict) or "key" not in ex or "operator" not in ex:
                raise ValueError(f"matchExpressions[{i}] needs key and operator")
            if ex["operator"] not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"matchExpressions[{i}].operator {ex['operator']!r}: use In, NotIn, Exists, DoesNotExist")
            if ex["operator"] in ("In", "NotIn") and not isinstance(ex.get("values"), list):
                raise ValueError(f"matchExpressions[{i}].values must be a list for {ex['operator']}")


def selector_matches(labels: dict[str, str], match_labels: dict, match_expressions: list) -> bool:
    """Kubernetes LabelSelector semantics (also used by the Kubernetes endpoint source)."""
    for k, v in match_labels.items():
        if labels.get(k) != str(v):
            return False
    for ex in match_expressions:
        key, op, vals = ex["key"], ex["operator"], [str(v) for v in ex.get("values") or []]
        has = key in labels
        if op == "In" and not (has and labels[key] in vals):
            return False
        if op == "NotIn" and has and labels[key] in vals:
            return False
        if op == "Exists" and not has:
            return False
        if op == "DoesNotExist" and has:
            return False
    return True


@register("label-selector-filter")
class LabelSelectorFilter(Filter):
    Params = LabelSelectorParams

    def filter(self, req, eps):
        p = self.params
        return [e for e in eps if selector_matches(e.labels, p.match_labels, p.match_expressions)]


@dataclass
class ByLabelParams(PluginParams):
    label: str = ""
    valid_values: list = field(default_factory=list)
    allows_no_label: bool = False

    def validate(self):
        if not self.label:
            raise ValueError("parameter 'label' is required")


@register("by-label")
class ByLabelFilter(Filter):
    Params = ByLabelParams

    def filter(self, req, eps):
        p = self.params
        valid = {str(v) for v in p.valid_values}
        return [e for e in eps if (e.labels.get(p.label) in valid) or (p.allows_no_label and p.label not in e.labels)]
