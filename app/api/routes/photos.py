from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, File, UploadFile

from app.api.deps import CurrentClient, IdempotencyDep, SettingsDep, StoreDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, located
from app.api.schemas import (
    DirectUploadCompletion,
    DirectUploadRequest,
    DirectUploadSlot,
    DirectUploadSlots,
    Page,
    PhotoPublic,
    UploadResponse,
    UploadResult,
)
from app.errors import InvalidRequest
from app.services import direct_uploads, photos

router = APIRouter(prefix=f"{API_PREFIX}/subjects/{{subject_id}}/photos", tags=["photos"])


def _read_files(files: list[UploadFile]) -> list[photos.UploadedFile]:
    """The uploads as the services read them: one at a time, from where the form parser spooled them."""
    return [photos.UploadedFile(upload.filename or "", upload.file) for upload in files]


@router.post(
    "", status_code=201, response_model=UploadResponse,
    responses={**errors(403, 404, 413), **located(201, "the subject's photos")},
    summary="Upload 1-30 photos; each file is validated on its own",
    description=("Formats are recognised from the file's content (JPEG, PNG, WebP, HEIC, AVIF). A bad file is "
                 "rejected with its own `reason_code` (`empty_file`, `not_an_image`, `too_large_bytes`, "
                 "`decompression_bomb`, ...) while the good files of the same request are stored; when every file "
                 "is rejected the answer is 422 `all_files_rejected` with the same per-file list in "
                 "`details` (`subject_id`, `stored`, `rejected`, `files`). 403 `storage_quota_exceeded` when the "
                 "files would exceed the client's storage quota. A file is stored "
                 "as sent minus its metadata (EXIF with GPS, XMP, comments and text are removed, the pixels are "
                 "not re-encoded; the orientation is kept). Decoding, face and quality checks run in the "
                 "training job's intake; see `GET .../photos`."),
)
def upload_photos(subject_id: str, caller: CurrentClient, settings: SettingsDep, store: StoreDep, uow: UoW,
                  idempotency: IdempotencyDep, files: list[UploadFile] = File(description="1-30 image files")):
    if not 1 <= len(files) <= settings.max_photos_per_request:
        raise InvalidRequest(f"Upload between 1 and {settings.max_photos_per_request} files per request.",
                             {"files": len(files), "max": settings.max_photos_per_request}, code="invalid_file_count")
    uploaded = _read_files(files)
    if replay := idempotency.replay(uow, [f.fingerprint() for f in uploaded], _photos_location):
        return replay
    outcomes = photos.upload_photos(uow, caller, subject_id, uploaded, store, settings)
    return upload_answer(idempotency, subject_id, outcomes)


def upload_answer(idempotency: IdempotencyDep, subject_id: str, outcomes: list[photos.FileOutcome],  # noqa: ANN201
                  location: Callable[[dict], str] | None = None):
    """201 with each file's verdict; 422 ``all_files_rejected`` (the same list in ``details``) when no file
    was stored (photos and template photos alike)."""
    results = [UploadResult(filename=o.filename, status=o.status, photo_id=o.photo_id, reason_code=o.reason_code,
                            message=o.message) for o in outcomes]
    stored = sum(r.status == "stored" for r in results)
    body = UploadResponse(subject_id=subject_id, stored=stored, rejected=len(results) - stored, files=results)
    if stored == 0:  # nothing usable: an error, still with every file's reason
        return idempotency.respond(422, {"code": "all_files_rejected", "message": "None of the files could be "
                                         "used; each file's reason is listed in details.files.",
                                         "details": body.model_dump(mode="json")})
    return idempotency.respond(201, body.model_dump(mode="json"), location or _photos_location)


def _photos_location(body: dict) -> str:
    return f"{API_PREFIX}/subjects/{body['subject_id']}/photos"


@router.get("", response_model=Page[PhotoPublic], responses=errors(404),
            summary="List a subject's photos with their validation results (intake fills them in)")
def list_photos(subject_id: str, caller: CurrentClient, uow: UoW):
    rows = photos.list_photos(uow.session, caller, subject_id)
    data = [PhotoPublic.model_validate(p).model_copy(update={"has_crop": p.crop_key is not None}) for p in rows]
    return {"data": data, "count": len(data)}


@router.post(
    "/direct-uploads", status_code=201, response_model=DirectUploadSlots, responses=errors(403, 404, 409),
    summary="S3 mode: presigned URLs to PUT photos straight to the blob store",
    description=("Name 1-30 files with their exact sizes; each gets an `upload_id` and a URL that accepts a PUT "
                 "of exactly that many bytes until `expires_at`. Then call `.../direct-uploads/complete`: "
                 "the photos are checked as the multipart upload checks them. 422 `too_large_bytes` for a "
                 "size over the limit, 403 `storage_quota_exceeded` past the quota, 409 "
                 "`direct_upload_unavailable` with local storage (use `POST .../photos`)."),
)
def begin_direct_upload(subject_id: str, body: DirectUploadRequest, caller: CurrentClient, settings: SettingsDep,
                        store: StoreDep, uow: UoW):
    planned = [direct_uploads.PlannedFile(f.filename, f.size_bytes) for f in body.files]
    slots = direct_uploads.begin(uow, caller, subject_id, planned, store, settings)
    data = [DirectUploadSlot(upload_id=s.upload_id, filename=s.filename, url=s.url, expires_at=s.expires_at)
            for s in slots]
    return {"data": data, "count": len(data)}


@router.post(
    "/direct-uploads/complete", status_code=201, response_model=UploadResponse, responses=errors(403, 404, 413),
    summary="S3 mode: check and register the photos PUT to the presigned URLs",
    description=("Each arrived file is checked exactly as `POST .../photos` checks an uploaded one (format from "
                 "its content, size, decompression bomb, metadata stripped) and stored pending intake; one that "
                 "never arrived is rejected with `upload_not_found`. Same answer as `POST .../photos` (422 "
                 "`all_files_rejected` when none could be used)."),
)
def complete_direct_upload(subject_id: str, body: DirectUploadCompletion, caller: CurrentClient,
                           settings: SettingsDep, store: StoreDep, uow: UoW, idempotency: IdempotencyDep):
    uploads = [(u.upload_id, u.filename) for u in body.uploads]
    if replay := idempotency.replay(uow, [list(u) for u in uploads]):
        return replay
    return upload_answer(idempotency, subject_id,
                         direct_uploads.complete(uow, caller, subject_id, uploads, store, settings))
