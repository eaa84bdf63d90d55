"""The one exception the client raises.

Every failure, whatever its origin, is a :class:`LikenessError` with the API's stable
``code`` to switch on, a human ``message``, structured ``details`` and the HTTP ``status``:

* an API error answer (4xx/5xx): its ``{code, message, details}`` body, as sent;
* the API unreachable, a timeout, a broken connection: ``status`` is ``None`` and ``code`` is
  :data:`UNREACHABLE` or :data:`TIMEOUT` (``transient`` is true: try again later);
* an answer that is not the API's (a proxy's HTML page, a non-JSON body): ``code`` is
  ``http_<status>``.
"""

from __future__ import annotations

from typing import Any

import httpx

UNREACHABLE = "api_unreachable"
TIMEOUT = "api_timeout"
WAIT_TIMEOUT = "wait_timeout"
INVALID_RESPONSE = "invalid_response"

#: HTTP statuses worth retrying later (the service or a proxy in front of it is briefly unable).
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})


class LikenessError(Exception):
    """An error from (or on the way to) the Likeness API."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *,
                 status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.message, self.details, self.status = code, message, details or {}, status
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        """True when the same request may succeed later (API down, overloaded, timed out)."""
        return self.status is None and self.code in (UNREACHABLE, TIMEOUT) or self.status in TRANSIENT_STATUSES

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        return f"{self.message} ({self.code}, {where})"

    def __repr__(self) -> str:
        return f"LikenessError(code={self.code!r}, status={self.status!r}, message={self.message!r})"

    def __reduce__(self):  # picklable like any exception crossing processes
        return (_rebuild, (self.code, self.message, self.details, self.status, self.retry_after_s))


def _rebuild(code, message, details, status, retry_after_s) -> LikenessError:  # noqa: ANN001
    return LikenessError(code, message, details, status=status, retry_after_s=retry_after_s)


def from_response(response: httpx.Response) -> LikenessError:
    """The error an API answer of status >= 400 stands for."""
    retry_after = _retry_after(response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        return LikenessError(body["code"], str(body.get("message") or body["code"]), details,
                             status=response.status_code, retry_after_s=retry_after)
    text = response.text[:200].strip() if response.content else ""
    return LikenessError(f"http_{response.status_code}",
                         f"The API answered HTTP {response.status_code}{': ' + text if text else ''}.",
                         status=response.status_code, retry_after_s=retry_after)


def from_transport(exc: httpx.TransportError, url: str) -> LikenessError:
    """The error a failed connection or a timeout stands for (no answer from the API)."""
    if isinstance(exc, httpx.TimeoutException):
        return LikenessError(TIMEOUT, f"The Likeness API at {url} did not answer in time.",
                             {"error": type(exc).__name__})
    return LikenessError(UNREACHABLE, f"Could not reach the Likeness API at {url}: {exc or type(exc).__name__}.",
                         {"error": type(exc).__name__})


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
