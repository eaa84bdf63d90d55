"""The admin dashboard in a real browser: Debian's Chromium driven by Playwright, against uvicorn
serving the real app, PostgreSQL, Redis and a real Celery worker (the scripted lifecycle worker on
the tiny preset: its training is slow and steady, so progress and cancel can be watched).

What an operator would notice: they are sent to the login page without a session; a wrong key
shows an error; a running training's progress moves on the jobs page without a reload; cancel
from the job page ends it; a subject shows its photos' verdicts and its gallery; a new client's
key is shown once and refused by the API once revoked; a POST without the CSRF token is refused;
a hostile subject name is text; the admin key never reaches the access log.

Each page is saved as a screenshot under the test's tmp dir (``LIKENESS_ADMIN_SCREENSHOTS=DIR``
also writes them to DIR: ``docs/admin`` holds the README's).
"""

from __future__ import annotations

import io
import os
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from core.db.models import Image as ImageRow
from core.db.models import Job, JobKind, JobStage, JobState, Photo, PhotoStatus, WebhookDelivery, WorkerRecord, utcnow
from core.storage import LocalBlobStore, image_key, photo_crop_key, photo_mask_key, upscaled_image_key
from tests.app.fixtures import session_scope
from tests.integration.conftest import WorkerProcess, uvicorn_app, wait_for

pytestmark = [pytest.mark.integration]

CHROMIUM = os.environ.get("LIKENESS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=alert(1)>"


# ---- the service: its own queues, a slow scripted worker, uvicorn with its access log --------------------------


@pytest.fixture(scope="module")
def dash_env(it_env) -> dict[str, str]:
    return {**it_env, "LIKENESS_QUEUE_PREFIX": it_env["LIKENESS_QUEUE_PREFIX"].rstrip(".") + "adm.",
            "LIFECYCLE_STEP_S": "0.4"}  # 40 steps: a training takes ~16 s


@pytest.fixture(scope="module")
def dash_worker(dash_env, tmp_path_factory):
    prefix = dash_env["LIKENESS_QUEUE_PREFIX"]
    worker = WorkerProcess("tests.integration.lifecycle_app", dash_env, f"{prefix}gpu,{prefix}cpu",
                           tmp_path_factory.mktemp("logs") / "admin-worker.log").start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def service(dash_env, dash_worker, pg_url, tmp_path_factory):
    """uvicorn serving the app (access log on, to a file); yields (base_url, admin key, log path)."""
    admin_key = "lk_admin_" + uuid.uuid4().hex
    log_path = tmp_path_factory.mktemp("logs") / "admin-api.log"
    with uvicorn_app({**dash_env, "LIKENESS_BOOTSTRAP_ADMIN_KEY": admin_key}, log_path, log_level="info") as base:
        yield base, admin_key, log_path


@pytest.fixture(scope="module")
def app_client(service):
    """An ``app`` client of the service (created through the admin API) and an httpx client with its key."""
    base, admin_key, _ = service
    created = httpx.post(f"{base}/v1/admin/clients", json={"name": "phone-app", "role": "app"},
                         headers={"Authorization": f"Bearer {admin_key}"})
    assert created.status_code == 201, created.text
    body = created.json()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {body['api_key']}"}, timeout=30) as client:
        yield body["client"]["id"], client


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def new_subject(client: httpx.Client, name: str, photos: list[bytes]) -> str:
    subject_id = client.post("/v1/subjects", json={"name": name}).json()["id"]
    response = client.post(f"/v1/subjects/{subject_id}/photos",
                           files=[("files", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)])
    assert response.status_code == 201, response.text
    return subject_id


@pytest.fixture(scope="module")
def portrait_subject(app_client, pg_url, dash_env, grace_hopper):
    """A subject as a finished training and generation leave it (what the scripted worker does not
    compute): photo verdicts with crops and masks, class word scores, a loss curve, a ranked gallery."""
    client_id, client = app_client
    variants = [grace_hopper.rotate(angle, expand=False).resize((384, 480)) for angle in (0, 4, -4, 8)]
    subject_id = new_subject(client, "Grace", [_jpeg(v) for v in variants])
    store = LocalBlobStore(dash_env["LIKENESS_STORAGE_DIR"])
    now = utcnow()
    with session_scope(pg_url) as session:
        photos = session.query(Photo).filter_by(subject_id=subject_id).order_by(Photo.created_at, Photo.id).all()
        for i, photo in enumerate(photos):
            if i == len(photos) - 1:
                photo.status, photo.reason_code = PhotoStatus.rejected, "identity_outlier"
                photo.message = "This face does not look like the same person as the other photos."
                continue
            photo.status, photo.blur, photo.identity_distance = PhotoStatus.accepted, 180.0 + i, 0.31 + i / 100
            crop = variants[i].crop((80, 40, 300, 260)).resize((256, 256))
            mask = Image.new("L", (256, 256), 0)
            ImageDraw.Draw(mask).ellipse((40, 20, 216, 250), fill=255)
            photo.crop_key, photo.mask_key = photo_crop_key(subject_id, photo.id), photo_mask_key(subject_id, photo.id)
            store.put(photo.crop_key, _png(crop))
            store.put(photo.mask_key, _png(mask))
        curve = [[step, round(0.32 * 0.97 ** (step / 5) + 0.04, 4)] for step in range(5, 205, 5)]
        train = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.SUCCEEDED,
                    request={"preset": "tiny"}, progress=100.0, attempts=1, created_at=now - timedelta(minutes=30),
                    started_at=now - timedelta(minutes=29), finished_at=now - timedelta(minutes=20),
                    completed_stages=["intake", "caching", "training:stage1", "training:stage2"],
                    result={"intake": {"accepted": 3, "rejected": 1, "class_token": "woman",
                                       "class_scores": {"woman": 0.2712, "man": 0.2231, "person": 0.2405,
                                                        "girl": 0.2198}},
                            "training": {"steps": 200, "final_loss": curve[-1][1], "loss_curve": curve}})
        generate = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.SUCCEEDED,
                       request={"preset": "tiny", "style": "studio_headshot"}, progress=100.0, attempts=1,
                       completed_stages=["generating", "ranking", "upscaling", "delivering"],
                       created_at=now - timedelta(minutes=15), finished_at=now - timedelta(minutes=12))
        failed = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.FAILED,
                     request={"preset": "tiny"}, progress=72.0, attempts=1, completed_stages=[],
                     error_code="no_deliverable_image", created_at=now - timedelta(minutes=10),
                     finished_at=now - timedelta(minutes=9),
                     error_message="none of the 4 candidates could be delivered (4 no_face)")
        session.add_all([train, generate, failed])
        session.flush()
        for rank in range(1, 5):
            image_id = uuid.uuid4().hex
            # The tiny preset's portraits are noise; these are too, tinted so the ranks are told apart.
            noise = Image.effect_noise((256, 256), 60).convert("RGB")
            tinted = Image.blend(noise, Image.new("RGB", (256, 256), (60 * rank, 110, 200 - 40 * rank)), 0.55)
            store.put(image_key(subject_id, image_id), _png(tinted))
            store.put(upscaled_image_key(subject_id, image_id), _png(tinted.resize((512, 512))))
            session.add(ImageRow(id=image_id, job_id=generate.id, subject_id=subject_id, rank=rank,
                                 key=image_key(subject_id, image_id),
                                 upscaled_key=upscaled_image_key(subject_id, image_id), width=256, height=256,
                                 seed=40 + rank, prompt="a photo of sks woman, studio headshot",
                                 style="studio_headshot",
                                 scores={"aesthetic": round(6.4 - rank * 0.3, 2),
                                         "identity": round(0.82 - rank / 50, 3)}))
        for stage, seconds in (("generating", 41.0), ("ranking", 3.2), ("upscaling", 9.5), ("delivering", 0.8)):
            session.add(JobStage(job_id=generate.id, kind=JobKind.GENERATE, stage=stage, attempt=1, worker="gpu-a:311",
                                 started_at=now - timedelta(minutes=15), finished_at=now - timedelta(minutes=14),
                                 seconds=seconds))
        session.add(WorkerRecord(name=f"gpu-a-{uuid.uuid4().hex[:4]}:311", queues=["gpu"], state="busy",
                                 current_job_id=generate.id, models=[{"name": "sd15", "bytes": 2 << 30}],
                                 gpu_memory_bytes=9 << 30, heartbeat_at=now))
        session.add(WorkerRecord(name=f"cpu-b-{uuid.uuid4().hex[:4]}:87", queues=["cpu"], state="idle", models=[],
                                 heartbeat_at=now - timedelta(seconds=60)))
        session.add(WebhookDelivery(client_id=client_id, job_id=train.id, event="job.succeeded", payload={}, attempt=4,
                                    status_code=503, error="receiver answered HTTP 503"))
        session.add(WebhookDelivery(client_id=client_id, job_id=generate.id, event="job.succeeded", payload={},
                                    attempt=1, status_code=200, delivered_at=now))
    return subject_id


# ---- the browser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


#: The screenshots the README shows (``LIKENESS_ADMIN_SCREENSHOTS=docs/admin`` refreshes them).
DOC_SHOTS = {"overview", "jobs", "job-running", "subject", "clients", "client-key-once", "webhooks",
             "login-wrong-key", "overview-phone"}


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """``shot(page, name)``: a PNG of the page under the tmp dir; the README's ones also go, with
    256 colours (small files), to $LIKENESS_ADMIN_SCREENSHOTS when it is set."""
    folder = tmp_path_factory.mktemp("screenshots")
    docs = os.environ.get("LIKENESS_ADMIN_SCREENSHOTS")

    def shot(page, name: str, full_page: bool = True) -> Path:  # noqa: ANN001
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        if docs and name in DOC_SHOTS:
            Path(docs).mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").quantize(256).save(Path(docs) / path.name, optimize=True)
        return path

    return shot


class Dialogs(list):
    """Every JavaScript dialog a page opened (an executed ``alert(1)`` would land here)."""


@pytest.fixture
def page(chromium, service):
    context = chromium.new_context(viewport={"width": 1280, "height": 860}, base_url=service[0])
    page = context.new_page()
    page.dialogs = Dialogs()
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.set_default_timeout(15_000)
    yield page
    context.close()


def log_in(page, key: str) -> None:  # noqa: ANN001
    page.fill("#api_key", key)
    page.click("button[type=submit]")


@pytest.fixture
def admin_page(page, service):
    page.goto("/admin/login")
    log_in(page, service[1])
    page.wait_for_url("**/admin")
    return page


# ---- the journeys ------------------------------------------------------------------------------------------------


def test_without_a_session_the_login_page_and_a_wrong_key_is_an_error(page, service, screens):
    base, admin_key, _ = service
    page.goto("/admin/jobs?state=running")
    assert page.url.startswith(base + "/admin/login?next=")
    screens(page, "login")
    log_in(page, "lk_wrong_" + uuid.uuid4().hex)
    error = page.locator("#login-error")
    assert "not a valid admin API key" in error.inner_text()
    assert "Traceback" not in page.content() and page.input_value("#api_key") == ""
    screens(page, "login-wrong-key")
    log_in(page, admin_key)
    page.wait_for_url("**/admin/jobs?state=running")
    assert page.locator("h1").inner_text() == "Jobs"
    assert admin_key not in page.content()
    cookie = next(c for c in page.context.cookies() if c["name"] == "likeness_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert cookie["expires"] > 0  # not a browser-session cookie: it has an expiry


def test_training_progress_moves_without_a_reload_and_cancel_ends_it(admin_page, app_client, screens):
    page = admin_page
    _, client = app_client
    subject_id = new_subject(client, "Ada", [_jpeg(Image.effect_noise((320, 320), 50).convert("RGB"))])
    job_id = client.post(f"/v1/subjects/{subject_id}/train", json={}).json()["id"]

    page.goto("/admin/jobs?kind=train")
    row = page.locator(f"#job-{job_id}")
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"] > 0, 30, 0.2, "the job to start")
    page.evaluate("window.__same_document = true")  # gone if the page reloads
    first = row.locator("[data-field=progress]").inner_text()
    page.wait_for_function(
        """([id, first]) => { const cell = document.querySelector(`#job-${id} [data-field=progress]`);
                              return cell && cell.textContent !== first && parseInt(cell.textContent) > 0; }""",
        arg=[job_id, first], timeout=20_000)
    assert page.evaluate("window.__same_document") is True
    assert row.get_attribute("data-state") == "running"
    stage = row.locator("[data-field=stage]").inner_text()
    assert stage in ("intake", "caching", "training:stage1", "training:stage2")
    screens(page, "jobs")

    page.click(f"#job-{job_id} a[href='/admin/jobs/{job_id}']")
    page.wait_for_url(f"**/admin/jobs/{job_id}")
    assert "running" in page.locator("#job-state").inner_text()
    assert '"preset": "tiny"' in page.locator("#job-request").inner_text()  # the resolved request
    # The job page's live part follows the job through its stages too (no reload).
    page.locator("#job-live [data-field=stage]", has_text="training:stage1").wait_for(timeout=30_000)
    # ... and so does its header: the worker that holds it and its heartbeat, from the same poll
    page.evaluate("window.__same_document = true")
    assert page.locator("#job-facts [data-field=worker]").inner_text() not in ("", "–")
    beat = page.locator("#job-facts [data-field=heartbeat]").inner_text()
    page.wait_for_function("""(beat) => document.querySelector('#job-facts [data-field=heartbeat]')
                                        .textContent !== beat""", arg=beat, timeout=10_000)
    assert page.evaluate("window.__same_document") is True
    assert page.locator("#stage-timeline tr").count() >= 4  # header, intake, caching, training:stage1
    screens(page, "job-running")
    page.click("#cancel-job")
    page.wait_for_url(f"**/admin/jobs/{job_id}?done=canceled")
    page.locator("#job-state", has_text="canceled").wait_for(timeout=20_000)  # the live part, then a refresh
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "canceled"
    assert "canceled" in page.locator("#job-error").inner_text()
    assert page.locator("#retry-job").is_visible()
    screens(page, "job-canceled")


def test_training_previews_appear_on_the_job_page_while_it_runs(admin_page, app_client, screens):
    page = admin_page
    _, client = app_client
    subject_id = new_subject(client, "Grace", [_jpeg(Image.effect_noise((320, 320), 60).convert("RGB"))])
    job_id = client.post(f"/v1/subjects/{subject_id}/train", json={}).json()["id"]
    page.goto(f"/admin/jobs/{job_id}")
    assert page.locator("#job-previews").count() == 0  # nothing made yet
    page.evaluate("window.__same_document = true")  # gone if the page reloads (it does once the job ends)
    first = page.locator("#job-previews figure").first
    first.wait_for(timeout=60_000)
    assert page.evaluate("window.__same_document") is True  # arrived with the live part, no reload
    assert "selecting" in page.locator("#job-live [data-field=stage]").inner_text()
    assert first.get_attribute("data-step") == "10" and "after 10 steps" in first.inner_text()
    assert page.evaluate("document.querySelector('#job-previews img').naturalWidth") == 64  # the image loads
    polled = client.get(f"/v1/jobs/{job_id}").json()
    assert polled["state"] == "running" and polled["previews"][0]["step"] == 10  # the API's clients see it too
    screens(page, "job-previews")


def test_a_subject_shows_its_photos_verdicts_and_its_gallery(admin_page, app_client, portrait_subject, screens):
    page = admin_page
    client_id, _ = app_client
    page.goto(f"/admin/subjects?client_id={client_id}")
    screens(page, "subjects")
    page.click(f"a[href='/admin/subjects/{portrait_subject}']")
    page.wait_for_url(f"**/admin/subjects/{portrait_subject}")
    photos = page.locator("#photos figure")
    assert photos.count() == 4
    verdicts = [photos.nth(i).locator(".badge").inner_text() for i in range(4)]
    assert verdicts == ["accepted", "accepted", "accepted", "rejected"]
    assert photos.nth(3).locator(".verdict-reason").inner_text() == "identity_outlier"
    assert "same person" in photos.nth(3).inner_text()
    assert "woman" in page.locator("#class-word b").first.inner_text()
    assert page.locator("#loss-curve svg polyline").count() == 1
    gallery = page.locator("#gallery figure")
    assert gallery.count() == 4
    assert [gallery.nth(i).locator("b").inner_text() for i in range(4)] == ["rank 1", "rank 2", "rank 3", "rank 4"]
    assert "aesthetic 6.1" in gallery.nth(0).inner_text()
    page.wait_for_load_state("networkidle")
    loaded = page.evaluate("""() => [...document.querySelectorAll('#photos img, #gallery img')]
                                   .map(img => img.complete && img.naturalWidth > 0)""")
    assert loaded and all(loaded), "an image did not load through the admin media routes"
    widths = page.evaluate("() => [...document.querySelectorAll('#photos img, #gallery img')].map(i => i.naturalWidth)")
    assert max(widths) <= 320, widths  # thumbnails, not the originals
    screens(page, "subject")


def test_a_new_clients_key_is_shown_once_and_refused_once_revoked(admin_page, service, screens):
    page = admin_page
    base = service[0]
    page.goto("/admin/clients")
    page.click("#create-client summary")
    page.fill("#create-client input[name=name]", "tg-bot")
    page.select_option("#create-client select[name=role]", "bot")
    page.click("#create-client-submit")
    key = page.locator("#new-api-key").inner_text().strip()
    assert key.startswith("lk_")
    screens(page, "client-key-once")
    assert httpx.get(f"{base}/v1/subjects", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    page.click("text=I have copied it")
    page.wait_for_selector("#client-name")
    assert key not in page.content() and key[:7] in page.content()
    page.check("#revoke-confirm")
    page.click("#revoke-key")
    page.wait_for_url("**done=revoked")
    assert "revoked" in page.locator("#client-name").inner_text()
    refused = httpx.get(f"{base}/v1/subjects", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    page.goto("/admin/clients")
    screens(page, "clients")


def test_a_post_without_the_csrf_token_is_refused(admin_page, service):
    page = admin_page
    page.goto("/admin/clients")
    name = "csrf-" + uuid.uuid4().hex[:6]
    # Same browser, same session cookie, but no token: what a forged cross-site form would send.
    refused = page.request.post("/admin/clients", form={"name": name, "role": "admin"}, max_redirects=0)
    assert refused.status == 403 and "security token" in refused.text()
    page.goto("/admin/clients")
    assert name not in page.content()


def test_a_hostile_subject_name_renders_as_text_and_deleting_it_leaves_nothing(admin_page, app_client, screens):
    page = admin_page
    client_id, client = app_client
    subject_id = new_subject(client, XSS, [_jpeg(Image.effect_noise((320, 320), 40).convert("RGB"))])
    page.goto(f"/admin/subjects?client_id={client_id}")
    page.goto(f"/admin/subjects/{subject_id}")
    assert page.locator("#subject-name").inner_text() == XSS
    assert page.locator("img[src='x']").count() == 0
    page.click("#delete-subject")
    page.wait_for_url(f"**/admin/subjects/{subject_id}/delete")
    assert page.locator("h1").inner_text() == f"Delete subject “{XSS}”?"
    screens(page, "subject-delete-confirm")
    page.fill("input[name=confirm_name]", XSS)
    page.click("#confirm-delete")
    page.wait_for_url(f"**/admin/subjects/{subject_id}/deleted**")
    assert "Nothing is left" in page.locator("#nothing-left").inner_text()
    cells = page.locator("#leftovers td.num").all_inner_texts()
    assert cells and set(cells) == {"0"}
    assert page.dialogs == [], "a script ran"


def test_overview_and_webhook_log_also_at_phone_width(admin_page, portrait_subject, pg_url, screens):
    page = admin_page
    with session_scope(pg_url) as session:  # the GPU worker's heartbeat is fresh, the CPU worker's is old
        session.query(WorkerRecord).filter(WorkerRecord.name.like("gpu-a-%")).update({"heartbeat_at": utcnow()})
    page.goto("/admin")
    workers = page.locator("#workers tr")
    gpu, cpu = (workers.filter(has_text=name).inner_text() for name in ("gpu-a-", "cpu-b-"))
    assert "busy" in gpu and "9.0 GiB" in gpu and "sd15" in gpu and "stale" not in gpu
    assert "idle" in cpu and "stale" in cpu  # no heartbeat for longer than LIKENESS_JOB_STALE_AFTER_S
    assert "generating" in page.locator("#stage-table").inner_text()
    assert "no_deliverable_image" in page.locator("#failed-codes").inner_text()
    assert page.locator("#queues").count() == 1 and page.locator("svg.chart").count() >= 2
    screens(page, "overview")

    page.goto("/admin/webhooks?status=failed")
    log = page.locator("#deliveries")
    assert "receiver answered HTTP 503" in log.inner_text()
    screens(page, "webhooks")
    log.locator("button:has-text('Redeliver')").first.click()
    page.wait_for_url("**done=redelivered")
    assert "queued again" in page.locator(".notice").inner_text()

    page.set_viewport_size({"width": 390, "height": 844})
    for path, name in (("/admin", "overview-phone"), ("/admin/jobs", "jobs-phone"),
                       (f"/admin/subjects/{portrait_subject}", "subject-phone")):
        page.goto(path)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{path} is wider than a phone screen by {overflow}px"
        screens(page, name)


def test_the_admin_key_never_reaches_the_access_log(service, admin_page):
    _, admin_key, log_path = service
    text = log_path.read_text(errors="replace")
    assert '"POST /admin/login HTTP/1.1" 303' in text  # the access log is on and saw the login
    assert admin_key not in text
