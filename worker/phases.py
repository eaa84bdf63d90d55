"""Phase runners: read a job's inputs from blob storage, call a pipeline, write outputs.

Every output goes under a deterministic key derived from ids (subject, job, rank), so a
rerun after a crash overwrites what the first run wrote instead of adding to it. The
phases themselves (queues, stages, order) are the job plan's (:mod:`likeness.contract.plan`);
this module binds each phase to the function that runs it (:data:`PHASE_RUNNERS`).

    train:    intake (cpu)                      -> dataset saved to subjects/<s>/datasets/<job>/
              caching, training:stage1/2 (gpu)  -> adapter blobs + ``adapters`` row (+ kohya export);
                                                   checkpoints mirrored to subjects/<s>/checkpoints/<job>/
    generate: generating, ranking, upscaling, delivering (gpu) -> ``images`` rows + blobs
    template: masking, generating, ranking, upscaling, delivering (gpu) -> ``images`` rows + blobs
              (and the verdict of an uploaded template photo on its ``template_photos`` row)
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    upload_folder,
    upscaled_image_key,
)
from likeness.contract.plan import PLANS, JobKind, Stage
from likeness.contract.requests import ResolvedGenerate, ResolvedTemplate, ResolvedTrain, TemplateSource, read_resolved
from pipelines.errors import DatasetRejected, InvalidConfig, PipelineError
from pipelines.intake import intake_models, prepare_dataset
from pipelines.intake.config import IntakeConfig
from pipelines.intake.dataset import Dataset, PhotoInput
from pipelines.intake.decode import decode_photo
from pipelines.intake.reasons import ReasonCode
from pipelines.models.presets import get_preset
from pipelines.models.weights import require_weights
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, StageProgress, raise_if_canceled
from pipelines.templates.catalog import open_template
from worker.adapter_cache import local_adapter_path
from worker.checkpoints import mirror_checkpoint, restore_checkpoint
from worker.jobs import JobSnapshot, record_result
from worker.models import get_manager, resolve_device

log = logging.getLogger(__name__)

#: an uploaded template is worked on at most this many pixels on its long side
TEMPLATE_MAX_SIDE = 2048


class NoDeliverableImage(PipelineError):
    """Every candidate of a generation failed the delivery rule (e.g. not exactly one face)."""

    code = "no_deliverable_image"


MAX_CURVE_POINTS = 500  # a training's loss curve is thinned to about this many points


@dataclass
class PhaseContext:
    job: JobSnapshot
    settings: Settings
    store: BlobStore
    on_progress: ProgressFn
    should_stop: CancelFn
    workdir: Path  # scratch space of this job on this machine


def image_id(job_id: str, rank: int) -> str:
    """Deterministic id of the rank-th image of a job: a rerun rewrites the same rows and keys."""
    return uuid.uuid5(uuid.UUID(hex=job_id.ljust(32, "0")[:32]), f"image-{rank}").hex


def _preset(name: str, settings: Settings):
    require_weights(name, settings.resolved_model_cache_dir)  # missing weights: one line, before any work
    return get_preset(name, settings.resolved_model_cache_dir)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---- train: intake ---------------------------------------------------------------------------------------


def _train_request(ctx: PhaseContext) -> ResolvedTrain:
    return read_resolved(ctx.job.kind, ctx.job.request)  # type: ignore[return-value]


def intake_config(ctx: PhaseContext):
    """The intake settings of a train job: the preset's CLIP/upscaler plus the request's class word."""
    request = _train_request(ctx)
    preset = _preset(request.preset, ctx.settings)
    return IntakeConfig(clip_model=preset.clip, upscaler_model=preset.upscaler_x2, class_token=request.class_token,
                        device=resolve_device(ctx.settings.device), crop_size=preset.intake_crop_size)


def run_intake(ctx: PhaseContext) -> dict[str, Any]:
    from pipelines.intake.pipeline import check_inputs

    job = ctx.job
    config = intake_config(ctx)
    with UnitOfWork(ctx.settings) as uow:
        photos = uow.session.execute(
            select(Photo.id, Photo.original_key).where(Photo.subject_id == job.subject_id).order_by(Photo.created_at)
        ).all()
    if not photos:
        raise InvalidConfig("the subject has no photos", code="no_photos")
    inputs = [PhotoInput(photo_id=p.id, data=ctx.store.get(p.original_key)) for p in photos]
    check_inputs(inputs, config)  # bad input fails before any model loads
    raise_if_canceled(ctx.should_stop)
    try:
        with get_manager().borrow(intake_models(config)) as models:
            dataset = prepare_dataset(inputs, config, models, on_progress=ctx.on_progress,
                                      should_stop=ctx.should_stop)
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


def _write_photo_reports(ctx: PhaseContext, reports: list, crops: dict[str, Any]) -> None:
    """Per-photo status/reason/measurements on the ``photos`` rows, crop and mask blobs."""
    subject_id = ctx.job.subject_id
    with UnitOfWork(ctx.settings) as uow:
        for report in reports:
            report = report if isinstance(report, dict) else report.to_dict()
            photo = uow.session.get(Photo, report.get("photo_id"))
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


def run_training(ctx: PhaseContext) -> dict[str, Any]:
    from pipelines.models.loading import base_spec
    from pipelines.training import BaseNotRestored, train

    job = ctx.job
    request = _train_request(ctx)
    folder = download_folder(ctx.store, dataset_prefix(job.subject_id, job.id), ctx.workdir / "dataset-in")
    dataset = Dataset.load(folder)
    preset = _preset(request.preset, ctx.settings)
    output_dir = ctx.workdir / "training"
    # Checkpoints: kept across attempts on this machine and mirrored to the blob store, so whichever
    # worker runs the next attempt resumes from the newest one (see worker.checkpoints).
    checkpoint_dir = ctx.workdir / "checkpoints"
    mirrored = checkpoint_prefix(job.subject_id, job.id)
    restore_checkpoint(ctx.store, mirrored, checkpoint_dir)
    curve: list[list[float]] = []

    def on_progress(event: ProgressEvent) -> None:  # (step, loss) of each report: the dashboard's loss curve
        if "loss" in event.metrics and "step" in event.metrics:
            curve.append([float(event.metrics["step"]), round(float(event.metrics["loss"]), 6)])
        if "resumed_from_step" in event.metrics:  # the client sees it while the job runs
            record_result(ctx.settings, job.id, {"resumed": {
                "from_step": int(event.metrics["resumed_from_step"]), "attempt": job.attempts,
                "message": event.message}})
        ctx.on_progress(event)

    device = resolve_device(ctx.settings.device)
    spec = base_spec(preset, device)  # the base generation borrows too: loaded once per worker
    try:
        with get_manager().borrow(spec) as base:
            result = train(dataset.training_examples(), dataset.token_spec(), request.training, preset, output_dir,
                           base=base, device=device, on_progress=on_progress, should_stop=ctx.should_stop,
                           checkpoint_dir=checkpoint_dir,
                           on_checkpoint=lambda folder: mirror_checkpoint(ctx.store, mirrored, folder))
    except BaseNotRestored:
        get_manager().evict(spec)  # never lend a base training could not put back
        raise
    adapter_dir = Path(result.adapter_dir)
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    with UnitOfWork(ctx.settings) as uow:
        session = uow.session
        adapter = session.execute(select(Adapter).where(Adapter.job_id == job.id)).scalar_one_or_none()
        if adapter is None:  # first completion; a rerun reuses its version (and blob prefix)
            version = (
                session.execute(select(func.max(Adapter.version)).where(Adapter.subject_id == job.subject_id)).scalar()
                or 0
            ) + 1
            adapter = Adapter(subject_id=job.subject_id, job_id=job.id, version=version, mode="", blob_prefix="")
            session.add(adapter)
        adapter.blob_prefix = adapter_prefix(job.subject_id, adapter.version)
        adapter.mode = str(manifest.get("mode", request.training.mode))
        adapter.manifest = manifest
        session.flush()
        adapter_id, version, prefix = adapter.id, adapter.version, adapter.blob_prefix
    upload_folder(ctx.store, adapter_dir, prefix)
    if adapter.mode == "lora":
        _store_kohya_export(ctx, adapter_dir, version)
    return {"adapter": {"id": adapter_id, "version": version},
            "training": {"steps": result.steps, **_jsonable(result.metrics or {}),
                         "loss_curve": curve[:: max(1, len(curve) // MAX_CURVE_POINTS)]}}


def _store_kohya_export(ctx: PhaseContext, adapter_dir: Path, version: int) -> None:
    """The A1111/ComfyUI zip (LoRA, one embedding per token, how to prompt), ready for
    ``GET /v1/subjects/{id}/adapter?format=kohya``."""
    from pipelines.adapters import kohya_zip

    out = kohya_zip(adapter_dir, ctx.workdir / "exports" / "kohya.zip")
    ctx.store.put(adapter_export_key(ctx.job.subject_id, version, "kohya"), out.read_bytes(), "application/zip")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


# ---- generate --------------------------------------------------------------------------------------------


def find_adapter(settings: Settings, subject_id: str, version: int) -> tuple[str, str] | None:
    """(id, blob prefix) of the subject's adapter ``version``."""
    with UnitOfWork(settings) as uow:
        row = uow.session.execute(select(Adapter.id, Adapter.blob_prefix).where(
            Adapter.subject_id == subject_id, Adapter.version == int(version))).one_or_none()
    return (row.id, row.blob_prefix) if row else None


def _adapter_dir(ctx: PhaseContext, adapter_id: str, prefix: str) -> Path:
    """Local copy of an adapter, shared by every generation job of this machine."""
    target = local_adapter_path(ctx.settings, adapter_id)  # pruned once the adapter is deleted
    if not (target / "manifest.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
        download_folder(ctx.store, prefix, staging)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another job got there first
    return target


def run_generation(ctx: PhaseContext) -> dict[str, Any]:
    from pipelines.generation.engine import GenerationEngine, generation_models

    job = ctx.job
    request: ResolvedGenerate = read_resolved(job.kind, job.request)  # type: ignore[assignment]
    found = find_adapter(ctx.settings, job.subject_id, request.adapter_version)
    if found is None:
        raise InvalidConfig(f"the subject's adapter version {request.adapter_version} no longer exists",
                            code="adapter_not_found")
    adapter_id, prefix = found
    adapter_dir = _adapter_dir(ctx, adapter_id, prefix)
    references = reference_crops(ctx)
    preset = _preset(request.preset, ctx.settings)
    device = resolve_device(ctx.settings.device)
    with get_manager().borrow(generation_models(preset, device, request=request.generation)) as models:
        results = GenerationEngine(preset, models).generate(
            request.generation, adapter_dir, references, on_progress=ctx.on_progress, should_stop=ctx.should_stop,
            return_all=True)
    deliverable = deliverable_results(results)
    return {**deliver(ctx, deliverable, adapter_id), "candidates": candidate_scores(results)}


def reference_crops(ctx: PhaseContext) -> list:
    """The subject's accepted face crops (identity scores in ranking)."""
    from PIL import Image as PILImage

    with UnitOfWork(ctx.settings) as uow:
        crop_keys = uow.session.execute(
            select(Photo.crop_key).where(
                Photo.subject_id == ctx.job.subject_id, Photo.status == PhotoStatus.accepted,
                Photo.crop_key.is_not(None),
            )
        ).scalars().all()
    return [PILImage.open(io.BytesIO(ctx.store.get(key))).convert("RGB") for key in crop_keys]


def candidate_scores(results: list) -> list[dict[str, Any]]:
    """Every candidate's scores, kept on the job record (rank 0 = not delivered), so a client or the
    dashboard can see why the delivered ones won."""
    return [
        {"seed": int(r.seed), "rank": int(r.rank), "faces": int(r.faces), "flagged": bool(r.flagged),
         "face_refined": bool(r.face_refined), "scores": _jsonable(dict(r.scores))}
        for r in sorted(results, key=lambda r: r.seed)
    ]


def deliverable_results(results: list) -> list:
    """The ranked results to deliver; fails with ``no_deliverable_image`` (saying how many candidates
    were dropped and why) when the delivery rule left none."""
    deliverable = [r for r in results if r.rank > 0]
    if deliverable:
        return deliverable
    dropped: dict[str, int] = {}
    for result in results:
        reason = "no_face" if result.faces == 0 else "several_faces"
        dropped[reason] = dropped.get(reason, 0) + 1
    raise NoDeliverableImage(
        f"none of the {len(results)} candidates could be delivered ({', '.join(f'{n} {r}' for r, n in dropped.items())}"
        "): each must show exactly one face; try another style, another seed or more candidates (n)",
        {"candidates": len(results), "dropped": dropped},
    )


def deliver(ctx: PhaseContext, results: list, adapter_id: str) -> dict[str, Any]:
    """The ``delivering`` stage: store each ranked image (original + upscaled) and its row."""
    job = ctx.job
    progress = StageProgress(ctx.on_progress, Stage.DELIVERING, total=len(results), min_interval_s=0.0)
    progress.start()
    rows = []
    for result in sorted(results, key=lambda r: r.rank):
        raise_if_canceled(ctx.should_stop)
        iid = image_id(job.id, result.rank)
        key = image_key(job.subject_id, iid)
        png = _png(result.image)
        ctx.store.put(key, png, "image/png")
        up_key, size_bytes = None, len(png)
        if getattr(result, "upscaled", None) is not None:
            up_key = upscaled_image_key(job.subject_id, iid)
            up_png = _png(result.upscaled)
            ctx.store.put(up_key, up_png, "image/png")
            size_bytes += len(up_png)
        rows.append(
            dict(
                id=iid, job_id=job.id, subject_id=job.subject_id, rank=int(result.rank), key=key, upscaled_key=up_key,
                width=result.image.width, height=result.image.height, seed=int(result.seed), prompt=result.prompt,
                negative_prompt=getattr(result, "negative_prompt", None), style=getattr(result, "style", None),
                scores=_jsonable(dict(result.scores)), size_bytes=size_bytes,
            )
        )
        progress.advance()
    with UnitOfWork(ctx.settings) as uow:
        uow.session.execute(delete(Image).where(Image.job_id == job.id))  # a rerun replaces, never duplicates
        uow.session.add_all(Image(**row) for row in rows)
    ctx.on_progress(ProgressEvent(Stage.DELIVERING, 1.0, 0.0))
    return {"images": len(rows), "adapter_id": adapter_id}


# ---- template -------------------------------------------------------------------------------------------------


def run_templating(ctx: PhaseContext) -> dict[str, Any]:
    """Template mode: judge and place the template (``masking``, detectors only), then inpaint the subject
    into it, rank, upscale (``generating``, ``ranking``, ``upscaling``) and deliver, as a generation does."""
    from pipelines.templates.engine import TemplateEngine, template_models
    from pipelines.templates.masking import TemplateRejected, masking_models, prepare_template

    job = ctx.job
    request: ResolvedTemplate = read_resolved(job.kind, job.request)  # type: ignore[assignment]
    found = find_adapter(ctx.settings, job.subject_id, request.adapter_version)
    if found is None:
        raise InvalidConfig(f"the subject's adapter version {request.adapter_version} no longer exists",
                            code="adapter_not_found")
    template = template_image(ctx, request.source)
    device = resolve_device(ctx.settings.device)
    raise_if_canceled(ctx.should_stop)
    # masking: a bad template fails here, before any diffusion model loads
    try:
        with get_manager().borrow(masking_models(device)) as masking:
            prepared = prepare_template(template, masking, on_progress=ctx.on_progress, should_stop=ctx.should_stop)
    except TemplateRejected as rejected:
        _template_verdict(ctx, request.source, rejected=rejected)
        raise
    _template_verdict(ctx, request.source, face_box=prepared.face.to_dict())
    adapter_id, prefix = found
    adapter_dir = _adapter_dir(ctx, adapter_id, prefix)
    references = reference_crops(ctx)
    preset = _preset(request.preset, ctx.settings)
    with get_manager().borrow(template_models(preset, device, spec=request.templating)) as models:
        results = TemplateEngine(preset, models).run(
            request.templating, prepared, adapter_dir, references, on_progress=ctx.on_progress,
            should_stop=ctx.should_stop, return_all=True)
    deliverable = deliverable_results(results)
    return {**deliver(ctx, deliverable, adapter_id), "candidates": candidate_scores(results),
            "template": {**request.source.model_dump(exclude_none=True), "face_box": _face_box(prepared.face.to_dict()),
                         "mask_box": _face_box(prepared.region.mask_box.to_dict())}}


def template_image(ctx: PhaseContext, source: TemplateSource):
    """The template a job names: a shipped one, or the subject's uploaded template photo (RGB)."""
    if source.kind == "shipped":
        return open_template(str(source.name))
    with UnitOfWork(ctx.settings) as uow:
        row = uow.session.get(TemplatePhoto, source.photo_id)
        key = row.key if row is not None and row.subject_id == ctx.job.subject_id else None
    if key is None or not ctx.store.exists(key):
        raise InvalidConfig("the template photo of this job was deleted", {"template_photo_id": source.photo_id},
                            code="template_photo_not_found")
    image = decode_photo(ctx.store.get(key), reduce_to=TEMPLATE_MAX_SIDE)
    image.thumbnail((TEMPLATE_MAX_SIDE, TEMPLATE_MAX_SIDE))  # the reduced decode is at least this big
    return image


def _template_verdict(ctx: PhaseContext, source: TemplateSource, *, face_box: Any = None,
                      rejected: PipelineError | None = None) -> None:
    """An uploaded template photo's verdict on its row, so later requests naming a refused one are refused
    at once (shipped templates are checked by the test suite)."""
    if source.kind != "upload":
        return
    with UnitOfWork(ctx.settings) as uow:
        row = uow.session.get(TemplatePhoto, source.photo_id)
        if row is None or row.subject_id != ctx.job.subject_id:
            return
        if rejected is None:
            row.status, row.reason_code, row.message = PhotoStatus.accepted, ReasonCode.ACCEPTED.value, None
            row.face_box = _face_box(face_box)
        else:
            row.status, row.message = PhotoStatus.rejected, rejected.message
            row.reason_code = str(rejected.details.get("reason") or rejected.error_code)
            row.face_box = _face_box(rejected.details.get("face_box"))


PhaseRunner = Callable[[PhaseContext], dict[str, Any]]

#: The function that runs each phase of the job plan; a kind without runners cannot be queued.
PHASE_RUNNERS: dict[tuple[JobKind, str], PhaseRunner] = {
    (JobKind.TRAIN, "intake"): run_intake,
    (JobKind.TRAIN, "training"): run_training,
    (JobKind.GENERATE, "generation"): run_generation,
    (JobKind.TEMPLATE, "templating"): run_templating,
}

assert {(kind, phase.name) for kind, plan in PLANS.items() for phase in plan.phases} == set(PHASE_RUNNERS), \
    "every phase of the job plan needs a runner (and nothing else has one)"
