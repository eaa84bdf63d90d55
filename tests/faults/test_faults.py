"""Faults with real processes, each on this folder's own servers (``conftest.stack``):

* the blob store unwritable: 503 ``storage_unavailable``, no photo row, no blob; uploads work once it is back;
* the API SIGKILLed during uploads: each request stored all of its photos or none, a retry with the
  same Idempotency-Key stores them once, no photo row without its blob;
* Redis stopped (and its queues lost) mid-job: a training posted meanwhile answers 202 at once, both
  jobs succeed after Redis is back (the outbox and the recovery sweep send what was lost);
* PostgreSQL stopped mid-training: 503 with Retry-After for every request meanwhile, the job
  succeeds after the database is back.

Every answer during a fault is a 2xx/4xx or a 503 with Retry-After, never another 5xx; no job is left
``running``; no photo or image is lost. Each test records its recovery time (terminal summary).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from core.db.session import CONNECT_TIMEOUT_S
from core.queue import SEND_TIMEOUT_S
from tests.conftest import encode, noise_image
from tests.faults.conftest import RECOVERY, Calls, db_rows, job_state, subject_with_photos, timed, wait_job
from tests.integration.conftest import ROOT, clean_environ, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 4.0  # how long each server stays down
#: what every training here asks for beside its steps: no checkpoint selection (the faults come and go before it)
TRAIN = {"select_checkpoint": False}


def _no_job_running(stack) -> None:  # noqa: ANN001
    assert db_rows(stack, "SELECT id, state, stage FROM jobs WHERE state IN ('running', 'queued')") == []


def _photos_intact(stack, subject_id: str) -> int:  # noqa: ANN001
    """Every photo row of the subject has its blob; returns how many there are."""
    rows = db_rows(stack, "SELECT original_key FROM photos WHERE subject_id = %(s)s", s=subject_id)
    missing = [key for (key,) in rows if not (stack.storage_dir / key).is_file()]
    assert missing == [], f"photo rows without their blob: {missing}"
    return len(rows)


def _images_intact(stack, subject_id: str) -> int:  # noqa: ANN001
    rows = db_rows(stack, "SELECT key FROM images WHERE subject_id = %(s)s", s=subject_id)
    missing = [key for (key,) in rows if not (stack.storage_dir / key).is_file()]
    assert missing == [], f"image rows without their blob: {missing}"
    return len(rows)


def _immutable(path, on: bool) -> bool:  # noqa: ANN001
    """``chattr +i``: not even root can create entries in ``path`` (a read-only or failed disk)."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_blob_store_unwritable_is_a_clear_503_and_leaves_nothing(stack, grace_hopper):
    client = stack.client()
    sid = client.post("/v1/subjects", json={"name": "storage"}).json()["id"]
    subjects = stack.storage_dir / "subjects"
    subjects.mkdir(parents=True, exist_ok=True)
    if not _immutable(subjects, True):
        pytest.skip("chattr +i is not available on this file system")
    try:
        from tests.faults.conftest import photos

        calls = Calls()
        refused = calls.record(client.post(f"/v1/subjects/{sid}/photos", files=photos(grace_hopper, 2)))
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "storage_unavailable" and int(refused.headers["Retry-After"]) > 0
        assert str(stack.storage_dir) not in refused.text  # no server path in the answer
        assert db_rows(stack, "SELECT id FROM photos WHERE subject_id = %(s)s", s=sid) == []
        assert client.get(f"/v1/subjects/{sid}/photos").json()["data"] == []
        assert not (subjects / sid).exists()
    finally:
        _immutable(subjects, False)
    back = time.monotonic()
    stored = client.post(f"/v1/subjects/{sid}/photos", files=photos(grace_hopper, 2))
    recovered = time.monotonic() - back
    assert stored.status_code == 201 and stored.json()["stored"] == 2, stored.text
    assert _photos_intact(stack, sid) == 2
    assert calls.server_errors() == []
    RECOVERY["blob store unwritable"] = {"answer": "503 storage_unavailable", "recovery_s": recovered}


def _big_upload(n: int = 16, size: int = 1400) -> list[tuple[str, tuple[str, bytes]]]:
    """Large noise JPEGs: a request long enough to be killed in the middle."""
    return [("files", (f"big_{i}.jpg", encode(noise_image(size, seed=i), "JPEG", quality=95))) for i in range(n)]


class _StreamedUpload:
    """A multipart upload sent in chunks, telling where it is: half of the body sent, all of it sent.

    With ``hold_at_half`` the rest of the body waits until :meth:`release` (the API is killed while it
    still reads the request)."""

    CHUNK = 64 * 1024

    def __init__(self, files: list, hold_at_half: bool):  # noqa: ANN001
        request = httpx.Request("POST", "http://api/", files=files)
        self.body, self.content_type = request.read(), request.headers["Content-Type"]
        self.hold_at_half = hold_at_half
        self.half_sent, self.all_sent, self._released = threading.Event(), threading.Event(), threading.Event()

    def chunks(self):  # noqa: ANN201
        half = len(self.body) // 2
        for offset in range(0, len(self.body), self.CHUNK):
            if offset >= half and not self.half_sent.is_set():
                self.half_sent.set()
                if self.hold_at_half:
                    self._released.wait(30)
            yield self.body[offset:offset + self.CHUNK]
        self.all_sent.set()

    def release(self) -> None:
        self._released.set()


def _first_blob(folder) -> bool:  # noqa: ANN001
    return folder.exists() and any(p.is_file() for p in folder.rglob("*"))


def test_api_killed_during_uploads_stores_each_request_whole_or_not_at_all(stack):
    """The API is SIGKILLed at three moments of an upload, each seen from outside, not timed: while it
    reads the body (half sent, the rest held back), once the whole body is sent (it decodes), and as the
    first blob of the request appears in the store (it writes blobs before it commits the rows)."""
    client = stack.client()
    files = _big_upload()
    killed_mid_request, restarts, left_by_kills = 0, [], 0
    for moment in ("reading the body", "body received", "first blob written"):
        sid = client.post("/v1/subjects", json={"name": f"killed-{moment}"}).json()["id"]
        folder = stack.storage_dir / "subjects" / sid
        key = f"upload-{uuid.uuid4().hex}"
        streamed = _StreamedUpload(files, hold_at_half=moment == "reading the body")
        outcome: dict = {}

        def upload(sid: str = sid, key: str = key, streamed: _StreamedUpload = streamed, outcome: dict = outcome):
            try:
                outcome["response"] = client.post(f"/v1/subjects/{sid}/photos", content=streamed.chunks(),
                                                  headers={"Idempotency-Key": key,
                                                           "Content-Type": streamed.content_type,
                                                           "Content-Length": str(len(streamed.body))})
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=upload)
        sender.start()
        if moment == "reading the body":
            assert streamed.half_sent.wait(60), "the upload never got half way"
        elif moment == "body received":
            assert streamed.all_sent.wait(60), "the upload's body was never sent"
        else:
            wait_for(lambda folder=folder, outcome=outcome: _first_blob(folder) or outcome, 60, 0.002,
                     "the upload's first blob")
        stack.api.kill()
        streamed.release()
        sender.join(30)
        killed_mid_request += "error" in outcome
        started = time.monotonic()
        stack.api.start()
        restarts.append(time.monotonic() - started)

        stored = _photos_intact(stack, sid)  # no row without its blob
        assert stored in (0, len(files)), f"a request killed ({moment}) left {stored} of {len(files)} photos"
        retry = client.post(f"/v1/subjects/{sid}/photos", files=files, headers={"Idempotency-Key": key})
        assert retry.status_code == 201, retry.text
        listed = client.get(f"/v1/subjects/{sid}/photos").json()["data"]
        assert len(listed) == len(files) == _photos_intact(stack, sid)  # once, even if the first one committed
        rows = {k for (k,) in db_rows(stack, "SELECT original_key FROM photos WHERE subject_id = %(s)s", s=sid)}
        orphans = [p for p in folder.rglob("*") if p.is_file() and p.relative_to(stack.storage_dir).as_posix()
                   not in rows]
        left_by_kills += len(orphans)
        # blobs a killed request wrote before its commit (partial .tmp- files too) are no photos (never listed,
        # no quota): `likeness purge` deletes them once past the grace period (0 here), and nothing a row names
        purged = subprocess.run([sys.executable, "-m", "likeness_cli.main", "purge"], cwd=ROOT, capture_output=True,
                                text=True, env=clean_environ(**stack.env, LIKENESS_ORPHAN_BLOB_GRACE_S="0"))
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert not any(p.exists() for p in orphans), purged.stdout
        assert {p.relative_to(stack.storage_dir).as_posix() for p in folder.rglob("*") if p.is_file()} == rows
        assert client.delete(f"/v1/subjects/{sid}").status_code == 204
        assert not any(p.is_file() for p in folder.rglob("*")), orphans
    # the first kill cannot miss (half the body is still to come); the others land in the request unless
    # the API answered first
    assert killed_mid_request >= 2, f"only {killed_mid_request} of 3 kills landed inside the requests"
    RECOVERY["API SIGKILL during upload"] = {
        "killed_mid_request": f"{killed_mid_request}/3", "recovery_s": max(restarts),
        "answer": "connection reset; retry with the same Idempotency-Key", "orphan_blobs_swept": left_by_kills}


def test_redis_restarted_mid_job_loses_no_work(stack, grace_hopper):
    client = stack.client()
    first = subject_with_photos(client, grace_hopper, "redis-first")
    second = subject_with_photos(client, grace_hopper, "redis-second")
    healthy_s, posted = timed(client.post, f"/v1/subjects/{first}/train", json=TRAIN | {"steps": 10})
    trained = posted.json()["id"]
    assert wait_job(stack, client, trained)["state"] == "succeeded"
    generation = client.post(f"/v1/subjects/{first}/generations", json={
        "style": "studio_headshot", "n": 2, "k": 1, "seed": 3, "steps": 2, "no_controlnet": True})
    assert generation.status_code == 202, generation.text
    running = generation.json()["id"]
    wait_for(lambda: job_state(client, running)["state"] == "running", 60, 0.1, "the generation to start")

    calls = Calls()
    stack.redis.stop()  # no persistence: every queued message is gone with it
    down = time.monotonic()
    took, response = timed(client.post, f"/v1/subjects/{second}/train", json=TRAIN | {"steps": 10})
    calls.record(response)
    assert response.status_code == 202, response.text
    # no waiting on the broker beyond one bounded send attempt (the outbox keeps the message): as fast
    # as with Redis up, give or take that attempt (before the outbox: 19.5 s of reconnects)
    assert took < healthy_s + SEND_TIMEOUT_S, f"POST /train took {took:.1f} s with Redis down ({healthy_s:.1f} s up)"
    waiting = response.json()["id"]
    assert db_rows(stack, "SELECT count(*) FROM outbox WHERE args::text LIKE %(id)s", id=f"%{waiting}%")[0][0] >= 1
    while time.monotonic() - down < OUTAGE_S:
        for job_id in (running, waiting):
            calls.record(client.get(f"/v1/jobs/{job_id}"))
        calls.record(client.get("/v1/subjects"))
        time.sleep(0.25)
    stack.redis.start()
    back = time.monotonic()

    def outbox_sent() -> bool:
        left = db_rows(stack, "SELECT count(*) FROM outbox WHERE args::text LIKE %(id)s", id=f"%{waiting}%")[0][0]
        return left == 0

    wait_for(outbox_sent, 60, 0.1, "the outbox to be sent")
    sent = time.monotonic() - back
    wait_for(lambda: job_state(client, waiting)["state"] != "queued", 90, 0.2, "the job posted during the outage")
    progressing = time.monotonic() - back  # includes waiting for the one worker to finish the generation
    generated, second_trained = wait_job(stack, client, running), wait_job(stack, client, waiting, 180)
    assert generated["state"] == "succeeded", generated
    assert second_trained["state"] == "succeeded", second_trained
    assert calls.server_errors() == [] and all(status < 500 for status in calls.statuses), calls.bodies
    _no_job_running(stack)
    assert _photos_intact(stack, first) == 5 and _photos_intact(stack, second) == 5
    assert _images_intact(stack, first) == 1
    RECOVERY["Redis stopped mid-job"] = {"outage_s": OUTAGE_S, "train_post_during_outage_s": took,
                                         "outbox_sent_after_s": sent, "queued_job_running_after_s": progressing,
                                         "answer": "202 (job queued in the outbox)"}


def test_postgres_restarted_mid_job_is_503_then_the_job_succeeds(stack, grace_hopper):
    client = stack.client()
    sid = subject_with_photos(client, grace_hopper, "postgres")
    job_id = client.post(f"/v1/subjects/{sid}/train", json=TRAIN | {"steps": 30}).json()["id"]

    def training() -> dict | None:
        job = job_state(client, job_id)
        assert job["state"] in ("queued", "running"), job
        return job if (job["stage"] or "").startswith("training") else None

    # Few steps (a 2-core CPU shared with other work): the training may end during the outage, when
    # the phase's record waits for the database (worker.jobs.through_db_outage).
    stage = wait_for(training, 120, 0.1, "the training to start")["stage"]
    requests = (("GET", f"/v1/jobs/{job_id}", None), ("GET", f"/v1/subjects/{sid}", None), ("GET", "/v1/jobs", None),
                ("POST", "/v1/subjects", {"name": "during"}))
    healthy_s = max(timed(client.request, method, path, json=body)[0] for method, path, body in requests)
    calls = Calls()
    stack.pg.stop()
    down = time.monotonic()
    while time.monotonic() - down < OUTAGE_S:
        for method, path, body in requests:
            took, response = timed(client.request, method, path, json=body)
            calls.record(response)
            assert response.status_code == 503, (method, path, response.status_code, response.text)
            assert response.json()["code"] == "database_unavailable" and int(response.headers["Retry-After"]) > 0
            # one bounded connection attempt, never a wait for the pool (POOL_TIMEOUT_S) or a hang
            assert took < healthy_s + CONNECT_TIMEOUT_S + 1, \
                f"{method} {path} took {took:.1f} s with the database down ({healthy_s:.1f} s up)"
        time.sleep(0.25)
    stack.pg.start()
    back = time.monotonic()

    def answers() -> bool:
        return calls.record(client.get(f"/v1/jobs/{job_id}")).status_code == 200

    wait_for(answers, 60, 0.1, "the API to answer again")
    api_back = time.monotonic() - back
    job = wait_job(stack, client, job_id, 180)
    assert job["state"] == "succeeded", job
    assert calls.server_errors() == [], calls.bodies
    _no_job_running(stack)
    assert _photos_intact(stack, sid) == 5
    RECOVERY["PostgreSQL stopped mid-job"] = {
        "outage_s": OUTAGE_S, "stage_at_stop": stage, "api_200_after_s": api_back,
        "job_succeeded_after_s": time.monotonic() - back, "answer": "503 database_unavailable, Retry-After: 5"}
