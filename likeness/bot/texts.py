"""Every sentence the bot says, in English (the gettext message ids); ``locales/`` translates them.

Texts are plain (no Markdown/HTML parse mode), so nothing a user or the API writes is ever
interpreted as markup. Module-level tables are marked with :func:`N_` and translated when used.
After changing a text: ``pybabel extract``/``update``/``compile`` (see ``locales/README.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiogram.types import TelegramObject, User
from aiogram.utils.i18n import I18n, I18nMiddleware
from aiogram.utils.i18n import gettext as _

from likeness.client import Job
from likeness.client.models import TrainedModel
from likeness.contract.plan import JobKind, JobState, Stage

LOCALES_DIR = Path(__file__).resolve().parent / "locales"
LANGUAGES = ("en", "ru")


def N_(message: str) -> str:  # noqa: N802 - the gettext convention for "translate later"
    return message


def make_i18n() -> I18n:
    return I18n(path=LOCALES_DIR, default_locale="en", domain="messages")


def locale_of(user: User | None) -> str:
    """The user's Telegram language when the bot speaks it, else English."""
    code = (user.language_code or "") if user else ""
    language = code.split("-")[0].lower()
    return language if language in LANGUAGES else "en"


class UserLanguage(I18nMiddleware):
    """Picks the catalogue from the Telegram user's language (no Babel needed at run time)."""

    async def get_locale(self, event: TelegramObject, data: dict[str, Any]) -> str:
        return locale_of(data.get("event_from_user"))


# ---- photo verdicts: every reason code of the API, in plain words ----------------------------------------------

REASONS: dict[str, str] = {
    # decoding (the upload's own verdict)
    "empty_file": N_("The file is empty. Please send the photo again."),
    "not_an_image": N_("This file is not a photo. Send a JPEG, PNG, WebP or HEIC picture."),
    "unsupported_format": N_("I can't read this picture format. Send a JPEG, PNG, WebP or HEIC photo."),
    "corrupt_image": N_("This photo is damaged and can't be opened. Please send it again."),
    "too_small": N_("This photo is too small. Send a larger one (at least 256 pixels on the short side)."),
    "too_large_bytes": N_("This file is too large. Send a smaller version of the photo."),
    "decompression_bomb": N_("This picture has far too many pixels to process. Send an ordinary photo."),
    # content (judged when training starts)
    "no_person": N_("No person in this photo. Send one where you are clearly visible."),
    "multiple_people": N_("More than one person in this photo. Send one where you are alone."),
    "no_face": N_("I can't see a face in this photo. Send one where your face is clearly visible."),
    "face_too_small": N_("Your face is too small in this photo. Send a closer shot."),
    "blurry": N_("This photo is too blurry. Send a sharper one."),
    "duplicate": N_("This photo is almost the same as another one you sent. Send a different one."),
    "identity_outlier": N_("This photo looks like a different person than the others. Send only photos of yourself."),
    # the bot's own checks, before anything reaches the service
    "too_big_for_telegram": N_("This file is larger than 20 MB, which Telegram doesn't let bots download. "
                               "Send it as a photo instead, or a smaller file."),
    "not_a_photo_document": N_("This file is not a picture. Send photos (as photos or as image files)."),
    "too_many_photos": N_("You have already sent the most photos I can use. Press Train, or /delete to start over."),
}

#: why a job ended without results, by the job's error code
JOB_ERRORS: dict[str, str] = {
    "dataset_rejected": N_("Too few of your photos can be used for training. "
                           "Send a few more where you are alone and your face is clearly visible, then press Train."),
    "no_photos": N_("There are no photos to train on. Send me photos of yourself first."),
    "worker_lost": N_("The server working on it stopped several times. Please try again later."),
    "canceled": N_("Canceled."),
    "subject_deleted": N_("Canceled: your data was deleted."),
    "no_deliverable_image": N_("None of the portraits came out well enough to send. Try again or another style."),
}

#: the kinds of job the bot starts
BOT_JOB_KINDS = (JobKind.TRAIN, JobKind.GENERATE)

#: what each stage of the bot's jobs means to a user (every stage of their plans: tests/bot/test_texts.py)
STAGES: dict[Stage, str] = {
    Stage.INTAKE: N_("checking your photos"),
    Stage.CACHING: N_("preparing"),
    Stage.TRAINING_STAGE1: N_("learning your face (part 1 of 2)"),
    Stage.TRAINING_STAGE2: N_("learning your face (part 2 of 2)"),
    Stage.SELECTING: N_("choosing the version that looks most like you"),
    Stage.GENERATING: N_("painting portraits"),
    Stage.REFINING: N_("refining faces"),
    Stage.RANKING: N_("picking the best ones"),
    Stage.UPSCALING: N_("making full-size files"),
    Stage.DELIVERING: N_("almost there"),
}


def reason_text(code: str | None, fallback: str | None = None) -> str:
    if code and code in REASONS:
        return _(REASONS[code])
    return fallback or _("This photo can't be used.")


def job_error_text(code: str | None, fallback: str | None = None) -> str:
    if code and code in JOB_ERRORS:
        return _(JOB_ERRORS[code])
    return _("Something went wrong on our side ({code}). Please try again later.").format(code=code or "error")


def queued_text() -> str:
    return _("in the queue")


def stage_text(job: Job) -> str:
    """What a running job is doing now; a job not running yet is in the queue."""
    if job.state != JobState.RUNNING or job.stage not in STAGES:
        return queued_text()
    return _(STAGES[job.stage])


# ---- conversation ------------------------------------------------------------------------------------------

def start_text(min_photos: int, max_photos: int, retention_days: float) -> str:
    return _(
        "Hi! I turn your selfies into portraits in the style you choose.\n\n"
        "1. Send me {min} to {max} photos of yourself: alone, face clearly visible, different places and "
        "light. As photos or as files (HEIC and full-size originals are welcome).\n"
        "2. Press Train: I learn your face. It takes a few minutes.\n"
        "3. Pick a style and get your best portraits, plus full-size files.\n\n"
        "Your photos are stored only to train your personal model and make your portraits; nobody else sees "
        "them. /delete erases your photos, model and portraits at any time, and everything is deleted "
        "automatically {days} days after your last message.\n\n"
        "Send your first photo to begin. /help lists the commands."
    ).format(min=min_photos, max=max_photos, days=f"{retention_days:g}")


def help_text(min_photos: int, max_photos: int) -> str:
    return _(
        "Send photos of yourself ({min} to {max}), press Train, then pick a style.\n\n"
        "/start - what I do and what happens to your photos\n"
        "/status - what I'm working on for you\n"
        "/styles - pick a style (after training)\n"
        "/cancel - stop the current training or portraits\n"
        "/delete - erase your photos, model and portraits\n"
        "/help - this list"
    ).format(min=min_photos, max=max_photos)


def api_down_text() -> str:
    return _("The portrait service isn't answering right now. Please try again in a minute.")


# ---- the trained model -----------------------------------------------------------------------------------------

FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL"}  # product names: not translated


def model_text(model: TrainedModel) -> str:
    """Which model family (and preset) the user's portraits are made with."""
    family = FAMILY_NAMES.get(model.family, model.family)
    if model.preset is None:
        return _("Model: {family}.").format(family=family)
    return _("Model: {family} (preset {preset}).").format(family=family, preset=model.preset)
