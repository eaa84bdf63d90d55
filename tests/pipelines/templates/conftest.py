"""Fixtures for template mode: the real detectors, a small shipped template, a warm tiny engine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def masking(tiny_preset):
    """The bundled detectors, segmenter and pose estimator (real MediaPipe graphs), loaded once."""
    from pipelines.templates.masking import masking_models

    return masking_models("cpu").load()


@pytest.fixture(scope="session")
def id_photo():
    """The smallest shipped template (272x340, face ~115 px): cheap to composite and upscale."""
    from pipelines.templates.catalog import open_template

    return open_template("id_photo")


@pytest.fixture(scope="session")
def prepared(id_photo, masking):
    from pipelines.templates.masking import prepare_template

    return prepare_template(id_photo, masking)


@pytest.fixture(scope="session")
def template_preset(tiny_preset):
    """The tiny models inpainting at 64 px (a quarter of the pixels of 128): same code paths."""
    from pipelines.models.presets import with_overrides

    return with_overrides(tiny_preset, resolution=64)


@pytest.fixture(scope="session")
def template_engine(template_preset):
    """Every model template mode uses, on the CPU (no identity embedder: no reference photos here)."""
    from pipelines.templates.engine import TemplateEngine, template_models

    return TemplateEngine(template_preset, template_models(template_preset, "cpu", identity_backend="none").load())


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, tiny_preset):
    from tests.pipelines.generation.conftest import build_lora_adapter

    return build_lora_adapter(tmp_path_factory.mktemp("template-adapter") / "subject", tiny_preset, "<subj>", seed=5)
