"""Routers of the ``/v1`` API.

Each router carries the full ``/v1/...`` prefix itself (rather than ``include_router(prefix=)``)
so the matched route's ``path`` is the whole template the metrics label requests with.
"""

API_PREFIX = "/v1"
