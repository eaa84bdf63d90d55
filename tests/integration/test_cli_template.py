"""``likeness run PHOTOS --template NAME_OR_FILE``: template mode in the one-shot CLI (tiny preset, in-process).

A template that can never work fails in one line before any photo is examined or any step trained; a
shipped template runs intake, training and template mode and writes the ranked images and report.json.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import encode, noise_image
from tests.integration.test_cli_run import cli_env, photos_dir  # noqa: F401 - module fixtures reused
from tests.pipelines.intake.conftest import side_by_side

pytestmark = [pytest.mark.integration]


def _fails_in_one_line(argv, capsys, monkeypatch) -> str:  # noqa: ANN001
    from likeness_cli import main as cli

    monkeypatch.setattr(sys, "argv", ["likeness", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code not in (0, None)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_bad_templates_fail_in_one_line_before_intake(cli_env, photos_dir, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                      astronaut, grace_hopper):
    out = tmp_path / "out"
    run = ["run", str(photos_dir), "--out", str(out)]
    assert "one of them" in _fails_in_one_line(run, capsys, monkeypatch)
    assert "one of them" in _fails_in_one_line([*run, "--style", "anime", "--template", "astronaut"], capsys,
                                               monkeypatch)
    started = time.monotonic()
    line = _fails_in_one_line([*run, "--template", "no_such_template"], capsys, monkeypatch)
    assert "unknown_template" in line and time.monotonic() - started < 20  # nothing loaded, nothing trained
    assert "no template file" in _fails_in_one_line([*run, "--template", str(tmp_path / "missing.jpg")], capsys,
                                                    monkeypatch)
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(b"not an image")  # the upload's decode checks
    assert "template_not_an_image" in _fails_in_one_line([*run, "--template", str(notes)], capsys, monkeypatch)
    assert not (out / "report.json").exists()  # refused before anything ran: the inputs themselves were wrong
    two = tmp_path / "two.jpg"
    two.write_bytes(encode(side_by_side(astronaut, grace_hopper), quality=90))
    assert "template_multiple_people" in _fails_in_one_line([*run, "--template", str(two)], capsys, monkeypatch)
    assert json.loads((out / "report.json").read_text())["error"]["code"] == "template_multiple_people"
    empty = tmp_path / "empty.png"
    empty.write_bytes(encode(noise_image(300), "PNG"))
    line = _fails_in_one_line([*run, "--template", str(empty)], capsys, monkeypatch)
    assert "template_no_person" in line and str(out / "report.json") in line
    report = json.loads((out / "report.json").read_text())  # judged, so the verdict is kept like a photo set's
    assert report["status"] == "rejected" and report["error"]["code"] == "template_no_person"
    assert report["error"]["message"] and report["template"]["reason"] == "no_person"
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_run_with_a_shipped_template_writes_ranked_composites(cli_env, photos_dir, tmp_path):  # noqa: F811
    from likeness_cli.main import app
    from pipelines.templates.catalog import open_template

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(photos_dir), "--template", "id_photo", "--out", str(out), "--n", "2",
                                      "--k", "1", "--train-steps", "10", "--strength", "0.15", "--seed", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    for stage in ("masking", "intake", "training:stage2", "generating", "ranking", "upscaling"):
        assert stage in result.output, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["style"] == "template:id_photo" and report["request"]["template"]["strength"] == 0.15
    (best,) = report["candidates"]
    assert best["rank"] == 1 and len(report["all_candidates"]) == 2
    template = np.asarray(open_template("id_photo"))
    with Image.open(out / best["file"]) as image:
        composite = np.asarray(image.convert("RGB"))
    with Image.open(out / best["upscaled_file"]) as upscaled:
        assert upscaled.size == (544, 680)
    x0, y0, x1, y1 = report["template"]["mask_box"]  # as the service stores it on a template job's result
    outside = np.ones(template.shape[:2], bool)
    outside[round(y0) : round(y1), round(x0) : round(x1)] = False
    assert composite.shape == template.shape and np.array_equal(composite[outside], template[outside])
