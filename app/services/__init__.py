"""Service layer: every query is scoped by the calling client; routes stay thin.

Services take a SQLAlchemy ``Session`` and the caller's :class:`~app.services.clients.Caller`,
raise :mod:`app.errors` domain errors and never commit (the route's session scope does).
"""
