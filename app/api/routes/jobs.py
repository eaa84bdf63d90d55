from __future__ import annotations

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool

from app.api.deps import CurrentClient, IdempotencyKey, ReadSessionDep, SessionDep, SettingsDep, released
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, replayable
from app.api.schemas import GenerateRequest, JobPublic, Page, TrainRequest
from app.db.models import JobKind, JobState
from app.db.session import get_engine, session_scope
from app.services import idempotency, jobs
from app.services.clients import Caller
from app.webhooks import send_deliveries
from pipelines.generation.request import ControlNetSpec, GenerationRequest
from worker.celery_app import enqueue_job

router = APIRouter(prefix=API_PREFIX, tags=["jobs"])


def _create_and_enqueue(create) -> idempotency.StoredResponse:  # noqa: ANN001
    with session_scope() as session:
        job = create(session)
        body = JobPublic.model_validate(job).model_dump(mode="json")
        job_id, kind = job.id, job.kind.value
    enqueue_job(job_id, kind)  # only after the commit: the worker must find the row
    return idempotency.StoredResponse(202, body)


@router.post("/subjects/{subject_id}/train", status_code=202, response_model=JobPublic, responses=errors(404, 409),
             summary="Start training a subject (needs uploaded photos; one training at a time)",
             description="409 `no_photos` without photos, 409 `training_in_progress` while another training of the "
                         "subject is queued or running. Intake runs first inside the job and judges each photo.")
def start_training(subject_id: str, caller: CurrentClient, settings: SettingsDep, request: Request,
                   idempotency_key: IdempotencyKey = None, body: TrainRequest | None = Body(None)):
    params = (body or TrainRequest()).model_dump(mode="json")
    fp = idempotency.fingerprint(f"POST {request.url.path}", params)
    response, replayed = idempotency.run_idempotent(caller.id, idempotency_key, fp, lambda: _create_and_enqueue(
        lambda session: jobs.create_train_job(session, caller, subject_id, params, settings, idempotency_key)))
    return replayable(response.status, response.body, replayed)


def to_generation_request(body: GenerateRequest) -> GenerationRequest:
    if body.no_controlnet:
        controlnets: tuple[ControlNetSpec, ...] | None = ()
    elif body.controlnet is not None:
        controlnets = (ControlNetSpec(kind=body.controlnet.kind, template=body.controlnet.template,
                                      scale=body.controlnet.scale),)
    else:
        controlnets = None
    return GenerationRequest(
        style=body.style, prompts=tuple(body.prompts) if body.prompts else None, negative_prompt=body.negative_prompt,
        n=body.n, k=body.k, aspect=body.aspect, seed=body.seed, steps=body.steps, guidance_scale=body.guidance_scale,
        sampler=body.sampler, controlnets=controlnets, upscale=None if body.upscale == "none" else body.upscale,
        ranking=body.ranking,
    )


@router.post("/subjects/{subject_id}/generations", status_code=202, response_model=JobPublic,
             responses=errors(404, 409), summary="Generate portraits of a trained subject (best k of n)",
             description="Checked before anything is queued: 422 with `k_greater_than_n`, `too_many_candidates`, "
                         "`unknown_style`, `unknown_aspect`, `unknown_template`, `prompt_missing_instance`, ...; "
                         "409 `subject_not_trained` when the subject has no trained adapter yet.")
def start_generation(subject_id: str, body: GenerateRequest, caller: CurrentClient, settings: SettingsDep,
                     request: Request, idempotency_key: IdempotencyKey = None):
    generation = to_generation_request(body)
    fp = idempotency.fingerprint(f"POST {request.url.path}", body.model_dump(mode="json"))
    response, replayed = idempotency.run_idempotent(caller.id, idempotency_key, fp, lambda: _create_and_enqueue(
        lambda session: jobs.create_generation_job(session, caller, subject_id, generation, settings, idempotency_key)))
    return replayable(response.status, response.body, replayed)


def _job_status(caller: Caller, job_id: str) -> JobPublic:
    with get_engine(autocommit=True).connect() as conn:
        return JobPublic.model_validate(jobs.get_job_fields(conn, caller, job_id))


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=errors(404),
            summary="Job status: state, stage, progress (0-100), ETA, error")
async def get_job(job_id: str, caller: CurrentClient):
    # The hot path of every client (status polls): one thread hop, one indexed SELECT on an
    # autocommit connection, serialisation on the event loop.
    return await run_in_threadpool(_job_status, caller, job_id)


@router.get("/jobs", response_model=Page[JobPublic], responses=errors(), summary="List your jobs, newest first")
def list_jobs(session: ReadSessionDep, caller: CurrentClient, state: JobState | None = None, subject_id: str | None = None,
              kind: JobKind | None = None, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
    rows, count = jobs.list_jobs(session, caller, state=state, subject_id=subject_id, kind=kind, limit=limit,
                                 offset=offset)
    return released(session, {"data": [JobPublic.model_validate(r) for r in rows], "count": count})


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=errors(404, 409),
             summary="Cancel a job (queued: at once; running: at the worker's next step)")
def cancel_job(job_id: str, session: SessionDep, caller: CurrentClient):
    job, delivery = jobs.cancel_job(session, caller, job_id)
    public = JobPublic.model_validate(job)
    session.commit()
    session.close()
    send_deliveries([delivery])
    return public
