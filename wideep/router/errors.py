"""OpenAI-style error bodies for answers the router gives itself (the shared encoder of wideep.utils.openai_errors)."""
from __future__ import annotations

from wideep.router.flow_control import REASON_HEADER
from wideep.router.types import SchedulingError
from wideep.utils.openai_errors import error_bytes
from wideep.utils.openai_errors import error_headers as _headers


def error_body(exc: SchedulingError) -> bytes:
    return error_bytes(exc.message, exc.status)


def error_headers(exc: SchedulingError) -> dict[str, str]:
    """429 names why it shed (flow control); 503 carries Retry-After: an outage, not a rejection."""
    h = {k.lower(): v for k, v in _headers(exc.status).items()}
    if exc.status == 429:
        h[REASON_HEADER] = exc.reason
    return h
