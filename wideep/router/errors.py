"""OpenAI-style error bodies for answers the router gives itself."""
from __future__ import annotations

import json

from wideep.router.flow_control import REASON_HEADER
from wideep.router.types import SchedulingError


def error_body(exc: SchedulingError) -> bytes:
    kind = "rate_limit_error" if exc.status == 429 else "service_unavailable"
    return json.dumps({"error": {"message": exc.message, "type": kind, "param": None, "code": exc.status}}).encode()


def error_headers(exc: SchedulingError) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if exc.status == 429:
        h[REASON_HEADER] = exc.reason
    return h
