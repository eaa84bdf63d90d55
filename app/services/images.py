"""Result images of a subject's generation jobs."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.services.clients import Caller
from app.services.subjects import get_subject
from core.db.models import Client, Image, Job, Subject
from core.storage import preview_key

#: ``best``: every job's rank 1 first (newest job first among equal ranks), then every rank 2, ... so the
#: first image is the best of the newest generation; ``by_job``: newest job first, each job's images best
#: first (the dashboard's gallery). Both end on ids, so pages never repeat or skip an image.
ImageOrder = Literal["best", "by_job"]


def list_images(session: Session, caller: Caller | None, subject_id: str, *, job_id: str | None = None,
                limit: int = 100, offset: int = 0, order: ImageOrder = "best") -> tuple[list[Image], int]:
    subject = get_subject(session, caller, subject_id)
    conditions = [Image.subject_id == subject.id]
    if job_id is not None:
        conditions.append(Image.job_id == job_id)
    count = session.scalar(select(func.count()).select_from(Image).where(*conditions)) or 0
    newest_job = (Job.created_at.desc(), Job.id.desc())
    keys = ((Image.rank, *newest_job) if order == "best" else (*newest_job, Image.rank)) + (Image.id,)
    rows = session.scalars(select(Image).join(Job, Job.id == Image.job_id).where(*conditions)
                           .order_by(*keys).limit(limit).offset(offset)).all()
    return list(rows), count


def get_image(session: Session, caller: Caller | None, image_id: str) -> Image:
    """``caller``'s image (``None``: any client's, for admins); 404 for another client's."""
    query = select(Image).join(Subject, Subject.id == Image.subject_id).where(Image.id == image_id)
    if caller is not None:
        query = query.where(Subject.client_id == caller.id)
    image = session.scalar(query)
    if image is None:
        raise NotFound("Image not found.", {"image_id": image_id})
    return image


def get_signed_image(session: Session, client_id: str, subject_id: str, image_id: str) -> Image:
    """The image a signed URL names, only while it is a result of that subject of that (unrevoked) client."""
    image = session.scalar(
        select(Image).join(Subject, Subject.id == Image.subject_id).join(Client, Client.id == Subject.client_id)
        .where(Image.id == image_id, Image.subject_id == subject_id, Subject.client_id == client_id,
               Client.revoked_at.is_(None))
    )
    if image is None:
        raise NotFound("The image of this link is gone.", code="blob_not_found")
    return image


def signed_preview_key(session: Session, client_id: str, subject_id: str, job_id: str, step: int) -> str:
    """The blob of the training preview a signed URL names, only while the job (of that subject of that
    unrevoked client) lists it."""
    job = session.scalar(
        select(Job).join(Client, Client.id == Job.client_id)
        .where(Job.id == job_id, Job.subject_id == subject_id, Job.client_id == client_id, Client.revoked_at.is_(None))
    )
    if job is None or not any(p.get("step") == step for p in (job.result or {}).get("previews") or []):
        raise NotFound("The preview of this link is gone.", code="blob_not_found")
    return preview_key(subject_id, job_id, step)


def image_blob_key(image: Image, variant: Literal["original", "upscaled"]) -> str:
    if variant == "upscaled":
        if not image.upscaled_key:
            raise NotFound("This image has no upscaled variant.", {"image_id": image.id}, code="variant_not_found")
        return image.upscaled_key
    return image.key
