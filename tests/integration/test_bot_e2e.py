"""The Telegram bot end to end: the real aiogram bot process, a local Bot API stand-in (Telegram
cannot be reached from here), the real Likeness API (uvicorn), PostgreSQL, Redis, and Celery
workers on the tiny preset.

One journey: /start -> six photos (an album, a full-size file, a cat) -> verdicts -> Train ->
the bot is SIGKILLed mid-training and restarted -> the same status message climbs to done ->
the cat explained -> a style -> an album of k portraits and k full-size documents -> /delete ->
no blob of that user left. Beside it: a second user who never sees the first one's data, a 429
waited out, files the bot must refuse, and the API stopped mid-conversation.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from likeness.client import Client
from tests.bot.process import BotProcess, bot_env
from tests.bot.standin import BotApiStandIn, Call
from tests.conftest import encode
from tests.integration.conftest import ROOT, clean_environ, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PERCENT = re.compile(r"(\d+)%")


@pytest.fixture(scope="module")
def tg():
    with BotApiStandIn() as standin:
        yield standin


@pytest.fixture(scope="module")
def bot_key(api) -> str:
    base, admin_key = api
    created = httpx.post(f"{base}/v1/admin/clients", json={"name": "telegram-bot", "role": "bot"},
                         headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    assert created.status_code == 201, created.text
    return created.json()["api_key"]


def _photos(grace_hopper: Image.Image) -> list[bytes]:
    from tests.pipelines.intake.conftest import person_variants

    return [encode(v, quality=90) for v in person_variants(grace_hopper, 5)]


def _cat() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.chelsea()).resize((900, 600)), quality=90)


def _reply(tg: BotApiStandIn, chat: int, after: int, contains: str, timeout_s: float = 60) -> Call:
    return tg.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == chat and contains in c.text, timeout_s,
                       after, f"a message to {chat} containing {contains!r}")


def _button(call: Call, data_prefix: str) -> str:
    return next(data for _, data in call.buttons if data.startswith(data_prefix))


def test_bot_journey_restart_isolation_and_deletion(api, split_workers, tg, bot_key, e2e_env, grace_hopper, tmp_path):
    base, _ = api
    redis_prefix = f"{e2e_env['LIKENESS_QUEUE_PREFIX']}bot:"
    env = bot_env(tg, base, bot_key, LIKENESS_REDIS_URL=e2e_env["LIKENESS_REDIS_URL"],
                  LIKENESS_BOT_REDIS_PREFIX=redis_prefix, LIKENESS_DATA_DIR=str(tmp_path),
                  LIKENESS_BOT_TRAIN_OPTIONS='{"steps": 10}', LIKENESS_BOT_GENERATIONS_PER_HOUR="2",
                  LIKENESS_BOT_GENERATE_OPTIONS='{"n": 3, "k": 2, "steps": 4, "no_controlnet": true, "seed": 7}')
    bot = BotProcess(env, tmp_path / "bot.log").start()
    grace, ivan = tg.user(7001, "Grace", "en"), tg.user(7002, "Иван", "ru")
    service = Client(base, bot_key)
    try:
        # /start explains what happens to the photos
        mark = tg.mark()
        tg.send_text(grace, "/start")
        start = _reply(tg, grace.id, mark, "/delete")
        assert "30 days" in start.text and "5 to 20" in start.text

        # six photos: four as an album, one as a full-size file, and a cat
        photos = _photos(grace_hopper)
        mark = tg.mark()
        for data in photos[:4]:
            tg.send_photo(grace, data, media_group_id="album-1")
        album = _reply(tg, grace.id, mark, "Photos so far: 4")
        assert [f"{n}. ✅ Photo {n} received." in album.text for n in (1, 2, 3, 4)] == [True] * 4
        mark = tg.mark()
        tg.send_document(grace, photos[4], "IMG_2041.JPG", "image/jpeg")
        assert "Photo 5 received" in _reply(tg, grace.id, mark, "Photos so far: 5").text
        mark = tg.mark()
        tg.send_photo(grace, _cat())
        ready = _reply(tg, grace.id, mark, "Photos so far: 6")
        assert "Photo 6 received" in ready.text and ("Train", "train") in ready.buttons

        # files the bot refuses without downloading them
        downloads = len(tg.calls("getFile"))
        mark = tg.mark()
        tg.send_document(grace, b"%PDF-1.4", "scan.pdf", "application/pdf")
        assert "not a picture" in _reply(tg, grace.id, mark, "❌").text
        mark = tg.mark()
        tg.send_document(grace, b"\xff\xd8 too big", "RAW.JPG", "image/jpeg", size=25 * 1024 * 1024)
        assert "20 MB" in _reply(tg, grace.id, mark, "❌").text
        assert len(tg.calls("getFile")) == downloads

        # a second user, in Russian, with one photo: separate data
        mark = tg.mark()
        tg.send_photo(ivan, photos[0])
        ivan_reply = _reply(tg, ivan.id, mark, "Всего фото: 1")
        assert "Фото 1 получено" in ivan_reply.text
        assert service.list_subjects(external_ref=f"tg:{grace.id}").count == 1
        assert service.list_subjects(external_ref=f"tg:{ivan.id}").count == 1
        grace_subject = service.list_subjects(external_ref=f"tg:{grace.id}").data[0].id

        # Train; Telegram's flood control strikes once on the status edits
        tg.fail("editMessageText", retry_after=1)
        mark = tg.mark()
        tg.press(grace, ready, "train")
        status = _reply(tg, grace.id, mark, "Training your model")
        status_id = status.result["message_id"]

        def edits() -> list[Call]:
            return [c for c in tg.calls("editMessageText", grace.id) if int(c.params["message_id"]) == status_id]

        def training() -> bool:  # the job itself, not the bot's status edits: those may skip a short stage
            jobs = service.list_jobs(subject_id=grace_subject).data
            return bool(jobs) and jobs[0].stage not in (None, "intake") and jobs[0].state == "running"

        wait_for(training, 240, 0.1, "training to start")
        bot.kill()  # SIGKILL in the middle of training
        killed_at = len(edits())
        bot = BotProcess(env, tmp_path / "bot.log").start()

        # the restarted bot follows the same job: the cat explained, the same status message up to done
        picker = _reply(tg, grace.id, mark, "Your model is ready", timeout_s=300)
        report = _reply(tg, grace.id, mark, "I checked your photos")
        assert "5 of 6 can be used" in report.text and "Photo 6: No person in this photo" in report.text
        texts = [c.text for c in edits()]
        percents = [int(PERCENT.search(t).group(1)) for t in texts if PERCENT.search(t)]
        assert percents == sorted(percents) and percents[-1] == 100 and "Done!" in texts[-1], texts
        assert len(texts) > killed_at  # edits came from the restarted process too
        retried = [c for c in tg.state.calls if c.method == "editMessageText" and c.status == 429]
        assert retried and any(c.at >= retried[0].at + 1 for c in edits())  # waited out retry_after
        style = _button(picker, "style:")

        # Ivan cannot use Grace's training, not even by sending the data of her style button from his chat
        mark = tg.mark()
        tg.press(ivan, ivan_reply, style)
        assert "Сначала обучите модель" in _reply(tg, ivan.id, mark, "обучите").text
        mark = tg.mark()
        tg.send_text(ivan, "/status")
        assert "Фото получено: 1" in _reply(tg, ivan.id, mark, "Фото").text

        # a style -> the best k as an album, the full-size files as documents, then more/another style
        mark = tg.mark()
        tg.press(grace, picker, style)
        more = _reply(tg, grace.id, mark, "Want more?", timeout_s=300)
        groups = [c for c in tg.calls("sendMediaGroup", grace.id) if c.at >= more.at - 120]
        album, documents = groups[-2], groups[-1]
        assert [m["type"] for m in album.params["media"]] == ["photo", "photo"]
        assert [m["type"] for m in documents.params["media"]] == ["document", "document"]
        sizes = [Image.open(__import__("io").BytesIO(data)).size for _, data in documents.files.values()]
        assert sizes == [(256, 256), (256, 256)]  # the x2 files of the 128 px tiny portraits
        assert {data for _, data in more.buttons} == {"more:" + style.split(":", 1)[1], "styles"}

        # "more in this style" starts another generation (no retraining); /cancel stops it
        mark = tg.mark()
        tg.press(grace, more, "more:" + style.split(":", 1)[1])
        second = _reply(tg, grace.id, mark, "Painting portraits")
        assert not [c for c in tg.state.calls[mark:] if "Training" in c.text]
        mark = tg.mark()
        tg.send_text(grace, "/cancel")
        assert _reply(tg, grace.id, mark, "Stop").text == "Stopped."
        tg.wait_for(lambda c: c.method == "editMessageText" and c.params["message_id"] == str(
            second.result["message_id"]) and "Canceled." in c.text, 120, mark, "the status to say canceled")
        # two generations this hour: the limit (2 per hour here) is explained, nothing is started
        mark = tg.mark()
        tg.press(grace, more, "more:" + style.split(":", 1)[1])
        assert "2 sets of portraits this hour" in _reply(tg, grace.id, mark, "this hour").text

        # /delete asks, then erases the user's data in the service and the bot
        mark = tg.mark()
        tg.send_text(grace, "/delete")
        confirm = _reply(tg, grace.id, mark, "cannot be undone")
        mark = tg.mark()
        tg.press(grace, confirm, "delete:yes")
        tg.wait_for(lambda c: c.method == "editMessageText" and "are deleted" in c.text, 60, mark, "the deletion")
        assert service.list_subjects(external_ref=f"tg:{grace.id}").count == 0
        blobs = Path(e2e_env["LIKENESS_STORAGE_DIR"]) / "subjects" / grace_subject
        assert not [p for p in blobs.rglob("*") if p.is_file()]
        assert service.list_subjects(external_ref=f"tg:{ivan.id}").count == 1  # the other user keeps theirs
        assert bot.alive
    except BaseException:
        print("==== bot log\n" + bot.log()[-15000:])
        print("==== transcript\n" + tg.transcript(80))
        raise
    finally:
        bot.stop()
        service.close()


def test_api_stopped_mid_conversation_gets_a_friendly_message(e2e_env, pg_url, tg, bot_key, grace_hopper,
                                                               tmp_path):
    """Its own API process (stopped and started again here); the bot keeps state in SQLite (embedded)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "api.log", "ab")

    def start_api() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port",
                                 str(port), "--log-level", "warning"], cwd=ROOT, env=clean_environ(**e2e_env),
                                stdout=log, stderr=log)
        wait_for(lambda: _up(base), 60, 0.2, "the API to start")
        return proc

    api_proc = start_api()
    user = tg.user(7100 + uuid.uuid4().int % 1000, "Ada")
    photos = _photos(grace_hopper)
    with BotProcess(bot_env(tg, base, bot_key, LIKENESS_DATA_DIR=str(tmp_path / "bot")), tmp_path / "bot.log") as bot:
        try:
            mark = tg.mark()
            tg.send_photo(user, photos[0])
            _reply(tg, user.id, mark, "Photo 1 received")
            api_proc.terminate()
            api_proc.wait(20)

            for action in ("photo", "/status"):
                mark = tg.mark()
                tg.send_photo(user, photos[1]) if action == "photo" else tg.send_text(user, action)
                assert "try again in a minute" in _reply(tg, user.id, mark, "isn't answering").text
            assert bot.alive

            api_proc = start_api()
            mark = tg.mark()
            tg.send_photo(user, photos[2])
            assert "Photo 2 received" in _reply(tg, user.id, mark, "Photos so far: 2").text
        except BaseException:
            print("==== bot log\n" + bot.log()[-10000:])
            raise
        finally:
            api_proc.terminate()
            api_proc.wait(20)
    assert (tmp_path / "bot" / "bot.sqlite3").exists()


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
