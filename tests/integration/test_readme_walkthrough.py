"""The README is a test: its REST walkthrough, run verbatim with bash, against ``likeness serve`` on the
embedded default (SQLite, local blobs, a local worker, the tiny preset) started in an empty folder as a
new user would, with real photos in ``photos/`` (the embedded-mode tests' shared service,
tests/integration/embedded.py). Any failed step fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.integration import embedded
from tests.integration.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTION = "## Walk through the REST flow"
WALKTHROUGH_BUDGET_S = 300  # the README promises about two minutes on a 2-core CPU; shared CI machines are slower


def walkthrough() -> str:
    """The first bash block of the README's walkthrough section, exactly as printed."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def folder(embedded_service) -> Path:
    """The user's folder ``likeness serve`` was started in: photos/ of one person, data/ from serve."""
    return embedded_service.folder


@pytest.fixture(scope="module")
def service(embedded_service) -> str:
    return embedded_service.base


def _run(script: str, folder: Path, api: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=folder, env=embedded.user_env(API=api), capture_output=True,
                          text=True, timeout=timeout_s)


def test_the_readme_walkthrough_runs_verbatim_and_downloads_the_best_image(folder, service):
    started = time.monotonic()
    done = _run(walkthrough(), folder, service, WALKTHROUGH_BUDGET_S)
    took = time.monotonic() - started
    print(f"README walkthrough: {took:.0f} s\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}")
    assert done.returncode == 0, f"stdout:\n{done.stdout[-5000:]}\nstderr:\n{done.stderr[-5000:]}"
    assert "Traceback" not in done.stderr
    assert "the best portrait: best.png" in done.stdout
    with Image.open(folder / "best.png") as best, Image.open(folder / "best_x2.png") as upscaled:
        assert best.format == "PNG" and upscaled.size == (2 * best.width, 2 * best.height)

    # "best" is the best: the listing the walkthrough printed has rank 1 first, and best.png is that image
    listings = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"data"')]
    images = next(page["data"] for page in listings if page["data"] and "rank" in page["data"][0])
    assert [image["rank"] for image in images] == sorted(image["rank"] for image in images) and images[0]["rank"] == 1
    assert len(images) == 4  # best 4 of 8
    store = folder / "data" / "blobs"
    stored = next(store.rglob(f"{images[0]['id']}.png"))
    assert stored.read_bytes() == (folder / "best.png").read_bytes()


def test_a_failing_step_shows_the_apis_answer_and_stops(folder, service, tmp_path):
    """Photos that are no photos: the upload is 422 all_files_rejected; the walkthrough prints that answer
    (code and message), runs nothing after it and exits non-zero, with no Python traceback."""
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "photos" / "notes.jpg").write_bytes(b"shopping list: milk, eggs\n")
    (user / "data").mkdir()
    (user / "data" / "admin_api_key").write_text((folder / "data" / "admin_api_key").read_text())
    done = _run(walkthrough(), user, service, 60)
    assert done.returncode != 0
    assert "failed (HTTP 422)" in done.stderr and "all_files_rejected" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr
    assert not (user / "best.png").exists()
