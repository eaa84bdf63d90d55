"""The shipped templates: at least six, small, licensed, packaged, and each usable (one person, a face)."""

from __future__ import annotations

import fnmatch
import io
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from pipelines.templates.catalog import LIBRARY_DIR, LICENSES_FILE, get_template, list_templates, thumbnail_jpeg

ROOT = Path(__file__).resolve().parents[3]


def test_at_least_six_small_templates_each_with_its_licence_noted():
    templates = list_templates()
    assert len(templates) >= 6
    licences = LICENSES_FILE.read_text()
    for template in templates:
        assert template.path.stat().st_size < 100 * 1024, template.name
        assert f"`{template.file}`" in licences and f"`{template.source}`" in licences, template.name
        assert template.licence and template.caption.strip()
    listed = {t.file for t in templates}
    images = {p.name for p in LIBRARY_DIR.iterdir() if p.suffix == ".jpg"}
    assert images == listed  # no unlisted (unlicensed) picture ships


def test_the_library_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipelines"]
    for path in LIBRARY_DIR.iterdir():
        relative = path.relative_to(ROOT / "pipelines").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_unknown_template_names_the_known_ones():
    from pipelines.errors import InvalidConfig

    with pytest.raises(InvalidConfig) as err:
        get_template("no_such_template")
    assert err.value.error_code == "unknown_template"
    assert set(err.value.details["known"]) == {t.name for t in list_templates()}


def test_thumbnails_are_small_jpegs():
    for template in list_templates():
        with Image.open(io.BytesIO(thumbnail_jpeg(template.name))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 256


def test_every_shipped_template_passes_the_intake_rule_and_is_placed(masking):
    """Exactly one person with a face of at least 64 px, found by the real detectors: a shipped template
    never fails a job. Its mask covers the face and stays inside the crop square."""
    from pipelines.templates.catalog import open_template
    from pipelines.templates.masking import MIN_FACE_PX, prepare_template

    for template in list_templates():
        prepared = prepare_template(open_template(template.name), masking)
        face = prepared.face
        assert max(face.width, face.height) >= MIN_FACE_PX, template.name
        mask_box, crop = prepared.region.mask_box, prepared.region.crop.box
        assert mask_box.x0 <= face.x0 and mask_box.y0 <= max(face.y0, 0) and mask_box.x1 >= face.x1, template.name
        assert crop.x0 <= mask_box.x0 and crop.y0 <= mask_box.y0 and crop.x1 >= mask_box.x1, template.name
        assert crop.y1 >= mask_box.y1, template.name
