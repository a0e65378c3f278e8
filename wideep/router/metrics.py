"""The router's own Prometheus metrics (its own registry, so several routers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)


class RouterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.scheduling_latency = Histogram(
            "wideep_router_scheduling_duration_seconds",
            "Time to pick endpoints for one request (producers + profiles + picker)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.picks = Counter("wideep_router_picks_total", "Requests sent to an endpoint",
                             ["profile", "endpoint"], registry=r)
        self.errors = Counter("wideep_router_errors_total", "Requests the router answered itself with an error",
                              ["code", "reason"], registry=r)
        self.requests = Counter("wideep_router_requests_total", "Requests received", registry=r)
        self.queue_size = Gauge("wideep_router_flow_control_queue_size", "Requests waiting in flow control",
                                registry=r)
        self.ready_endpoints = Gauge("wideep_router_ready_endpoints", "Endpoints that can take traffic",
                                     registry=r)
        self.pd_fallbacks = Counter("wideep_router_pd_decode_only_fallbacks_total",
                                    "P/D requests served decode-only because no prefill endpoint fit", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
