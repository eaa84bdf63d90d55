from __future__ import annotations

from fastapi import APIRouter, File, UploadFile

from app.api.deps import CurrentClient, IdempotencyDep, SettingsDep, StoreDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import errors
from app.api.schemas import Page, PhotoPublic, UploadResponse, UploadResult
from app.errors import InvalidRequest
from app.services import photos

router = APIRouter(prefix=f"{API_PREFIX}/subjects/{{subject_id}}/photos", tags=["photos"])


def _read_files(files: list[UploadFile]) -> list[photos.UploadedFile]:
    """The uploads as the services read them: one at a time, from where the form parser spooled them."""
    return [photos.UploadedFile(upload.filename or "", upload.file) for upload in files]


@router.post(
    "", status_code=201, response_model=UploadResponse, responses=errors(403, 404, 413),
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
    if replay := idempotency.replay(uow, [f.fingerprint() for f in uploaded]):
        return replay
    outcomes = photos.upload_photos(uow, caller, subject_id, uploaded, store, settings)
    return upload_answer(idempotency, subject_id, outcomes)


def upload_answer(idempotency: IdempotencyDep, subject_id: str, outcomes: list[photos.FileOutcome]):  # noqa: ANN201
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
    return idempotency.respond(201, body.model_dump(mode="json"))


@router.get("", response_model=Page[PhotoPublic], responses=errors(404),
            summary="List a subject's photos with their validation results (intake fills them in)")
def list_photos(subject_id: str, caller: CurrentClient, uow: UoW):
    rows = photos.list_photos(uow.session, caller, subject_id)
    data = [PhotoPublic.model_validate(p).model_copy(update={"has_crop": p.crop_key is not None}) for p in rows]
    return {"data": data, "count": len(data)}
