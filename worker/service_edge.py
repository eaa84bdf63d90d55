"""The service's edge of a job (:class:`worker.phases.JobEdge`): inputs from the database and the blob
store, outputs to them.

Every output goes under a deterministic key derived from ids (subject, job, rank), so a rerun after
a crash overwrites what the first run wrote instead of adding to it:

    intake    -> each ``photos`` row's verdict, crop and mask blobs; the dataset under subjects/<s>/datasets/<job>/
    training  -> adapter blobs + ``adapters`` row (+ kohya export); checkpoints under subjects/<s>/checkpoints/<job>/
    delivery  -> ``images`` rows + blobs
"""

from __future__ import annotations

import io
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import delete, func, select

from core.config import Settings
from core.db.models import Adapter, Image, Photo, PhotoStatus, TemplatePhoto
from core.db.uow import UnitOfWork
from core.storage import (
    BlobStore,
    adapter_export_key,
    adapter_prefix,
    checkpoint_prefix,
    dataset_prefix,
    download_folder,
    image_key,
    photo_crop_key,
    photo_mask_key,
    preview_key,
    upload_folder,
    upscaled_image_key,
)
from likeness.contract.requests import TemplateSource
from likeness.contract.results import AdapterRef, Resumed
from pipelines.errors import InvalidConfig
from pipelines.intake.dataset import Dataset, PhotoInput
from pipelines.templates.catalog import open_template
from worker.adapter_cache import local_adapter_path
from worker.checkpoints import mirror_checkpoint, restore_checkpoint
from worker.jobs import JobSnapshot, record_preview, record_result, through_db_outage
from worker.phases import box, decode_template, jsonable


def image_id(job_id: str, rank: int) -> str:
    """Deterministic id of the rank-th image of a job: a rerun rewrites the same rows and keys."""
    return uuid.uuid5(uuid.UUID(hex=job_id.ljust(32, "0")[:32]), f"image-{rank}").hex


def png(image) -> bytes:  # noqa: ANN001 - PIL image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ServiceEdge:
    """A job of the service: rows in the database, files in the blob store."""

    def __init__(self, settings: Settings, store: BlobStore):
        self.settings = settings
        self.store = store
        self._images: list[dict[str, Any]] = []

    # ---- train: intake

    def photos(self, job: JobSnapshot) -> list[PhotoInput]:
        with UnitOfWork(self.settings) as uow:
            photos = uow.session.execute(
                select(Photo.id, Photo.original_key).where(Photo.subject_id == job.subject_id)
                .order_by(Photo.created_at)).all()
        return [PhotoInput(photo_id=p.id, data=self.store.get(p.original_key)) for p in photos]

    def photos_judged(self, job: JobSnapshot, reports: list[dict[str, Any]], crops: dict[str, Any]) -> None:
        through_db_outage(f"job {job.id}: photo verdicts", self._write_verdicts, job, reports, crops)

    def _write_verdicts(self, job: JobSnapshot, reports: list[dict[str, Any]], crops: dict[str, Any]) -> None:
        """Per-photo status/reason/measurements on the ``photos`` rows, crop and mask blobs."""
        with UnitOfWork(self.settings) as uow:
            for report in reports:
                photo = uow.session.get(Photo, report.get("photo_id"))
                if photo is None or photo.subject_id != job.subject_id:
                    continue
                photo.status = PhotoStatus.accepted if report.get("accepted") else PhotoStatus.rejected
                photo.reason_code = str(report.get("reason_code") or "") or None
                photo.message = report.get("message")
                photo.face_box = box(report.get("face_box"))
                photo.blur = report.get("blur")
                photo.identity_distance = report.get("identity_distance")
                item = crops.get(photo.id)
                if item is not None:  # deterministic keys: a rerun overwrites
                    photo.crop_key = photo_crop_key(job.subject_id, photo.id)
                    self.store.put(photo.crop_key, png(item.crop), "image/png")
                    if getattr(item, "mask", None) is not None:
                        photo.mask_key = photo_mask_key(job.subject_id, photo.id)
                        self.store.put(photo.mask_key, png(item.mask), "image/png")

    def keep_dataset(self, job: JobSnapshot, dataset, folder: Path) -> None:  # noqa: ANN001
        upload_folder(self.store, folder, dataset_prefix(job.subject_id, job.id))

    # ---- train: training

    def dataset(self, job: JobSnapshot, workdir: Path) -> Dataset:
        return Dataset.load(download_folder(self.store, dataset_prefix(job.subject_id, job.id),
                                            workdir / "dataset-in"))

    def checkpoint_dir(self, job: JobSnapshot, workdir: Path) -> Path:
        checkpoint_dir = workdir / "checkpoints"
        restore_checkpoint(self.store, checkpoint_prefix(job.subject_id, job.id), checkpoint_dir)
        return checkpoint_dir

    def mirror_checkpoint(self, job: JobSnapshot, folder: Path) -> None:
        mirror_checkpoint(self.store, checkpoint_prefix(job.subject_id, job.id), folder)

    def training_resumed(self, job: JobSnapshot, resumed: Resumed) -> None:
        record_result(self.settings, job.id, {"resumed": resumed.model_dump(mode="json")})

    def training_preview(self, job: JobSnapshot, step: int, image) -> None:  # noqa: ANN001 - PIL image
        """The image under the job's previews (deleted with the subject), then listed on the job and announced."""
        self.store.put(preview_key(job.subject_id, job.id, step), png(image), "image/png")
        record_preview(self.settings, job.id, step)

    def keep_adapter(self, job: JobSnapshot, adapter_dir: Path, manifest: dict[str, Any], workdir: Path) -> AdapterRef:
        """The ``adapters`` row (a rerun reuses its version and blob prefix), the blobs and the kohya export."""
        ref, prefix, mode = through_db_outage(f"job {job.id}: adapter row", self._adapter_row, job, manifest)
        upload_folder(self.store, adapter_dir, prefix)
        if mode == "lora":  # the A1111/ComfyUI zip (LoRA, one embedding per token, how to prompt), for
            # GET /v1/subjects/{id}/adapter?format=kohya
            from pipelines.adapters import kohya_zip

            name = f"likeness-{job.subject_id[:8]}-v{ref.version}"  # what A1111/ComfyUI will call the files
            out = kohya_zip(adapter_dir, workdir / "exports" / "kohya.zip", name)
            self.store.put(adapter_export_key(job.subject_id, ref.version, "kohya"), out.read_bytes(),
                           "application/zip")
        return ref

    def _adapter_row(self, job: JobSnapshot, manifest: dict[str, Any]) -> tuple[AdapterRef, str, str]:
        with UnitOfWork(self.settings) as uow:
            session = uow.session
            adapter = session.execute(select(Adapter).where(Adapter.job_id == job.id)).scalar_one_or_none()
            if adapter is None:
                version = (session.execute(select(func.max(Adapter.version))
                                           .where(Adapter.subject_id == job.subject_id)).scalar() or 0) + 1
                adapter = Adapter(subject_id=job.subject_id, job_id=job.id, version=version, mode="", blob_prefix="")
                session.add(adapter)
            adapter.blob_prefix = adapter_prefix(job.subject_id, adapter.version)
            adapter.mode = str(manifest.get("mode", "lora"))
            adapter.manifest = manifest
            session.flush()
            return AdapterRef(id=adapter.id, version=adapter.version), adapter.blob_prefix, adapter.mode

    # ---- generate / template

    def adapter(self, job: JobSnapshot, version: int) -> tuple[str, Path]:
        """The adapter row, and its local copy shared by every generation job of this machine."""
        with UnitOfWork(self.settings) as uow:
            row = uow.session.execute(select(Adapter.id, Adapter.blob_prefix).where(
                Adapter.subject_id == job.subject_id, Adapter.version == int(version))).one_or_none()
        if row is None:
            raise InvalidConfig(f"the subject's adapter version {version} no longer exists",
                                code="adapter_not_found")
        target = local_adapter_path(self.settings, row.id)  # pruned once the adapter is deleted
        if not (target / "manifest.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
            download_folder(self.store, row.blob_prefix, staging)
            try:
                staging.rename(target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another job got there first
        return row.id, target

    def reference_crops(self, job: JobSnapshot) -> list[PILImage.Image]:
        with UnitOfWork(self.settings) as uow:
            crop_keys = uow.session.execute(select(Photo.crop_key).where(
                Photo.subject_id == job.subject_id, Photo.status == PhotoStatus.accepted,
                Photo.crop_key.is_not(None))).scalars().all()
        return [PILImage.open(io.BytesIO(self.store.get(key))).convert("RGB") for key in crop_keys]

    def template_image(self, job: JobSnapshot, source: TemplateSource) -> PILImage.Image:
        """A shipped template, or the subject's uploaded template photo (its verdict was given at upload)."""
        if source.kind == "shipped":
            return open_template(str(source.name))
        with UnitOfWork(self.settings) as uow:
            row = uow.session.get(TemplatePhoto, source.photo_id)
            key = row.key if row is not None and row.subject_id == job.subject_id else None
        if key is None or not self.store.exists(key):
            raise InvalidConfig("the template photo of this job was deleted", {"template_photo_id": source.photo_id},
                                code="template_photo_not_found")
        return decode_template(self.store.get(key))

    def deliver(self, job: JobSnapshot, result: Any) -> None:  # noqa: ANN401
        iid = image_id(job.id, result.rank)
        key = image_key(job.subject_id, iid)
        original = png(result.image)
        self.store.put(key, original, "image/png")
        up_key, size_bytes = None, len(original)
        if getattr(result, "upscaled", None) is not None:
            up_key = upscaled_image_key(job.subject_id, iid)
            upscaled = png(result.upscaled)
            self.store.put(up_key, upscaled, "image/png")
            size_bytes += len(upscaled)
        self._images.append(dict(
            id=iid, job_id=job.id, subject_id=job.subject_id, rank=int(result.rank), key=key, upscaled_key=up_key,
            width=result.image.width, height=result.image.height, seed=int(result.seed), prompt=result.prompt,
            negative_prompt=getattr(result, "negative_prompt", None), style=getattr(result, "style", None),
            scores=jsonable(dict(result.scores)), face_refined=bool(getattr(result, "face_refined", False)),
            size_bytes=size_bytes))

    def delivered(self, job: JobSnapshot) -> None:
        """The ``images`` rows. The images are computed and stored: the rows wait for an unavailable
        database (up to ``DB_OUTAGE_WAIT_S``) rather than the whole generation running again."""
        rows, self._images = self._images, []
        through_db_outage(f"job {job.id}: image rows", self._write_images, job, rows)

    def _write_images(self, job: JobSnapshot, rows: list[dict[str, Any]]) -> None:
        with UnitOfWork(self.settings) as uow:
            uow.session.execute(delete(Image).where(Image.job_id == job.id))  # a rerun replaces, never duplicates
            uow.session.add_all(Image(**row) for row in rows)
