"""OpenAI-style HTTP errors: every failure a client sees is `{"error": {message, type, param, code}}`."""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from wideep.errors import WideepError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(WideepError):
    """Raised anywhere in request handling; the app turns it into the error body and status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def json(self) -> str:
        return json.dumps(self.body())


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)
