from __future__ import annotations

import mimetypes
from pathlib import PurePosixPath
from typing import Literal

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import (
    CurrentClient,
    SettingsDep,
    StoreDep,
    UoW,
    count_failure,
    limit_address,
    refuse_failing_address,
)
from app.api.routes import API_PREFIX
from app.api.routes._common import BINARY, errors, page
from app.api.schemas import ImagePublic, Page, SignedUrl, SignedUrlRequest
from app.errors import Forbidden, NotFound
from app.services import adapters, images
from core.signing import check_image_signature, check_preview_signature, signed_image_url, signing_secret
from core.storage import BlobNotFound, BlobStore, InvalidKey

router = APIRouter(prefix=API_PREFIX, tags=["images and adapters"])

_IMAGE_RESPONSE = {200: {"content": {"image/png": BINARY}, "description": "The image bytes (PNG)."}}


def _stream(store: BlobStore, key: str, filename: str) -> StreamingResponse:
    try:
        chunks = store.open_stream(key)
    except (BlobNotFound, InvalidKey):
        raise NotFound("The image file is gone.", code="blob_not_found") from None
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return StreamingResponse(chunks, media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Cache-Control": "private, max-age=300"})


@router.get("/subjects/{subject_id}/images", response_model=Page[ImagePublic], responses=errors(404),
            summary="A subject's result images with scores and ranks, best first",
            description="Ordered by rank (1 = best within its job), then newest job first, then id: `data[0]` is "
                        "the best image of the newest generation, and every rank 1 comes before any rank 2. "
                        "The order is total, so `offset` pages never repeat or skip an image.")
def list_images(request: Request, subject_id: str, caller: CurrentClient, uow: UoW, job_id: str | None = None,
                limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = images.list_images(uow.session, caller, subject_id, job_id=job_id, limit=limit, offset=offset)
    data = [ImagePublic.model_validate(i).model_copy(update={"has_upscaled": i.upscaled_key is not None}) for i in rows]
    return page(request, data, count, offset)


@router.get("/images/{image_id}/download", response_class=StreamingResponse,
            responses={**_IMAGE_RESPONSE, **errors(404)},
            summary="Download an image (streamed)")
def download_image(image_id: str, caller: CurrentClient, uow: UoW, store: StoreDep,
                   variant: Literal["original", "upscaled"] = "original"):
    image = images.get_image(uow.session, caller, image_id)
    key = images.image_blob_key(image, variant)  # the unit of work ends before the stream starts
    return _stream(store, key, f"{image_id}{'-upscaled' if variant == 'upscaled' else ''}.png")


@router.post("/images/{image_id}/url", response_model=SignedUrl, responses=errors(404),
             summary="A short-lived signed URL for an image (no API key needed to GET it)")
def image_url(image_id: str, caller: CurrentClient, uow: UoW, settings: SettingsDep,
              body: SignedUrlRequest | None = Body(None)):
    image = images.get_image(uow.session, caller, image_id)
    variant = (body or SignedUrlRequest()).variant
    images.image_blob_key(image, variant)  # 404 now if the variant does not exist
    url, expires_at = signed_image_url(signing_secret(settings), caller.id, image.subject_id, image.id, variant,
                                       settings.signed_url_ttl_s)
    return SignedUrl(url=url, expires_at=expires_at)


@router.get("/blobs/signed", response_class=StreamingResponse,
            responses={**_IMAGE_RESPONSE, **errors(403, 404, 429, authenticated=False)},
            summary="Fetch a result image through a signed URL (expires; any change voids it)",
            description="Serves only the result image the URL was made for (`POST /v1/images/{id}/url`), while it "
                        "still belongs to that subject and client; needs no API key.")
def signed_blob(request: Request, settings: SettingsDep, store: StoreDep, uow: UoW, client: str = Query(max_length=64),
                subject: str = Query(max_length=64), image: str = Query(max_length=64),
                variant: Literal["original", "upscaled"] = Query(), exp: int = Query(ge=0, le=2**62),
                sig: str = Query(max_length=128)):
    refuse_failing_address(request)
    limit_address(request, "signed-links")
    problem = check_image_signature(signing_secret(settings), client, subject, image, variant, exp, sig)
    if problem is not None:
        count_failure(request)
        raise Forbidden("This link is invalid." if problem == "invalid_signature" else "This link has expired.",
                        code=problem)
    key = images.image_blob_key(images.get_signed_image(uow.session, client, subject, image), variant)
    return _stream(store, key, f"{image}{'-upscaled' if variant == 'upscaled' else ''}.png")


@router.get("/previews/signed", response_class=StreamingResponse,
            responses={**_IMAGE_RESPONSE, **errors(403, 404, 429, authenticated=False)},
            summary="Fetch a training preview through a signed URL (GET /v1/jobs/{id} lists them; expires)",
            description="Serves only the preview the URL was made for, while its train job still lists it; needs "
                        "no API key.")
def signed_preview(request: Request, settings: SettingsDep, store: StoreDep, uow: UoW,
                   client: str = Query(max_length=64), subject: str = Query(max_length=64),
                   job: str = Query(max_length=64), step: int = Query(ge=0, le=1_000_000),
                   exp: int = Query(ge=0, le=2**62), sig: str = Query(max_length=128)):
    refuse_failing_address(request)
    limit_address(request, "signed-links")
    problem = check_preview_signature(signing_secret(settings), client, subject, job, step, exp, sig)
    if problem is not None:
        count_failure(request)
        raise Forbidden("This link is invalid." if problem == "invalid_signature" else "This link has expired.",
                        code=problem)
    key = images.signed_preview_key(uow.session, client, subject, job, step)
    return _stream(store, key, f"preview-{job[:8]}-step-{step}.png")


@router.get("/subjects/{subject_id}/adapter", response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": BINARY, "application/octet-stream": BINARY},
                             "description": "diffusers: the adapter folder as a zip (load_lora_weights + "
                                            "load_textual_inversion); kohya: a zip for A1111/ComfyUI: the LoRA, "
                                            "one embedding per learned token and HOW-TO-PROMPT.txt."},
                       **errors(404, 409)},
            summary="Download the subject's trained adapter (owner only)")
def download_adapter(subject_id: str, caller: CurrentClient, uow: UoW, store: StoreDep,
                     format: Literal["diffusers", "kohya"] = "diffusers",  # noqa: A002 - the query parameter's name
                     version: int | None = Query(None, ge=1, le=1_000_000, description="Default: the newest adapter.")):
    adapter = adapters.get_adapter(uow.session, caller, subject_id, version)
    name = f"likeness-{subject_id[:8]}-v{adapter.version}"
    if format == "diffusers":
        return StreamingResponse(adapters.zip_stream(store, adapter.blob_prefix), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})
    key = adapters.export_key(store, adapter, format)
    return _stream(store, key, f"{name}-{format}{PurePosixPath(key).suffix}")
