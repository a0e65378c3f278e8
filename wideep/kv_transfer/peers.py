"""Which KV producers a consumer may connect to: the engine-side SSRF guard.

`kv_transfer_params.remote_host/remote_port` arrive in a request body, so whoever can send a request
could make a rank dial any address. Every path that may end in a connection (the rank's HTTP
frontend, the connector before a pull or a release, any transport) calls `check_peer` /
`check_kv_transfer_params` first with the one allow-list the deployment configures:
WIDEEP_KV_PEER_ALLOWLIST, comma-separated entries

    10.0.0.7:5600      one producer side channel
    10.0.0.7:5600-5663 a port range (a DP group's side channels: base + rank)
    10.0.0.7           any port of that host
    10.0.0.0/16        any host of a network, any port

Unset means no restriction (a warning is logged once); set but empty allows nothing. Names are
compared literally, never resolved (a resolver must not decide what is inside the pool). Torch-free.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("wideep.kv_transfer")

ENV = "WIDEEP_KV_PEER_ALLOWLIST"


class PeerNotAllowed(ValueError):
    """kv_transfer_params name a producer outside the allow-list."""


@dataclass
class PeerAllowlist:
    ports: dict[str, list[tuple[int, int]]] = field(default_factory=dict)   # host -> port ranges
    hosts: set[str] = field(default_factory=set)                            # any port
    networks: list[Any] = field(default_factory=list)                       # ip_network, any port

    @classmethod
    def parse(cls, entries: list[str] | str) -> "PeerAllowlist":
        if isinstance(entries, str):
            entries = entries.split(",")
        a = cls()
        for raw in entries:
            e = raw.strip().lower()
            if not e:
                continue
            if "/" in e:
                try:
                    a.networks.append(ipaddress.ip_network(e, strict=False))
                except ValueError:
                    raise ValueError(f"{ENV}: {raw.strip()!r} is not a network (a.b.c.d/n)") from None
                continue
            host, port = _split(e)
            if port is None:
                a.hosts.add(host)
                continue
            lo, _, hi = port.partition("-")
            try:
                rng = (int(lo), int(hi or lo))
            except ValueError:
                raise ValueError(f"{ENV}: {raw.strip()!r}: the port must be N or N-M") from None
            if not (0 < rng[0] <= rng[1] < 65536):
                raise ValueError(f"{ENV}: {raw.strip()!r}: ports must lie in 1..65535")
            a.ports.setdefault(host, []).append(rng)
        return a

    def allows(self, host: str, port: int) -> bool:
        h = _norm(host)
        if h in self.hosts or any(lo <= port <= hi for lo, hi in self.ports.get(h, ())):
            return True
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)


def _norm(host: str) -> str:
    h = host.strip().lower().strip("[]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def _split(entry: str) -> tuple[str, str | None]:
    """'h:p', '[v6]:p', 'h', 'v6' -> (normalized host, port text or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return _norm(host), rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return _norm(host), port
    return _norm(entry), None


def kv_peer_allowlist_from_env() -> PeerAllowlist | None:
    from wideep import envs

    raw = envs.WIDEEP_KV_PEER_ALLOWLIST
    if raw is None:
        return None
    return PeerAllowlist.parse(raw)


_warned = False


def check_peer(allow: PeerAllowlist | None, host: Any, port: Any) -> None:
    """Raises PeerNotAllowed unless host:port is a producer this rank may connect to."""
    global _warned
    if allow is None:
        if not _warned:
            _warned = True
            log.warning("kv_transfer: %s is not set; kv_transfer_params may name any KV producer", ENV)
        return
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise PeerNotAllowed(f"kv_transfer_params.remote_host/remote_port must be a string and an integer, "
                             f"got {host!r}, {port!r}")
    if not allow.allows(host, port):
        raise PeerNotAllowed(f"kv_transfer_params name KV producer {host}:{port}, which is not a member of "
                             f"this pool ({ENV})")


def check_kv_transfer_params(params: dict[str, Any] | None, allow: PeerAllowlist | None) -> None:
    """The request-level check: any remote_host/remote_port a request carries must be allowed."""
    if not params:
        return
    host, port = params.get("remote_host"), params.get("remote_port")
    if host is None and port is None:
        return
    check_peer(allow, host, port)
