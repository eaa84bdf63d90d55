"""The daemon-free image builder's seed: what a pip step resolves is lent from this run's venv, the rest installed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.imagebuild import Builder, Seed, site_packages

DOCKERFILE = """\
FROM python:3.11-slim AS base
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /srv/app
COPY pyproject.toml ./
COPY hello.py ./

FROM base AS deps
RUN pip install .
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "hello-seed"
version = "1.0"
dependencies = ["{dependency}"]

[tool.setuptools]
py-modules = ["hello"]
"""


def test_a_seeded_build_links_what_the_step_resolves_and_pip_installs_the_rest(tmp_path):
    pygments = importlib.metadata.version("pygments")  # in the seed: pytest depends on it
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "pyproject.toml").write_text(PYPROJECT.format(dependency=f"pygments=={pygments}"))
    (context / "hello.py").write_text("import pygments\nVERSION = '1.0'\n")
    seed = Seed(Path(sys.prefix))

    image = Builder(context / "Dockerfile", context, tmp_path / "build", seed).build("deps")

    assert image.lent == [f"pygments=={pygments}"]
    # only what the step resolved: nothing else the seed holds (pytest, torch, ...) came along
    assert image.frozen() == {"pygments": pygments}
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
