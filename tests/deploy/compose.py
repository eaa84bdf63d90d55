"""docker-compose.yml read the way Compose reads it, far enough to start a service's command elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path = ROOT / "docker-compose.yml") -> dict:
    """The compose file with YAML anchors and ``<<`` merges resolved (PyYAML does both)."""
    return yaml.safe_load(path.read_text())


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` and ``$$``."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        found = variables.get(name, "")
        if op == ":?" and not found:
            raise KeyError(f"compose needs {name}: {arg}")
        if op == ":-" and not found:
            return arg
        return found

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value.replace("$$", "\0")).replace("\0", "$")


def service_environment(service: dict, variables: dict[str, str]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # `NAME=value`, or `NAME` alone: passed through from the shell when it is set there
        env = dict(item.split("=", 1) if "=" in item else (item, variables.get(item)) for item in env)
    return {key: interpolate(str(value), variables) for key, value in env.items() if value is not None}


def build_target(service: dict) -> str | None:
    build = service.get("build")
    return build.get("target") if isinstance(build, dict) else None


def healthcheck_argv(service: dict) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    return None


def with_port(argv: list[str], old: int, new: int) -> list[str]:
    """The command with a published port moved (``8000``, ``--port=8000``, ``http://host:8000/``)."""
    return [re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), arg) for arg in argv]
