"""``likeness health``: one container health check per kind of process (Dockerfile, docker-compose.yml).

Each check exits 0 when the process does its work and 1 with one line saying what is wrong:

* ``http URL``: the URL answers 2xx (the API's ``/healthz``, Flower's ``/healthcheck``);
* ``worker``: a Celery worker on this host answers a ``ping`` through the broker (the consumer of this
  container, not any worker of the deployment: the ping goes to ``*@<hostname>`` alone);
* ``beat``: the broker accepts a connection and beat's schedule file exists (beat writes it at start);
* ``bot``: the API the bot talks to (``LIKENESS_API_URL``) answers ``/healthz``.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer

health_app = typer.Typer(help="Container health checks: exit 0 when healthy, 1 with the reason.",
                         no_args_is_help=True)


def _report(problem: str | None) -> None:
    if problem:
        typer.echo(f"unhealthy: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("ok")


def http_problem(url: str, timeout_s: float = 3.0) -> str | None:
    """None when ``url`` answers 2xx, else why not."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{url}: {type(exc).__name__}: {exc}"
    if not response.is_success:
        return f"{url} answered {response.status_code}"
    return None


def worker_problem(hostname: str | None = None, timeout_s: float = 5.0) -> str | None:
    """None when a worker node named ``*@<hostname>`` answers a ping, else why not. The first answer is
    enough: a healthy worker is reported at once, only a missing one waits out ``timeout_s``."""
    from worker.celery_app import celery_app

    hostname = hostname or socket.gethostname()
    try:
        replies = celery_app.control.inspect(pattern=f"*@{hostname}", matcher="glob", timeout=timeout_s,
                                             limit=1).ping()
    except Exception as exc:  # noqa: BLE001 - the broker is away: say so
        return f"broker unreachable: {type(exc).__name__}: {exc}"
    if not replies:
        return f"no worker on {hostname} answered a ping within {timeout_s:g} s"
    return None


def beat_problem() -> str | None:
    """None when the broker accepts a connection and beat's schedule file exists."""
    from core.config import get_settings
    from worker.celery_app import celery_app

    schedule = get_settings().data_dir / "celerybeat-schedule"
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # noqa: BLE001
        return f"broker unreachable: {type(exc).__name__}: {exc}"
    if not any(schedule.parent.glob(schedule.name + "*")):  # dbm adds a suffix on some platforms
        return f"no beat schedule at {schedule} (beat has not started)"
    return None


@health_app.command("http")
def http(url: str) -> None:
    """The URL answers 2xx."""
    _report(http_problem(url))


@health_app.command("worker")
def worker(
    hostname: Annotated[str | None, typer.Option(help="Host part of the node name (default: this host).")] = None,
) -> None:
    """A Celery worker of this host answers a ping through the broker."""
    _report(worker_problem(hostname))


@health_app.command("beat")
def beat() -> None:
    """The broker is reachable and beat has written its schedule."""
    _report(beat_problem())


@health_app.command("bot")
def bot() -> None:
    """The API the bot talks to (LIKENESS_API_URL) is alive."""
    api = os.environ.get("LIKENESS_API_URL")
    _report("LIKENESS_API_URL is not set" if not api else http_problem(api.rstrip("/") + "/healthz"))
