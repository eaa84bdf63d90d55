"""Routers of the ``/v1`` API.

Each router carries the full ``/v1/...`` prefix itself (rather than ``include_router(prefix=)``)
so the matched route's ``path`` is the whole template the metrics label requests with.
"""

API_PREFIX = "/v1"


def operation_id(route) -> str:  # noqa: ANN001 - a fastapi.routing.APIRoute
    """A route's OpenAPI ``operationId``: its handler's name (``start_training``, ``get_job``), the method
    name a generated client gives it. Operator routes prefix ``admin_`` (their router says so)."""
    return route.name
