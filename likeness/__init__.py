"""Likeness: the job contract, the command line and the Python client of the service.

Importing this package is cheap (no torch, no web server): the API, the workers, the
CLI and client code all import :mod:`likeness.contract`.
"""

__version__ = "0.2.0"
