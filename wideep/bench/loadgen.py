"""Load generation: runs the configured stages against the server with asyncio + aiohttp.

Stage kinds follow inference-perf: `concurrent` keeps N requests in flight until num_requests
are done (scheduled over one second, so schedule_delay shows the queueing); `constant` spreads
rate*duration arrivals with exponential gaps rescaled to the duration; `poisson` draws a
Poisson count for every second. A `sweep` first probes the saturation rate, then runs
rate stages spaced linearly or geometrically up to it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

import aiohttp
import numpy as np

from .client import send_request
from .config import BenchConfig, ConfigError, LoadStage
from .datagen import Prompt
from .records import RequestRecord
from .tokenizer import BenchTokenizer


class ProgressSink(Protocol):
    def stage_started(self, stage_id: int, description: str, total: Optional[int]) -> None: ...
    def request_started(self) -> None: ...
    def request_finished(self, rec: RequestRecord) -> None: ...


class NullProgress:
    def stage_started(self, stage_id, description, total): pass
    def request_started(self): pass
    def request_finished(self, rec): pass


@dataclass
class StageResult:
    stage_id: int
    kind: str
    rate: Optional[float]  # requested rate; for concurrent stages num_requests (as inference-perf reports it)
    concurrency: Optional[int]
    duration: Optional[float]
    wall_start: float
    wall_end: float
    records: list[RequestRecord] = field(default_factory=list)


def constant_times(rate: float, duration: float, start: float, rng: np.random.Generator) -> list[float]:
    n = int(rate * duration)
    if n <= 0:
        return []
    gaps = rng.exponential(1 / rate, n)
    gaps *= duration / gaps.sum()
    return list(start + np.cumsum(gaps))


def poisson_times(rate: float, duration: float, start: float, rng: np.random.Generator) -> list[float]:
    out: list[float] = []
    t = start
    while t < start + duration:
        k = int(rng.poisson(rate))
        if k >= 1:
            out += constant_times(k, 1.0, t, rng)
        t += 1.0
    return [x for x in out if x <= start + duration]


class LoadGenerator:
    def __init__(self, cfg: BenchConfig, tok: Optional[BenchTokenizer], prompts: Iterator[Prompt], model: str,
                 progress: ProgressSink | None = None, seed: Optional[int] = None):
        self.cfg, self.tok, self.prompts, self.model = cfg, tok, prompts, model
        self.progress = progress or NullProgress()
        self.rng = np.random.default_rng(seed)
        self.in_flight = 0

    async def _one(self, session, stage_id: int, scheduled: float) -> RequestRecord:
        prompt = next(self.prompts)
        self.in_flight += 1
        self.progress.request_started()
        try:
            rec = await send_request(session, self.cfg, self.tok, prompt, self.model, stage_id, scheduled)
        finally:
            self.in_flight -= 1
        self.progress.request_finished(rec)
        return rec

    async def run_concurrent(self, session, stage_id: int, stage: LoadStage) -> list[RequestRecord]:
        n, conc = stage.num_requests, stage.concurrency_level
        t0 = time.perf_counter()
        records: list[RequestRecord] = []
        counter = iter(range(n))

        async def worker():
            for i in counter:
                sched = t0 + i / n
                if (delay := sched - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                records.append(await self._one(session, stage_id, sched))

        await asyncio.gather(*(worker() for _ in range(min(conc, n))))
        return records

    async def run_rate(self, session, stage_id: int, rate: float, duration: float, kind: str,
                       timeout: Optional[float] = None) -> list[RequestRecord]:
        t0 = time.perf_counter()
        times = (poisson_times if kind == "poisson" else constant_times)(rate, duration, t0, self.rng)
        limit = asyncio.Semaphore(max(1, self.cfg.load.num_workers * self.cfg.load.worker_max_concurrency))
        records: list[RequestRecord] = []

        async def gated(sched: float):
            async with limit:
                records.append(await self._one(session, stage_id, sched))

        tasks = []
        for sched in times:
            if (delay := sched - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(gated(sched)))
        grace = self.cfg.load.stage_teardown_grace_seconds if timeout is None else max(0.0, t0 + timeout - time.perf_counter())
        done, pending = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            now = time.perf_counter()
            records.extend(RequestRecord(stage_id, now, now, now, "", self.cfg.api.streaming,
                                         error_type="CancelledError", error_msg="cancelled at stage teardown")
                           for _ in range(len(pending)))
        return records

    async def _probe_saturation(self, session) -> list[LoadStage]:
        sweep = self.cfg.load.sweep
        samples: list[tuple[float, int]] = []
        finished = {"n": 0}

        class Counting(NullProgress):
            def request_finished(_, rec):
                finished["n"] += 1

        outer, self.progress = self.progress, Counting()

        async def sample():
            while True:
                samples.append((time.perf_counter(), self.in_flight))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        try:
            await self.run_rate(session, -1, sweep.num_requests / 5, 5, "constant", timeout=sweep.timeout)
        finally:
            sampler.cancel()
            self.progress = outer
        samples = [s for s in samples if s[0] < start + sweep.timeout]
        rates = [abs((b[1] - a[1]) / (b[0] - a[0])) for a, b in zip(samples, samples[1:]) if b[1] - a[1] < 0]
        if len(rates) <= 1:
            raise ConfigError("load.sweep: too few samples to find the saturation rate; raise sweep.num_requests or timeout")
        target = float(np.percentile(rates, sweep.saturation_percentile))
        if sweep.type == "geometric":
            stage_rates = [round(1 + target - r, 2) for r in np.geomspace(target, 1, num=sweep.num_stages)]
        else:
            stage_rates = [round(r, 2) for r in np.linspace(1, target, sweep.num_stages)]
        return [LoadStage(rate=float(r), duration=sweep.stage_duration) for r in stage_rates]

    async def run(self) -> list[StageResult]:
        load = self.cfg.load
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None)
        results: list[StageResult] = []
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            stages = list(load.stages)
            if load.sweep is not None:
                self.progress.stage_started(-1, "sweep: probing saturation", None)
                stages = await self._probe_saturation(session)
            for stage_id, stage in enumerate(stages):
                if stage_id:
                    await asyncio.sleep(load.interval)
                wall0 = time.time()
                if load.type == "concurrent":
                    self.progress.stage_started(stage_id, f"stage {stage_id}: concurrency {stage.concurrency_level}",
                                                stage.num_requests)
                    records = await self.run_concurrent(session, stage_id, stage)
                    res = StageResult(stage_id, "concurrent", float(stage.num_requests), stage.concurrency_level,
                                      None, wall0, time.time(), records)
                else:
                    self.progress.stage_started(stage_id, f"stage {stage_id}: {load.type} {stage.rate:g} req/s",
                                                int(stage.rate * stage.duration))
                    records = await self.run_rate(session, stage_id, stage.rate, stage.duration, load.type)
                    res = StageResult(stage_id, load.type, stage.rate, None, stage.duration, wall0, time.time(), records)
                results.append(res)
        return results
