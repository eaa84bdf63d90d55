"""The bot shows one training preview mid-training, before the style picker, in the user's language.

The bot's job follower (``Tracker``) runs in-process against the Bot API stand-in; the Likeness API
is scripted (a train job that is learning, then choosing its snapshot with one preview listed, then
done), reached through the Python client as the bot always does."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime

import httpx
import pytest
from PIL import Image

from tests.bot.standin import TOKEN, BotApiStandIn
from tests.conftest import noise_image

PREVIEW_URL = "/v1/previews/signed?client=c&subject=s&job=j1&step=8&exp=9999999999&sig=abc"


def _png() -> bytes:
    buf = io.BytesIO()
    noise_image(32, 7).save(buf, format="PNG")
    return buf.getvalue()


def _job(state: str, stage: str, progress: float, previews: list[dict]) -> dict:
    now = datetime.now(UTC).isoformat()
    return {"id": "j1", "subject_id": "s", "kind": "train", "state": state, "stage": stage, "progress": progress,
            "eta_s": 30.0, "created_at": now, "updated_at": now, "previews": previews}


class ScriptedApi:
    """GET /v1/jobs/j1 walks through ``answers`` (the last repeats); the preview URL serves a PNG."""

    def __init__(self):
        self.answers = [_job("running", "training:stage2", 60, []),
                        _job("running", "selecting", 90, [{"step": 8, "url": PREVIEW_URL}]),
                        _job("succeeded", "selecting", 100, [{"step": 8, "url": PREVIEW_URL}])]
        self.preview_fetches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/jobs/j1":
            answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
            return httpx.Response(200, json=answer)
        if path == "/v1/previews/signed":
            assert dict(request.url.params)["sig"] == "abc"  # the signed query reaches the API as it was listed
            self.preview_fetches += 1
            return httpx.Response(200, content=_png(), headers={"content-type": "image/png"})
        if path == "/v1/styles":
            return httpx.Response(200, content=json.dumps({"data": [
                {"name": "cinematic", "version": 1, "title": "Cinematic", "description": "", "aspect": "4:5"}],
                "count": 1}), headers={"content-type": "application/json"})
        return httpx.Response(404, json={"code": "not_found", "message": path})


async def _follow(tg: BotApiStandIn, tmp_path, locale: str) -> ScriptedApi:  # noqa: ANN001
    from aiogram import Bot
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer

    from likeness.bot.config import BotSettings
    from likeness.bot.service import Service
    from likeness.bot.store import PendingJob, SqliteBotStore
    from likeness.bot.texts import make_i18n
    from likeness.bot.tracker import Tracker
    from likeness.client import AsyncClient

    scripted = ScriptedApi()
    api = AsyncClient("http://api.test", "lk_test", http=httpx.AsyncClient(
        base_url="http://api.test", transport=httpx.MockTransport(scripted)))
    settings = BotSettings(telegram_token=TOKEN, api_key="k", bot_status_interval_s=0, bot_poll_max_s=0.05)
    store = SqliteBotStore(tmp_path / f"bot-{locale}.sqlite3")
    bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
    try:
        tracker = Tracker(bot, Service(api, store, settings), make_i18n())
        status = await bot.send_message(42, "Training your model")
        pending = PendingJob("j1", kind="train", user_id=42, chat_id=42, message_id=status.message_id, locale=locale,
                             intake_reported=True)
        await store.save_pending(pending)
        await asyncio.wait_for(tracker._run(pending), 60)
        assert await store.pending() == []  # reported and dropped
    finally:
        await bot.session.close()
        await store.close()
    return scripted


@pytest.mark.parametrize("locale, caption, picker", [
    ("en", "How you look after 8 steps of training", "Your model is ready"),
    ("ru", "Как вы выглядите после 8 шагов обучения", "Ваша модель готова"),
])
def test_one_preview_photo_arrives_before_the_style_picker(tmp_path, locale, caption, picker):
    with BotApiStandIn() as tg:
        mark = tg.mark()
        scripted = asyncio.run(_follow(tg, tmp_path, locale))
        calls = tg.calls(chat_id=42)[mark:]
    photos = [c for c in calls if c.method == "sendPhoto"]
    assert len(photos) == 1 and scripted.preview_fetches == 1  # one preview, however often it was listed
    assert photos[0].text == caption
    sent = Image.open(io.BytesIO(next(iter(photos[0].files.values()))[1]))
    assert sent.size == (32, 32)
    order = [c for c in calls if c.method == "sendPhoto" or picker in c.text]
    assert [c.method for c in order] == ["sendPhoto", "sendMessage"]  # the preview, then the style picker
