"""Offline validation of rendered objects against CRD schemas.

jsonschema Draft 7 on `spec.versions[].schema.openAPIV3Schema`, made strict: every object schema
that lists `properties` (and does not preserve unknown fields) gets `additionalProperties: false`,
so a typo'd field fails instead of being pruned silently by the API server.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


class CRDValidators:
    """(apiVersion, kind) -> Draft7Validator, loaded from a folder of CRD YAML files."""

    def __init__(self, schema_dir: str | Path):
        import jsonschema
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        self._validators: dict[tuple[str, str], Any] = {}
        for path in sorted(Path(schema_dir).glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=loader)
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
                self._validators[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)

    def knows(self, obj: dict[str, Any]) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self._validators

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Human-readable schema violations of one object (empty when it validates)."""
        v = self._validators[(obj["apiVersion"], obj["kind"])]
        out = []
        for err in sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(p) for p in err.absolute_path) or "<root>"
            out.append(f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {where}: {err.message[:300]}")
        return out
