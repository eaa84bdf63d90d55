"""A preset's weights are checked before any work, from the local caches only, and ``auto`` picks the
real preset exactly when its weights are here."""

from __future__ import annotations

import time

import pytest

from pipelines.models import weights
from pipelines.models.weights import WeightsMissing, require_weights, resolve_preset


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, and the hub marked offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_preset.cache_clear()
    yield tmp_path / "models"
    resolve_preset.cache_clear()


def test_missing_weights_fail_at_once_in_one_line_with_the_command(empty_hub):
    started = time.monotonic()
    with pytest.raises(WeightsMissing) as missing:
        require_weights("sd15", empty_hub)
    assert time.monotonic() - started < 10  # the local caches only: no hub retries
    message = missing.value.message
    assert "\n" not in message and "preset sd15 is missing" in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "more" in message
    assert message.endswith("run: likeness models pull --preset sd15")
    assert missing.value.error_code == "weights_missing" and missing.value.details["missing"]


def test_the_tiny_preset_builds_itself_and_needs_nothing(empty_hub):
    require_weights("tiny", empty_hub)


def test_auto_is_tiny_without_real_weights_and_sd15_with_them(empty_hub, monkeypatch):
    assert resolve_preset("auto", empty_hub) == "tiny"
    assert resolve_preset("sd15", empty_hub) == "sd15"  # an explicit choice is kept (and checked before use)
    resolve_preset.cache_clear()
    monkeypatch.setattr(weights, "available", lambda ref, revision=None: True)  # as after `models pull`
    assert resolve_preset("auto", empty_hub) == "sd15"
    require_weights("sd15", empty_hub)


def test_settings_name_the_resolved_preset(empty_hub, monkeypatch):
    from core.config import Settings

    monkeypatch.delenv("LIKENESS_MODEL_PRESET", raising=False)
    assert Settings(model_preset="auto", model_cache_dir=empty_hub).preset == "tiny"
    assert Settings(model_cache_dir=empty_hub).model_preset == "auto"  # the embedded default
