"""Scrapes every endpoint's /metrics (vLLM names) on a fixed tick; a failed scrape takes the
endpoint out of the candidates at once, a missing one lets it go stale after `staleness_s`."""
from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp

from wideep.router.datastore import Datastore
from wideep.router.types import Endpoint, EndpointMetrics

log = logging.getLogger(__name__)

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, value))
    return out


def _adapters(text: str | None) -> frozenset[str]:
    return frozenset(a.strip() for a in (text or "").split(",") if a.strip())


def metrics_from_text(text: str) -> EndpointMetrics:
    m = EndpointMetrics()
    usage_new, usage_old = None, None
    lora_ts = None
    for name, labels, value in parse_prometheus(text):
        if name == "vllm:num_requests_waiting":
            m.waiting += int(value)
        elif name == "vllm:num_requests_running":
            m.running += int(value)
        elif name == "vllm:kv_cache_usage_perc":
            usage_new = max(usage_new or 0.0, value)
        elif name == "vllm:gpu_cache_usage_perc":
            usage_old = max(usage_old or 0.0, value)
        elif name == "vllm:lora_requests_info":
            # one sample per change, value = its timestamp: the newest sample is the current state
            if lora_ts is None or value >= lora_ts:
                lora_ts = value
                m.running_lora = _adapters(labels.get("running_lora_adapters"))
                m.waiting_lora = _adapters(labels.get("waiting_lora_adapters"))
                try:
                    m.max_lora = int(float(labels.get("max_lora") or 0))
                except ValueError:
                    m.max_lora = 0
        elif name == "vllm:cache_config_info":
            try:
                if "block_size" in labels:
                    m.block_size = int(float(labels["block_size"]))
                if labels.get("num_gpu_blocks") not in (None, "", "None"):
                    m.num_gpu_blocks = int(float(labels["num_gpu_blocks"]))
            except ValueError:
                pass
    m.kv_usage = usage_new if usage_new is not None else (usage_old or 0.0)
    return m


class MetricsScraper:
    def __init__(self, datastore: Datastore, interval_s: float = 0.05, timeout_s: float = 1.0):
        self.datastore = datastore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}
        self._sync_task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None
        self.first_round = asyncio.Event()
        self.failures = 0

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             connector=aiohttp.TCPConnector(limit=0))
        self._sync_task = asyncio.create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(0.2)

    def sync(self) -> None:
        eps = {e.name: e for e in self.datastore.all()}
        for name in list(self._tasks):
            if name not in eps or eps[name].address != self._tasks[name][0]:
                self._tasks.pop(name)[1].cancel()
        for name, e in eps.items():
            if name not in self._tasks:
                self._tasks[name] = (e.address, asyncio.create_task(self._loop(e)))

    async def scrape_once(self, e: Endpoint) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(f"http://{e.address}/metrics") as r:
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if e.healthy:
                log.warning("endpoint %s (%s) left the pool: /metrics failed: %s", e.name, e.address, exc)
            e.healthy = False
            self.failures += 1
            return False
        m = metrics_from_text(text)
        m.updated_at = time.monotonic()
        e.metrics = m
        if not e.healthy:
            log.info("endpoint %s (%s) is ready", e.name, e.address)
        e.healthy = True
        return True

    async def _loop(self, e: Endpoint) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once(e)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape_once(e) for e in self.datastore.all()))

    async def stop(self) -> None:
        if self._sync_task:
            self._sync_task.cancel()
        for _, t in self._tasks.values():
            t.cancel()
        self._tasks.clear()
        if self.session:
            await self.session.close()
