"""Flow control (featureGates: [flowControl]): hold requests in a bounded FIFO while the pool is
saturated, answer 429 with a reason when the queue is full or a request waited too long.

Saturated = every ready endpoint is over the saturationDetector thresholds (waiting queue depth
or KV-cache use) or at the router-side in-flight cap.
"""
from __future__ import annotations

import asyncio
from collections import deque

from wideep.router.config import FlowControlParams, SaturationParams
from wideep.router.types import Endpoint, saturated

REASON_HEADER = "x-llm-d-request-dropped-reason"


class FlowController:
    def __init__(self, params: FlowControlParams, sat: SaturationParams, enabled: bool):
        self.params = params
        self.sat = sat
        self.enabled = enabled
        self.queue: deque[object] = deque()
        self.changed = asyncio.Event()

    def endpoint_saturated(self, e: Endpoint) -> bool:
        cap = self.params.max_inflight_per_endpoint
        return (e.metrics.waiting >= self.sat.queue_depth_threshold
                or e.metrics.kv_usage >= self.sat.kv_cache_util_threshold
                or (cap > 0 and e.inflight_requests >= cap))

    def pool_saturated(self, eps: list[Endpoint]) -> bool:
        return bool(eps) and all(self.endpoint_saturated(e) for e in eps)

    def notify(self) -> None:
        """A request finished or metrics changed: queued requests re-check."""
        self.changed.set()

    async def admit(self, candidates) -> None:
        """Returns when the request may be scheduled; raises the 429 SchedulingError otherwise.
        `candidates` is a callable giving the current ready endpoints."""
        if not self.enabled or (not self.queue and not self.pool_saturated(candidates())):
            return
        if len(self.queue) >= self.params.max_queue_size:
            raise saturated(f"pool saturated and the flow-control queue is full ({self.params.max_queue_size})")
        token = object()
        self.queue.append(token)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.params.queue_timeout_s
        try:
            while True:
                if self.queue[0] is token and not self.pool_saturated(candidates()):
                    return
                left = deadline - loop.time()
                if left <= 0:
                    raise saturated(f"request waited {self.params.queue_timeout_s}s in the flow-control queue",
                                    reason="ttl-expired")
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=min(left, 0.05))
                except asyncio.TimeoutError:
                    pass
        finally:
            self.queue.remove(token)
            self.changed.set()
