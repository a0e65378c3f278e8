"""The one OpenAI error body every wideep HTTP surface answers with (server, sidecar, router).

`{"error": {"message", "type", "param", "code"}}` with vLLM's vocabulary: `type` is the exception-style
name of the status (BadRequestError, ServiceUnavailableError, ...) and `code` the HTTP status, exactly
as vLLM's ErrorResponse spells them, so a client cannot tell which hop answered. Torch-free.
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

RETRY_AFTER_S = 1   # what a 503 "nothing can serve this now" tells clients to wait


def error_type(status: int) -> str:
    try:
        return TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"


def error_body(message: str, status: int = 400, param: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": status}}


def error_bytes(message: str, status: int = 400, param: str | None = None, type: str | None = None) -> bytes:
    return json.dumps(error_body(message, status, param, type), ensure_ascii=False).encode()


def error_headers(status: int) -> dict[str, str]:
    """Content type, plus Retry-After on 503 so clients can tell an outage from a rejection."""
    h = {"Content-Type": "application/json"}
    if status == 503:
        h["Retry-After"] = str(RETRY_AFTER_S)
    return h


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.\-+@~]+){2,}/?")


def client_message(text: str, limit: int = 300) -> str:
    """An internal error's text as a client may see it: its first line, no file-system paths, bounded.

    Engine failures carry tracebacks (gloo, torch) whose paths and frames say nothing to a client
    and something to an attacker; the full text stays in the server log."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    line = _PATH.sub("<path>", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."
