from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response

from app.api import job_status
from app.api.deps import CurrentClient, IdempotencyDep, SettingsDep, UoW, app_settings
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, job_location, located, page
from app.api.schemas import JobPublic, Page
from app.services import jobs
from likeness.contract.plan import JobKind, JobState
from likeness.contract.requests import GenerateRequest, TrainRequest

router = APIRouter(prefix=API_PREFIX, tags=["jobs"])


def _public(job) -> dict:  # noqa: ANN001
    return JobPublic.model_validate(job).model_dump(mode="json")


@router.post("/subjects/{subject_id}/train", status_code=202, response_model=JobPublic,
             responses={**errors(404, 409), **located(202, "the job")},
             summary="Start training a subject (needs uploaded photos; one training at a time)",
             description="409 `no_photos` without photos, 409 `training_in_progress` while another training of the "
                         "subject is queued or running. Intake runs first inside the job and judges each photo.")
def start_training(subject_id: str, caller: CurrentClient, settings: SettingsDep, uow: UoW,
                   idempotency: IdempotencyDep, body: TrainRequest | None = Body(None)):
    body = body or TrainRequest()
    if replay := idempotency.replay(uow, body.model_dump(mode="json"), job_location):
        return replay
    job = jobs.create_train_job(uow, caller, subject_id, body, settings)
    return idempotency.respond(202, _public(job), job_location)


@router.post("/subjects/{subject_id}/generations", status_code=202, response_model=JobPublic,
             responses={**errors(404, 409), **located(202, "the job")},
             summary="Generate portraits of a trained subject (best k of n)",
             description="Checked before anything is queued: 422 with `k_greater_than_n`, `too_many_candidates`, "
                         "`unknown_style`, `unknown_aspect`, `unknown_template`, `prompt_missing_instance`, ...; "
                         "409 `subject_not_trained` when the subject has no trained adapter yet.")
def start_generation(subject_id: str, body: GenerateRequest, caller: CurrentClient, settings: SettingsDep, uow: UoW,
                     idempotency: IdempotencyDep):
    if replay := idempotency.replay(uow, body.model_dump(mode="json"), job_location):
        return replay
    job = jobs.create_generation_job(uow, caller, subject_id, body, settings)
    return idempotency.respond(202, _public(job), job_location)


@router.get("/jobs/{job_id}", response_model=JobPublic,
            responses={**errors(404),
                       200: {"headers": {"ETag": {"description": "The body's version: send it back in "
                                                                 "If-None-Match to poll cheaply.",
                                                  "schema": {"type": "string"}}}},
                       304: {"description": "Not modified: the job is as it was when the ETag was sent."}},
            summary="Job status: state, stage, progress (0-100), ETA, error")
async def get_job(job_id: str, caller: CurrentClient, request: Request,
                  if_none_match: Annotated[str | None, Header(description=(
                      "The ETag of the last answer: 304 with no body while the job has not changed."))] = None,
                  ) -> Response:
    # The hot path of every client: a cached, already serialised body (see app.api.job_status).
    body = await job_status.status_body(request.app.state.job_status, app_settings(request), caller.id, job_id)
    etag = job_status.etag(body)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and job_status.etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/jobs", response_model=Page[JobPublic], responses=errors(), summary="List your jobs, newest first")
def list_jobs(request: Request, caller: CurrentClient, uow: UoW, state: JobState | None = None,
              subject_id: str | None = None,
              kind: JobKind | None = None, limit: int = Query(50, ge=1, le=500),
              offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = jobs.list_jobs(uow.session, caller, state=state, subject_id=subject_id, kind=kind, limit=limit,
                                 offset=offset)
    return page(request, [JobPublic.model_validate(r) for r in rows], count, offset)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=errors(404, 409),
             summary="Cancel a job (queued: at once; running: at the worker's next step)")
def cancel_job(job_id: str, caller: CurrentClient, uow: UoW):
    job = jobs.cancel_job(uow, caller, job_id)
    uow.after_commit(lambda: job_status.forget(job.id))  # this process's next poll sees the cancel
    return JobPublic.model_validate(job)
