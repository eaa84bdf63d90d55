"""A Dockerfile read and carried out without a Docker daemon, far enough to run the image's commands.

``build(dockerfile, target, into)`` lays out the target's file system under ``into/rootfs`` the way its
COPY steps say (``.dockerignore`` applied, ``COPY --from=<stage>`` from that stage's own tree), creates an
EMPTY virtualenv for the image's ``VIRTUAL_ENV`` and runs every ``RUN pip ...`` step with bash in the image's
WORKDIR, the venv first on ``PATH``. Other RUN steps (apt-get, useradd, the venv itself) belong to the base
system and are listed in ``skipped``. The result knows the image's ENV, CMD and HEALTHCHECK, and maps the
image's absolute paths (``/opt/venv``, ``/srv/likeness``) to their places here.

A builder given a ``Seed`` (the distributions installed in this test run's own virtualenv) installs
faster and installs the same: before a ``pip install`` step runs, the step's requirements are followed through
the project's own metadata (the extras it names) and the seed's installed metadata, markers evaluated as pip
evaluates them; every distribution reached that the seed holds at a version the step's constraints and the
requiring specifier allow is hard-linked into the empty venv from the seed's files (as a wheel cache would
unpack the same wheel). Then the step runs unchanged: pip finds those requirements satisfied and resolves and
installs the rest (the project itself, anything the seed lacks or holds at another version). A distribution
the step does not require is never lent, so a dependency missing from the image's extras still fails the build.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import venv
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement


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
    lent: list[str] = field(default_factory=list)  # name==version of each distribution linked from the seed

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

    def distributions(self) -> set[str]:
        """``name==version`` of every distribution in the venv (pip and setuptools included)."""
        return {f"{canonical(dist.metadata['Name'])}=={dist.version}"
                for dist in importlib.metadata.distributions(path=[str(site_packages(self.venv))])}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def normalise_pin(line: str) -> tuple[str, str]:
    name, _, version = line.strip().partition("==")
    return canonical(name), version


def read_lock(path: Path) -> dict[str, str]:
    return dict(normalise_pin(line) for line in path.read_text().splitlines() if "==" in line
                and not line.startswith("#"))


class Seed:
    """The distributions installed in a virtualenv, lent file by file (hard links) to the venvs built here."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.site = site_packages(prefix)
        self.installed = {canonical(dist.metadata["Name"]): dist
                          for dist in importlib.metadata.distributions(path=[str(self.site)])}

    @classmethod
    def of_this_python(cls) -> Seed | None:
        """This interpreter's virtualenv (None outside one: nothing to lend)."""
        return cls(Path(sys.prefix)) if sys.prefix != sys.base_prefix else None

    def lend(self, wanted: dict[str, str], venv_dir: Path) -> list[str]:
        """Link every ``name -> version`` this seed holds at that version into ``venv_dir``; the
        ``name==version`` of each lent one."""
        lent = []
        for name, version in sorted(wanted.items()):
            dist = self.installed.get(name)
            if dist is not None and dist.version == version and dist.files:
                self._link(dist, venv_dir)
                lent.append(f"{name}=={version}")
        return lent

    def _link(self, dist: importlib.metadata.Distribution, venv_dir: Path) -> None:
        target_site = site_packages(venv_dir)
        seed_python = str(self.prefix).encode()
        for file in dist.files or ():
            source = Path(os.path.normpath(self.site / file))
            if not source.is_file():
                continue  # listed but not there (a .pyc never written)
            target = Path(os.path.normpath(target_site / file))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # a path two distributions share (opencv variants): the later wins, as pip
            with source.open("rb") as opened:
                head = opened.read(256)
            if head.startswith(b"#!") and seed_python in head.split(b"\n", 1)[0]:
                # a console script: its first line names the seed's interpreter
                target.write_bytes(source.read_bytes().replace(seed_python, str(venv_dir).encode(), 1))
                target.chmod(source.stat().st_mode)
                continue
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copy2(source, target)


def site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def required_from_seed(step: str, cwd: Path, seed: Seed) -> dict[str, str]:
    """What the seed can lend to ``step`` (a plain ``pip install`` of local projects or named requirements,
    with ``-c`` constraint files): ``name -> version`` of every distribution the step requires, followed
    from the projects' ``pyproject.toml`` through the seed's own metadata, that the seed holds at a version
    the requirement and the constraints allow. Empty for any other step (pip then installs everything)."""
    words = shlex.split(step)
    if words[:2] != ["pip", "install"]:
        return {}
    constraints: dict[str, Requirement] = {}
    requested: list[Requirement] = []
    projects: dict[str, dict] = {}
    rest = iter(words[2:])
    for word in rest:
        if word in ("-c", "--constraint"):
            for line in (cwd / next(rest)).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    constraint = Requirement(line)
                    constraints[canonical(constraint.name)] = constraint
        elif word.startswith("-"):
            return {}  # --no-deps, -e, -r, an index option: not a step to second-guess
        else:
            path, _, extras = word.partition("[")
            if (cwd / path / "pyproject.toml").is_file():
                project = tomllib.loads((cwd / path / "pyproject.toml").read_text())["project"]
                projects[canonical(project["name"])] = project
                requested.append(Requirement(f"{project['name']}[{extras}" if extras else project["name"]))
            else:
                try:
                    requested.append(Requirement(word))
                except InvalidRequirement:
                    return {}
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = list(requested)
    while queue:
        requirement = queue.pop()
        name, extras = canonical(requirement.name), frozenset(canonical(e) for e in requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name in projects:  # the image's own project: its dependencies and the extras asked for
            project = projects[name]
            lines = list(project.get("dependencies", []))
            for extra in extras:
                lines += project.get("optional-dependencies", {}).get(extra, [])
            queue += [r for r in map(Requirement, lines) if _applies(r, frozenset())]
            continue
        dist = seed.installed.get(name)
        if dist is None or not requirement.specifier.contains(dist.version, prereleases=True):
            continue
        if name in constraints and not constraints[name].specifier.contains(dist.version, prereleases=True):
            continue
        found[name] = dist.version
        queue += [r for r in map(Requirement, dist.requires or ()) if _applies(r, extras)]
    return found


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Whether a dependency line applies on this interpreter with ``extras`` asked of its distribution."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**default_environment(), "extra": extra})
               for extra in (extras | {""}))


class Builder:
    def __init__(self, dockerfile: Path, context: Path, into: Path, seed: Seed | None = None):
        self.context, self.into, self.seed = context, into, seed
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
        pip_steps, skipped, lent = [], [], []
        for stage in self.chain(target):
            for step in stage.steps:
                if step.op == "ENV":
                    env.update(parse_env(step.args, env))
                elif step.op == "WORKDIR":
                    workdir = os.path.join(workdir, step.args)
                    (rootfs / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
                elif step.op == "COPY":
                    self._copy(step.args, rootfs, workdir)
                elif step.op == "RUN":
                    if step.args.startswith("pip "):
                        pip_steps.append(step.args)
                        if venv_dir is None:
                            venv_dir = self._empty_venv(target, env)
                        lent += self._pip(step, rootfs / workdir.lstrip("/"), env, venv_dir, pip_timeout_s)
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
                          pip_steps, skipped, lent)

    def _empty_venv(self, target: str, env: dict[str, str]) -> Path:
        if "VIRTUAL_ENV" not in env:
            raise AssertionError("the image installs with pip before it sets VIRTUAL_ENV: pip would write into "
                                 "the system Python")
        path = self.into / target / "venv"
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        return path

    def _pip(self, step: Instruction, cwd: Path, image_env: dict[str, str], venv_dir: Path,
             timeout_s: float) -> list[str]:
        """Run the step (after lending the seed's copies of what it resolves); what was lent."""
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("LIKENESS_", "PYTHON"))]:
            del env[key]
        env.update({k: v for k, v in image_env.items() if k not in ("PATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")})
        env["VIRTUAL_ENV"] = str(venv_dir)  # PIP_NO_CACHE_DIR dropped: here pip may reuse the local wheel cache
        env["PIP_NO_COMPILE"] = "1"  # no .pyc written at install: the same packages, installed faster
        env["PATH"] = f"{venv_dir}/bin:{os.environ['PATH']}"
        lent = self.seed.lend(required_from_seed(step.args, cwd, self.seed), venv_dir) if self.seed else []
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", step.args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"Dockerfile line {step.line}: `RUN {step.args}` failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return lent

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

    def _copy(self, args: str, rootfs: Path, workdir: str) -> None:
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
                self._copy_tree(origin, dest_path, ignore, source.rstrip("/"))
            else:
                target = dest_path / origin.name if into_dir else dest_path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    def _copy_tree(self, origin: Path, dest: Path, ignore: list[str], prefix: str) -> None:
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
        dest.mkdir(parents=True, exist_ok=True)
