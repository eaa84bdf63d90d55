"""Shared fixtures: tiny random-weight models and real public-domain photos."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_CACHE = Path(os.environ.get("LIKENESS_TEST_MODEL_CACHE",
                                  Path(__file__).resolve().parent.parent / ".likeness" / "test-models"))


@pytest.fixture(scope="session")
def tiny_preset():
    """The ``tiny`` preset, built once per machine (deterministic) and reused."""
    from pipelines.models.presets import get_preset

    return get_preset("tiny", MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_sdxl_preset():
    """The ``tiny-sdxl`` preset (SDXL's layout, random weights), built once per machine and reused."""
    from pipelines.models.presets import get_preset

    return get_preset("tiny-sdxl", MODEL_CACHE)


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def grace_hopper() -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(size: int = 256, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def sqlite_db(tmp_path, monkeypatch):
    """A migrated SQLite database as the process-wide default (what embedded mode uses)."""
    from core.config import get_settings
    from core.db.migrate import upgrade_to_head
    from core.db.session import dispose_engines

    for name in [k for k in os.environ if k.startswith("LIKENESS_")]:  # other test packages set some
        monkeypatch.delenv(name)
    monkeypatch.setenv("LIKENESS_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade_to_head()
    yield get_settings().resolved_database_url
    dispose_engines()
    get_settings.cache_clear()
