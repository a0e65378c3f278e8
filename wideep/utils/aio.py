"""Event-loop choice shared by the long-running processes (frontend, supervisor, router, sidecar)."""
from __future__ import annotations


def install_uvloop() -> None:
    """Make uvloop asyncio's event loop where it is installed; the stock loop otherwise (it works, only slower)."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


# probes and scrapes (every 50 ms from the router) would drown the access log: requests only
QUIET_PATHS = frozenset({"/metrics", "/health", "/readyz", "/ready", "/ping"})


def access_logger_class():
    """aiohttp access logger of the HTTP tiers: one line per request, probes and scrapes left out."""
    from aiohttp.abc import AbstractAccessLogger

    class AccessLogger(AbstractAccessLogger):
        def log(self, request, response, time: float) -> None:
            if request.path in QUIET_PATHS:
                return
            v = request.version
            self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.3fs', request.remote, request.method, request.path_qs,
                             v.major, v.minor, response.status, response.body_length, time)

    return AccessLogger
