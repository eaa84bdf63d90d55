"""The one-shot CLI, in-process: ``likeness run PHOTOS_DIR --style STYLE --out OUT_DIR``.

Tiny random-weight preset (the tests' prebuilt models, found through
``LIKENESS_MODEL_CACHE_DIR`` as a user's install would), six distinct photos of Grace
Hopper plus a text file named ``.jpg``. Asserts what the user gets: exit code, the
progress per stage, ``report.json`` and the ranked images on disk.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import MODEL_CACHE, encode
from tests.pipelines.intake.conftest import person_variants

pytestmark = [pytest.mark.integration]

CLASS_WORDS = {"girl", "man", "boy", "baby"}
TINY_SIZE = 128  # the tiny preset's resolution; rank_XX_x2.png is twice that


# A 1:1 style without a ControlNet template: the CLI has no --steps, so the style's 25 steps
# run for every candidate, and a pose ControlNet would double that cost on this CPU.
STYLE = "pencil_sketch"
N, K, TRAIN_STEPS = 4, 2, 10  # 10: the fewest steps a TrainRequest accepts


@pytest.fixture(scope="module")
def cli_env(tiny_preset, tmp_path_factory):
    """Settings as a user sets them: the prebuilt tiny models, a data dir of the test's own."""
    from core.config import get_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIKENESS_MODEL_CACHE_DIR", str(MODEL_CACHE))
        patch.setenv("LIKENESS_DATA_DIR", str(tmp_path_factory.mktemp("cli-data")))
        patch.setenv("LIKENESS_MODEL_PRESET", "tiny")
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()  # other tests read their own environment again


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory, grace_hopper) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, variant in enumerate(person_variants(grace_hopper, 6)):
        (folder / f"grace_{i}.jpg").write_bytes(encode(variant, quality=92))
    (folder / "notes.jpg").write_bytes(b"shopping list: milk, eggs\n")  # a text file renamed .jpg
    return folder


@pytest.fixture(scope="module")
def cli_run(cli_env, photos_dir, tmp_path_factory):
    """One ``likeness run`` shared by the tests below: (CliRunner result, output folder, report)."""
    from likeness_cli.main import app

    out = tmp_path_factory.mktemp("run") / "out"
    result = CliRunner().invoke(app, ["run", str(photos_dir), "--style", STYLE, "--out", str(out), "--n", str(N),
                                      "--k", str(K), "--train-steps", str(TRAIN_STEPS), "--seed", "3",
                                      "--device", "cpu"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result, out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_run_shows_progress_per_stage_and_a_summary(cli_run):
    result, out, _ = cli_run
    for stage in ("intake", "caching", "training:stage1", "training:stage2", "generating", "ranking", "upscaling"):
        assert stage in result.output, result.output
    summary = result.output.replace("\n", "")
    assert "class token" in summary and f"{K} images and report.json" in summary and str(out) in summary


@pytest.mark.slow
def test_report_has_per_photo_intake_and_class_token(cli_run):
    _, _, report = cli_run
    photos = {p["file"].removesuffix(".jpg"): p for p in report["photos"]}
    assert set(photos) == {f"grace_{i}" for i in range(6)} | {"notes"}
    assert len({p["photo_id"] for p in photos.values()}) == 7  # ids are never file names
    assert photos["notes"]["accepted"] is False and photos["notes"]["reason_code"] == "not_an_image"
    assert photos["notes"]["message"]
    accepted = [p for p in photos.values() if p["accepted"]]
    assert len(accepted) >= 5
    assert all(p["reason_code"] == "accepted" and p["face_box"] for p in accepted)

    assert report["class_token"] in CLASS_WORDS
    assert set(report["class_scores"]) == CLASS_WORDS
    assert all(isinstance(v, float) for v in report["class_scores"].values())
    # The scores are mean CLIP cosine distances: the chosen word is the closest one.
    assert report["class_token"] == min(report["class_scores"], key=report["class_scores"].get)


@pytest.mark.slow
def test_report_has_training_metrics(cli_run):
    _, _, report = cli_run
    training = report["training"]
    assert training["steps"] == TRAIN_STEPS
    assert training["final_loss"] > 0 and training["steps_per_s"] > 0
    assert sum(training["stages"].values()) == TRAIN_STEPS  # split over training:stage1 and :stage2


@pytest.mark.slow
def test_k_ranked_images_on_disk_with_their_scores(cli_run):
    _, out, report = cli_run
    candidates = report["candidates"]
    assert report["style"] == STYLE and report["preset"] == "tiny"
    assert [c["rank"] for c in candidates] == list(range(1, K + 1))
    for candidate in candidates:
        assert {"aesthetic", "identity", "text", "combined"} <= set(candidate["scores"])
        with Image.open(out / candidate["file"]) as original:
            assert original.size == (TINY_SIZE, TINY_SIZE)
        with Image.open(out / candidate["upscaled_file"]) as upscaled:
            assert upscaled.size == (2 * TINY_SIZE, 2 * TINY_SIZE)
    combined = [c["scores"]["combined"] for c in candidates]
    assert combined == sorted(combined, reverse=True)  # rank 1 is the best
    assert sorted(p.name for p in out.glob("rank_*.png")) == sorted(
        [c["file"] for c in candidates] + [c["upscaled_file"] for c in candidates])


@pytest.mark.slow
def test_report_scores_every_candidate(cli_run):
    _, _, report = cli_run
    scored = report["all_candidates"]
    assert len(scored) == N and all(c["scores"] for c in scored)
    assert sorted(c["rank"] for c in scored if c["rank"]) == [1, 2]  # the delivered k, the rest rank 0
    assert len({c["seed"] for c in scored}) == N


def _two_photos_of_grace(folder: Path, grace_hopper) -> Path:  # noqa: ANN001
    folder.mkdir()
    for i, variant in enumerate(person_variants(grace_hopper, 2)):
        (folder / f"grace_{i}.jpg").write_bytes(encode(variant, quality=92))
    return folder


def _run_failing(photos: Path, out: Path, monkeypatch, capsys):  # noqa: ANN001, ANN202
    """``likeness run`` as a user types it, expected to exit 1; returns what it printed."""
    from likeness_cli import main as cli

    monkeypatch.setattr(sys, "argv", ["likeness", "run", str(photos), "--style", STYLE, "--out", str(out),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    return capsys.readouterr()


def test_unknown_style_fails_in_one_line_before_training(cli_env, photos_dir, tmp_path, monkeypatch, capsys):
    from likeness_cli import main as cli

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv",
                        ["likeness", "run", str(photos_dir), "--style", "no_such_style", "--out", str(out)])
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code not in (0, None)
    assert time.monotonic() - started < 20  # no model loaded, nothing trained
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no_such_style" in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (out / "report.json").exists() and not (out / ".work").exists()


def test_files_sharing_a_stem_are_separate_photos(tmp_path, grace_hopper):
    """Phones name a photo and its HEIC/JPEG twin alike (IMG_0001.JPG, IMG_0001.HEIC)."""
    from worker.local import read_photos

    (tmp_path / "IMG_0001.JPG").write_bytes(encode(grace_hopper, quality=90))
    (tmp_path / "IMG_0001.png").write_bytes(encode(grace_hopper, "PNG"))
    photos = read_photos(tmp_path)
    assert len(photos) == 2 and len({p.photo_id for p in photos}) == 2
    assert {p.path.name for p in photos} == {"IMG_0001.JPG", "IMG_0001.png"}


@pytest.mark.slow
def test_a_rejected_photo_set_still_gets_report_json_and_a_verdict_table(cli_env, grace_hopper, tmp_path,
                                                                        monkeypatch, capsys):
    """Too few usable photos: exit 1 with one clear line, the verdicts printed, report.json saying per photo
    why and what to do; nothing trained."""
    photos = _two_photos_of_grace(tmp_path / "photos", grace_hopper)
    (photos / "blank.png").write_bytes(encode(Image.new("RGB", (400, 400), "white"), "PNG"))
    (photos / "notes.jpg").write_bytes(b"shopping list: milk, eggs\n")
    out = tmp_path / "out"
    captured = _run_failing(photos, out, monkeypatch, capsys)
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]  # (model loaders log too)
    assert len(errors) == 1 and "Only 2 of 4 photos are usable" in errors[0], captured.err
    assert str(out / "report.json") in errors[0] and "Nothing was trained" in errors[0]
    table = " ".join(captured.out.split())
    assert "photos: 0 of 4 used" in table and "not_an_image" in table and "not used" in table, captured.out
    assert table.count("usable") == 2  # fine photos, but too few: nothing was trained on them

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "rejected" and report["error"]["code"] == "dataset_rejected"
    verdicts = {p["file"]: p for p in report["photos"]}
    assert set(verdicts) == {"grace_0.jpg", "grace_1.jpg", "blank.png", "notes.jpg"}
    assert verdicts["notes.jpg"]["reason_code"] == "not_an_image"
    assert verdicts["blank.png"]["reason_code"] in ("no_person", "no_face")
    for photo in verdicts.values():
        assert photo["message"] and photo["what_to_do"]
    assert verdicts["notes.jpg"]["what_to_do"] != verdicts["blank.png"]["what_to_do"]
    assert not (out / ".work" / "training").exists()


@pytest.mark.slow
def test_too_few_photos_say_how_many_more_and_mark_none_used(cli_env, grace_hopper, tmp_path, monkeypatch, capsys):
    """Two good photos: nothing wrong with either, there are just too few; neither was used (nothing trained)."""
    out = tmp_path / "out"
    captured = _run_failing(_two_photos_of_grace(tmp_path / "photos", grace_hopper), out, monkeypatch, capsys)
    (error,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Only 2 photos given; at least 5 are needed: add 3 more" in error and "()" not in error, error
    table = " ".join(captured.out.split())
    assert "photos: 0 of 2 used" in table and table.count("usable") == 2, table
    report = json.loads((out / "report.json").read_text())
    assert [p["used"] for p in report["photos"]] == [False, False]
    assert all(p["accepted"] for p in report["photos"])
