"""Loopback port helpers: tests of several components run side by side, so nothing binds a fixed port."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (below the ephemeral range: see free_port_range)."""
    return free_port_range(1)


def _ephemeral_low() -> int:
    """The first port the kernel hands out for bind(0) and outgoing connections (Linux's default when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(count: int, start: int = 20000, stop: int | None = None) -> int:
    """First port of `count` consecutive free ports (for base+rank layouts such as 8000+i). Taken below the
    ephemeral range when it leaves room: a port found free there cannot be handed to another process's
    outgoing connection or bind(0) listener (NIXL's UCX, NCCL, gloo) before our server binds it."""
    import random

    stop = stop or _ephemeral_low()
    if stop - start < 4 * count:
        stop = 60000
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
