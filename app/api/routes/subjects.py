from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import CurrentClient, IdempotencyKey, ReadSessionDep, SessionDep, StoreDep, released
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, replayable
from app.api.schemas import Page, SubjectCreate, SubjectPublic
from app.db.session import session_scope
from app.services import idempotency, subjects
from app.webhooks import send_deliveries

router = APIRouter(prefix=f"{API_PREFIX}/subjects", tags=["subjects"])


@router.post("", status_code=201, summary="Create a subject (a person to learn)", response_model=SubjectPublic,
             responses=errors())
def create_subject(body: SubjectCreate, caller: CurrentClient, request: Request, idempotency_key: IdempotencyKey = None):
    def action() -> idempotency.StoredResponse:
        with session_scope() as session:
            subject = subjects.create_subject(session, caller, body.name, body.class_token_override)
            public = SubjectPublic.model_validate(subject).model_dump(mode="json")
        return idempotency.StoredResponse(201, public)

    fp = idempotency.fingerprint(f"POST {request.url.path}", body.model_dump(mode="json"))
    response, replayed = idempotency.run_idempotent(caller.id, idempotency_key, fp, action)
    return replayable(response.status, response.body, replayed)


@router.get("", summary="List your subjects", response_model=Page[SubjectPublic], responses=errors())
def list_subjects(session: ReadSessionDep, caller: CurrentClient, limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0)):
    rows, count = subjects.list_subjects(session, caller, limit=limit, offset=offset)
    return released(session, {"data": [SubjectPublic.model_validate(r) for r in rows], "count": count})


@router.get("/{subject_id}", summary="Get a subject", response_model=SubjectPublic, responses=errors(404))
def get_subject(subject_id: str, session: ReadSessionDep, caller: CurrentClient):
    return released(session, SubjectPublic.model_validate(subjects.get_subject(session, caller, subject_id)))


@router.delete("/{subject_id}", status_code=204, response_class=Response, responses=errors(404),
               summary="Delete a subject with every photo, crop, adapter and image (database and blobs)")
def delete_subject(subject_id: str, session: SessionDep, caller: CurrentClient, store: StoreDep):
    deliveries = subjects.delete_subject(session, caller, subject_id)
    session.commit()
    session.close()
    subjects.purge_subject_blobs(store, subject_id)
    send_deliveries(deliveries)
    return Response(status_code=204)
