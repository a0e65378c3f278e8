"""One request's way through the router, shared by the ext_proc server and the built-in proxy:
parse -> flow control -> candidates (subset hint) -> producers -> schedule -> pre-request ->
response hooks. Errors come out as SchedulingError (503 no endpoint, 429 shed/saturated)."""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field

from wideep.router.config import PickerConfig
from wideep.router.datastore import Datastore
from wideep.router.flow_control import FlowController
from wideep.router.framework import DataProducer
from wideep.router.metrics import RouterMetrics
from wideep.router.tokenize import request_text
from wideep.router.types import (PARSED, Endpoint, LLMRequest, ProfileRunResult, SchedulingError, SchedulingResult,
                                 no_endpoints)

log = logging.getLogger(__name__)

DEST_HEADER = "x-gateway-destination-endpoint"


@dataclass
class Decision:
    req: LLMRequest
    result: SchedulingResult
    request_headers: dict[str, str] = field(default_factory=dict)   # to add to the upstream request
    finished: bool = False

    @property
    def target(self) -> Endpoint:
        return self.result.target

    @property
    def target_address(self) -> str:
        """Where the built-in proxy connects (the pod's primary port under the deprecated v0.5 primaryPort handlers)."""
        return self.result.destination_override or self.result.target.address

    @property
    def destination(self) -> str:
        if self.result.destination_override:
            return self.result.destination_override
        return ",".join(e.address for e in self.result.primary.targets)


class Director:
    def __init__(self, cfg: PickerConfig, datastore: Datastore, metrics: RouterMetrics | None = None,
                 failure_mode: str = "FailOpen"):
        if failure_mode not in ("FailOpen", "FailClose"):
            raise ValueError(f"failure mode {failure_mode!r}: use FailOpen or FailClose")
        self.cfg = cfg
        self.datastore = datastore
        self.metrics = metrics or RouterMetrics()
        self.failure_mode = failure_mode
        self.scheduler = cfg.scheduler()
        self.flow = FlowController(cfg.flow_control, cfg.saturation, cfg.flow_control_enabled)
        self._fallbacks_seen = 0
        self._async_producers = [p for p in cfg.producers
                                 if type(p).produce_async is not DataProducer.produce_async]

    # ---- request side ------------------------------------------------------------------------
    def parse_request(self, body: bytes, headers: dict[str, str], path: str) -> LLMRequest:
        """A body that is not a JSON object is still routed (at random), as llm-d does for no body."""
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past the limit
            doc = None
        req = LLMRequest(body=doc if isinstance(doc, dict) else {}, headers=headers, path=path.split("?")[0])
        if isinstance(doc, dict):
            req.model = str(doc.get("model") or "")
            req.prompt_text = request_text(doc, req.path.endswith("/chat/completions"))
            req.prompt_bytes = req.prompt_text.encode()
            req.data.put(PARSED, True)
        if headers.get("x-request-id"):
            req.request_id = headers["x-request-id"]
        return req

    def candidates(self, subset: list[str] | None = None) -> list[Endpoint]:
        eps = self.datastore.ready()
        if subset:
            allowed = set(subset)
            eps = [e for e in eps if e.address in allowed]
        return eps

    async def route(self, req: LLMRequest, subset: list[str] | None = None) -> Decision:
        self.metrics.requests.inc()
        try:
            await self.flow.admit(lambda: self.candidates(subset))
            if self._async_producers and req.data.get(PARSED):
                cands = self.screen(req, self.candidates(subset))
                for p in self._async_producers:
                    try:
                        await p.produce_async(req, cands)
                    except Exception:  # a producer's I/O failing must not fail the request
                        log.exception("producer %s failed for request %s", p.name, req.request_id)
            return self.schedule(req, subset)
        except SchedulingError as exc:
            self.metrics.errors.labels(str(exc.status), exc.reason).inc()
            raise

    def screen(self, req: LLMRequest, cands: list[Endpoint]) -> list[Endpoint]:
        """Every screener sees the same candidates; an endpoint stays if all of them keep it."""
        if not self.cfg.screeners:
            return cands
        if len(self.cfg.screeners) == 1:
            return self.cfg.screeners[0].screen(req, cands)
        keep = None
        for s in self.cfg.screeners:
            ids = {id(e) for e in s.screen(req, cands)}
            keep = ids if keep is None else keep & ids
        return [e for e in cands if id(e) in keep]

    def schedule(self, req: LLMRequest, subset: list[str] | None = None) -> Decision:
        t0 = time.perf_counter()
        cands = self.candidates(subset)
        if not cands:
            raise no_endpoints("no ready endpoint in the pool" + (" within the subset hint" if subset else ""))
        if self.cfg.screeners and req.data.get(PARSED):
            cands = self.screen(req, cands)
            if not cands:
                raise no_endpoints("the screeners left no endpoint")
        if not req.data.get(PARSED):
            result = _single(random.choice(cands))
        else:
            try:
                for p in self.cfg.producers:
                    p.produce(req, cands)
                result = self.scheduler.schedule(req, cands)
            except SchedulingError:
                raise
            except Exception:
                log.exception("scheduler failed for request %s", req.request_id)
                if self.failure_mode == "FailClose":
                    raise SchedulingError(503, "scheduler-error", "the router failed to schedule the request")
                result = _single(random.choice(cands))
        decision = Decision(req=req, result=result)
        for p in self.cfg.pre_request:
            p.pre_request(req, result, decision.request_headers)
        decision.request_headers[DEST_HEADER] = decision.destination
        self.metrics.scheduling_latency.observe(time.perf_counter() - t0)
        for name, r in result.profile_results.items():
            if r is not None and r.targets:
                self.metrics.picks.labels(name, r.targets[0].name).inc()
        fb = self.cfg.handler.fallbacks
        if fb != self._fallbacks_seen:
            self.metrics.pd_fallbacks.inc(fb - self._fallbacks_seen)
            self._fallbacks_seen = fb
        return decision

    # ---- response side -----------------------------------------------------------------------
    def response_headers(self, d: Decision, headers: dict[str, str]) -> None:
        for p in self.cfg.response_hooks:
            p.on_response_headers(d.req, d.result, headers)

    def response_body(self, d: Decision, chunk: bytes, end_of_stream: bool) -> None:
        if d.finished:
            return
        for p in self.cfg.response_hooks:
            p.on_response_body(d.req, d.result, chunk, end_of_stream)
        if end_of_stream:
            d.finished = True
            self.flow.notify()

    def finish(self, d: Decision) -> None:
        """End of the exchange however it ended (error, client gone): release in-flight load once."""
        self.response_body(d, b"", True)


def _single(ep: Endpoint) -> SchedulingResult:
    return SchedulingResult(primary_profile="random", profile_results={"random": ProfileRunResult([ep])})
