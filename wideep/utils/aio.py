"""Event-loop choice shared by the long-running processes (frontend, supervisor, router, sidecar)."""
from __future__ import annotations


def install_uvloop() -> None:
    """Make uvloop asyncio's event loop where it is installed; the stock loop otherwise (it works, only slower)."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()
