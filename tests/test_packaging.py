"""What a wheel of this repository ships: the licence text, typing markers, one version and the
dependencies its code imports."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "core", "likeness", "likeness_cli", "pipelines", "worker")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (the checkout stays clean of build folders)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("likeness-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_the_wheel_ships_the_apache_licence_text(wheel):
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    text = wheel.read(name).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" \
        in text
    assert _metadata(wheel)["License-Expression"] == "Apache-2.0"


def test_the_typed_packages_carry_their_marker(wheel):
    names = set(wheel.namelist())
    assert {"likeness/py.typed", "app/py.typed"} <= names


def test_one_version_everywhere(wheel):
    import likeness

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _metadata(wheel)["Version"] == declared == likeness.__version__
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d+", (ROOT / "likeness" / "__init__.py").read_text())  # no copy


def test_the_clip_tokenizers_pattern_library_is_a_declared_dependency(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    assert any(r.split(">")[0].split("=")[0].strip() == "regex" and "extra ==" not in r for r in requires), requires
