"""Real-ESRGAN via spandrel: exact sizes, tiling equals the untiled result."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.upscale import load_upscaler, upscale, upscaler_spec
from tests.conftest import noise_image


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((67, 45))  # odd sizes on purpose


@pytest.fixture(scope="module")
def x2(tiny_preset):
    return load_upscaler(tiny_preset.upscaler_x2)


@pytest.mark.parametrize("factor", [2, 4])
def test_output_size_is_exact(tiny_preset, photo, factor):
    model = load_upscaler(tiny_preset.upscaler_x2 if factor == 2 else tiny_preset.upscaler_x4)
    (small,) = upscale([photo], model, factor=factor, tile=64, overlap=8)
    assert small.size == (67 * factor, 45 * factor)
    (tiny,) = upscale([noise_image(5)], model)  # the factor defaults to the model's own
    assert tiny.size == (5 * factor, 5 * factor)


def test_tiled_matches_untiled(x2, photo):
    (whole,) = upscale([photo], x2, factor=2, tile=512, overlap=0)
    (tiled,) = upscale([photo], x2, factor=2, tile=48, overlap=8)
    diff = np.abs(np.asarray(whole, np.int16) - np.asarray(tiled, np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 8
    # Without overlap the seams show: the blend is what makes tiling match.
    (seams,) = upscale([photo], x2, factor=2, tile=32, overlap=0)
    assert np.abs(np.asarray(whole, np.int16) - np.asarray(seams, np.int16)).mean() > diff.mean()


def test_upscaling_changes_the_image_not_only_its_size(x2, photo):
    (up,) = upscale([photo], x2, factor=2)
    resized = photo.resize(up.size, Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(up, np.int16) - np.asarray(resized, np.int16)).mean() > 1


def test_bad_arguments(x2, photo):
    with pytest.raises(InvalidConfig) as err:
        upscale([photo], x2, factor=3)
    assert err.value.error_code == "invalid_upscale"
    with pytest.raises(InvalidConfig) as err:
        upscale([photo], x2, factor=4)
    assert err.value.error_code == "upscaler_scale_mismatch"
    with pytest.raises(InvalidConfig) as err:
        upscaler_spec("")
    assert err.value.error_code == "upscaler_required"


def test_the_spec_keys_the_weights_device_and_precision(tiny_preset):
    spec = upscaler_spec(tiny_preset.upscaler_x2, "cpu")
    assert spec.key == ("upscaler", tiny_preset.upscaler_x2, "cpu", "float32")
    assert upscaler_spec(tiny_preset.upscaler_x2, "cpu", half=True).key.dtype == "float16"
    assert spec.load().scale == 2
