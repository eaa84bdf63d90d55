"""``likeness run --preset tiny-sdxl``: photos in, staged SDXL training, ranked and upscaled images out."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.integration.test_cli_run import STYLE, TINY_SIZE, cli_env, photos_dir  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_on_tiny_sdxl_trains_both_encoders_and_writes_ranked_images(cli_env, photos_dir, tmp_path):  # noqa: F811
    from likeness_cli.main import app
    from pipelines.adapters import load_manifest

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(photos_dir), "--preset", "tiny-sdxl", "--style", STYLE, "--out",
                                      str(out), "--n", "2", "--k", "1", "--train-steps", "10", "--seed", "3",
                                      "--device", "cpu"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "tiny-sdxl" and report["training"]["steps"] == 10
    assert sum(report["training"]["stages"].values()) == 10  # training:stage1 (both encoders) and :stage2
    (best,) = report["candidates"]
    assert best["rank"] == 1 and {"aesthetic", "identity", "text", "combined"} <= set(best["scores"])
    with Image.open(out / best["upscaled_file"]) as image:
        assert image.size == (2 * TINY_SIZE, 2 * TINY_SIZE)
    (manifest_path,) = out.rglob("adapter/manifest.json")
    manifest = load_manifest(manifest_path.parent)
    assert (manifest.family, manifest.preset) == ("sdxl", "tiny-sdxl")
    assert set(manifest.components) == {"unet", "text_encoder", "text_encoder_2"}


def test_a_template_job_on_tiny_sdxl_keeps_every_pixel_outside_the_mask(cli_env, photos_dir, tmp_path):  # noqa: F811
    """Template mode on the second family: SDXL inpainting + ControlNet puts the subject into a shipped photo."""
    import numpy as np

    from likeness_cli.main import app
    from pipelines.templates.catalog import open_template

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(photos_dir), "--preset", "tiny-sdxl", "--template", "id_photo",
                                      "--out", str(out), "--n", "2", "--k", "1", "--train-steps", "10", "--seed", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "tiny-sdxl" and report["style"] == "template:id_photo"
    (best,) = report["candidates"]
    template = np.asarray(open_template("id_photo"))
    with Image.open(out / best["file"]) as image:
        composite = np.asarray(image.convert("RGB"))
    x0, y0, x1, y1 = report["template"]["mask_box"]
    outside = np.ones(template.shape[:2], bool)
    outside[round(y0) : round(y1), round(x0) : round(x1)] = False
    assert composite.shape == template.shape and np.array_equal(composite[outside], template[outside])
    assert not np.array_equal(composite[~outside], template[~outside])  # the subject went in
