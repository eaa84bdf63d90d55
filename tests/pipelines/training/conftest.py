"""What the trainer's tests share: the tiny preset at 32 px (16x16 latents, fast) and two real photos."""

from __future__ import annotations

import pytest

from pipelines.models.presets import with_overrides
from pipelines.types import TrainingExample


@pytest.fixture(scope="module")
def preset(tiny_preset):
    return with_overrides(tiny_preset, resolution=32)


@pytest.fixture(scope="module")
def examples(astronaut, grace_hopper):
    return [TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a"),
            TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]
