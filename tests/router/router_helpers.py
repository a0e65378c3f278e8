"""Shared helpers for router tests: endpoints that look scraped and ready."""
from __future__ import annotations

import time

from wideep.router.types import ROLE_LABEL, Endpoint, LLMRequest


def ep(name, role=None, waiting=0, running=0, kv=0.0, inflight=0, tokens=0, address=None):
    e = Endpoint(name=name, address=address or f"10.0.0.{abs(hash(name)) % 250}:8000",
                 labels={ROLE_LABEL: role} if role else {})
    e.metrics.waiting, e.metrics.running, e.metrics.kv_usage = waiting, running, kv
    e.metrics.updated_at = time.monotonic() + 3600
    e.healthy = True
    e.inflight_requests, e.inflight_tokens = inflight, tokens
    return e


def request(prompt="hello", model="m", headers=None, chat=False):
    from wideep.router.director import Director  # noqa: F401  (parsing lives there)
    import json

    body = {"model": model, "messages": [{"role": "user", "content": prompt}]} if chat else {"model": model, "prompt": prompt}
    req = LLMRequest(body=body, headers=headers or {}, path="/v1/chat/completions" if chat else "/v1/completions")
    req.model = model
    req.prompt_text = json.dumps(body["messages"]) if chat else prompt
    req.prompt_bytes = req.prompt_text.encode()
    req.data["parsed"] = True
    return req
