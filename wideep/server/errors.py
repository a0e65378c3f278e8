"""The frontend's HTTP errors: raise APIError anywhere in request handling; the app answers with the
shared OpenAI error body (wideep.utils.openai_errors)."""
from __future__ import annotations

import json
from typing import Any

from wideep.errors import WideepError
from wideep.utils.openai_errors import error_body, error_headers, error_type


class APIError(WideepError):
    """Raised anywhere in request handling; the app turns it into the error body and status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.type)

    def json(self) -> str:
        return json.dumps(self.body())

    def headers(self) -> dict[str, str]:
        return error_headers(self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)
