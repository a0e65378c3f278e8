"""Port allocation for a local stack: every component of every group gets its own free ports.

With a base, ports are handed out upward from it (skipping taken ones); without, each block is
an ephemeral free range. Ports already handed out are never handed out twice.
"""
from __future__ import annotations

from wideep.utils.net import _is_free, free_port_range


class PortAllocator:
    def __init__(self, base: int | None = None):
        self.base = base
        self._next = base
        self.taken: set[int] = set()

    def _ok(self, start: int, count: int) -> bool:
        return all(p not in self.taken and p < 65536 and _is_free(p) for p in range(start, start + count))

    def block(self, count: int) -> int:
        """First port of `count` consecutive free ports."""
        if self._next is not None:
            start = self._next
            while not self._ok(start, count):
                start += 1
                if start + count > 65535:
                    raise RuntimeError(f"no {count} consecutive free ports above --port-base {self.base}")
            self._next = start + count
        else:
            for _ in range(100):
                start = free_port_range(count)
                if self._ok(start, count):
                    break
            else:
                raise RuntimeError(f"no {count} consecutive free ports found")
        self.taken.update(range(start, start + count))
        return start

    def single(self) -> int:
        return self.block(1)

    def prefer(self, port: int) -> int:
        """`port` if it is free, else another free one (the router keeps the spec's port when it can)."""
        if port and self._ok(port, 1):
            self.taken.add(port)
            return port
        return self.single()
