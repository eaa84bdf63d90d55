"""Training previews over REST: a running train job lists each validation image as it is made, with a
signed URL for its owner only, and announces it with a ``job.preview`` webhook (the worker's side is the
service edge, called here as the selecting stage calls it)."""

from __future__ import annotations

import io
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

from PIL import Image

from tests.app.helpers import subject_with_photo
from tests.conftest import noise_image


def _running_train_job(client, settings):  # noqa: ANN001, ANN202
    """A train job a worker has claimed (what the selecting stage runs inside)."""
    from worker.jobs import ClaimOutcome, claim

    subject_id = subject_with_photo(client)
    job_id = client.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    claimed = claim(settings, job_id)
    assert claimed.outcome == ClaimOutcome.run
    return claimed.job


def _poll_until_listed(client, job_id: str, steps: list[int]) -> dict:  # noqa: ANN001
    """Poll as a client does. A cached status may be one change behind for the moment until the database's
    notification of the write reaches the API (app/api/job_status.py), so the listing shows on a later poll."""
    deadline = time.monotonic() + 10
    while True:
        polled = client.get(f"/v1/jobs/{job_id}").json()
        if [p["step"] for p in polled["previews"]] == steps:
            return polled
        assert time.monotonic() < deadline, f"previews {steps} never listed: {polled['previews']}"
        time.sleep(0.05)


def test_previews_appear_on_a_polled_job_before_it_succeeds(client_a, client_b, http, settings, store):
    from worker.service_edge import ServiceEdge

    job = _running_train_job(client_a, settings)
    assert client_a.get(f"/v1/jobs/{job.id}").json()["previews"] == []
    edge = ServiceEdge(settings, store)
    images = {4: noise_image(32, 1), 8: noise_image(32, 2)}
    edge.training_preview(job, 4, images[4])
    polled = _poll_until_listed(client_a, job.id, [4])
    assert polled["state"] == "running"
    edge.training_preview(job, 8, images[8])
    polled = _poll_until_listed(client_a, job.id, [4, 8])
    assert polled["state"] == "running"

    # each URL serves its own image, with no API key
    for preview in polled["previews"]:
        answer = http.get(preview["url"])
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(answer.content)).convert("RGB")
        assert shown.tobytes() == images[preview["step"]].convert("RGB").tobytes()

    # the owner only: another client does not see the job, and a link changed by anyone is refused
    assert client_b.get(f"/v1/jobs/{job.id}").status_code == 404
    query = dict(parse_qsl(urlsplit(polled["previews"][0]["url"]).query))
    for change in ({"client": client_b.id}, {"step": "8"}, {"exp": str(int(query["exp"]) + 3600)}):
        forged = http.get("/v1/previews/signed?" + urlencode({**query, **change}))
        assert forged.status_code == 403 and forged.json()["code"] == "invalid_signature"
    expired = http.get("/v1/previews/signed?" + urlencode({**query, "exp": "1"}))
    assert expired.status_code == 403


def test_a_preview_link_stops_working_with_its_subject(client_a, http, settings, store):
    from worker.service_edge import ServiceEdge

    job = _running_train_job(client_a, settings)
    ServiceEdge(settings, store).training_preview(job, 4, noise_image(32, 3))
    url = client_a.get(f"/v1/jobs/{job.id}").json()["previews"][0]["url"]
    assert http.get(url).status_code == 200
    assert client_a.delete(f"/v1/subjects/{job.subject_id}").status_code in (202, 204)
    gone = http.get(url)
    assert gone.status_code == 404 and gone.json()["code"] == "blob_not_found"


def test_each_preview_is_announced_by_a_job_preview_webhook(client_a, settings, store):
    from worker.service_edge import ServiceEdge

    assert client_a.put("/v1/webhook", json={"url": "https://example.com/hook"}).status_code == 200
    job = _running_train_job(client_a, settings)
    ServiceEdge(settings, store).training_preview(job, 6, noise_image(32, 4))
    log = client_a.get("/v1/webhook/deliveries", params={"job_id": job.id}).json()["data"]
    previews = [d for d in log if d["event"] == "job.preview"]
    assert len(previews) == 1
    payload = previews[0]["payload"]
    assert payload["type"] == "job.preview" and payload["job_id"] == job.id and payload["state"] == "running"
    assert payload["preview"]["step"] == 6 and payload["preview"]["url"].startswith("/v1/previews/signed?")
