from __future__ import annotations

import redis

from tests.app.helpers import add_adapter, create_subject, subject_with_photo


def _queued_messages(settings) -> int:
    r = redis.Redis.from_url(settings.resolved_broker_url)
    return sum(r.llen(f"{settings.queue_prefix}{settings.queue(q)}") for q in ("gpu", "cpu"))


def test_training_needs_a_photo_and_only_one_runs_per_subject(client_a, settings):
    empty = create_subject(client_a)
    response = client_a.post(f"/v1/subjects/{empty}/train")
    assert response.status_code == 409 and response.json()["code"] == "no_photos"

    subject_id = subject_with_photo(client_a)
    before = _queued_messages(settings)
    response = client_a.post(f"/v1/subjects/{subject_id}/train", json={"mode": "lora", "steps": 100})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "train" and job["state"] == "queued" and job["progress"] == 0
    # The stored request is the resolved one: every training option, the preset it runs on.
    resolved = job["request"]
    assert resolved["kind"] == "train" and resolved["preset"] == settings.preset
    assert resolved["training"]["mode"] == "lora" and resolved["training"]["max_train_steps"] == 100
    assert resolved["training"]["strategy"] == "staged" and resolved["training"]["stage1_fraction"] == 0.3
    assert _queued_messages(settings) == before + 1  # really sent to the broker, after the commit

    again = client_a.post(f"/v1/subjects/{subject_id}/train")
    assert again.status_code == 409 and again.json()["code"] == "training_in_progress"
    assert again.json()["details"]["job_id"] == job["id"]

    polled = client_a.get(f"/v1/jobs/{job['id']}")
    assert polled.status_code == 200 and polled.json()["state"] == "queued"
    listed = client_a.get("/v1/jobs", params={"subject_id": subject_id, "state": "queued"}).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]


def test_cancel_a_queued_job_is_immediate(client_a):
    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    canceled = client_a.post(f"/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    assert client_a.get(f"/v1/jobs/{job_id}").json()["state"] == "canceled"
    # the subject can be trained again
    assert client_a.post(f"/v1/subjects/{subject_id}/train").status_code == 202


def test_cancel_a_running_job_asks_the_worker_to_stop(client_a):
    from core.db.models import Job, JobState
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.state, job.worker = JobState.RUNNING, "gpu-host:4242"
    body = client_a.post(f"/v1/jobs/{job_id}/cancel").json()
    assert body["state"] == "running" and body["cancel_requested"] is True
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.state = JobState.SUCCEEDED
    finished = client_a.post(f"/v1/jobs/{job_id}/cancel")
    assert finished.status_code == 409 and finished.json()["code"] == "job_already_finished"


def test_cancel_a_job_waiting_between_phases_is_immediate(client_a):
    """Intake done, the job waits for the gpu queue's worker (maybe behind another training): no worker
    holds it, so the cancel (and its webhook) must not wait for one."""
    from core.db.models import Job, JobState, WebhookDelivery
    from tests.app.fixtures import session_scope

    client_a.put("/v1/webhook", json={"url": "https://hooks.example.com/likeness"})
    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.state, job.worker, job.completed_stages = JobState.RUNNING, None, ["intake"]
    body = client_a.post(f"/v1/jobs/{job_id}/cancel").json()
    assert body["state"] == "canceled" and body["error_code"] == "canceled"
    with session_scope() as session:
        events = [d.event for d in session.query(WebhookDelivery).filter_by(job_id=job_id)]
    assert "job.canceled" in events


def test_generation_of_an_untrained_subject_is_409(client_a):
    subject_id = subject_with_photo(client_a)
    response = client_a.post(f"/v1/subjects/{subject_id}/generations", json={"style": "cinematic", "n": 4, "k": 2})
    assert response.status_code == 409 and response.json()["code"] == "subject_not_trained"


def test_generation_requests_are_checked_before_anything_is_queued(make_client):
    client = make_client(max_candidates=16)
    subject_id = subject_with_photo(client)
    add_adapter(subject_id)
    url = f"/v1/subjects/{subject_id}/generations"
    cases = [
        ({"style": "cinematic", "n": 4, "k": 5}, "k_greater_than_n"),
        ({"style": "cinematic", "n": 17, "k": 2}, "too_many_candidates"),
        ({"style": "no-such-style"}, "unknown_style"),
        ({"style": "cinematic", "aspect": "3:2"}, "unknown_aspect"),
        ({"prompts": ["a portrait of a man"]}, "prompt_missing_instance"),
        ({"prompts": ["a portrait of {instance}, " + "sharp focus, " * 30]}, "prompt_too_long_for_clip"),
        ({"style": "cinematic", "negative_prompt": "blurry, " * 40}, "prompt_too_long_for_clip"),
        ({}, "style_or_prompts_required"),
        ({"style": "cinematic", "controlnet": {"kind": "pose", "template": "../../secret.png"}}, "unknown_template"),
    ]
    for body, code in cases:
        response = client.post(url, json=body)
        assert response.status_code == 422 and response.json()["code"] == code, (body, response.text)
    assert client.get("/v1/jobs", params={"subject_id": subject_id, "kind": "generate"}).json()["count"] == 0

    ok = client.post(url, json={"style": "cinematic", "n": 4, "k": 2, "aspect": "4:5", "seed": 7, "upscale": "none"})
    assert ok.status_code == 202, ok.text
    request = ok.json()["request"]
    assert request["kind"] == "generate" and request["adapter_version"] == 1
    spec = request["generation"]
    assert spec["style"] == "cinematic" and spec["style_version"] >= 1 and spec["n"] == 4 and spec["aspect"] == "4:5"
    assert spec["upscale"] is None  # "none" -> no upscaling
    # Defaults come from the style pack and are stored, so the job can be replayed exactly.
    from pipelines.generation.styles import get_style

    style = get_style("cinematic")
    assert spec["prompts"] == list(style.prompts) and spec["negative_prompt"] == style.negative_prompt
    assert spec["guidance_scale"] == style.guidance_scale
    from likeness.contract.requests import PRESET_GENERATION_DEFAULTS  # the tiny preset denoises fewer steps

    assert spec["steps"] == PRESET_GENERATION_DEFAULTS[request["preset"]].get("steps", style.steps)


def test_styles_are_listed(client_a):
    styles = client_a.get("/v1/styles").json()
    assert styles["count"] >= 1 and "cinematic" in {s["name"] for s in styles["data"]}


def test_a_subject_trains_on_the_preset_it_names_and_generates_on_the_one_it_was_trained_on(client_a, settings):
    subject_id = subject_with_photo(client_a)
    trained = client_a.post(f"/v1/subjects/{subject_id}/train", json={"preset": "tiny-sdxl", "steps": 20})
    assert trained.status_code == 202, trained.text
    assert trained.json()["request"]["preset"] == "tiny-sdxl"
    unknown = client_a.post(f"/v1/subjects/{subject_id}/train", json={"preset": "sd3"})
    assert unknown.status_code == 422 and "preset" in unknown.text

    add_adapter(subject_id, version=1, preset="tiny-sdxl")  # what that training leaves (the manifest's preset)
    generation = client_a.post(f"/v1/subjects/{subject_id}/generations", json={"style": "cinematic", "n": 2, "k": 1})
    assert generation.status_code == 202, generation.text
    assert generation.json()["request"]["preset"] == "tiny-sdxl" != settings.model_preset
    template = client_a.post(f"/v1/subjects/{subject_id}/templates", json={"template": "id_photo"})
    assert template.status_code == 202, template.text
    assert template.json()["request"]["preset"] == "tiny-sdxl"

    older = subject_with_photo(client_a)
    add_adapter(older)  # trained before adapters recorded their preset: the deployment's
    generation = client_a.post(f"/v1/subjects/{older}/generations", json={"style": "cinematic", "n": 2, "k": 1})
    assert generation.json()["request"]["preset"] == settings.model_preset
