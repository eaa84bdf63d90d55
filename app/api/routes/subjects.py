from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import CurrentClient, IdempotencyDep, StoreDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, located, page
from app.api.schemas import Page, SubjectCreate, SubjectPublic
from app.services import subjects

router = APIRouter(prefix=f"{API_PREFIX}/subjects", tags=["subjects"])


def _subject_location(body: dict) -> str:
    return f"{API_PREFIX}/subjects/{body['id']}"


@router.post("", status_code=201, summary="Create a subject (a person to learn)", response_model=SubjectPublic,
             responses={**errors(), **located(201, "the new subject")})
def create_subject(body: SubjectCreate, caller: CurrentClient, uow: UoW, idempotency: IdempotencyDep):
    if replay := idempotency.replay(uow, body.model_dump(mode="json"), _subject_location):
        return replay
    subject = subjects.create_subject(uow.session, caller, body.name, body.class_token_override, body.external_ref)
    return idempotency.respond(201, SubjectPublic.model_validate(subject).model_dump(mode="json"), _subject_location)


@router.get("", summary="List your subjects (optionally one end user's)", response_model=Page[SubjectPublic],
            responses=errors())
def list_subjects(request: Request, caller: CurrentClient, uow: UoW,
                  external_ref: str | None = Query(None, max_length=200, description="Only this end user's."),
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = subjects.list_subjects(uow.session, caller, external_ref=external_ref, limit=limit, offset=offset)
    return page(request, [SubjectPublic.model_validate(r) for r in rows], count, offset)


@router.get("/{subject_id}", summary="Get a subject", response_model=SubjectPublic, responses=errors(404))
def get_subject(subject_id: str, caller: CurrentClient, uow: UoW):
    return SubjectPublic.model_validate(subjects.get_subject(uow.session, caller, subject_id))


@router.delete("/{subject_id}", status_code=204, response_class=Response, responses=errors(404),
               summary="Delete a subject with every photo, crop, adapter and image (database and blobs)")
def delete_subject(subject_id: str, caller: CurrentClient, uow: UoW, store: StoreDep):
    subjects.delete_subject(uow, caller, subject_id, store)
    return Response(status_code=204)
