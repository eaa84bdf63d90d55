"""The typed client against the real API (in-process): every call a consumer makes, its errors as one
exception type, Idempotency-Keys that make retries safe, polling with backoff, downloads."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import zipfile
from types import SimpleNamespace

import httpx
import pytest

from likeness.client import AsyncClient, Backoff, Client, LikenessError, Retry
from likeness.contract.plan import JobKind, JobState
from likeness.contract.requests import GenerateRequest, TrainRequest
from likeness.webhooks import SIGNATURE_HEADER, sign, verify
from tests.app.helpers import add_adapter, jpeg
from tests.app.test_adapters import _stored_adapter, kohya_zip_bytes
from tests.app.test_tenancy_and_deletion import _seed_results

FAST = Retry(attempts=3, initial_s=0.01, max_s=0.02)


class InProcess(httpx.BaseTransport):
    """An ``httpx`` transport into the app through FastAPI's TestClient (which runs on its own httpx fork)."""

    def __init__(self, test_client):  # noqa: ANN001
        self.test_client = test_client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.test_client.request(request.method, str(request.url), headers=dict(request.headers),
                                          content=request.read())
        return httpx.Response(answer.status_code, headers=list(answer.headers.multi_items()), content=answer.content,
                              request=request)


def _client(api_client, transport: httpx.BaseTransport | None = None) -> Client:  # noqa: ANN001
    http = httpx.Client(base_url="http://testserver", transport=transport or InProcess(api_client.http))
    return Client(api_key=api_client.key, http=http, retry=FAST)


def test_subjects_photos_and_jobs_round_trip(client_a):
    api = _client(client_a)
    grace = api.create_subject("Grace", external_ref="tg:1")
    api.create_subject("Ada", external_ref="tg:2")
    assert grace.external_ref == "tg:1" and grace.name == "Grace"
    mine = api.list_subjects(external_ref="tg:1")
    assert [s.id for s in mine.data] == [grace.id] and mine.count == 1

    upload = api.upload_photos(grace.id, [("a.jpg", jpeg(seed=1)), ("notes.txt", b"not an image")])
    assert (upload.stored, upload.rejected) == (1, 1)
    good, bad = upload.files
    assert good.status == "stored" and good.photo_id and bad.status == "rejected"
    assert bad.reason_code == "not_an_image" and bad.message
    photos = api.list_photos(grace.id).data
    assert [p.id for p in photos] == [good.photo_id] and photos[0].status == "pending"

    job = api.train(grace.id, TrainRequest(steps=10))
    assert job.kind == JobKind.TRAIN and job.state == JobState.QUEUED and not job.done
    assert job.request["training"]["max_train_steps"] == 10
    assert api.get_job(job.id) == job
    assert [j.id for j in api.list_jobs(subject_id=grace.id, state=JobState.QUEUED).data] == [job.id]
    canceled = api.cancel_job(job.id)
    assert canceled.state == JobState.CANCELED and canceled.done and not canceled.succeeded

    api.delete_subject(grace.id)
    assert api.list_subjects(external_ref="tg:1").count == 0


def test_api_errors_are_one_exception_with_code_message_details_and_status(client_a, client_b):
    api = _client(client_a)
    subject = api.create_subject("Grace")
    with pytest.raises(LikenessError) as missing:
        api.get_job("nope")
    assert (missing.value.code, missing.value.status) == ("not_found", 404) and missing.value.message
    with pytest.raises(LikenessError) as untrained:
        api.generate(subject.id, GenerateRequest(style="cinematic", n=2, k=1))
    assert (untrained.value.code, untrained.value.status) == ("subject_not_trained", 409)
    add_adapter(subject.id)
    with pytest.raises(LikenessError) as invalid:
        api.generate(subject.id, GenerateRequest(style="cinematic", n=2, k=3))
    assert invalid.value.code == "k_greater_than_n" and invalid.value.details == {"k": 3, "n": 2}
    with pytest.raises(LikenessError) as others:  # another client's subject does not exist for this one
        _client(client_b).get_subject(subject.id)
    assert others.value.status == 404 and not others.value.transient
    with pytest.raises(LikenessError) as unauthorized:
        Client(api_key="lk_wrong", http=httpx.Client(base_url="http://t", transport=InProcess(client_a.http))
               ).list_styles()
    assert (unauthorized.value.code, unauthorized.value.status) == ("unauthorized", 401)


def test_an_unreachable_api_is_a_clear_transient_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with Client(f"http://127.0.0.1:{port}", "lk_key", retry=FAST) as api, pytest.raises(LikenessError) as down:
        api.list_subjects()
    assert down.value.code == "api_unreachable" and down.value.status is None and down.value.transient
    assert f"127.0.0.1:{port}" in down.value.message

    async def async_down():
        async with AsyncClient(f"http://127.0.0.1:{port}", "lk_key", retry=FAST) as api:
            await api.get_job("x")

    with pytest.raises(LikenessError) as adown:
        asyncio.run(async_down())
    assert adown.value.code == "api_unreachable"


class _LoseAnswers(httpx.BaseTransport):
    """Forwards every request to the app but drops the answer of the first ``lose`` matching ones,
    as a network that fails after the server did the work."""

    def __init__(self, inner: httpx.BaseTransport, method: str, path_end: str, lose: int = 1):
        self.inner, self.method, self.path_end, self.lose = inner, method, path_end, lose
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == self.method and request.url.path.endswith(self.path_end):
            self.keys.append(request.headers.get("idempotency-key"))
            if self.lose > 0:
                self.lose -= 1
                response.read()
                raise httpx.ReadError("connection reset by peer", request=request)
        return response


@pytest.mark.parametrize("operation", ["train", "upload", "create"])
def test_retries_of_a_creating_call_reuse_its_idempotency_key_and_create_once(client_a, operation):
    subject_id = _client(client_a).create_subject("Grace").id
    _client(client_a).upload_photos(subject_id, [("a.jpg", jpeg(seed=1))])
    path_end = {"train": "/train", "upload": "/photos", "create": "/v1/subjects"}[operation]
    transport = _LoseAnswers(InProcess(client_a.http), "POST", path_end)
    with _client(client_a, transport) as api:
        if operation == "train":
            api.train(subject_id)
        elif operation == "upload":
            api.upload_photos(subject_id, [("b.jpg", jpeg(seed=2))])
        else:
            api.create_subject("Ada", external_ref="tg:ada")
    assert len(transport.keys) == 2 and transport.keys[0] and transport.keys[0] == transport.keys[1]
    check = _client(client_a)
    if operation == "train":
        assert check.list_jobs(subject_id=subject_id).count == 1
    elif operation == "upload":
        assert check.list_photos(subject_id).count == 2
    else:
        assert check.list_subjects(external_ref="tg:ada").count == 1


def test_two_logical_calls_get_two_keys(client_a):
    subject_id = _client(client_a).create_subject("Grace").id
    transport = _LoseAnswers(InProcess(client_a.http), "POST", "/photos", lose=0)
    with _client(client_a, transport) as api:
        api.upload_photos(subject_id, [("a.jpg", jpeg(seed=1))])
        api.upload_photos(subject_id, [("a.jpg", jpeg(seed=1))])  # the same file sent again on purpose
    assert len(set(transport.keys)) == 2
    assert _client(client_a).list_photos(subject_id).count == 2


def test_images_download_signed_urls_and_adapter(client_a, store, tmp_path):
    api = _client(client_a)
    subject_id = api.create_subject("Grace").id
    api.upload_photos(subject_id, [("a.jpg", jpeg(seed=1))])
    job_id, image_id = _seed_results(subject_id, client_a.id, store)
    images = api.list_images(subject_id, job_id=job_id)
    assert [i.id for i in images.data] == [image_id] and images.data[0].has_upscaled
    assert api.download_image(image_id) == b"\x89PNG original"
    assert api.download_image(image_id, "upscaled") == b"\x89PNG upscaled"
    signed = api.image_url(image_id, "upscaled")
    assert signed.url.startswith("http://testserver/v1/blobs/signed?") and signed.expires_at > time.time()
    assert client_a.http.get(signed.url).content == b"\x89PNG upscaled"  # no API key needed

    files = _stored_adapter(subject_id, store, version=2)
    path = api.download_adapter(subject_id, tmp_path)
    assert path.parent == tmp_path and path.name.endswith("-v2.zip")
    with zipfile.ZipFile(path) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == files
    kohya = api.download_adapter(subject_id, tmp_path / "mine.zip", format="kohya")
    assert kohya.read_bytes() == kohya_zip_bytes() and not list(tmp_path.glob("*.part"))
    with pytest.raises(LikenessError) as missing:
        api.download_adapter(subject_id, tmp_path, version=9)
    assert missing.value.code == "adapter_not_found"


def test_styles_and_a_webhook_whose_signature_verifies(client_a):
    api = _client(client_a)
    styles = api.list_styles()
    assert styles.count == len(styles.data) > 3 and "cinematic" in {s.name for s in styles.data}
    hook = api.set_webhook("https://example.com/hook")
    assert hook.url == "https://example.com/hook" and hook.secret
    body = json.dumps({"type": "job.succeeded"}).encode()
    header = sign(body, hook.secret, int(time.time()))
    assert verify(body, hook.secret, header) and not verify(body + b" ", hook.secret, header)
    assert not verify(body, hook.secret, sign(body, hook.secret, int(time.time()) - 3600))  # replayed later
    assert SIGNATURE_HEADER == "X-Likeness-Signature"
    import core.webhooks

    assert core.webhooks.sign is sign and core.webhooks.verify is verify  # one implementation


# ---- polling -------------------------------------------------------------------------------------------------

def _job(state: str, stage: str | None, progress: float) -> dict:
    now = "2026-01-01T00:00:00Z"
    return {"id": "j1", "subject_id": "s1", "kind": "train", "state": state, "stage": stage, "progress": progress,
            "eta_s": None if state != "running" else 10.0, "error_code": None, "error_message": None, "attempts": 1,
            "cancel_requested": False, "request": {}, "result": None, "created_at": now, "started_at": now,
            "finished_at": None, "updated_at": now}


SCRIPT = [(200, _job("queued", None, 0)), (200, _job("queued", None, 0)), (200, _job("running", "intake", 5)),
          (503, {"code": "service_unavailable", "message": "db restarting", "details": {}}),
          (503, {"code": "service_unavailable", "message": "db restarting", "details": {}}),
          (503, {"code": "service_unavailable", "message": "db restarting", "details": {}}),
          (200, _job("running", "intake", 5)), (200, _job("running", "caching", 12)),
          (200, _job("succeeded", "training:stage2", 100))]


def _scripted():
    answers = list(SCRIPT)
    polls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(time.monotonic())
        status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler), polls


FAST_POLL = Backoff(initial_s=0.01, factor=2.0, max_s=0.04)


def test_wait_yields_each_change_once_outlasts_a_brief_outage_and_ends_final(monkeypatch):
    transport, polls = _scripted()
    pauses: list[float] = []  # what the client asked to sleep between polls (recorded, not slept)
    monkeypatch.setattr("likeness.client.sync.time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    with Client("http://api", "k", http=httpx.Client(base_url="http://api", transport=transport),
                retry=Retry(attempts=1)) as api:
        seen = [(j.state.value, j.stage, j.progress) for j in api.wait("j1", backoff=FAST_POLL)]
    assert seen == [("queued", None, 0), ("running", "intake", 5), ("running", "caching", 12),
                    ("succeeded", "training:stage2", 100)]
    assert len(polls) == len(SCRIPT)
    # a change polls again soon (0.01 s); nothing changed or an outage doubles the pause, up to 0.04 s
    assert pauses == pytest.approx([0.01, 0.02,  # queued, queued again
                                    0.01, 0.02, 0.04, 0.04,  # running, then three 503s
                                    0.04,  # running as before the outage: still no change
                                    0.01])  # caching; then succeeded ends the wait without a pause


def test_async_wait_and_timeouts():
    async def run():
        transport, _ = _scripted()
        async with AsyncClient("http://api", "k", http=httpx.AsyncClient(base_url="http://api", transport=transport),
                               retry=Retry(attempts=1)) as api:
            final = await api.wait_for("j1", backoff=FAST_POLL)
            stuck = httpx.MockTransport(lambda r: httpx.Response(200, json=_job("running", "intake", 5)))
            slow = AsyncClient("http://api", "k", http=httpx.AsyncClient(base_url="http://api", transport=stuck))
            with pytest.raises(LikenessError) as timeout:
                await slow.wait_for("j1", timeout_s=0.2, backoff=FAST_POLL)
            return final, timeout.value

    final, timeout = asyncio.run(run())
    assert final.succeeded and final.progress == 100
    assert timeout.code == "wait_timeout" and timeout.details["state"] == "running"


def test_wait_gives_up_after_a_long_outage():
    down = httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)))
    with Client("http://api", "k", http=httpx.Client(base_url="http://api", transport=down),
                retry=Retry(attempts=1)) as api, pytest.raises(LikenessError) as gone:
        list(api.wait("j1", backoff=FAST_POLL, max_outage_s=0.2))
    assert gone.value.code == "api_unreachable"


def test_client_reads_url_and_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("LIKENESS_API_URL", raising=False)
    with pytest.raises(LikenessError) as no_url:
        Client(api_key="k")
    assert no_url.value.code == "missing_api_url"
    monkeypatch.setenv("LIKENESS_API_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("LIKENESS_API_KEY", "lk_env")
    with Client() as api:
        assert api.base_url == "http://127.0.0.1:9" and api._auth["Authorization"] == "Bearer lk_env"


def test_client_imports_no_server_or_ml_code():
    import subprocess
    import sys

    code = ("import sys, likeness.client, likeness.webhooks; "
            "print(sorted(m for m in ('torch', 'app', 'worker', 'fastapi', 'sqlalchemy', 'numpy', 'PIL') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_upload_error_body_is_read_even_when_not_json():
    proxy = httpx.MockTransport(lambda r: httpx.Response(502, text="<html>Bad gateway</html>"))
    with Client("http://api", "k", http=httpx.Client(base_url="http://api", transport=proxy),
                retry=Retry(attempts=2, initial_s=0.01)) as api, pytest.raises(LikenessError) as bad:
        api.upload_photos("s1", [("a.jpg", io.BytesIO(b"x").getvalue())])
    assert bad.value.code == "http_502" and bad.value.status == 502 and bad.value.transient
