"""What a Telegram user may do in the service, always through their own subjects.

A user's subjects are those the bot created with ``external_ref="tg:<telegram user id>"`` and
are found by that reference only: nothing in a message (text, captions, button data) ever
names a subject, a job or an image, so no user can reach another's data.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from likeness.bot.config import BotSettings
from likeness.bot.store import BotStore
from likeness.client import AsyncClient, Job, Style, Subject
from likeness.contract.plan import JobKind, JobState

STYLES_TTL_S = 300.0
#: The window each per-user limit counts in: trainings per day, generations per hour.
WINDOWS = {JobKind.TRAIN: 86400.0, JobKind.GENERATE: 3600.0}


def user_ref(user_id: int) -> str:
    return f"tg:{user_id}"


@dataclass
class Service:
    api: AsyncClient
    store: BotStore
    settings: BotSettings
    _locks: dict[int, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    _styles: tuple[float, list[Style]] = (0.0, [])

    def lock(self, user_id: int) -> asyncio.Lock:
        """Serialises one user's photo uploads and job starts (an album arrives as parallel updates)."""
        return self._locks[user_id]

    async def subject(self, user_id: int) -> Subject | None:
        """The user's subject (their newest, should there be several), or None before the first photo."""
        page = await self.api.list_subjects(external_ref=user_ref(user_id), limit=1)
        return page.data[0] if page.data else None

    async def subject_or_create(self, user_id: int, name: str) -> Subject:
        return await self.subject(user_id) or await self.api.create_subject(
            name[:200] or user_ref(user_id), external_ref=user_ref(user_id))

    async def is_trained(self, subject_id: str) -> bool:
        page = await self.api.list_jobs(subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.SUCCEEDED, limit=1)
        return page.count > 0

    async def active_jobs(self, subject_id: str) -> list[Job]:
        jobs = []
        for state in (JobState.RUNNING, JobState.QUEUED):
            jobs += (await self.api.list_jobs(subject_id=subject_id, state=state, limit=20)).data
        return jobs

    async def delete_everything(self, user_id: int) -> int:
        """Delete every subject of the user (photos, adapters, images: database and blobs); returns how many."""
        deleted = 0
        while True:
            page = await self.api.list_subjects(external_ref=user_ref(user_id), limit=50)
            if not page.data:
                return deleted
            for subject in page.data:
                await self.api.delete_subject(subject.id)
                deleted += 1

    async def styles(self) -> list[Style]:
        fetched_at, styles = self._styles
        if not styles or time.monotonic() - fetched_at > STYLES_TTL_S:
            styles = (await self.api.list_styles()).data
            self._styles = (time.monotonic(), styles)
        return styles

    async def style(self, name: str) -> Style | None:
        return next((s for s in await self.styles() if s.name == name), None)

    # ---- per-user limits ---------------------------------------------------------------------------------

    def limit(self, what: JobKind) -> int:
        return self.settings.bot_trainings_per_day if what == JobKind.TRAIN else self.settings.bot_generations_per_hour

    async def wait_s(self, user_id: int, what: JobKind, now: float | None = None) -> float:
        """0 when the user may start another ``what`` now, else seconds until they may."""
        now = time.time() if now is None else now
        uses = await self.store.uses_since(user_id, what, now - WINDOWS[what])
        if len(uses) < self.limit(what):
            return 0.0
        return max(1.0, uses[-self.limit(what)] + WINDOWS[what] - now)
