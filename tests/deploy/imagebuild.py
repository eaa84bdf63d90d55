"""A Dockerfile read and carried out without a Docker daemon, far enough to run the image's commands.

``build(dockerfile, target, into)`` lays out the target's file system under ``into/rootfs`` the way its
COPY steps say (``.dockerignore`` applied, ``COPY --from=<stage>`` from that stage's own tree), creates an
EMPTY virtualenv for the image's ``VIRTUAL_ENV`` and runs every ``RUN pip ...`` step with bash in the image's
WORKDIR, the venv first on ``PATH``. Other RUN steps (apt-get, useradd, the venv itself) belong to the base
system and are listed in ``skipped``. The result knows the image's ENV, CMD and HEALTHCHECK, and maps the
image's absolute paths (``/opt/venv``, ``/srv/likeness``) to their places here.

Like ``docker build``, a builder given a ``LayerCache`` keeps the venv its first ``pip`` step made (the
dependency layer) under the key of that step's inputs: every instruction before it in the target's chain, the
bytes of every file copied so far, this Python. A later build whose inputs match starts from that venv instead
of running the step again; any change to the lock, pyproject.toml or those instructions makes a new key. A
clean clone has no cache, so CI always installs from scratch.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    op: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str  # another stage's name or an external image
    steps: list[Instruction] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuation lines joined (comments and blank lines dropped)."""
    lines, current, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append((start, current + stripped))
        current = ""
    if current:
        lines.append((start, current))
    return lines


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name in file order)."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for number, line in logical_lines(text):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            words = rest.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stage = stages[name] = Stage(name, base)
        elif stage is None:
            if op == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stage.steps.append(Instruction(op, rest, number))
    return args, stages


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """``ENV K=V K2="V 2"`` with ``$VAR``/``${VAR}`` expanded from what is set so far."""
    found = {}
    for word in shlex.split(args):
        key, _, value = word.partition("=")
        found[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: {**env, **found}.get(m.group(1), ""), value)
    return found


def exec_form(args: str) -> list[str]:
    """``CMD ["a", "b"]`` (exec form) or ``CMD a b`` (shell form, as ``sh -c``)."""
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def read_dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    return [p.strip().rstrip("/") for p in path.read_text().splitlines() if p.strip() and not p.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's ignore rules for the patterns this repository uses (``**/x``, ``*.ext``, plain names)."""
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in relative.split("/")):
                return True
        elif fnmatch.fnmatch(relative, pattern) or relative.split("/")[0] == pattern:
            return True
    return False


@dataclass
class BuiltImage:
    """One target's file tree and venv, and what the image says about running it."""

    target: str
    rootfs: Path
    venv: Path
    workdir: Path  # inside rootfs
    image_workdir: str
    env: dict[str, str]  # the image's ENV (absolute image paths as written)
    cmd: list[str]
    healthcheck: list[str] | None
    pip_steps: list[str]
    skipped: list[str]
    cached_steps: list[str] = field(default_factory=list)  # pip steps whose venv came from the layer cache
    _lock: object = None  # the cached layer's lock, held while this image is in use

    def host_path(self, image_path: str) -> str:
        """An absolute path of the image, where it lies here."""
        if image_path == self.env.get("VIRTUAL_ENV") or image_path.startswith(self.env.get("VIRTUAL_ENV", "\0") + "/"):
            return str(self.venv) + image_path[len(self.env["VIRTUAL_ENV"]):]
        return str(self.rootfs) + image_path

    def run_env(self, **overrides: str) -> dict[str, str]:
        """A clean environment for the image's processes: its ENV with paths mapped, then ``overrides``.
        Nothing of the test process leaks in (no PYTHONPATH, no LIKENESS_* of the outer run)."""
        env = {"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
        for key, value in self.env.items():
            if key == "PATH":
                value = value.replace(self.env.get("VIRTUAL_ENV", "\0"), str(self.venv))
            elif value.startswith("/"):
                value = self.host_path(value)
            env[key] = value
        env["PATH"] = f"{self.venv}/bin:" + env["PATH"].replace(f"{self.venv}/bin:", "")
        env.update(overrides)
        return env

    def run(self, argv: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=timeout_s)

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        handle = log.open("w")
        return subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def frozen(self) -> dict[str, str]:
        """Installed distributions but the project itself (as .ci/lock leaves it out), normalised name -> version."""
        out = subprocess.run([str(self.venv / "bin" / "pip"), "freeze", "--exclude-editable"], check=True,
                             capture_output=True, text=True).stdout
        pins = dict(normalise_pin(line) for line in out.splitlines() if "==" in line and not line.startswith("#"))
        pins.pop("likeness", None)
        return pins


def normalise_pin(line: str) -> tuple[str, str]:
    name, _, version = line.strip().partition("==")
    return re.sub(r"[-_.]+", "-", name).lower(), version


def read_lock(path: Path) -> dict[str, str]:
    return dict(normalise_pin(line) for line in path.read_text().splitlines() if "==" in line
                and not line.startswith("#"))


class LayerCache:
    """Venvs of dependency layers, one folder per key; each taken under an exclusive lock while in use (a venv
    cannot move, so it is built and used where it is kept). Keeps the newest entry of each layer."""

    def __init__(self, root: Path):
        self.root = root

    def take(self, layer: str, key: str):  # noqa: ANN201 - (venv path, complete?, held lock)
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.root / key[:24]
        lock = (self.root / f"{key[:24]}.lock").open("w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete = (entry / "complete").exists()
        if not complete:
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir()
            (entry / "layer").write_text(layer)
        return entry / "venv", complete, lock

    def completed(self, venv_dir: Path) -> None:
        entry = venv_dir.parent
        (entry / "complete").write_text("")
        layer = (entry / "layer").read_text()
        for other in self.root.iterdir():  # older builds of the same layer: free their disk (GBs for the ML stack)
            label = other / "layer"
            if other != entry and label.is_file() and label.read_text() == layer:
                with (self.root / f"{other.name}.lock").open("w") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # in use by another run
                    shutil.rmtree(other, ignore_errors=True)


class Builder:
    def __init__(self, dockerfile: Path, context: Path, into: Path, cache: LayerCache | None = None):
        self.context, self.into, self.cache = context, into, cache
        self.args, self.stages = parse(dockerfile.read_text())
        self.ignore = read_dockerignore(context)
        self._trees: dict[str, tuple[Path, str]] = {}

    def chain(self, target: str) -> list[Stage]:
        stages = []
        name = target
        while name in self.stages:
            stages.insert(0, self.stages[name])
            name = self.stages[name].base
        return stages

    def build(self, target: str, pip_timeout_s: float = 1800) -> BuiltImage:
        if target not in self.stages:
            raise KeyError(f"no stage {target!r} in the Dockerfile (stages: {sorted(self.stages)})")
        rootfs = self.into / target / "rootfs"
        rootfs.mkdir(parents=True)
        venv_dir: Path | None = None
        env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        workdir = "/"
        cmd: list[str] = []
        healthcheck: list[str] | None = None
        pip_steps, skipped, cached_steps = [], [], []
        inputs = hashlib.sha256(sys.version.encode())  # what the next step's result depends on, as docker keys it
        lock = None
        for stage in self.chain(target):
            for step in stage.steps:
                inputs.update(f"{step.op} {step.args}\n".encode())
                if step.op == "ENV":
                    env.update(parse_env(step.args, env))
                elif step.op == "WORKDIR":
                    workdir = os.path.join(workdir, step.args)
                    (rootfs / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
                elif step.op == "COPY":
                    self._copy(step.args, rootfs, workdir, inputs)
                elif step.op == "RUN":
                    if step.args.startswith("pip "):
                        pip_steps.append(step.args)
                        if venv_dir is None and self.cache is not None:
                            venv_dir, complete, lock = self.cache.take(stage.name, inputs.hexdigest())
                            if complete:
                                cached_steps.append(step.args)
                                continue
                            self._empty_venv(target, env, venv_dir)
                            self._pip(step, rootfs / workdir.lstrip("/"), env, venv_dir, pip_timeout_s)
                            self.cache.completed(venv_dir)
                            continue
                        if venv_dir is None:
                            venv_dir = self._empty_venv(target, env)
                        self._pip(step, rootfs / workdir.lstrip("/"), env, venv_dir, pip_timeout_s)
                    else:
                        skipped.append(step.args)
                elif step.op == "CMD":
                    cmd = exec_form(step.args)
                elif step.op == "HEALTHCHECK":
                    body = re.sub(r"^(--\S+\s+)*", "", step.args)
                    healthcheck = None if body.upper() == "NONE" else exec_form(body.removeprefix("CMD").strip())
        if venv_dir is None:
            venv_dir = self._empty_venv(target, env)
        return BuiltImage(target, rootfs, venv_dir, rootfs / workdir.lstrip("/"), workdir, env, cmd, healthcheck,
                          pip_steps, skipped, cached_steps, lock)

    def _empty_venv(self, target: str, env: dict[str, str], path: Path | None = None) -> Path:
        if "VIRTUAL_ENV" not in env:
            raise AssertionError("the image installs with pip before it sets VIRTUAL_ENV: pip would write into "
                                 "the system Python")
        path = path or self.into / target / "venv"
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        return path

    def _pip(self, step: Instruction, cwd: Path, image_env: dict[str, str], venv_dir: Path, timeout_s: float) -> None:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("LIKENESS_", "PYTHON"))]:
            del env[key]
        env.update({k: v for k, v in image_env.items() if k not in ("PATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")})
        env["VIRTUAL_ENV"] = str(venv_dir)  # PIP_NO_CACHE_DIR dropped: here pip may reuse the local wheel cache
        env["PIP_NO_COMPILE"] = "1"  # no .pyc written at install: the same packages, installed faster
        env["PATH"] = f"{venv_dir}/bin:{os.environ['PATH']}"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", step.args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"Dockerfile line {step.line}: `RUN {step.args}` failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def _tree(self, stage: str) -> tuple[Path, str]:
        """A stage's files (for COPY --from): its COPY steps only, built once."""
        if stage not in self._trees:
            self.into.mkdir(parents=True, exist_ok=True)
            rootfs = Path(tempfile.mkdtemp(prefix=f"from-{stage}-", dir=self.into))
            workdir = "/"
            for chained in self.chain(stage):
                for step in chained.steps:
                    if step.op == "WORKDIR":
                        workdir = os.path.join(workdir, step.args)
                    elif step.op == "COPY":
                        self._copy(step.args, rootfs, workdir)
            self._trees[stage] = (rootfs, workdir)
        return self._trees[stage]

    def _copy(self, args: str, rootfs: Path, workdir: str, inputs=None) -> None:  # noqa: ANN001 - a hashlib hash
        words = shlex.split(args)
        flags = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        sources, dest = paths[:-1], paths[-1]
        dest_path = rootfs / os.path.join(workdir, dest).lstrip("/")
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for source in sources:
            if "--from" in flags:
                from_root, from_workdir = self._tree(flags["--from"])
                origin = from_root / os.path.join(from_workdir, source).lstrip("/")
                ignore: list[str] = []
            else:
                origin, ignore = self.context / source, self.ignore
                if ignored(source.rstrip("/"), ignore):
                    raise AssertionError(f"COPY {source}: .dockerignore excludes it, the image would lack it")
            if not origin.exists():
                raise AssertionError(f"COPY {source}: no such file in the build context")
            if origin.is_dir():
                self._copy_tree(origin, dest_path, ignore, source.rstrip("/"), inputs)
            else:
                target = dest_path / origin.name if into_dir else dest_path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
                if inputs is not None:
                    inputs.update(f"{target.relative_to(rootfs)}\n".encode() + origin.read_bytes())

    def _copy_tree(self, origin: Path, dest: Path, ignore: list[str], prefix: str, inputs=None) -> None:  # noqa: ANN001
        for path in sorted(origin.rglob("*")):
            relative = path.relative_to(origin).as_posix()
            if ignore and ignored(f"{prefix}/{relative}" if prefix not in ("", ".") else relative, ignore):
                continue
            target = dest / relative
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                if inputs is not None:
                    inputs.update(f"{prefix}/{relative}\n".encode() + path.read_bytes())
        dest.mkdir(parents=True, exist_ok=True)
