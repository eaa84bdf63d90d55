"""The admin dashboard over HTTP (no browser): sessions, CSRF, escaping, admin-only media, actions.

The real-browser journeys are in ``tests/integration/test_admin_browser.py``.
"""

from __future__ import annotations

import io
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.admin import auth
from core.db.models import Client, Job, JobKind, JobState, Photo, PhotoStatus, Subject, WebhookDelivery
from tests.app.fixtures import session_scope
from tests.app.helpers import create_subject, jpeg, served, upload

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def browser(app, http):
    """A fresh cookie jar against the running app (no redirects followed, so they can be checked).

    Not entered as a context manager: the session's ``http`` client already runs the app's lifespan
    (a second start/stop would stop the listeners every other test relies on)."""
    return TestClient(app, raise_server_exceptions=False, follow_redirects=False)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def log_in(browser: TestClient, key: str):  # noqa: ANN201
    page = browser.get("/admin/login")
    assert page.status_code == 200
    return browser.post("/admin/login", data={"api_key": key, "csrf_token": csrf_of(page.text), "next": "/admin"})


@pytest.fixture
def operator(browser, admin):
    """``browser`` logged in as a fresh admin; returns the CSRF token of its session."""
    response = log_in(browser, admin.key)
    assert response.status_code == 303, response.text
    return csrf_of(browser.get("/admin").text)


@pytest.mark.parametrize("path", ["/admin", "/admin/jobs", "/admin/clients", "/admin/subjects", "/admin/webhooks",
                                  "/admin/jobs/x", "/admin/media/photos/x/original", "/admin/nowhere"])
def test_every_page_without_a_session_sends_the_browser_to_the_login_page(browser, path):
    response = browser.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/admin/login")
    polled = browser.get(path, headers={"HX-Request": "true"})  # an htmx poll: the whole page goes to the login
    assert polled.status_code == 204 and polled.headers["HX-Redirect"].startswith("/admin/login")


def test_an_api_key_header_is_no_session(browser, admin):
    response = browser.get("/admin/clients", headers=admin.headers)
    assert response.status_code == 303 and response.headers["location"].startswith("/admin/login")


def test_login_sets_a_signed_strict_httponly_cookie_and_logout_ends_the_session(browser, admin):
    response = log_in(browser, admin.key)
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    cookie = next(v for v in response.headers.get_list("set-cookie") if v.startswith(auth.SESSION_COOKIE + "="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/admin" in flags
    assert f"max-age={auth.SESSION_TTL_S}" in flags
    assert admin.key not in cookie and admin.key not in response.headers.get("location", "")
    page = browser.get("/admin")
    assert page.status_code == 200 and "Overview" in page.text
    assert admin.key not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]

    out = browser.post("/admin/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"
    assert browser.get("/admin").status_code == 303


def test_login_keeps_the_page_asked_for_but_never_another_site(browser, admin):
    page = browser.get("/admin/login?next=/admin/clients")
    response = browser.post("/admin/login", data={"api_key": admin.key, "csrf_token": csrf_of(page.text),
                                                  "next": "//evil.example/admin"})
    assert response.headers["location"] == "/admin"
    assert 'name="next" value="/admin/clients"' in page.text


@pytest.mark.parametrize("which", ["unknown", "app", "revoked"])
def test_a_wrong_key_shows_an_error_not_a_stack_trace(browser, make_client, which):
    key = "lk_not-a-key" if which == "unknown" else make_client().key
    if which == "revoked":
        victim = make_client("admin")
        from app.services.clients import revoke
        from core.db.uow import UnitOfWork

        with UnitOfWork() as uow:
            revoke(uow, victim.id)
        key = victim.key
    response = log_in(browser, key)
    assert response.status_code == 401
    assert "not a valid admin API key" in response.text
    assert "Traceback" not in response.text and key not in response.text
    assert auth.SESSION_COOKIE + "=" not in response.headers.get("set-cookie", "")
    assert browser.get("/admin").status_code == 303


def test_sign_in_attempts_are_limited_per_address(app, admin):
    """Ten wrong keys from one address: the next attempt waits, even with the right key; others are unaffected."""
    from app.admin.routes import LOGIN_FAILURES_PER_MINUTE

    guesser = TestClient(app, raise_server_exceptions=False, follow_redirects=False, client=("203.0.113.7", 50000))
    for _ in range(LOGIN_FAILURES_PER_MINUTE):
        assert log_in(guesser, "lk_guess").status_code == 401
    blocked = log_in(guesser, admin.key)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    assert "Too many failed sign-ins" in blocked.text and admin.key not in blocked.text
    assert auth.SESSION_COOKIE + "=" not in blocked.headers.get("set-cookie", "")
    elsewhere = TestClient(app, raise_server_exceptions=False, follow_redirects=False, client=("198.51.100.9", 50000))
    assert log_in(elsewhere, admin.key).status_code == 303


def _log_in_over(http: httpx.Client, key: str, forwarded_for: str) -> httpx.Response:
    page = http.get("/admin/login")
    return http.post("/admin/login", data={"api_key": key, "csrf_token": csrf_of(page.text), "next": "/admin"},
                     headers={"X-Forwarded-For": forwarded_for})


def test_the_sign_in_limit_cannot_be_dodged_with_x_forwarded_for(app, admin, settings):
    """Served as `likeness serve` serves it (real uvicorn, proxies from settings: none by default), a fresh
    X-Forwarded-For header per attempt is still one address."""
    from app.admin.routes import LOGIN_FAILURES_PER_MINUTE
    from app.main import proxy_options

    assert settings.forwarded_allow_ips == ""
    with served(app, **proxy_options(settings)) as base, httpx.Client(base_url=base, timeout=10) as http:
        for i in range(LOGIN_FAILURES_PER_MINUTE):
            assert _log_in_over(http, "lk_guess", f"198.18.0.{i}").status_code == 401
        assert _log_in_over(http, admin.key, "198.18.1.1").status_code == 429


def test_a_proxy_named_in_settings_is_believed(app, admin, settings, monkeypatch):
    """Behind a trusted proxy (here: 127.0.0.1 named in LIKENESS_FORWARDED_ALLOW_IPS) the forwarded address counts."""
    from app.admin.routes import LOGIN_FAILURES_PER_MINUTE
    from app.main import proxy_options

    monkeypatch.setattr(settings, "forwarded_allow_ips", "127.0.0.1")
    with served(app, **proxy_options(settings)) as base, httpx.Client(base_url=base, timeout=10) as http:
        for _ in range(LOGIN_FAILURES_PER_MINUTE):
            assert _log_in_over(http, "lk_guess", "198.18.2.7").status_code == 401
        assert _log_in_over(http, admin.key, "198.18.2.7").status_code == 429
        assert _log_in_over(http, admin.key, "198.18.2.8").status_code == 303  # another client behind the proxy


def test_posts_without_the_csrf_token_are_refused(browser, operator):
    name = f"csrf-{time.time_ns()}"
    for data in ({"name": name}, {"name": name, "csrf_token": "forged"}):
        response = browser.post("/admin/clients", data=data)
        assert response.status_code == 403 and "security token" in response.text
    with session_scope() as session:
        assert session.query(Client).filter_by(name=name).count() == 0
    assert browser.post("/admin/clients", data={"name": name, "csrf_token": operator}).status_code == 200
    by_header = browser.post("/admin/clients", data={"name": name + "h"}, headers={"X-CSRF-Token": operator})
    assert by_header.status_code == 200


def test_the_login_form_itself_needs_its_token(browser, admin):
    browser.get("/admin/login")
    response = browser.post("/admin/login", data={"api_key": admin.key})
    assert response.status_code == 403
    assert browser.get("/admin").status_code == 303


def test_a_forged_or_expired_cookie_is_no_session(browser, operator, settings):
    good = browser.cookies.get(auth.SESSION_COOKIE)
    payload = auth.unseal(settings, good)
    assert payload is not None
    expired = auth.seal(settings, {**payload, "exp": int(time.time()) - 1})
    other_secret = settings.model_copy(update={"secret_key": "not-the-server-secret"})
    tampered = good[:-2] + ("ff" if good.endswith("00") else "00")  # one MAC in 256 ends in 00: always differ
    for value in (expired, auth.seal(other_secret, payload), tampered):
        browser.cookies.clear()
        browser.cookies.set(auth.SESSION_COOKIE, value, path="/admin")
        assert browser.get("/admin").status_code == 303


def test_non_ascii_cookies_headers_and_form_fields_are_refused_not_errors(app, browser, operator):
    """A byte outside ASCII in the session cookie, the CSRF header or a CSRF form field is a wrong value
    (never a 500)."""
    stranger = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    for cookie in ("likeness_admin=abc.\u00e9", "likeness_admin=\u00e9\u00e9.\u00e9"):
        response = stranger.get("/admin", headers=[(b"cookie", cookie.encode())])
        assert response.status_code == 303 and response.headers["location"].startswith("/admin/login")
    by_header = browser.post("/admin/clients", data={"name": "x"},
                             headers=[(b"x-csrf-token", "\u00e9t\u00e9".encode())])
    assert by_header.status_code == 403
    by_form = browser.post("/admin/clients", data={"name": "x", "csrf_token": "\u00e9t\u00e9"})
    assert by_form.status_code == 403
    page = stranger.get("/admin/login")
    login = stranger.post("/admin/login", data={"api_key": "k", "csrf_token": "\u00e9" + csrf_of(page.text)})
    assert login.status_code == 403


LISTS = ("/admin/jobs", "/admin/subjects", "/admin/clients", "/admin/webhooks")
OUT_OF_RANGE = [(path, query) for path in LISTS
                for query in ("page=1000000000000000000000", "page=100001", "page=-5e300")] + [
    (path, query) for path in LISTS if path != "/admin/clients"  # the pages with a client filter
    for query in ("client_id=x%00y", "client_id=" + "x" * 500)]


@pytest.mark.parametrize("path,query", OUT_OF_RANGE)
def test_out_of_range_query_parameters_are_4xx_pages_not_500(browser, operator, path, query):
    response = browser.get(f"{path}?{query}")
    assert 400 <= response.status_code < 500, response.text
    assert "Traceback" not in response.text and 'href="/admin"' in response.text


@pytest.mark.parametrize("query", ["date_to=9999-12-31", "date_from=0001-01-01", "date_to=99999-01-01"])
def test_dates_outside_the_calendar_are_422_not_500(browser, operator, query):
    response = browser.get(f"/admin/jobs?{query}")
    assert response.status_code == 422, response.text


def test_the_last_allowed_page_and_date_answer_normally(browser, operator):
    assert browser.get("/admin/jobs?page=100000&date_to=9998-12-31").status_code == 200


def test_the_client_pages_show_the_default_limits(browser, operator, client_a, settings, monkeypatch):
    monkeypatch.setattr(settings, "default_requests_per_minute", 600)
    monkeypatch.setattr(settings, "default_max_storage_bytes", 5 * 1024**3)
    monkeypatch.setattr(settings, "default_max_concurrent_jobs", None)
    for page in (browser.get(f"/admin/clients/{client_a.id}").text, browser.get("/admin/clients").text):
        assert 'placeholder="default: 600"' in page
        assert f"({5 * 1024**3})" in page and 'placeholder="default: unlimited"' in page


@pytest.mark.parametrize("change", ["rotate", "revoke"])
def test_rotating_or_revoking_the_admins_key_ends_its_sessions(browser, admin, change):
    assert log_in(browser, admin.key).status_code == 303
    assert browser.get("/admin").status_code == 200
    from app.services import clients
    from core.db.uow import UnitOfWork

    with UnitOfWork() as uow:
        clients.rotate_key(uow, admin.id) if change == "rotate" else clients.revoke(uow, admin.id)
    assert browser.get("/admin").status_code == 303


def test_a_hostile_subject_name_renders_as_text(browser, operator, client_a):
    subject_id = create_subject(client_a, XSS)
    for path in (f"/admin/subjects?client_id={client_a.id}", f"/admin/subjects/{subject_id}",
                 f"/admin/subjects/{subject_id}/delete"):
        html = browser.get(path).text
        assert XSS not in html, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in html, path


def test_photos_and_images_are_served_to_an_admin_session_only(browser, operator, client_a, http):
    subject_id = create_subject(client_a)
    photo_id = upload(client_a, subject_id, [("a.jpg", jpeg())]).json()["files"][0]["photo_id"]
    response = browser.get(f"/admin/media/photos/{photo_id}/original")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content[:2] == b"\xff\xd8"
    assert browser.get(f"/admin/media/photos/{photo_id}/crop").status_code == 404  # no intake yet
    assert http.get(f"/admin/media/photos/{photo_id}/original", headers=client_a.headers,
                    follow_redirects=False).status_code == 303


def test_the_subject_page_shows_verdicts_class_word_and_loss_curve(browser, operator, client_a):
    subject_id = create_subject(client_a)
    photo_id = upload(client_a, subject_id, [("a.jpg", jpeg())]).json()["files"][0]["photo_id"]
    with session_scope() as session:
        photo = session.get(Photo, photo_id)
        photo.status, photo.reason_code, photo.message = PhotoStatus.rejected, "blurry", "The photo is blurry."
        session.add(Job(client_id=client_a.id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.SUCCEEDED,
                        request={}, completed_stages=[], progress=100.0, result={
                            "intake": {"accepted": 0, "rejected": 1, "class_token": "woman",
                                       "class_scores": {"man": 0.21, "woman": 0.27}},
                            "training": {"steps": 40, "final_loss": 0.11,
                                         "loss_curve": [[10, 0.4], [20, 0.3], [30, 0.2], [40, 0.11]]}}))
    html = browser.get(f"/admin/subjects/{subject_id}").text
    assert "blurry" in html and "The photo is blurry." in html
    assert "<b>woman</b>" in html and "0.27" in html and "0.21" in html
    assert '<polyline points="' in html and "Training loss per step" in html


def test_create_client_shows_the_key_once_then_revoke_makes_the_api_refuse_it(browser, operator, http):
    page = browser.post("/admin/clients", data={"name": "phone-app", "role": "app", "max_candidates": "16",
                                                "requests_per_minute": "", "csrf_token": operator})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    key = re.search(r'id="new-api-key">([^<]+)<', page.text).group(1)
    assert http.get("/v1/subjects", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    client_id = re.search(r'href="/admin/clients/([0-9a-f]{32})"', page.text).group(1)
    detail = browser.get(f"/admin/clients/{client_id}").text
    assert key not in detail and key[:7] in detail  # only the hint, from now on
    assert 'name="max_candidates" min="1" max="1024" value="16"' in detail

    revoked = browser.post(f"/admin/clients/{client_id}/revoke", data={"confirm": "on", "csrf_token": operator})
    assert revoked.status_code == 303
    assert http.get("/v1/subjects", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_limits_are_checked_like_the_api_checks_them(browser, operator, client_a):
    response = browser.post(f"/admin/clients/{client_a.id}/limits",
                            data={"max_candidates": "0", "csrf_token": operator})
    assert response.status_code == 422 and "max_candidates" in response.text
    ok = browser.post(f"/admin/clients/{client_a.id}/limits",
                      data={"max_candidates": "8", "max_concurrent_jobs": "2", "csrf_token": operator})
    assert ok.status_code == 303
    with session_scope() as session:
        client = session.get(Client, client_a.id)
        assert (client.max_candidates, client.max_concurrent_jobs, client.requests_per_minute) == (8, 2, None)


def test_cancel_and_retry_from_the_job_page(browser, operator, client_a):
    subject_id = create_subject(client_a)
    upload(client_a, subject_id, [("a.jpg", jpeg())])
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train", json={}).json()["id"]
    assert "id=\"cancel-job\"" in browser.get(f"/admin/jobs/{job_id}").text
    response = browser.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": operator})
    assert response.status_code == 303
    page = browser.get(response.headers["location"]).text
    assert "badge canceled" in page and "Cancel requested" in page
    retried = browser.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": operator})
    new_id = retried.headers["location"].split("/")[3].split("?")[0]
    assert new_id != job_id
    with session_scope() as session:
        old, new = session.get(Job, job_id), session.get(Job, new_id)
        assert new.request == old.request and new.state == JobState.QUEUED
    again = browser.post(f"/admin/jobs/{new_id}/retry", data={"csrf_token": operator})
    assert again.status_code == 409 and "Only a failed or canceled job" in again.text


def test_jobs_filter_by_client_and_state(browser, operator, client_a, client_b):
    for client in (client_a, client_b):
        subject_id = create_subject(client)
        upload(client, subject_id, [("a.jpg", jpeg())])
        client.post(f"/v1/subjects/{subject_id}/train", json={})
    html = browser.get(f"/admin/jobs?client_id={client_a.id}&state=queued").text
    rows = re.findall(r'<tr id="job-([0-9a-f]{32})"', html)
    with session_scope() as session:
        assert rows and all(session.get(Job, r).client_id == client_a.id for r in rows)
    assert 'hx-trigger="every 2s"' in html  # queued rows update themselves
    bad = browser.get("/admin/jobs?state=sleeping")
    assert bad.status_code == 422 and "Unknown state" in bad.text


def test_deleting_a_subject_asks_first_then_shows_nothing_is_left(browser, operator, client_a, store):
    subject_id = create_subject(client_a, "Ada")
    upload(client_a, subject_id, [("a.jpg", jpeg()), ("b.jpg", jpeg(seed=1))])
    confirm = browser.get(f"/admin/subjects/{subject_id}/delete").text
    assert re.search(r"<td>photos</td><td class=\"num\">2</td>", confirm)
    wrong = browser.post(f"/admin/subjects/{subject_id}/delete", data={"confirm_name": "Bob", "csrf_token": operator})
    assert wrong.status_code == 422
    done = browser.post(f"/admin/subjects/{subject_id}/delete", data={"confirm_name": "Ada", "csrf_token": operator})
    assert done.status_code == 303
    html = browser.get(done.headers["location"]).text
    assert 'id="nothing-left"' in html
    assert store.list(f"subjects/{subject_id}/") == []
    with session_scope() as session:
        assert session.get(Subject, subject_id) is None


def test_redeliver_from_the_log(browser, operator, client_a):
    subject_id = create_subject(client_a)
    with session_scope() as session:
        job = Job(client_id=client_a.id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.FAILED,
                  request={}, completed_stages=[], error_code="worker_lost")
        session.add(job)
        session.flush()
        delivery = WebhookDelivery(client_id=client_a.id, job_id=job.id, event="job.failed", payload={}, attempt=6,
                                   status_code=500, error="receiver answered HTTP 500")
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id
    html = browser.get(f"/admin/webhooks?client_id={client_a.id}&status=failed").text
    assert f'data-delivery="{delivery_id}"' in html and "receiver answered HTTP 500" in html
    response = browser.post(f"/admin/webhooks/{delivery_id}/redeliver",
                            data={"csrf_token": operator, "back": f"/admin/webhooks?client_id={client_a.id}"})
    assert response.status_code == 303 and response.headers["location"].endswith("done=redelivered")
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert (row.attempt, row.status_code, row.error, row.delivered_at) == (0, None, None, None)
        assert row.next_attempt_at is not None


def test_the_job_page_header_updates_with_the_live_poll(browser, operator, client_a):
    """Started, worker and heartbeat sit in the header: the live poll sends it again (out of band)."""
    subject_id = create_subject(client_a)
    with session_scope() as session:
        job = Job(client_id=client_a.id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.QUEUED,
                  request={}, completed_stages=[])
        session.add(job)
        session.flush()
        job_id = job.id
    page = browser.get(f"/admin/jobs/{job_id}").text
    assert 'id="job-facts"' in page and "gpu-host-7" not in page
    with session_scope() as session:  # a worker takes the job
        job = session.get(Job, job_id)
        job.state, job.worker = JobState.RUNNING, "gpu-host-7:4242"
        job.started_at = job.heartbeat_at = datetime.now(UTC) - timedelta(seconds=3)
    live = browser.get(f"/admin/jobs/{job_id}/live", headers={"HX-Request": "true"})
    assert live.status_code == 200
    header = re.search(r'<dl class="facts card" id="job-facts" hx-swap-oob="true">(.*?)</dl>', live.text, re.S)
    assert header, live.text
    assert "gpu-host-7:4242" in header.group(1)
    assert re.search(r'data-field="heartbeat">[3-9]\.\d s ago<', header.group(1)), header.group(1)
    assert "never" not in header.group(1)  # the heartbeat is shown, not the page's first state


def test_pages_show_thumbnails_not_the_originals(browser, operator, client_a):
    subject_id = create_subject(client_a)
    original = jpeg(1024)
    photo_id = upload(client_a, subject_id, [("big.jpg", original)]).json()["files"][0]["photo_id"]
    page = browser.get(f"/admin/subjects/{subject_id}").text
    assert f'<img src="/admin/media/photos/{photo_id}/original/thumb"' in page
    assert f'href="/admin/media/photos/{photo_id}/original"' in page  # the link still opens the file itself
    response = browser.get(f"/admin/media/photos/{photo_id}/original/thumb")
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert "max-age=86400" in response.headers["cache-control"]
    assert len(response.content) < len(original) / 5
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert max(thumb.size) == 320
    assert browser.get(f"/admin/media/photos/{photo_id}/original/thumb").content == response.content
    assert browser.get(f"/admin/media/photos/{photo_id}/crop/thumb").status_code == 404  # no intake yet


def test_the_class_word_chart_gives_the_longest_bar_to_the_best_fit_and_marks_the_chosen_word(browser, operator,
                                                                                              client_a):
    subject_id = create_subject(client_a)
    with session_scope() as session:
        session.add(Job(client_id=client_a.id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.SUCCEEDED,
                        request={}, completed_stages=[], progress=100.0, result={"intake": {
                            "accepted": 5, "rejected": 0, "class_token": "man",
                            "class_scores": {"woman": 0.27, "man": 0.21, "boy": 0.24}}}))
    html = browser.get(f"/admin/subjects/{subject_id}").text
    chart = re.search(r'<section class="card" id="class-word">(.*?)</section>', html, re.S).group(1)
    bars = {word: float(width) for width, word in re.findall(
        r'<rect x="\d+" y="[\d.]+" width="([\d.]+)" height="\d+" class="fit \w+"><title>(\w+):', chart)}
    assert set(bars) == {"man", "woman", "boy"}
    assert max(bars, key=bars.get) == "man" and bars["man"] > bars["boy"] > bars["woman"] > 0
    assert 'class="fit chosen"><title>man:' in chart and "0.21 · chosen" in chart
    assert "lower fits better" in chart


def test_error_pages_keep_the_navigation_bar(browser, operator):
    page = browser.get("/admin/jobs/no-such-job")
    assert page.status_code == 404
    assert '<header class="top">' in page.text and 'href="/admin/subjects"' in page.text and "Log out" in page.text


def test_metrics_label_dashboard_requests_with_their_route(browser, operator, http):
    assert browser.get("/admin/jobs/no-such-job").status_code == 404
    assert browser.get("/admin/jobs").status_code == 200
    assert browser.get("/admin/static/admin.css").status_code == 200  # every page loads it and htmx
    text = http.get("/metrics").text
    routes = set(re.findall(r'likeness_http_request_duration_seconds_count\{[^}]*route="([^"]+)"', text))
    assert {"/admin/jobs/{job_id}", "/admin/jobs", "/admin/static/{path}"} <= routes, routes
    assert "no-such-job" not in text
