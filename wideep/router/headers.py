"""Headers a proxy must not copy from one HTTP hop to the next (the router's proxy and the sidecar).

The connection-specific ones of RFC 9110 §7.6.1 (plus the obsolete `keep-alive`, `proxy-*`), and
the framing aiohttp recomputes for the body it sends (content-length, host). Bodies pass through
unchanged (sessions run with auto_decompress=False), so content-encoding is kept.
"""
from __future__ import annotations

from typing import Iterable

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
REFRAMED = frozenset({"content-length", "host"})
NOT_FORWARDED = HOP_BY_HOP | REFRAMED


def forwardable(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The end-to-end headers of `headers` (pairs, e.g. `request.headers.items()`)."""
    return {k: v for k, v in headers if k.lower() not in NOT_FORWARDED}
