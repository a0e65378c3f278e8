"""Prometheus metrics under vLLM's names and labels, one registry per frontend.

Routers (llm-d EPP) scrape `vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc` and `vllm:cache_config_info{block_size,num_gpu_blocks}`; dashboards read
the counters and latency histograms. Engine-side numbers come from the latest `EngineStats` (a
custom collector, so a scrape always shows one consistent snapshot); request latencies are
observed here, where the tokens reach the client.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wideep.engine.api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and SLO queries carry over.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class _EngineStatsCollector:
    """Exposes the last EngineStats snapshot as vLLM gauges and counters."""

    def __init__(self, model_name: str, engine: str):
        self.model_name = model_name
        self.engine = engine
        self.stats = EngineStats()

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        labels = ["model_name", "engine"]
        values = [self.model_name, self.engine]

        def gauge(name: str, doc: str, v: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, v)
            return g

        def counter(name: str, doc: str, v: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, v)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine", "model_name"])
        info.add_metric([str(s.block_size), str(s.num_blocks), "True", self.engine, self.model_name], 1.0)
        yield info
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        lora.add_metric(["", "", "0"], 0.0)
        yield lora
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens)


class FrontendMetrics:
    """All metrics of one DP rank's frontend."""

    def __init__(self, model_name: str, dp_rank: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, "engine": str(dp_rank)}
        self._engine = _EngineStatsCollector(model_name, str(dp_rank))
        self.registry.register(self._engine)
        names = ["model_name", "engine"]
        r = self.registry
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                names + ["finished_reason"], registry=r)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               names, buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              names, buckets=ITL_BUCKETS, registry=r).labels(**self.labels)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              names, buckets=E2E_BUCKETS, registry=r).labels(**self.labels)
        self._prompt_len = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                     names, buckets=TOKEN_BUCKETS, registry=r).labels(**self.labels)
        self._gen_len = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                  names, buckets=TOKEN_BUCKETS, registry=r).labels(**self.labels)
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(finished_reason=reason, **self.labels)

    def update_engine_stats(self, stats: EngineStats) -> None:
        self._engine.stats = stats

    def observe_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int = 1) -> None:
        """A step that delivered k tokens counts k gaps of seconds/k (vLLM observes per token)."""
        if num_tokens <= 0:
            return
        per = seconds / num_tokens
        for _ in range(num_tokens):
            self._itl.observe(per)

    def observe_finished(self, finish_reason: str, e2e_seconds: float, prompt_tokens: int, generation_tokens: int) -> None:
        self._success.labels(finished_reason=finish_reason, **self.labels).inc()
        self._e2e.observe(e2e_seconds)
        self._prompt_len.observe(prompt_tokens)
        self._gen_len.observe(generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
