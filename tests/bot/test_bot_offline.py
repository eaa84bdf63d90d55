"""The real bot process against the Bot API stand-in, with no Likeness API behind it: what it must do
before (or without) the service: explain itself in the user's language, refuse files it cannot take,
wait out Telegram's flood control, stay up and say "try again in a minute" while the API is down,
and serve Telegram's webhook calls when run in webhook mode."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.bot.process import BotProcess, bot_env
from tests.bot.standin import BotApiStandIn, Call
from tests.integration.conftest import wait_for


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tg():
    with BotApiStandIn() as standin:
        yield standin


@pytest.fixture(scope="module")
def bot(tg, tmp_path_factory):
    """The bot in embedded mode (SQLite state), its API at an address where nothing listens."""
    data = tmp_path_factory.mktemp("bot")
    env = bot_env(tg, f"http://127.0.0.1:{_closed_port()}", "lk_unused", LIKENESS_DATA_DIR=str(data),
                  LIKENESS_BOT_RETENTION_DAYS="14", LIKENESS_BOT_MIN_PHOTOS="3", LIKENESS_BOT_MAX_PHOTOS="12")
    with BotProcess(env, data / "bot.log") as process:
        yield process
    assert (data / "bot.sqlite3").exists()


def _reply(tg: BotApiStandIn, chat: int, after: int, timeout_s: float = 60) -> Call:
    return tg.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == chat, timeout_s, after,
                       f"a message to {chat}")


def test_start_and_help_in_the_users_language(tg, bot):
    en, ru = tg.user(101, "Grace", "en"), tg.user(102, "Иван", "ru-RU")
    mark = tg.mark()
    tg.send_text(en, "/start")
    start = _reply(tg, en.id, mark).text
    assert "3 to 12 photos" in start and "/delete" in start and "14 days" in start and "nobody else" in start
    mark = tg.mark()
    tg.send_text(ru, "/start")
    assert "от 3 до 12" in _reply(tg, ru.id, mark).text
    mark = tg.mark()
    tg.send_text(ru, "/help")
    help_ru = _reply(tg, ru.id, mark).text
    assert "/delete - удалить" in help_ru and "от 3 до 12" in help_ru  # the limits this bot runs with
    mark = tg.mark()
    tg.send_text(en, "/help")
    assert "(3 to 12)" in _reply(tg, en.id, mark).text


def test_files_it_cannot_take_are_refused_without_downloading(tg, bot):
    user = tg.user(103, "Ada")
    downloads = len(tg.calls("getFile"))
    mark = tg.mark()
    tg.send_document(user, b"\xff\xd8" + b"0" * 100, "IMG_0001.HEIC", "image/heic", size=21 * 1024 * 1024)
    assert "larger than 20 MB" in _reply(tg, user.id, mark).text
    mark = tg.mark()
    tg.send_document(user, b"%PDF-1.4", "contract.pdf", "application/pdf")
    assert "not a picture" in _reply(tg, user.id, mark).text
    assert len(tg.calls("getFile")) == downloads


def test_flood_control_is_waited_out(tg, bot):
    user = tg.user(104, "Lin")
    tg.fail("sendMessage", retry_after=2)
    mark = tg.mark()
    tg.send_text(user, "/help")
    reply = _reply(tg, user.id, mark)
    refused = [c for c in tg.state.calls[mark:] if c.method == "sendMessage" and c.status == 429]
    assert refused and reply.at - refused[0].at >= 2.0 and "/status" in reply.text


def test_the_api_down_gets_a_friendly_answer_and_the_bot_stays_up(tg, bot):
    user = tg.user(105, "Max")
    for send in (lambda: tg.send_photo(user, b"\xff\xd8\xff\xe0 a photo"), lambda: tg.send_text(user, "/status"),
                 lambda: tg.send_text(user, "/styles")):
        mark = tg.mark()
        send()
        assert _reply(tg, user.id, mark).text == ("The portrait service isn't answering right now. "
                                                  "Please try again in a minute.")
    assert bot.alive


def test_webhook_mode_registers_and_answers_updates(tg, tmp_path):
    port = _closed_port()
    public = f"http://127.0.0.1:{port}/telegram"
    env = bot_env(tg, f"http://127.0.0.1:{_closed_port()}", "lk_unused", LIKENESS_DATA_DIR=str(tmp_path),
                  LIKENESS_TELEGRAM_WEBHOOK_SECRET="s3cret-token")
    mark = tg.mark()
    with BotProcess(env, tmp_path / "bot.log", ("--webhook-url", public, "--listen", f"127.0.0.1:{port}")) as bot:
        registered = tg.wait_for(lambda c: c.method == "setWebhook", 60, mark, "setWebhook")
        assert registered.params["url"] == public and registered.params["secret_token"] == "s3cret-token"
        wait_for(lambda: _answers(public), 30, 0.2, "the webhook server")
        user = tg.user(106, "Webb")
        update = {"update_id": 9001, "message": {"message_id": 1, "date": int(time.time()), "from": user.json(),
                                                 "chat": {"id": user.id, "type": "private"}, "text": "/help",
                                                 "entities": [{"type": "bot_command", "offset": 0, "length": 5}]}}
        forged = httpx.post(public, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"})
        assert forged.status_code == 401
        accepted = httpx.post(public, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"})
        assert accepted.status_code == 200
        assert "/status" in _reply(tg, user.id, mark).text
        assert bot.alive


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False
