"""The daemon-free image builder's layer cache: reused while a step's inputs hold, rebuilt when they change."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.imagebuild import Builder, LayerCache

DOCKERFILE = """\
FROM python:3.11-slim AS base
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /srv/app
COPY pyproject.toml ./
COPY hello.py ./

FROM base AS deps
RUN pip install --no-deps .
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "hello-layer"
version = "{version}"

[tool.setuptools]
py-modules = ["hello"]
"""


def _context(folder: Path, version: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "Dockerfile").write_text(DOCKERFILE)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    (folder / "hello.py").write_text(f"VERSION = {version!r}\n")
    return folder


def _version(image) -> str:  # noqa: ANN001 - BuiltImage
    done = subprocess.run([str(image.venv / "bin" / "python"), "-c", "import hello; print(hello.VERSION)"],
                          cwd="/", capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_dependency_layer_is_reused_until_its_inputs_change_and_the_old_one_is_freed(tmp_path):
    context = _context(tmp_path / "context", "1.0")
    cache = LayerCache(tmp_path / "cache")

    def build(run: str):  # noqa: ANN202
        return Builder(context / "Dockerfile", context, tmp_path / run, cache).build("deps")

    first = build("a")
    assert first.cached_steps == [] and _version(first) == "1.0"
    first._lock.close()  # the first run is over: its layer is free
    again = build("b")
    assert again.cached_steps == again.pip_steps and again.venv == first.venv and _version(again) == "1.0"
    again._lock.close()

    _context(context, "2.0")  # a copied file changed: a new key, the step runs again
    changed = build("c")
    assert changed.cached_steps == [] and changed.venv != first.venv and _version(changed) == "2.0"
    assert not first.venv.exists()  # the superseded build of the same layer is gone
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [changed.venv.parent.name]
