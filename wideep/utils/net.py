"""Loopback port helpers: tests of several components run side by side, so nothing binds a fixed port."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, start: int = 20000, stop: int = 60000) -> int:
    """First port of `count` consecutive free ports (for base+rank layouts such as 8000+i)."""
    import random

    for _ in range(200):
        base = random.randrange(start, stop - count)
        if all(_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def _is_free(port: int) -> bool:
    """Whether a server could bind the port now. SO_REUSEADDR as every wideep server binds: a socket
    in TIME_WAIT (a server stopped a moment ago) does not make a port busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
