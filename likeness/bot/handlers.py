"""The conversation: commands, photos (as photos, albums and files) and buttons.

Every handler finds the user's data from ``from_user.id`` (``tg:<id>``) through
:class:`~likeness.bot.service.Service`; button data carries only an action and a style name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import random
import time
from dataclasses import dataclass, field

from aiogram import Bot, F, Router
from aiogram.filters import Command, CommandStart
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, ErrorEvent, Message
from aiogram.utils.i18n import I18n
from aiogram.utils.i18n import gettext as _

from likeness.bot import keyboards, texts
from likeness.bot.service import Service
from likeness.bot.store import PendingJob
from likeness.bot.tracker import Tracker
from likeness.client import LikenessError
from likeness.contract.plan import JobKind

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".tif", ".tiff", ".bmp")


@dataclass
class Context:
    """What every handler gets (aiogram injects it by the parameter name ``ctx``)."""

    service: Service
    tracker: Tracker
    i18n: I18n
    albums: dict[str, list[Message]] = field(default_factory=dict)

    @property
    def settings(self):
        return self.service.settings


@dataclass
class Incoming:
    """One photo or image file a user sent."""

    file_id: str
    filename: str
    size: int | None
    kind: str  # photo | document
    problem: str | None = None  # a reason code decided before download


def _incoming(message: Message, max_bytes: int) -> Incoming:
    if message.photo:
        largest = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        item = Incoming(largest.file_id, f"photo-{message.message_id}.jpg", largest.file_size, "photo")
    else:
        doc = message.document
        name = doc.file_name or f"file-{message.message_id}"
        mime = doc.mime_type or mimetypes.guess_type(name)[0] or ""
        item = Incoming(doc.file_id, name, doc.file_size, "document")
        if not (mime.startswith("image/") or name.lower().endswith(IMAGE_SUFFIXES)):
            item.problem = "not_a_photo_document"
    if item.problem is None and item.size is not None and item.size > max_bytes:
        item.problem = "too_big_for_telegram"
    return item


def build_router() -> Router:
    router = Router(name="likeness")

    @router.message(CommandStart())
    async def start(message: Message, ctx: Context) -> None:
        await ctx.service.store.touch(message.from_user.id)
        s = ctx.settings
        await message.answer(texts.start_text(s.bot_min_photos, s.bot_max_photos, s.bot_retention_days))

    @router.message(Command("help"))
    async def help_(message: Message, ctx: Context) -> None:
        s = ctx.settings
        await message.answer(texts.help_text(s.bot_min_photos, s.bot_max_photos))

    @router.message(Command("status"))
    async def status(message: Message, ctx: Context) -> None:
        user_id = message.from_user.id
        await ctx.service.store.touch(user_id)
        subject = await ctx.service.subject(user_id)
        if subject is None:
            await message.answer(_("You haven't sent any photos yet. Send {min} to {max} photos of yourself to "
                                   "begin.").format(min=ctx.settings.bot_min_photos, max=ctx.settings.bot_max_photos))
            return
        active = await ctx.service.active_jobs(subject.id)
        if active:
            lines = []
            for job in active:
                what = _("Training") if job.kind == JobKind.TRAIN else _("Portraits")
                lines.append(f"{what}: {texts.stage_text(job)}, "
                             f"{int(job.progress)}%")
            await message.answer("\n".join(lines))
            return
        photos = (await ctx.service.api.list_photos(subject.id)).count
        if await ctx.service.is_trained(subject.id):
            await message.answer(_("Your model is trained ({photos} photos). Pick a style with /styles.").format(
                photos=photos))
        else:
            await message.answer(_("You have sent {photos} photos; nothing is running.").format(photos=photos),
                                 reply_markup=keyboards.train() if photos >= ctx.settings.bot_min_photos else None)

    @router.message(Command("cancel"))
    async def cancel(message: Message, ctx: Context) -> None:
        user_id = message.from_user.id
        subject = await ctx.service.subject(user_id)
        active = await ctx.service.active_jobs(subject.id) if subject else []
        for job in active:
            try:
                await ctx.service.api.cancel_job(job.id)
            except LikenessError as exc:
                if exc.code != "job_already_finished":
                    raise
        await message.answer(_("Stopped.") if active else _("Nothing is running."))

    @router.message(Command("styles"))
    async def styles(message: Message, ctx: Context) -> None:
        await _offer_styles(message, message.from_user.id, ctx)

    @router.message(Command("delete"))
    async def delete(message: Message, ctx: Context) -> None:
        await message.answer(_("Delete your photos, your model and all your portraits? This cannot be undone."),
                             reply_markup=keyboards.confirm_delete())

    @router.message(F.photo | F.document)
    async def photo(message: Message, ctx: Context, bot: Bot, state: FSMContext) -> None:
        if message.media_group_id is None:
            await _take_photos([message], ctx, bot, state)
            return
        group = ctx.albums.setdefault(message.media_group_id, [])  # an album arrives as one update per photo
        group.append(message)
        if len(group) == 1:
            await asyncio.sleep(ctx.settings.bot_album_wait_s)
            await _take_photos(ctx.albums.pop(message.media_group_id), ctx, bot, state)

    @router.message()
    async def other(message: Message, ctx: Context) -> None:
        await message.answer(_("Send me photos of yourself, or see /help."))

    # ---- buttons ----------------------------------------------------------------------------------------

    @router.callback_query(F.data == keyboards.TRAIN)
    async def train(query: CallbackQuery, ctx: Context) -> None:
        await query.answer()
        await _train(query.message, query.from_user.id, ctx)

    @router.callback_query(F.data == keyboards.STYLES)
    async def another_style(query: CallbackQuery, ctx: Context) -> None:
        await query.answer()
        await _offer_styles(query.message, query.from_user.id, ctx)

    @router.callback_query(F.data.startswith(keyboards.STYLE) | F.data.startswith(keyboards.MORE))
    async def pick_style(query: CallbackQuery, ctx: Context) -> None:
        await query.answer()
        await _generate(query.message, query.from_user.id, query.data.split(":", 1)[1], ctx)

    @router.callback_query(F.data == keyboards.DELETE_YES)
    async def delete_yes(query: CallbackQuery, ctx: Context) -> None:
        await query.answer()
        user_id = query.from_user.id
        async with ctx.service.lock(user_id):
            await ctx.tracker.stop_user(user_id)
            await ctx.service.delete_everything(user_id)
            await ctx.service.store.forget_user(user_id)
        await query.message.edit_text(_("Done: your photos, model and portraits are deleted. "
                                        "Send new photos any time to start again."))

    @router.callback_query(F.data == keyboards.DELETE_NO)
    async def delete_no(query: CallbackQuery, ctx: Context) -> None:
        await query.answer()
        await query.message.edit_text(_("Nothing was deleted."))

    @router.errors()
    async def on_error(event: ErrorEvent, ctx: Context, bot: Bot) -> bool:
        update = event.update
        chat = update.message.chat.id if update.message else (
            update.callback_query.message.chat.id if update.callback_query and update.callback_query.message else None)
        exc = event.exception
        if isinstance(exc, LikenessError) and exc.transient:
            log.warning("Likeness API unavailable: %s", exc)
            text = texts.api_down_text()
        elif isinstance(exc, LikenessError) and exc.status == 429:
            text = _("Too many requests right now. Please try again in a minute.")
        else:
            log.error("update %s failed", update.update_id, exc_info=exc)
            text = _("Sorry, something went wrong. Please try again.")
        if chat is not None:
            try:
                await bot.send_message(chat, text)
            except Exception:  # noqa: BLE001 - telling the user is best effort
                log.warning("could not tell chat %s about the error", chat)
        return True

    return router


# ---- the steps ----------------------------------------------------------------------------------------------

async def _take_photos(messages: list[Message], ctx: Context, bot: Bot, state: FSMContext) -> None:
    first = messages[0]
    user = first.from_user
    settings = ctx.settings
    await ctx.service.store.touch(user.id)
    items = [_incoming(m, settings.bot_max_file_bytes) for m in messages]
    wanted = [i for i in items if i.problem is None]
    payload = []
    for item in wanted:
        data = await bot.download(item.file_id)
        payload.append((item.filename, data.read()))
    verdicts: dict[int, str] = {}
    count = None
    async with ctx.service.lock(user.id) if wanted else contextlib.nullcontext():
        subject = await ctx.service.subject_or_create(user.id, user.full_name) if wanted else None
        have = (await ctx.service.api.list_photos(subject.id)).count if subject else 0
        room = max(0, settings.bot_max_photos - have)
        for item in wanted[room:]:
            item.problem = "too_many_photos"
        sending = [(item, data) for item, data in zip(wanted, payload) if item.problem is None]
        if sending:
            result = await ctx.service.api.upload_photos(subject.id, [data for _item, data in sending])
            # The user's own numbering (the order they sent), kept to name photos in the intake report later.
            numbers = dict((await state.get_data()).get("photo_numbers", {}))
            for (item, _data), verdict in zip(sending, result.files):
                if verdict.status == "stored":
                    numbers[verdict.photo_id] = have = have + 1
                    verdicts[id(item)] = "✅ " + _("Photo {number} received.").format(number=numbers[verdict.photo_id])
                else:
                    item.problem = verdict.reason_code or "not_an_image"
                    verdicts[id(item)] = "❌ " + texts.reason_text(verdict.reason_code, verdict.message)
            await state.update_data(photo_numbers=numbers)
            count = have
        elif subject is not None:
            count = have
    for item in items:
        if item.problem is not None and id(item) not in verdicts:
            verdicts[id(item)] = "❌ " + texts.reason_text(item.problem)
    lines = [verdicts[id(i)] if len(items) == 1 else f"{n}. {verdicts[id(i)]}" for n, i in enumerate(items, 1)]
    need, markup = settings.bot_min_photos, None
    if count is None:  # nothing reached the service (every file refused here)
        pass
    elif count >= need:
        lines.append(_("Photos so far: {count}. That's enough to train: press Train, or send more (up to {max})."
                       ).format(count=count, max=settings.bot_max_photos))
        markup = keyboards.train()
    else:
        lines.append(_("Photos so far: {count} of at least {need}.").format(count=count, need=need))
    await first.reply("\n".join(lines), reply_markup=markup)


async def _train(message: Message, user_id: int, ctx: Context) -> None:
    service = ctx.service
    async with service.lock(user_id):
        subject = await service.subject(user_id)
        if subject is None or (await service.api.list_photos(subject.id)).count < ctx.settings.bot_min_photos:
            await message.answer(_("Send at least {need} photos of yourself first.").format(
                need=ctx.settings.bot_min_photos))
            return
        if wait := await service.wait_s(user_id, JobKind.TRAIN):
            await message.answer(_("You have used today's {limit} trainings. You can train again in {time}.").format(
                limit=service.limit(JobKind.TRAIN), time=_duration(wait)))
            return
        try:
            job = await service.api.train(subject.id, ctx.settings.train_request())
        except LikenessError as exc:
            if exc.code == "training_in_progress":
                await message.answer(_("Your model is already training; I'll tell you when it's ready."))
                return
            raise
        await service.store.record_use(user_id, JobKind.TRAIN)
        await _follow(message, user_id, job.id, JobKind.TRAIN, None, ctx)


def _train_first(ctx: Context) -> str:
    return _("Train your model first: send {min} to {max} photos of yourself, then press Train.").format(
        min=ctx.settings.bot_min_photos, max=ctx.settings.bot_max_photos)


async def _offer_styles(message: Message, user_id: int, ctx: Context) -> None:
    subject = await ctx.service.subject(user_id)
    if subject is None or not await ctx.service.is_trained(subject.id):
        await message.answer(_train_first(ctx))
        return
    await message.answer(_("Pick a style:"), reply_markup=keyboards.styles(await ctx.service.styles()))


async def _generate(message: Message, user_id: int, style_name: str, ctx: Context) -> None:
    service = ctx.service
    style = await service.style(style_name)
    if style is None:
        await message.answer(_("This style is no longer available. Pick another one:"),
                             reply_markup=keyboards.styles(await service.styles()))
        return
    async with service.lock(user_id):
        subject = await service.subject(user_id)
        if subject is None or not await service.is_trained(subject.id):
            await message.answer(_train_first(ctx))
            return
        if wait := await service.wait_s(user_id, JobKind.GENERATE):
            await message.answer(_("You have made {limit} sets of portraits this hour. Next one in {time}.").format(
                limit=service.limit(JobKind.GENERATE), time=_duration(wait)))
            return
        request = ctx.settings.generate_request(style.name, seed=random.randrange(2**31 - 1))
        job = await service.api.generate(subject.id, request)
        await service.store.record_use(user_id, JobKind.GENERATE)
        await _follow(message, user_id, job.id, JobKind.GENERATE, style.name, ctx)


async def _follow(message: Message, user_id: int, job_id: str, kind: JobKind, style: str | None, ctx: Context) -> None:
    locale = ctx.i18n.current_locale
    title = _("Training your model") if kind == JobKind.TRAIN else _("Painting portraits")
    status = await message.answer(f"{title}\n⏳ {texts.queued_text()}")
    await ctx.tracker.follow(PendingJob(job_id=job_id, kind=kind, user_id=user_id, chat_id=message.chat.id,
                                        message_id=status.message_id, locale=locale, style=style,
                                        created_at=time.time()))


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    if minutes < 60:
        return _("{minutes} min").format(minutes=minutes)
    return _("{hours} h {minutes} min").format(hours=minutes // 60, minutes=minutes % 60)
