"""Likeness: the job contract, the command line and the Python client of the service.

Importing this package is cheap (no torch, no web server): the API, the workers, the
CLI and client code all import :mod:`likeness.contract`.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one version source: pyproject.toml's, as installed
    __version__ = version("likeness")
except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
    __version__ = "0+unknown"
