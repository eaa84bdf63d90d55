"""One status message per job, edited in place while the job runs; the results when it ends.

Each job the bot starts is saved as a :class:`~likeness.bot.store.PendingJob` before anything is
shown, and followed by a task that polls the API with backoff (``AsyncClient.wait``). At start-up
every saved job is followed again, so a bot restarted mid-training still edits the same status
message and delivers the results. An unreachable API is waited out; the job is dropped only once
its results (or its failure) have been sent.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiogram import Bot
from aiogram.exceptions import TelegramBadRequest, TelegramForbiddenError
from aiogram.fsm.storage.base import StorageKey
from aiogram.types import BufferedInputFile, InputMediaDocument, InputMediaPhoto
from aiogram.utils.i18n import I18n
from aiogram.utils.i18n import gettext as _

from likeness.bot import keyboards, texts
from likeness.bot.service import Service
from likeness.bot.store import PendingJob
from likeness.client import Backoff, Job, LikenessError
from likeness.contract.plan import JobKind, Stage

log = logging.getLogger(__name__)


def progress_bar(percent: int, width: int = 10) -> str:
    filled = round(width * percent / 100)
    return "▓" * filled + "░" * (width - filled) + f" {percent}%"


def eta_text(eta_s: float | None) -> str:
    if eta_s is None:
        return ""
    if eta_s < 60:
        return _("less than a minute left")
    return _("about {minutes} min left").format(minutes=round(eta_s / 60))


def status_text(pending: PendingJob, job: Job, percent: int, style_title: str | None = None) -> str:
    title = _("Training your model") if pending.kind == JobKind.TRAIN else \
        _("Painting portraits: {style}").format(style=style_title or pending.style or "")
    if job.succeeded:
        done = _("Done!")
        return f"{title}\n✅ {done}\n{progress_bar(100)}"
    if job.done:
        return f"{title}\n❌ {texts.job_error_text(job.error_code, job.error_message)}"
    lines = [title, "⏳ " + texts.stage_text(job), progress_bar(percent)]
    if eta := eta_text(job.eta_s):
        lines.append(eta)
    return "\n".join(lines)


class Tracker:
    def __init__(self, bot: Bot, service: Service, i18n: I18n):
        self.bot, self.service, self.i18n = bot, service, i18n
        self.settings = service.settings
        self.tasks: dict[str, asyncio.Task] = {}

    @property
    def store(self):
        return self.service.store

    async def follow(self, pending: PendingJob) -> None:
        """Save the job (so a restart resumes it), then follow it in the background."""
        await self.store.save_pending(pending)
        self._spawn(pending)

    async def resume_all(self) -> int:
        jobs = await self.store.pending()
        for pending in jobs:
            self._spawn(pending)
        if jobs:
            log.info("resumed %d pending job(s)", len(jobs))
        return len(jobs)

    async def stop_user(self, user_id: int) -> None:
        for pending in await self.store.pending_for(user_id):
            task = self.tasks.pop(pending.job_id, None)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _spawn(self, pending: PendingJob) -> None:
        if pending.job_id not in self.tasks or self.tasks[pending.job_id].done():
            self.tasks[pending.job_id] = asyncio.create_task(self._run(pending), name=f"job-{pending.job_id}")

    async def _run(self, pending: PendingJob, attempts: int = 6) -> None:
        """Follow until the results are out; a failure (Telegram briefly unreachable...) is retried with
        backoff, and after the last attempt the job stays saved for the next start."""
        try:
            for attempt in range(1, attempts + 1):
                try:
                    with self.i18n.context(), self.i18n.use_locale(pending.locale):
                        await self._follow(pending)
                    await self.store.drop_pending(pending.job_id)
                    return
                except LikenessError as exc:
                    if exc.status == 404:  # the job went with its subject (/delete): nothing to report
                        await self.store.drop_pending(pending.job_id)
                        return
                    log.warning("following job %s: %s (attempt %d)", pending.job_id, exc, attempt)
                except TelegramForbiddenError:  # the user blocked the bot
                    await self.store.drop_pending(pending.job_id)
                    return
                except Exception:
                    log.exception("following job %s failed (attempt %d)", pending.job_id, attempt)
                await asyncio.sleep(min(60.0, 2.0 ** attempt))
        finally:
            self.tasks.pop(pending.job_id, None)

    async def _follow(self, pending: PendingJob) -> None:
        backoff = Backoff(initial_s=0.5, factor=1.5, max_s=self.settings.bot_poll_max_s)
        style = await self._style_title(pending.style) if pending.style else None
        last_text, last_edit, job = None, 0.0, None
        async for job in self.service.api.wait(pending.job_id, backoff=backoff, max_outage_s=None):
            if pending.kind == JobKind.TRAIN and not pending.intake_reported and (job.done or job.stage not in (
                    None, Stage.INTAKE)):
                await self._report_intake(pending, job)
            if pending.kind == JobKind.TRAIN and not pending.preview_sent and job.previews:
                await self._send_preview(pending, job)
            percent = 100 if job.succeeded else max(pending.percent, int(job.progress))
            text = status_text(pending, job, percent, style)
            throttled = time.monotonic() - last_edit < self.settings.bot_status_interval_s
            if text != last_text and (job.done or not throttled):
                await self._edit(pending, text)
                last_text, last_edit = text, time.monotonic()
                if percent != pending.percent:
                    pending.percent = percent
                    await self.store.save_pending(pending)
        if job is None or not job.succeeded:
            return
        if pending.kind == JobKind.TRAIN:
            await self._offer_styles(pending)
        else:
            await self._deliver(pending, job, style)

    async def _style_title(self, name: str) -> str:
        try:
            style = await self.service.style(name)
        except LikenessError:
            return name
        return style.title if style else name

    async def _edit(self, pending: PendingJob, text: str) -> None:
        try:
            await self.bot.edit_message_text(text=text, chat_id=pending.chat_id, message_id=pending.message_id)
        except TelegramBadRequest as exc:
            if "not modified" in str(exc):
                return
            # the status message is gone (deleted by the user): carry on in a new one
            message = await self.bot.send_message(pending.chat_id, text)
            pending.message_id = message.message_id
            await self.store.save_pending(pending)

    async def _report_intake(self, pending: PendingJob, job: Job) -> None:
        photos = (await self.service.api.list_photos(job.subject_id)).data
        key = StorageKey(bot_id=self.bot.id, chat_id=pending.chat_id, user_id=pending.user_id)
        numbers = (await self.store.fsm.get_data(key)).get("photo_numbers", {})
        judged = [p for p in photos if p.status != "pending"]
        if judged:
            accepted = sum(p.status == "accepted" for p in judged)
            lines = [_("I checked your photos: {accepted} of {total} can be used.").format(
                accepted=accepted, total=len(judged))]
            for position, photo in enumerate(photos, 1):
                if photo.status == "rejected":
                    lines.append(_("Photo {number}: {reason}").format(
                        number=numbers.get(photo.id, position),
                        reason=texts.reason_text(photo.reason_code, photo.message)))
            await self.bot.send_message(pending.chat_id, "\n".join(lines))
        pending.intake_reported = True
        await self.store.save_pending(pending)

    async def _send_preview(self, pending: PendingJob, job: Job) -> None:
        """The first training preview, once, while the model is being chosen."""
        preview = job.previews[0]
        try:
            data = await self.service.api.download_preview(preview)
        except LikenessError as exc:  # expired or gone: the next poll's list signs it again
            log.info("preview of job %s not sent yet: %s", job.id, exc)
            return
        await self.bot.send_photo(pending.chat_id, BufferedInputFile(data, f"preview-{preview.step}.png"),
                                  caption=_("How you look after {steps} steps of training").format(
                                      steps=preview.step))
        pending.preview_sent = True
        await self.store.save_pending(pending)

    async def _offer_styles(self, pending: PendingJob) -> None:
        styles = await self.service.styles()
        await self.bot.send_message(pending.chat_id, _("Your model is ready! Pick a style:"),
                                    reply_markup=keyboards.styles(styles))

    async def _deliver(self, pending: PendingJob, job: Job, style_title: str | None) -> None:
        api = self.service.api
        images = sorted((await api.list_images(job.subject_id, job_id=job.id)).data, key=lambda i: i.rank)
        if not images:
            await self.bot.send_message(pending.chat_id, texts.job_error_text("no_deliverable_image"))
            return
        photos, files = [], []
        for image in images:
            photos.append(BufferedInputFile(await api.download_image(image.id), f"portrait-{image.rank}.png"))
            if image.has_upscaled:
                files.append(BufferedInputFile(await api.download_image(image.id, "upscaled"),
                                               f"portrait-{image.rank}-full.png"))
        caption = _("Your {count} best portraits: {style}").format(count=len(images), style=style_title or "")
        if len(photos) == 1:
            await self.bot.send_photo(pending.chat_id, photos[0], caption=caption)
        else:
            await self.bot.send_media_group(pending.chat_id, [
                InputMediaPhoto(media=p, caption=caption if i == 0 else None) for i, p in enumerate(photos)])
        if len(files) == 1:
            await self.bot.send_document(pending.chat_id, files[0], caption=_("Full-size file"))
        elif files:
            await self.bot.send_media_group(pending.chat_id, [
                InputMediaDocument(media=f, caption=_("Full-size files") if i == len(files) - 1 else None)
                for i, f in enumerate(files)])
        await self.bot.send_message(pending.chat_id, _("Want more?"),
                                    reply_markup=keyboards.after_results(pending.style or ""))
