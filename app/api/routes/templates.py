"""Template mode: shipped templates (with thumbnails), template photos uploaded to a subject, template jobs."""

from __future__ import annotations

from fastapi import APIRouter, File, Response, UploadFile

from app.api.deps import CurrentClient, IdempotencyDep, SettingsDep, StoreDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import BINARY, errors, job_location, located
from app.api.routes.photos import _read_files, upload_answer
from app.api.schemas import JobPublic, Page, TemplatePhotoPublic, TemplatePublic, UploadResponse
from app.errors import InvalidRequest, NotFound
from app.services import templates
from likeness.contract.requests import TemplateRequest
from pipelines.errors import InvalidConfig
from pipelines.templates import catalog

router = APIRouter(prefix=API_PREFIX, tags=["templates"])

MAX_TEMPLATE_FILES = 10


@router.get("/templates", response_model=Page[TemplatePublic], responses=errors(),
            summary="Shipped templates to put a subject into (template mode)")
def list_templates(caller: CurrentClient):
    data = []
    for t in catalog.list_templates():
        width, height = catalog.template_size(t.name)
        data.append(TemplatePublic(name=t.name, version=t.version, title=t.title, caption=t.caption, width=width,
                                   height=height, thumbnail_url=f"{API_PREFIX}/templates/{t.name}/thumbnail",
                                   licence=t.licence))
    return {"data": data, "count": len(data)}


@router.get("/templates/{name}/thumbnail", response_class=Response, responses={
    **errors(404), 200: {"content": {"image/jpeg": BINARY}, "description": "JPEG, long side 256 px."}},
    summary="A shipped template's thumbnail")
def template_thumbnail(name: str, caller: CurrentClient):
    try:
        data = catalog.thumbnail_jpeg(name)
    except InvalidConfig as exc:
        raise NotFound(f"Unknown template {name!r}.", exc.details, code=exc.error_code) from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.post(
    "/subjects/{subject_id}/templates/photos", status_code=201, response_model=UploadResponse,
    responses={**errors(404, 413), **located(201, "the subject's template photos")},
    summary="Upload template photos to put the subject into; each file gets a verdict",
    description=("The same checks as subject photos (content sniffing, `decompression_bomb`, `not_an_image`, ...; "
                 "a bad file is rejected with its own `reason_code` while the good ones are stored, without "
                 "metadata; when every file is rejected the answer is 422 `all_files_rejected` with the same "
                 "per-file list in `details`). `photo_id` of a stored file is its `template_photo_id`. Whether it "
                 "shows exactly one person with a face is then decided by a worker within seconds, before any job "
                 "uses it: `GET .../templates/photos` shows the verdict (`pending` until then; `no_person`, "
                 "`multiple_people`, `no_face`, `face_too_small`), and a request naming a refused photo is "
                 "refused at once (`template_multiple_people`, ...). Photos are worked on at most 2048 px on the "
                 "long side."),
)
def upload_template_photos(subject_id: str, caller: CurrentClient, settings: SettingsDep, store: StoreDep, uow: UoW,
                           idempotency: IdempotencyDep,
                           files: list[UploadFile] = File(description=f"1-{MAX_TEMPLATE_FILES} image files")):
    if not 1 <= len(files) <= MAX_TEMPLATE_FILES:
        raise InvalidRequest(f"Upload between 1 and {MAX_TEMPLATE_FILES} template photos per request.",
                             {"files": len(files), "max": MAX_TEMPLATE_FILES}, code="invalid_file_count")
    uploaded = _read_files(files)
    if replay := idempotency.replay(uow, [f.fingerprint() for f in uploaded], _template_photos_location):
        return replay
    outcomes = templates.upload_template_photos(uow, caller, subject_id, uploaded, store, settings)
    return upload_answer(idempotency, subject_id, outcomes, _template_photos_location)


def _template_photos_location(body: dict) -> str:
    return f"{API_PREFIX}/subjects/{body['subject_id']}/templates/photos"


@router.get("/subjects/{subject_id}/templates/photos", response_model=Page[TemplatePhotoPublic],
            responses=errors(404), summary="List the subject's template photos with their verdicts")
def list_template_photos(subject_id: str, caller: CurrentClient, uow: UoW):
    rows = templates.list_template_photos(uow.session, caller, subject_id)
    return {"data": [TemplatePhotoPublic.model_validate(r) for r in rows], "count": len(rows)}


@router.delete("/subjects/{subject_id}/templates/photos/{template_photo_id}", status_code=204,
               response_class=Response, responses=errors(404), summary="Delete a template photo")
def delete_template_photo(subject_id: str, template_photo_id: str, caller: CurrentClient, uow: UoW, store: StoreDep):
    templates.delete_template_photo(uow, caller, subject_id, template_photo_id, store)
    return Response(status_code=204)


@router.post("/subjects/{subject_id}/templates", status_code=202, response_model=JobPublic,
             responses={**errors(404, 409), **located(202, "the job")},
             summary="Put a trained subject into a template photo (best k of n)",
             description="A shipped template (`template`, GET /v1/templates) or an uploaded template photo "
                         "(`template_photo_id`). Checked before anything is queued: 422 with "
                         "`template_or_photo_required`, `unknown_template`, `k_greater_than_n`, "
                         "`too_many_candidates`, `invalid_strength`, `template_multiple_people` (a photo already "
                         "refused), ...; 404 `template_photo_not_found`; 409 `subject_not_trained`. The job's "
                         "stages: masking, generating, ranking, upscaling, delivering.")
def start_template_job(subject_id: str, body: TemplateRequest, caller: CurrentClient, settings: SettingsDep, uow: UoW,
                       idempotency: IdempotencyDep):
    if replay := idempotency.replay(uow, body.model_dump(mode="json"), job_location):
        return replay
    job = templates.create_template_job(uow, caller, subject_id, body, settings)
    return idempotency.respond(202, JobPublic.model_validate(job).model_dump(mode="json"), job_location)
