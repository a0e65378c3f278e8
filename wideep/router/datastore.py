"""The pool's endpoints and which of them may take traffic right now.

Sources (static list, endpoints file, Kubernetes) replace the endpoint set; state that the router
accumulated (metrics, in-flight counts) survives a refresh for endpoints that stay.
An endpoint is a candidate only while its last /metrics scrape succeeded within `staleness_s`.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import yaml

from wideep.router.types import ROLE_LABEL, Endpoint

ROLES = ("prefill", "decode", "prefill-decode", "both")


class Datastore:
    def __init__(self, staleness_s: float = 2.0):
        self.staleness_s = staleness_s
        self._eps: dict[str, Endpoint] = {}
        self.version = 0

    def set_endpoints(self, eps: list[Endpoint]) -> None:
        new: dict[str, Endpoint] = {}
        for e in eps:
            old = self._eps.get(e.name)
            if old is not None and old.address == e.address:
                old.labels, old.rank, old.kv_events, old.kv_events_replay = e.labels, e.rank, e.kv_events, e.kv_events_replay
                new[e.name] = old
            else:
                new[e.name] = e
        if set(new) != set(self._eps) or any(new[k] is not self._eps.get(k) for k in new):
            self.version += 1
        self._eps = new

    def all(self) -> list[Endpoint]:
        return list(self._eps.values())

    def get(self, name: str) -> Endpoint | None:
        return self._eps.get(name)

    def is_ready(self, e: Endpoint, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return e.healthy and now - e.metrics.updated_at <= self.staleness_s

    def ready(self) -> list[Endpoint]:
        oldest = time.monotonic() - self.staleness_s    # same test as is_ready, inlined (hot path)
        return [e for e in self._eps.values() if e.healthy and e.metrics.updated_at >= oldest]


# ---- static sources -------------------------------------------------------------------------

_ADDR = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _check_address(addr: Any, where: str) -> str:
    if not isinstance(addr, str) or not _ADDR.match(addr):
        raise ValueError(f"{where}: address must be 'ip:port', got {addr!r}")
    return addr


def _rank_from_name(name: str) -> int:
    m = re.search(r"-rank-(\d+)$", name)
    return int(m.group(1)) if m else 0


def parse_endpoint_flag(text: str) -> Endpoint:
    """`ip:port[,role=prefill][,name=x][,rank=1][,kv-events=tcp://h:p][,kv-events-replay=tcp://h:p][,label.k=v]` (repeatable flag)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--endpoint: empty value")
    addr = _check_address(parts[0], f"--endpoint {text!r}")
    labels: dict[str, str] = {}
    name, rank, kv, kv_replay = None, None, None, None
    for opt in parts[1:]:
        k, sep, v = opt.partition("=")
        if not sep:
            raise ValueError(f"--endpoint {text!r}: option {opt!r} must be key=value")
        if k == "role":
            if v not in ROLES:
                raise ValueError(f"--endpoint {text!r}: role must be one of {', '.join(ROLES)}")
            labels[ROLE_LABEL] = v
        elif k == "name":
            name = v
        elif k == "rank":
            rank = int(v)
        elif k == "kv-events":
            kv = v
        elif k == "kv-events-replay":
            kv_replay = v
        elif k.startswith("label."):
            labels[k[len("label."):]] = v
        else:
            raise ValueError(f"--endpoint {text!r}: unknown option {k!r} (role, name, rank, kv-events, kv-events-replay, label.<key>)")
    name = name or addr
    return Endpoint(name=name, address=addr, labels=labels, rank=_rank_from_name(name) if rank is None else rank,
                    kv_events=kv, kv_events_replay=kv_replay)


def parse_endpoints_doc(doc: Any, where: str = "endpoints file") -> list[Endpoint]:
    """A YAML list of {address: "ip:port", name, labels: {llm-d.ai/role: prefill|decode}, rank, kvEvents}
    (or a mapping with an `endpoints:` list)."""
    if isinstance(doc, dict) and "endpoints" in doc:
        doc = doc["endpoints"]
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a list of endpoints")
    out, names = [], set()
    for i, item in enumerate(doc):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{w}: expected a mapping with 'address'")
        bad = set(item) - {"address", "name", "labels", "rank", "kvEvents", "kvEventsReplay"}
        if bad:
            raise ValueError(f"{w}: unknown key(s) {sorted(bad)}; use address, name, labels, rank, kvEvents, kvEventsReplay")
        addr = _check_address(item.get("address"), w)
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"{w}.labels: expected a mapping")
        labels = {str(k): str(v) for k, v in labels.items()}
        if ROLE_LABEL in labels and labels[ROLE_LABEL] not in ROLES:
            raise ValueError(f"{w}.labels.{ROLE_LABEL}: must be one of {', '.join(ROLES)}")
        name = str(item.get("name") or addr)
        if name in names:
            raise ValueError(f"{w}: duplicate endpoint name {name!r}")
        names.add(name)
        rank = item.get("rank")
        out.append(Endpoint(name=name, address=addr, labels=labels,
                            rank=_rank_from_name(name) if rank is None else int(rank), kv_events=item.get("kvEvents"),
                            kv_events_replay=item.get("kvEventsReplay")))
    return out


def load_endpoints_file(path: str | Path) -> list[Endpoint]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--endpoints-file {p}: file not found")
    return parse_endpoints_doc(yaml.safe_load(p.read_text()), str(p))
