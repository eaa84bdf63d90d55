"""The bot's words: every API reason code has a sentence, and the gettext catalogues (EN, RU) are
complete, compiled from their .po files, and keep every placeholder."""

from __future__ import annotations

import gettext
import io
import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from likeness.bot import texts
from likeness.client import Job
from likeness.contract.plan import PLANS, JobKind, JobState, Stage

LOCALES = texts.LOCALES_DIR
PLACEHOLDER = re.compile(r"{(\w*)}")


def _catalog(lang: str):
    from babel.messages.pofile import read_po

    with open(LOCALES / lang / "LC_MESSAGES" / "messages.po", "rb") as f:
        return read_po(f)


def _job(state: JobState, stage: str | None, kind: JobKind = JobKind.TRAIN) -> Job:
    now = datetime.now(UTC)
    return Job(id="j", subject_id="s", kind=kind, state=state, stage=stage, progress=0, created_at=now,
               updated_at=now)


@pytest.fixture
def english():
    i18n = texts.make_i18n()
    with i18n.context(), i18n.use_locale("en"):
        yield


def test_every_stage_of_the_bots_jobs_tells_the_user_what_happens(english):
    stages = {stage for kind in texts.BOT_JOB_KINDS for stage in PLANS[kind].stages}
    assert stages - set(texts.STAGES) == set()
    for stage in stages:
        assert texts.stage_text(_job(JobState.RUNNING, stage)) == texts.STAGES[stage]


def test_a_job_not_running_is_in_the_queue_whatever_stage_it_reported(english):
    queued = texts.queued_text()
    assert queued == "in the queue"
    # between its phases a training is queued again with the intake behind it
    assert texts.stage_text(_job(JobState.QUEUED, Stage.INTAKE)) == queued
    assert texts.stage_text(_job(JobState.QUEUED, None)) == queued
    assert texts.stage_text(_job(JobState.RUNNING, "some-future-stage")) == queued
    assert texts.stage_text(_job(JobState.RUNNING, Stage.RANKING, JobKind.GENERATE)) == "picking the best ones"


def test_every_reason_code_of_the_api_has_a_sentence():
    from pipelines.intake.reasons import ReasonCode

    missing = {code.value for code in ReasonCode} - {"accepted"} - set(texts.REASONS)
    assert missing == set()


def test_the_catalogues_hold_every_text_of_the_source(tmp_path):
    pot = tmp_path / "messages.pot"
    subprocess.run([sys.executable, "-m", "babel.messages.frontend", "extract", "-k", "N_", "--no-location",
                    "--omit-header", "-o", str(pot), str(texts.LOCALES_DIR.parent)], check=True, capture_output=True)
    from babel.messages.pofile import read_po

    source = {m.id for m in read_po(pot.open("rb")) if m.id}
    assert len(source) > 60
    for lang in texts.LANGUAGES:
        catalog = {m.id for m in _catalog(lang) if m.id}
        assert source - catalog == set(), f"{lang}: texts missing from the catalogue (run pybabel update)"
        assert catalog - source == set(), f"{lang}: texts no longer in the source"


def test_russian_is_complete_and_keeps_placeholders():
    for message in _catalog("ru"):
        if not message.id:
            continue
        assert message.string, f"untranslated: {message.id!r}"
        assert sorted(PLACEHOLDER.findall(message.id)) == sorted(PLACEHOLDER.findall(message.string)), message.id


@pytest.mark.parametrize("lang", texts.LANGUAGES)
def test_the_compiled_mo_files_match_their_po_files(lang):
    from babel.messages.mofile import write_mo

    compiled = io.BytesIO()
    write_mo(compiled, _catalog(lang))
    compiled.seek(0)
    fresh = gettext.GNUTranslations(compiled)
    with open(LOCALES / lang / "LC_MESSAGES" / "messages.mo", "rb") as f:
        shipped = gettext.GNUTranslations(f)
    assert shipped._catalog == fresh._catalog, "stale .mo: run pybabel compile -d likeness/bot/locales -D messages"


def test_the_user_language_picks_the_catalogue():
    from aiogram.types import User

    i18n = texts.make_i18n()
    assert set(i18n.available_locales) == {"en", "ru"}
    assert texts.locale_of(User(id=1, is_bot=False, first_name="a", language_code="ru")) == "ru"
    assert texts.locale_of(User(id=1, is_bot=False, first_name="a", language_code="ru-RU")) == "ru"
    assert texts.locale_of(User(id=1, is_bot=False, first_name="a", language_code="de")) == "en"
    assert texts.locale_of(User(id=1, is_bot=False, first_name="a")) == "en"
    with i18n.context(), i18n.use_locale("ru"):
        assert texts.reason_text("no_person").startswith("На этом фото нет человека")
        assert texts.reason_text("some_future_code", "The API's own words.") == "The API's own words."
        assert texts.stage_text(_job(JobState.RUNNING, Stage.TRAINING_STAGE1)) == "изучаю ваше лицо (часть 1 из 2)"
    with i18n.context(), i18n.use_locale("en"):
        assert texts.reason_text("multiple_people").startswith("More than one person")


def test_status_names_the_model_family_and_preset_in_the_users_language():
    from likeness.client.models import TrainedModel

    i18n = texts.make_i18n()
    sdxl = TrainedModel(family="sdxl", preset="sdxl", adapter_version=2)
    older = TrainedModel(family="sd15", preset=None, adapter_version=1)  # an adapter from before presets
    with i18n.context(), i18n.use_locale("en"):
        assert texts.model_text(sdxl) == "Model: SDXL (preset sdxl)."
        assert texts.model_text(older) == "Model: Stable Diffusion 1.5."
    with i18n.context(), i18n.use_locale("ru"):
        assert texts.model_text(sdxl) == "Модель: SDXL (пресет sdxl)."
