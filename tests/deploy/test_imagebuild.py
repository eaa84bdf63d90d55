"""The daemon-free image builder's seed: what a pip step requires is lent from this run's venv, the rest installed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.imagebuild import Builder, Seed, required_from_seed, site_packages

DOCKERFILE = """\
FROM python:3.11-slim AS base
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /srv/app
COPY pyproject.toml constraints.txt ./
COPY hello.py ./

FROM base AS deps
RUN pip install -c constraints.txt ".[more]"
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "hello-seed"
version = "1.0"
dependencies = ["{dependency}"]

[project.optional-dependencies]
more = ["{extra}"]
unused = ["pluggy"]

[tool.setuptools]
py-modules = ["hello"]
"""


def seeded_context(root: Path, extra: str = "iniconfig") -> tuple[Path, dict[str, str]]:
    """A project needing pygments, with an extra ``more`` (``extra``) asked for by the step and an extra
    ``unused`` (pluggy) it does not ask for; its constraints pin what the seed holds (pytest needs all three)."""
    held = {name: importlib.metadata.version(name) for name in ("pygments", "iniconfig", "pluggy")}
    root.mkdir()
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "pyproject.toml").write_text(PYPROJECT.format(dependency="pygments", extra=extra))
    (root / "constraints.txt").write_text("".join(f"{name}=={version}\n" for name, version in held.items()))
    (root / "hello.py").write_text("import pygments\nVERSION = '1.0'\n")
    return root, held


def test_a_seeded_build_links_what_the_step_requires_and_pip_installs_the_rest(tmp_path):
    context, held = seeded_context(tmp_path / "context")
    seed = Seed(Path(sys.prefix))

    image = Builder(context / "Dockerfile", context, tmp_path / "build", seed).build("deps")

    assert image.lent == [f"iniconfig=={held['iniconfig']}", f"pygments=={held['pygments']}"]
    # only what the step required: not the extra it did not ask for, nothing else the seed holds (pytest, torch)
    assert image.frozen() == {"pygments": held["pygments"], "iniconfig": held["iniconfig"]}
    linked = site_packages(image.venv) / "pygments" / "__init__.py"
    assert os.path.samefile(linked, seed.site / "pygments" / "__init__.py")
    # the console script runs on the new venv's interpreter, not the seed's
    script = image.venv / "bin" / "pygmentize"
    assert script.read_text().splitlines()[0].startswith(f"#!{image.venv}/bin/python")
    assert subprocess.run([str(script), "-V"], capture_output=True, text=True, check=True).stdout.startswith("Pygments")
    # the project itself, which no seed holds, was built and installed by the step's own pip
    done = subprocess.run([str(image.venv / "bin" / "python"), "-c", "import hello; print(hello.VERSION)"],
                          cwd="/", capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1.0"


@pytest.mark.parametrize(("step", "lent"), [
    ('pip install -c constraints.txt ".[more]"', {"pygments", "iniconfig"}),
    ('pip install -c constraints.txt ".[more,unused]"', {"pygments", "iniconfig", "pluggy"}),
    ("pip install -c constraints.txt .", {"pygments"}),
    ("pip install pluggy", {"pluggy"}),
    ("pip install --no-deps -e .", set()),  # not a step whose requirements the seed should guess
])
def test_the_seed_lends_the_requirements_of_the_extras_the_step_names(tmp_path, step, lent):
    context, held = seeded_context(tmp_path / "context")
    assert required_from_seed(step, context, Seed(Path(sys.prefix))) == {name: held[name] for name in lent}


def test_a_version_the_constraints_or_the_requirement_rule_out_is_not_lent(tmp_path):
    context, held = seeded_context(tmp_path / "context", extra="iniconfig<0.1")
    seed = Seed(Path(sys.prefix))
    assert required_from_seed('pip install -c constraints.txt ".[more]"', context, seed) == {
        "pygments": held["pygments"]}
    (context / "constraints.txt").write_text("pygments==0.0.1\n")
    assert required_from_seed("pip install -c constraints.txt .", context, seed) == {}
