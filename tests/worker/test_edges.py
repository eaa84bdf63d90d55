"""One orchestration, two edges: the same train and generate jobs run through the service (the runner on
SQLite and local blobs) and through ``likeness run`` (a folder and ``report.json``) produce the same
phases, the same typed results and the same number of images (tiny preset, CPU, the same photos)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tests.conftest import MODEL_CACHE, encode
from tests.pipelines.intake.conftest import person_variants
from tests.worker.conftest import read_job, settings_with, subject_with_photos

N, K, STEPS = 3, 2, 10


def test_both_edges_answer_every_question_of_the_port(tmp_path):
    from core.storage import LocalBlobStore
    from worker.local import FolderEdge
    from worker.phases import JobEdge
    from worker.service_edge import ServiceEdge

    assert isinstance(ServiceEdge(settings_with(), LocalBlobStore(tmp_path / "blobs")), JobEdge)
    assert isinstance(FolderEdge([], tmp_path / "out"), JobEdge)


def _requests():
    from likeness.contract.requests import GenerateRequest, TrainRequest

    return TrainRequest(steps=STEPS, seed=5), GenerateRequest(style="pencil_sketch", n=N, k=K, steps=3, seed=9,
                                                             upscale="none")


def _through_the_service(settings, photos: list[bytes]) -> tuple[str, str]:
    """A subject with ``photos`` uploaded, its training then a generation, run by the worker's runner."""
    from core.db.models import Job, JobKind, JobState
    from likeness.contract.requests import resolve_generate, resolve_train
    from tests.app.fixtures import session_scope
    from worker import runner

    train, generate = _requests()
    client_id, subject_id = subject_with_photos(settings, photos)
    ids = {"client_id": client_id, "subject_id": subject_id}

    def run(kind: JobKind, request) -> str:  # noqa: ANN001
        with session_scope() as session:
            job = Job(**ids, kind=kind, state=JobState.QUEUED, request=request.model_dump(mode="json"),
                      completed_stages=[])
            session.add(job)
            session.flush()
            job_id = job.id
        assert runner.run_job(job_id, settings=settings) == "succeeded", read_job(job_id).error_message
        return job_id

    train_id = run(JobKind.TRAIN, resolve_train(train, preset="tiny"))
    generate_id = run(JobKind.GENERATE, resolve_generate(generate, preset="tiny", adapter_version=1))
    return train_id, generate_id


def _stages(job_id: str) -> list[str]:
    from core.db.models import JobStage
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return list(session.scalars(select(JobStage.stage).where(JobStage.job_id == job_id)
                                    .order_by(JobStage.started_at)))


@pytest.mark.slow
def test_the_service_and_a_local_run_produce_the_same_jobs(sqlite_db, queue, tiny_preset, grace_hopper, tmp_path):
    from core.db.models import Image
    from likeness.contract.results import read_result
    from tests.app.fixtures import session_scope
    from worker.local import LocalRunConfig, StageTimer, run_local

    photos = [encode(variant, quality=92) for variant in person_variants(grace_hopper, 6)]
    settings = settings_with(model_cache_dir=MODEL_CACHE, device="cpu")
    train_id, generate_id = _through_the_service(settings, photos)

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(photos):
        (folder / f"photo_{i}.jpg").write_bytes(data)
    train, generate = _requests()
    timer = StageTimer()
    report = run_local(folder, tmp_path / "out", LocalRunConfig(train=train, generate=generate, device="cpu"),
                       MODEL_CACHE, timer=timer)

    # the same phases, stage by stage
    assert _stages(train_id) + _stages(generate_id) == list(timer.durations())
    # the same typed results: what the service stores on its jobs is what report.json holds
    service = {"train": read_result("train", read_job(train_id).result),
               "generate": read_result("generate", read_job(generate_id).result)}
    local = {kind: read_result(kind, stored) for kind, stored in report["results"].items()}
    assert set(local) == {"train", "generate"}
    for kind in local:
        assert set(local[kind].stored()) == set(service[kind].stored()), kind
    assert local["train"].intake == service["train"].intake  # the same verdicts, class word and scores
    assert local["train"].training.steps == service["train"].training.steps == STEPS
    assert local["train"].adapter.version == service["train"].adapter.version == 1
    assert [(c.seed, c.rank, c.faces) for c in local["generate"].candidates] == \
        [(c.seed, c.rank, c.faces) for c in service["generate"].candidates]
    # the same number of images, delivered the same way
    with session_scope() as session:
        delivered = session.scalars(select(Image).where(Image.job_id == generate_id).order_by(Image.rank)).all()
        rows = [(image.rank, image.seed, image.width, image.height) for image in delivered]
    assert local["generate"].images == service["generate"].images == len(rows) == K
    assert [(c["rank"], c["seed"], c["width"], c["height"]) for c in report["candidates"]] == rows
    assert all((tmp_path / "out" / c["file"]).is_file() for c in report["candidates"])
    # report.json is what run_local returned (plus timings), with each photo's verdict
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["results"] == report["results"] and written["status"] == "succeeded"
    assert sorted(p["file"] for p in written["photos"]) == sorted(p.name for p in folder.iterdir())
    assert sum(p["accepted"] for p in written["photos"]) == service["train"].intake.accepted
