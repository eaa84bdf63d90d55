"""Stage functions: read a job's inputs from blob storage, call a pipeline, write outputs.

Every output goes under a deterministic key derived from ids (subject, job, rank), so a
rerun after a crash overwrites what the first run wrote instead of adding to it.

A job kind is a list of :class:`Phase` s. A phase runs on one queue and covers one or
more client-visible stages; once its outputs are stored, its stages join the job's
``completed_stages`` and a rerun skips it.

    train:    intake (cpu)                      -> dataset saved to subjects/<s>/datasets/<job>/
              caching, training:stage1/2 (gpu)  -> adapter blobs + ``adapters`` row
    generate: generating, ranking, upscaling, delivering (gpu) -> ``images`` rows + blobs
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from app.config import Settings
from app.db.models import Adapter, Image, Photo, PhotoStatus
from app.db.session import session_scope
from app.storage import (
    BlobStore,
    adapter_prefix,
    image_key,
    photo_crop_key,
    photo_mask_key,
    subject_prefix,
    upscaled_image_key,
)
from pipelines.errors import InvalidConfig, PipelineError
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, StageProgress, raise_if_canceled
from worker.jobs import JobSnapshot
from worker.model_cache import models, resolve_device

log = logging.getLogger(__name__)


class StageUnavailable(PipelineError):
    """A pipeline function this stage needs has not landed in ``pipelines/`` (never faked)."""

    code = "stage_unavailable"


@dataclass
class StageContext:
    job: JobSnapshot
    settings: Settings
    store: BlobStore
    on_progress: ProgressFn
    should_stop: CancelFn
    workdir: Path  # scratch space of this job on this machine


@dataclass(frozen=True)
class Phase:
    name: str
    queue: str  # "cpu" | "gpu"
    stages: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]  # returns what joins the job's ``result``


def dataset_prefix(subject_id: str, job_id: str) -> str:
    return f"{subject_prefix(subject_id)}datasets/{job_id}/"


def image_id(job_id: str, rank: int) -> str:
    """Deterministic id of the rank-th image of a job: a rerun rewrites the same rows and keys."""
    return uuid.uuid5(uuid.UUID(hex=job_id.ljust(32, "0")[:32]), f"image-{rank}").hex


def _require(module: str, *names: str):
    """Import ``names`` from a pipeline module, or fail the stage with a clear error."""
    import importlib

    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, name) for name in names)
    except (ImportError, AttributeError) as exc:
        raise StageUnavailable(f"{module} does not provide {', '.join(names)} yet: {exc}") from exc


def _preset(settings: Settings):
    from pipelines.models.presets import get_preset

    return get_preset(settings.model_preset, settings.resolved_model_cache_dir)


# ---- blob folders ----------------------------------------------------------------------------------------


def upload_folder(store: BlobStore, folder: Path, prefix: str) -> list[str]:
    """Mirror ``folder`` to ``prefix``: stale keys from an earlier run are removed first."""
    store.delete_prefix(prefix)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        store.put(key, path.read_bytes())
        keys.append(key)
    return keys


def download_folder(store: BlobStore, prefix: str, folder: Path) -> Path:
    keys = store.list(prefix)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {prefix}")
    for key in keys:
        target = folder / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))
    return folder


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---- train: intake ---------------------------------------------------------------------------------------


def intake_config(ctx: StageContext):
    """The intake settings of a train job: the preset's CLIP/upscaler plus the client's class token."""
    (IntakeConfig,) = _require("pipelines.intake.config", "IntakeConfig")
    preset = _preset(ctx.settings)
    values = dict(ctx.job.request.get("intake", {}))
    if ctx.job.request.get("class_token"):
        values["class_token"] = ctx.job.request["class_token"]
    return IntakeConfig.from_dict(
        {"clip_model": preset.clip, "upscaler_model": preset.upscaler_x2, "device": resolve_device(ctx.settings.device),
         **values}
    )


def run_intake(ctx: StageContext) -> dict[str, Any]:
    (prepare_dataset,) = _require("pipelines.intake", "prepare_dataset")
    (PhotoInput,) = _require("pipelines.intake.dataset", "PhotoInput")
    from pipelines.errors import DatasetRejected

    job = ctx.job
    config = intake_config(ctx)
    with session_scope() as session:
        photos = session.execute(
            select(Photo.id, Photo.original_key).where(Photo.subject_id == job.subject_id).order_by(Photo.created_at)
        ).all()
    if not photos:
        raise InvalidConfig("the subject has no photos", code="no_photos")
    inputs = [PhotoInput(photo_id=p.id, data=ctx.store.get(p.original_key)) for p in photos]
    raise_if_canceled(ctx.should_stop)
    try:
        dataset = prepare_dataset(inputs, config, on_progress=ctx.on_progress, should_stop=ctx.should_stop)
    except DatasetRejected as exc:
        _write_photo_reports(ctx, list(exc.details.get("report") or []), crops={})
        raise
    reports = [r.to_dict() for r in dataset.report]
    _write_photo_reports(ctx, reports, {item.photo_id: item for item in dataset.items})
    folder = ctx.workdir / "dataset"
    shutil.rmtree(folder, ignore_errors=True)
    dataset.save(folder)
    upload_folder(ctx.store, folder, dataset_prefix(job.subject_id, job.id))
    accepted = sum(1 for r in reports if r["accepted"])
    return {
        "intake": {
            "accepted": accepted,
            "rejected": len(reports) - accepted,
            "class_token": dataset.class_token,
            "class_scores": {k: round(float(v), 4) for k, v in dataset.class_scores.items()},
            "checks": dict(getattr(dataset, "checks", {}) or {}),
        }
    }


def _face_box(box: Any) -> list[float] | None:
    if not box:
        return None
    if isinstance(box, dict):
        return [round(float(box[k]), 1) for k in ("x0", "y0", "x1", "y1")]
    return [round(float(v), 1) for v in box]


def _write_photo_reports(ctx: StageContext, reports: list, crops: dict[str, Any]) -> None:
    """Per-photo status/reason/measurements on the ``photos`` rows, crop and mask blobs."""
    subject_id = ctx.job.subject_id
    with session_scope() as session:
        for report in reports:
            report = report if isinstance(report, dict) else report.to_dict()
            photo = session.get(Photo, report.get("photo_id"))
            if photo is None or photo.subject_id != subject_id:
                continue
            photo.status = PhotoStatus.accepted if report.get("accepted") else PhotoStatus.rejected
            photo.reason_code = str(report.get("reason_code") or "") or None
            photo.message = report.get("message")
            photo.face_box = _face_box(report.get("face_box"))
            photo.blur = report.get("blur")
            photo.identity_distance = report.get("identity_distance")
            item = crops.get(photo.id)
            if item is not None:  # deterministic keys: a rerun overwrites
                photo.crop_key = photo_crop_key(subject_id, photo.id)
                ctx.store.put(photo.crop_key, _png(item.crop), "image/png")
                if getattr(item, "mask", None) is not None:
                    photo.mask_key = photo_mask_key(subject_id, photo.id)
                    ctx.store.put(photo.mask_key, _png(item.mask), "image/png")


# ---- train: caching + training ---------------------------------------------------------------------------


LORA_CHECKPOINT_EVERY = 100


def train_config(request: dict[str, Any]):
    """API train request (mode, steps, advanced ``training`` overrides) -> TrainConfig."""
    (TrainConfig,) = _require("pipelines.training.config", "TrainConfig")
    values = dict(request.get("training", {}))
    if request.get("mode"):
        values["mode"] = request["mode"]
    if request.get("steps"):
        values["max_train_steps"] = int(request["steps"])
    if values.get("mode", "lora") == "lora":
        # LoRA checkpoints are a few MB: a worker killed mid-training resumes close to where it was.
        values.setdefault("checkpoint_every", LORA_CHECKPOINT_EVERY)
    return TrainConfig.from_dict(values)


def run_training(ctx: StageContext) -> dict[str, Any]:
    (train,) = _require("pipelines.training", "train")
    (Dataset,) = _require("pipelines.intake.dataset", "Dataset")
    job = ctx.job
    config = train_config(job.request)
    dataset = Dataset.load(download_folder(ctx.store, dataset_prefix(job.subject_id, job.id), ctx.workdir / "dataset-in"))
    preset = _preset(ctx.settings)
    output_dir = ctx.workdir / "training"  # kept across attempts on this machine: train() resumes its checkpoint
    result = train(
        dataset.training_examples(),
        dataset.token_spec(),
        config,
        preset,
        output_dir,
        on_progress=ctx.on_progress,
        should_stop=ctx.should_stop,
        device=resolve_device(ctx.settings.device),
    )
    adapter_dir = Path(result.adapter_dir)
    manifest = _read_manifest(adapter_dir)
    with session_scope() as session:
        adapter = session.execute(select(Adapter).where(Adapter.job_id == job.id)).scalar_one_or_none()
        if adapter is None:  # first completion; a rerun reuses its version (and blob prefix)
            version = (
                session.execute(select(func.max(Adapter.version)).where(Adapter.subject_id == job.subject_id)).scalar()
                or 0
            ) + 1
            adapter = Adapter(subject_id=job.subject_id, job_id=job.id, version=version, mode="", blob_prefix="")
            session.add(adapter)
        adapter.blob_prefix = adapter_prefix(job.subject_id, adapter.version)
        adapter.mode = str(manifest.get("mode", getattr(config, "mode", "lora")))
        adapter.manifest = manifest
        session.flush()
        adapter_id, version, prefix = adapter.id, adapter.version, adapter.blob_prefix
    upload_folder(ctx.store, adapter_dir, prefix)
    return {"adapter": {"id": adapter_id, "version": version},
            "training": {"steps": result.steps, **_jsonable(result.metrics or {})}}


def _read_manifest(folder: Path) -> dict[str, Any]:
    import json

    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


# ---- generate --------------------------------------------------------------------------------------------


def find_adapter(subject_id: str, version: int | None = None) -> tuple[str, str] | None:
    """(id, blob prefix) of the subject's adapter ``version`` (default: the newest)."""
    with session_scope() as session:
        query = select(Adapter.id, Adapter.blob_prefix).where(Adapter.subject_id == subject_id)
        if version is not None:
            query = query.where(Adapter.version == int(version))
        row = session.execute(query.order_by(Adapter.version.desc()).limit(1)).one_or_none()
    return (row.id, row.blob_prefix) if row else None


def _adapter_dir(ctx: StageContext, adapter_id: str, prefix: str) -> Path:
    """Local copy of an adapter, shared by every generation job of this machine."""
    target = ctx.settings.data_dir.resolve() / "adapters" / adapter_id
    if not (target / "manifest.json").exists():
        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent if target.parent.exists() else None))
        download_folder(ctx.store, prefix, staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another job got there first
    return target


def _engine(settings: Settings):
    (GenerationEngine,) = _require("pipelines.generation.engine", "GenerationEngine")
    device = resolve_device(settings.device)
    preset = _preset(settings)
    return models.borrow(("generation", preset.name, device), lambda: GenerationEngine(preset, device))


def run_generation(ctx: StageContext) -> dict[str, Any]:
    (GenerationRequest,) = _require("pipelines.generation.request", "GenerationRequest")
    from PIL import Image as PILImage

    job = ctx.job
    found = find_adapter(job.subject_id, job.request.get("adapter_version"))
    if found is None:
        raise InvalidConfig("the subject has no trained adapter; train it first", code="subject_not_trained")
    adapter_id, prefix = found
    request = GenerationRequest(**{k: v for k, v in job.request.items() if k != "adapter_version"})
    adapter_dir = _adapter_dir(ctx, adapter_id, prefix)
    with session_scope() as session:
        crop_keys = session.execute(
            select(Photo.crop_key).where(
                Photo.subject_id == job.subject_id, Photo.status == PhotoStatus.accepted, Photo.crop_key.is_not(None)
            )
        ).scalars().all()
    references = [PILImage.open(io.BytesIO(ctx.store.get(key))).convert("RGB") for key in crop_keys]
    with _engine(ctx.settings) as engine:
        results = engine.generate(
            request, adapter_dir, references, on_progress=ctx.on_progress, should_stop=ctx.should_stop,
            return_all=True,
        )
    delivered = deliver(ctx, [r for r in results if r.rank > 0], adapter_id)
    # Every candidate's scores stay on the job record (rank 0 = not delivered), so a client or
    # the dashboard can see why the delivered ones won.
    delivered["candidates"] = [
        {"seed": int(r.seed), "rank": int(r.rank), "flagged": bool(r.flagged), "scores": _jsonable(dict(r.scores))}
        for r in sorted(results, key=lambda r: r.seed)
    ]
    return delivered


def deliver(ctx: StageContext, results: list, adapter_id: str) -> dict[str, Any]:
    """The ``delivering`` stage: store each ranked image (original + upscaled) and its row."""
    job = ctx.job
    progress = StageProgress(ctx.on_progress, "delivering", total=len(results), min_interval_s=0.0)
    progress.start()
    rows = []
    for result in sorted(results, key=lambda r: r.rank):
        raise_if_canceled(ctx.should_stop)
        iid = image_id(job.id, result.rank)
        key = image_key(job.subject_id, iid)
        ctx.store.put(key, _png(result.image), "image/png")
        up_key = None
        if getattr(result, "upscaled", None) is not None:
            up_key = upscaled_image_key(job.subject_id, iid)
            ctx.store.put(up_key, _png(result.upscaled), "image/png")
        rows.append(
            dict(
                id=iid, job_id=job.id, subject_id=job.subject_id, rank=int(result.rank), key=key, upscaled_key=up_key,
                width=result.image.width, height=result.image.height, seed=int(result.seed), prompt=result.prompt,
                negative_prompt=getattr(result, "negative_prompt", None), style=getattr(result, "style", None),
                scores=_jsonable(dict(result.scores)),
            )
        )
        progress.advance()
    with session_scope() as session:
        session.execute(delete(Image).where(Image.job_id == job.id))  # a rerun replaces, never duplicates
        session.add_all(Image(**row) for row in rows)
    ctx.on_progress(ProgressEvent("delivering", 1.0, 0.0))
    return {"images": len(rows), "adapter_id": adapter_id}


PLANS: dict[str, tuple[Phase, ...]] = {
    "train": (
        Phase("intake", "cpu", ("intake",), run_intake),
        Phase("training", "gpu", ("caching", "training:stage1", "training:stage2"), run_training),
    ),
    "generate": (Phase("generation", "gpu", ("generating", "ranking", "upscaling", "delivering"), run_generation),),
}
