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
# One compute thread per process, here and in every worker, API and CLI process a test starts (they inherit
# it): the suite already runs a process per core (pytest-xdist) beside the workers its tests start, and torch's
# default of a thread per core in each of them oversubscribes the cores, its OpenMP threads spinning while
# they wait for one. tests/pipelines/training on 2 cores: 146 s and 272 CPU-s -> 45 s and 72 CPU-s. Set before
# anything imports torch (OpenMP reads it once); an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# ---- parallel runs (pytest-xdist: ``-n auto --dist loadfile`` in pyproject's addopts) -------------------------
#
# A test module runs whole on one worker (its module and session fixtures are built once). Modules that
# share an expensive session fixture are one unit of work (``SAME_WORKER``): they run one after the other
# on one worker. Units with slow tests are handed out first, then those with integration tests, so that
# quick ones fill the gaps at the end. (xdist's own ``xdist_group`` marker does not reach its scheduler
# with pytest 9, whose node ids can no longer be renamed; hence the scheduler below.)

#: module -> the unit of work it shares with other modules
SAME_WORKER = {
    # one `likeness serve` (tests/integration/embedded.py)
    "tests/integration/test_embedded_queues.py": "embedded-serve",
    "tests/integration/test_embedded_serve.py": "embedded-serve",
    "tests/integration/test_readme_walkthrough.py": "embedded-serve",
    # one uvicorn, one CPU-queue and one GPU-queue worker (tests/integration/conftest.py: api, split_workers)
    "tests/integration/test_e2e_http.py": "split-service",
    "tests/integration/test_bot_e2e.py": "split-service",
}


def work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return SAME_WORKER.get(module, module)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):  # noqa: ANN001, ANN201
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesAndSharedUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModulesAndSharedUnits(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    if not hasattr(config, "workerinput"):  # not an xdist worker: the order stays as collected
        return
    slow = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}
    integration = {work_unit(item.nodeid) for item in items if item.get_closest_marker("integration")}

    def handed_out(item) -> int:  # noqa: ANN001
        unit = work_unit(item.nodeid)
        return 0 if unit in slow else 1 if unit in integration else 2

    items.sort(key=handed_out)  # stable: each module keeps its order


def pytest_collection_finish(session) -> None:  # noqa: ANN001
    """Everything collection imported (torch, diffusers, transformers, the app: hundreds of thousands of objects
    that live as long as the process) is moved out of the cyclic garbage collector's sight: each full
    collection, those Python runs on its own and the explicit ones (a model eviction's), then walks only what
    the tests made (tests/pipelines/training/test_steps.py and test_trainer.py: 42.7 -> 37.5 s)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    """The figures the fault tests record (tests/faults: ``("fault recovery", (fault, figures))`` in a
    test's user properties), read from the reports, where pytest-xdist workers send them too."""
    recorded: dict[str, dict] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "fault recovery":
                    fault, figures = value
                    recorded[fault] = figures
    if recorded:
        terminalreporter.section("fault recovery")
        for fault, figures in recorded.items():
            terminalreporter.write_line(f"{fault}: " + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
