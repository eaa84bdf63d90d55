from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.deps import AdminClient, ReadSessionDep, SessionDep, released
from app.api.routes import API_PREFIX
from app.api.routes._common import errors
from app.api.schemas import AdminJobPublic, ClientCreate, ClientCreated, ClientPublic, Page
from app.db.models import JobKind, JobState
from app.services import clients, jobs

router = APIRouter(prefix=f"{API_PREFIX}/admin", tags=["admin"])


@router.post("/clients", status_code=201, response_model=ClientCreated, responses=errors(403),
             summary="Create a client; its API key is returned once")
def create_client(body: ClientCreate, session: SessionDep, caller: AdminClient):
    client, key = clients.create_client(session, body.name, body.role, max_candidates=body.max_candidates)
    out = ClientCreated(client=ClientPublic.model_validate(client), api_key=key)
    session.commit()
    return released(session, out)


@router.get("/jobs", response_model=Page[AdminJobPublic], responses=errors(403),
            summary="Every client's jobs (dashboard)")
def list_all_jobs(session: ReadSessionDep, caller: AdminClient, state: JobState | None = None,
                  kind: JobKind | None = None, client_id: str | None = None,
                  limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    rows, count = jobs.list_jobs(session, None, state=state, kind=kind, limit=limit, offset=offset,
                                 client_id=client_id)
    return released(session, {"data": [AdminJobPublic.model_validate(r) for r in rows], "count": count})
