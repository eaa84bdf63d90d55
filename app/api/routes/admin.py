"""Operator endpoints (admin keys only): clients and their keys and limits, every client's jobs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from app.api import job_status
from app.api.deps import AdminClient, SettingsDep, StoreDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, page
from app.api.schemas import AdminJobPublic, ClientCreate, ClientCreated, ClientLimits, ClientPublic, Page
from app.services import clients, jobs
from likeness.contract.plan import JobKind, JobState

# Operation ids admin_<handler> (admin_cancel_job beside the tenant's cancel_job): unique and readable.
router = APIRouter(prefix=f"{API_PREFIX}/admin", tags=["admin"],
                   generate_unique_id_function=lambda route: f"admin_{route.name}")


@router.post("/clients", status_code=201, response_model=ClientCreated, responses=errors(403),
             summary="Create a client; its API key is returned once")
def create_client(body: ClientCreate, caller: AdminClient, uow: UoW):
    limits = body.model_dump(exclude={"name", "role"})
    client, key = clients.create_client(uow.session, body.name, body.role, **limits)
    return ClientCreated(client=ClientPublic.model_validate(client), api_key=key)


@router.get("/clients", response_model=Page[ClientPublic], responses=errors(403), summary="Every client")
def list_clients(request: Request, caller: AdminClient, uow: UoW, limit: int = Query(100, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = clients.list_clients(uow.session, limit=limit, offset=offset)
    return page(request, [ClientPublic.model_validate(c) for c in rows], count, offset)


@router.post("/clients/{client_id}/rotate", response_model=ClientCreated, responses=errors(403, 404, 409),
             summary="Replace the client's API key; the old key is refused at once (the new one is shown once)")
def rotate_key(client_id: str, caller: AdminClient, uow: UoW):
    client, key = clients.rotate_key(uow, client_id)
    return ClientCreated(client=ClientPublic.model_validate(client), api_key=key)


@router.post("/clients/{client_id}/revoke", response_model=ClientPublic, responses=errors(403, 404),
             summary="Refuse the client's API key from now on (at once, in every API process)")
def revoke_key(client_id: str, caller: AdminClient, uow: UoW):
    return ClientPublic.model_validate(clients.revoke(uow, client_id))


@router.put("/clients/{client_id}/limits", response_model=ClientPublic, responses=errors(403, 404),
            summary="Set the client's limits and retention (null: the service default)")
def set_limits(client_id: str, body: ClientLimits, caller: AdminClient, uow: UoW):
    return ClientPublic.model_validate(clients.set_limits(uow, client_id, **body.model_dump()))


@router.delete("/clients/{client_id}", status_code=204, response_class=Response, responses=errors(403, 404, 409),
               summary="Delete a client and everything it owns (subjects, photos, jobs, adapters, images, blobs)")
def delete_client(client_id: str, caller: AdminClient, uow: UoW, store: StoreDep):
    clients.delete_client(uow, client_id, store, caller_id=caller.id)
    return Response(status_code=204)


@router.get("/jobs", response_model=Page[AdminJobPublic], responses=errors(403),
            summary="Every client's jobs (dashboard)")
def list_all_jobs(request: Request, caller: AdminClient, uow: UoW, state: JobState | None = None,
                  kind: JobKind | None = None,
                  client_id: str | None = None, subject_id: str | None = None,
                  limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = jobs.list_jobs(uow.session, None, state=state, kind=kind, client_id=client_id,
                                 subject_id=subject_id, limit=limit, offset=offset)
    return page(request, [AdminJobPublic.model_validate(r) for r in rows], count, offset)


@router.post("/jobs/{job_id}/cancel", response_model=AdminJobPublic, responses=errors(403, 404, 409),
             summary="Cancel any client's job")
def cancel_job(job_id: str, caller: AdminClient, uow: UoW):
    job = jobs.cancel_job(uow, None, job_id)
    uow.after_commit(lambda: job_status.forget(job.id))
    return AdminJobPublic.model_validate(job)


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=AdminJobPublic, responses=errors(403, 404, 409),
             summary="Run a failed or canceled job again: a new job with the same resolved request")
def retry_job(job_id: str, caller: AdminClient, uow: UoW, settings: SettingsDep):
    return AdminJobPublic.model_validate(jobs.retry_job(uow, job_id, settings))
