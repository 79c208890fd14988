"""The service's error hierarchy, each type mapped to an HTTP status in one place.

Every error reaches the client as `{"error": {"type": ..., "message": ...}}`.
"""

from __future__ import annotations


class QuaverError(Exception):
    """Base class: an error with an HTTP status and a stable machine-readable type."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message}}


class BadRequest(QuaverError):
    status, type = 400, "bad_request"


class Unauthorized(QuaverError):
    status, type = 401, "unauthorized"


class NotFound(QuaverError):
    status, type = 404, "not_found"


class BodyTimeout(QuaverError):
    """The request body stopped arriving (QUAVER_BODY_TIMEOUT_S without a byte)."""

    status, type = 408, "body_timeout"


class PayloadTooLarge(QuaverError):
    status, type = 413, "payload_too_large"


class AudioTooLong(QuaverError):
    status, type = 413, "audio_too_long"


class UnsupportedMediaType(QuaverError):
    status, type = 415, "unsupported_media_type"


class InvalidInput(QuaverError):
    status, type = 422, "invalid_input"


class LimitExceeded(InvalidInput):
    """A request over one of the bounds on its cost (app/limits.py); `limit` names the bound."""

    type = "limit_exceeded"

    def __init__(self, limit: str, value: int, bound: int, message: str) -> None:
        super().__init__(message)
        self.limit, self.value, self.bound = limit, value, bound

    def body(self) -> dict:
        body = super().body()
        body["error"].update(limit=self.limit, value=self.value, bound=self.bound)
        return body


class Overloaded(QuaverError):
    status, type = 503, "overloaded"


class NotReady(QuaverError):
    status, type = 503, "not_ready"


class InferenceTimeout(QuaverError):
    """The request's deadline (QUAVER_REQUEST_TIMEOUT_S, queueing included) passed: 503 with
    Retry-After, like the other capacity errors, since retrying later can succeed."""

    status, type = 503, "timeout"


class ShuttingDown(QuaverError):
    """The server is draining after SIGTERM: queued and late requests get this."""

    status, type = 503, "shutting_down"
