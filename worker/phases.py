"""The one orchestration of a job's phases: what each phase of the job plan does, in order.

The phases themselves (queues, stages, order) are the job plan's (:mod:`likeness.contract.plan`);
this module binds each phase to the function that runs it (:data:`PHASE_RUNNERS`). A phase reads
its inputs from, and hands its outputs to, a :class:`JobEdge`: the only thing that differs between
the service and ``likeness run``.

* :class:`worker.service_edge.ServiceEdge`: the database and the blob store (the worker, through
  :mod:`worker.runner`, which records each finished phase and hands the job between queues);
* :class:`worker.local.FolderEdge`: a folder of photos in, ranked images and ``report.json`` out.

    train:    intake (cpu)                      -> photo verdicts, the dataset kept for training
              caching, training:stage1/2 (gpu)  -> the adapter kept (checkpoints mirrored by the edge)
    generate: generating, ranking, upscaling, delivering (gpu)          -> delivered images
    template: masking, generating, ranking, upscaling, delivering (gpu) -> delivered images

Each runner returns its part of the job's typed result (:mod:`likeness.contract.results`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from likeness.contract.plan import PLANS, JobKind, Stage, plan_for
from likeness.contract.requests import (
    ResolvedGenerate,
    ResolvedTemplate,
    ResolvedTrain,
    TemplateSource,
    read_resolved,
)
from likeness.contract.results import (
    AdapterRef,
    CandidateScore,
    CheckpointCandidate,
    CheckpointSelection,
    GenerateResult,
    IntakeSummary,
    JobResult,
    Resumed,
    TemplatePlacement,
    TemplateResult,
    TrainingPreview,
    TrainingSummary,
    TrainResult,
    read_result,
)
from pipelines.errors import DatasetRejected, InvalidConfig, PipelineError
from pipelines.intake import intake_models, prepare_dataset
from pipelines.intake.config import IntakeConfig
from pipelines.intake.dataset import Dataset, PhotoInput
from pipelines.intake.decode import decode_photo
from pipelines.models.presets import get_preset
from pipelines.models.weights import require_weights
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, StageProgress, raise_if_canceled
from pipelines.training.config import total_steps
from pipelines.training.selection import select_snapshot, snapshot_steps, validate_snapshots, validation_set
from worker.jobs import JobSnapshot
from worker.models import ModelManager

if TYPE_CHECKING:
    from PIL.Image import Image

#: an uploaded template is worked on at most this many pixels on its long side
TEMPLATE_MAX_SIDE = 2048

MAX_CURVE_POINTS = 500  # a training's loss curve is thinned to about this many points


class NoDeliverableImage(PipelineError):
    """Every candidate of a generation failed the delivery rule (e.g. not exactly one face)."""

    code = "no_deliverable_image"


@runtime_checkable
class JobEdge(Protocol):
    """Where a job's inputs come from and where its outputs go (the port of the orchestration).

    Every method gets the job it works for; ids in it are the edge's own (database ids for the
    service, made-up ones for a local run).
    """

    # ---- train: intake
    def photos(self, job: JobSnapshot) -> list[PhotoInput]:
        """The subject's photos, in upload order."""

    def photos_judged(self, job: JobSnapshot, reports: list[dict[str, Any]], crops: dict[str, Any]) -> None:
        """Intake's verdict per photo (also when the whole set was rejected; then ``crops`` is empty)."""

    def keep_dataset(self, job: JobSnapshot, dataset: Dataset, folder: Path) -> None:
        """The prepared dataset (saved in ``folder``), for the training phase, maybe on another machine."""

    # ---- train: training
    def dataset(self, job: JobSnapshot, workdir: Path) -> Dataset:
        """The dataset intake kept for this job."""

    def checkpoint_dir(self, job: JobSnapshot, workdir: Path) -> Path | None:
        """Where the trainer keeps its checkpoints, with the newest one an earlier attempt left restored
        into it; None: no checkpoints (nothing would resume from them)."""

    def mirror_checkpoint(self, job: JobSnapshot, folder: Path) -> None:
        """A checkpoint the trainer just wrote (so another attempt can resume from it)."""

    def training_resumed(self, job: JobSnapshot, resumed: Resumed) -> None:
        """The training resumed from a checkpoint: tell the client while the job runs."""

    def training_preview(self, job: JobSnapshot, step: int, image: Image) -> None:
        """A validation image of the snapshot after ``step``, made while the job runs: show it now."""

    def keep_adapter(self, job: JobSnapshot, adapter_dir: Path, manifest: dict[str, Any], workdir: Path) -> AdapterRef:
        """The trained adapter; returns its id and version."""

    # ---- generate / template
    def adapter(self, job: JobSnapshot, version: int) -> tuple[str, Path]:
        """(id, local folder) of the subject's adapter ``version``."""

    def reference_crops(self, job: JobSnapshot) -> list[Image]:
        """The subject's accepted face crops (identity scores in ranking)."""

    def template_image(self, job: JobSnapshot, source: TemplateSource) -> Image:
        """The template a template job names (RGB)."""

    def deliver(self, job: JobSnapshot, result: Any) -> None:  # noqa: ANN401 - a ranked GenerationResult
        """Keep one ranked image (original and upscaled)."""

    def delivered(self, job: JobSnapshot) -> None:
        """Every ranked image was handed to :meth:`deliver` (a rerun replaces what an earlier run kept)."""


@dataclass
class PhaseContext:
    job: JobSnapshot
    edge: JobEdge
    manager: ModelManager  # the models a worker keeps loaded between jobs
    device: str  # resolved: cpu, cuda, cuda:N
    model_cache_dir: Path
    on_progress: ProgressFn
    should_stop: CancelFn
    workdir: Path  # scratch space of this job on this machine

    def request(self) -> ResolvedTrain | ResolvedGenerate | ResolvedTemplate:
        return read_resolved(self.job.kind, self.job.request)

    def preset(self, name: str):  # noqa: ANN201 - pipelines.models.presets.ModelPreset
        require_weights(name, self.model_cache_dir)  # missing weights: one line, before any work
        return get_preset(name, self.model_cache_dir)


PhaseRunner = Callable[[PhaseContext], "JobResult | None"]


def run_phases(ctx: PhaseContext) -> JobResult:
    """Every phase of the job's plan, one after the other, on this machine; their results merged.
    (The worker runs them through :mod:`worker.runner`, which records each phase as it ends.)"""
    result = read_result(ctx.job.kind, None)
    for phase in plan_for(ctx.job.kind).phases:
        part = PHASE_RUNNERS[(JobKind(ctx.job.kind), phase.name)](ctx)
        if part is not None:
            result = merged(result, part)
    return result


def merged(result: JobResult, part: JobResult) -> JobResult:
    return read_result(result.kind, {**result.stored(), **part.stored()})


def jsonable(value: Any) -> Any:  # noqa: ANN401
    """``value`` as plain JSON data (objects with ``to_dict`` through it, anything else as a string)."""
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def box(value: Any) -> list[float] | None:  # noqa: ANN401
    """A box (``{x0, y0, x1, y1}`` or a sequence) as ``[x0, y0, x1, y1]`` rounded to 0.1 px."""
    if not value:
        return None
    if isinstance(value, dict):
        return [round(float(value[k]), 1) for k in ("x0", "y0", "x1", "y1")]
    return [round(float(v), 1) for v in value]


# ---- train: intake ---------------------------------------------------------------------------------------


def intake_config(ctx: PhaseContext):  # noqa: ANN201 - pipelines.intake.config.IntakeConfig
    """The intake settings of a train job: the preset's CLIP/upscaler plus the request's class word."""
    request: ResolvedTrain = ctx.request()  # type: ignore[assignment]
    preset = ctx.preset(request.preset)
    return IntakeConfig(clip_model=preset.clip, upscaler_model=preset.upscaler_x2, class_token=request.class_token,
                        device=ctx.device, crop_size=preset.intake_crop_size)


def run_intake(ctx: PhaseContext) -> TrainResult:
    from pipelines.intake.pipeline import check_inputs

    config = intake_config(ctx)
    inputs = ctx.edge.photos(ctx.job)
    if not inputs:
        raise InvalidConfig("the subject has no photos", code="no_photos")
    check_inputs(inputs, config)  # bad input fails before any model loads
    raise_if_canceled(ctx.should_stop)
    try:
        with ctx.manager.borrow(intake_models(config)) as models:
            dataset = prepare_dataset(inputs, config, models, on_progress=ctx.on_progress,
                                      should_stop=ctx.should_stop)
    except DatasetRejected as exc:
        ctx.edge.photos_judged(ctx.job, [dict(r) for r in exc.details.get("report") or []], crops={})
        raise
    reports = [r.to_dict() for r in dataset.report]
    ctx.edge.photos_judged(ctx.job, reports, {item.photo_id: item for item in dataset.items})
    folder = ctx.workdir / "dataset"
    shutil.rmtree(folder, ignore_errors=True)
    dataset.save(folder)
    ctx.edge.keep_dataset(ctx.job, dataset, folder)
    accepted = sum(1 for r in reports if r["accepted"])
    return TrainResult(intake=IntakeSummary(
        accepted=accepted, rejected=len(reports) - accepted, class_token=dataset.class_token,
        class_scores={k: round(float(v), 4) for k, v in dataset.class_scores.items()},
        checks=dict(getattr(dataset, "checks", {}) or {})))


# ---- train: caching + training ---------------------------------------------------------------------------


def run_training(ctx: PhaseContext) -> TrainResult:
    from pipelines.models.loading import base_spec
    from pipelines.training import BaseNotRestored, train

    job = ctx.job
    request: ResolvedTrain = ctx.request()  # type: ignore[assignment]
    dataset = ctx.edge.dataset(job, ctx.workdir)
    preset = ctx.preset(request.preset)
    # Checkpoints: kept across attempts on this machine; the edge mirrors them so that whichever
    # machine runs the next attempt resumes from the newest one (see worker.checkpoints).
    checkpoint_dir = ctx.edge.checkpoint_dir(job, ctx.workdir)
    curve: list[list[float]] = []
    resumed: list[Resumed] = []  # also kept in the phase's result: the notice while running is best effort
    snapshots = snapshot_steps(total_steps(request.training, len(dataset.items))) if request.select_checkpoint else []

    def on_progress(event: ProgressEvent) -> None:  # (step, loss) of each report: the dashboard's loss curve
        if "loss" in event.metrics and "step" in event.metrics:
            curve.append([float(event.metrics["step"]), round(float(event.metrics["loss"]), 6)])
        if "resumed_from_step" in event.metrics:
            resumed.append(Resumed(from_step=int(event.metrics["resumed_from_step"]), attempt=job.attempts,
                                   message=event.message))
            ctx.edge.training_resumed(job, resumed[-1])
        ctx.on_progress(event)

    spec = base_spec(preset, ctx.device)  # the base generation borrows too: loaded once per worker
    try:
        with ctx.manager.borrow(spec) as base:
            trained = train(dataset.training_examples(), dataset.token_spec(), request.training, preset,
                            ctx.workdir / "training", base=base, device=ctx.device, on_progress=on_progress,
                            should_stop=ctx.should_stop, checkpoint_dir=checkpoint_dir,
                            on_checkpoint=(lambda folder: ctx.edge.mirror_checkpoint(job, folder))
                            if checkpoint_dir is not None else None, snapshot_steps=snapshots)
            selection = select_checkpoint(ctx, base, preset, dataset, trained) if request.select_checkpoint else None
    except BaseNotRestored:
        ctx.manager.evict(spec)  # never lend a base training could not put back
        raise
    adapter_dir = Path(trained.adapter_dir)
    if selection is not None:
        adapter_dir = {**trained.snapshots, trained.steps: adapter_dir}[selection.selected_step]
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    adapter = ctx.edge.keep_adapter(job, adapter_dir, manifest, ctx.workdir)
    previews = [TrainingPreview(step=c.step) for c in selection.candidates] if selection is not None else None
    return TrainResult(adapter=adapter, checkpoint_selection=selection, previews=previews,
                       resumed=resumed[-1] if resumed else None, training=TrainingSummary(
        **{**jsonable(trained.metrics or {}), "steps": trained.steps,
           "loss_curve": curve[:: max(1, len(curve) // MAX_CURVE_POINTS)]}))


def select_checkpoint(ctx: PhaseContext, base: Any, preset: Any, dataset: Dataset,  # noqa: ANN401
                      trained: Any) -> CheckpointSelection:  # noqa: ANN401 - pipelines.training.TrainResult
    """The ``selecting`` stage: every snapshot (and the finished adapter) renders the validation set on
    the base training just gave back, each as soon as it is made shown as a preview; the rule of
    :func:`pipelines.training.selection.select_snapshot` picks the one the subject keeps."""
    from pipelines.eval.metrics import IdentityScorer
    from pipelines.ranking import ranking_models
    started = time.perf_counter()
    snapshots = sorted({**trained.snapshots, trained.steps: Path(trained.adapter_dir)}.items())
    tokens = dataset.token_spec()
    progress = StageProgress(ctx.on_progress, Stage.SELECTING, total=len(snapshots), min_interval_s=0.0)
    progress.start()

    def shown(validation: Any) -> None:  # noqa: ANN401 - pipelines.training.selection.Validation
        ctx.edge.training_preview(ctx.job, validation.step, validation.plain[0])
        progress.advance(step=float(validation.step))

    with ctx.manager.borrow(ranking_models(preset, ctx.device)) as ranking:
        identity = IdentityScorer([item.crop for item in dataset.items], embedder=ranking.face_embedder,
                                  face_detector=ranking.face_detector)
        scores = validate_snapshots(base, snapshots, tokens.instance_token, tokens.class_token, identity, ranking.clip,
                                    preset.resolution, validation_set(preset.name), on_validated=shown,
                                    should_stop=ctx.should_stop)
    selected = select_snapshot(scores)
    trained.metrics["selection_s"] = time.perf_counter() - started
    return CheckpointSelection(selected_step=selected, candidates=[
        CheckpointCandidate(step=s.step, identity=s.identity, text_alignment=s.text_alignment) for s in scores])


# ---- generate --------------------------------------------------------------------------------------------


def run_generation(ctx: PhaseContext) -> GenerateResult:
    from pipelines.generation.engine import GenerationEngine, generation_models

    job = ctx.job
    request: ResolvedGenerate = ctx.request()  # type: ignore[assignment]
    adapter_id, adapter_dir = ctx.edge.adapter(job, request.adapter_version)
    references = ctx.edge.reference_crops(job)
    preset = ctx.preset(request.preset)
    with ctx.manager.borrow(generation_models(preset, ctx.device, request=request.generation)) as models:
        results = GenerationEngine(preset, models).generate(
            request.generation, adapter_dir, references, on_progress=ctx.on_progress, should_stop=ctx.should_stop,
            return_all=True)
    images = deliver(ctx, deliverable_results(results))
    return GenerateResult(images=images, adapter_id=adapter_id, candidates=candidate_scores(results))


def candidate_scores(results: list) -> list[CandidateScore]:
    """Every candidate's scores, kept on the job record (rank 0 = not delivered), so a client or the
    dashboard can see why the delivered ones won."""
    return [CandidateScore(seed=int(r.seed), rank=int(r.rank), faces=int(r.faces), flagged=bool(r.flagged),
                           face_refined=bool(r.face_refined), scores=jsonable(dict(r.scores)))
            for r in sorted(results, key=lambda r: r.seed)]


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


def deliver(ctx: PhaseContext, results: list) -> int:
    """The ``delivering`` stage: hand each ranked image to the edge, best first; returns how many."""
    progress = StageProgress(ctx.on_progress, Stage.DELIVERING, total=len(results), min_interval_s=0.0)
    progress.start()
    ranked = sorted(results, key=lambda r: r.rank)
    for result in ranked:
        raise_if_canceled(ctx.should_stop)
        ctx.edge.deliver(ctx.job, result)
        progress.advance()
    ctx.edge.delivered(ctx.job)
    ctx.on_progress(ProgressEvent(Stage.DELIVERING, 1.0, 0.0))
    return len(ranked)


# ---- template -------------------------------------------------------------------------------------------------


def decode_template(data: bytes) -> Image:
    """An uploaded template as every phase works on it: decoded (EXIF rotation applied), RGB, at most
    :data:`TEMPLATE_MAX_SIDE` pixels on its long side; raises ``PhotoRejected`` for a file that is no image."""
    image = decode_photo(data, reduce_to=TEMPLATE_MAX_SIDE)
    image.thumbnail((TEMPLATE_MAX_SIDE, TEMPLATE_MAX_SIDE))  # the reduced decode is at least this big
    return image


def place_template(manager: ModelManager, device: str, image: Image, on_progress: ProgressFn | None = None,
                   should_stop: CancelFn | None = None):  # noqa: ANN201 - pipelines.templates.masking.PreparedTemplate
    """The ``masking`` stage: judge the template (one person, a face big enough) and place the subject's
    region in it, with detectors only; raises ``TemplateRejected`` for a template that can never work.
    The verdict of an upload (:mod:`worker.template_photos`, a local run's template file) is this too."""
    from pipelines.templates.masking import masking_models, prepare_template

    with manager.borrow(masking_models(device)) as masking:
        return prepare_template(image, masking, on_progress=on_progress, should_stop=should_stop)


def run_templating(ctx: PhaseContext) -> TemplateResult:
    """Template mode: judge and place the template (``masking``, detectors only), then inpaint the subject
    into it, rank, upscale (``generating``, ``ranking``, ``upscaling``) and deliver, as a generation does."""
    from pipelines.templates.engine import TemplateEngine, template_models

    job = ctx.job
    request: ResolvedTemplate = ctx.request()  # type: ignore[assignment]
    adapter_id, adapter_dir = ctx.edge.adapter(job, request.adapter_version)  # a missing one fails first
    template = ctx.edge.template_image(job, request.source)
    raise_if_canceled(ctx.should_stop)
    # a bad template fails here, before any diffusion model loads (an upload was judged when it came)
    prepared = place_template(ctx.manager, ctx.device, template, ctx.on_progress, ctx.should_stop)
    references = ctx.edge.reference_crops(job)
    preset = ctx.preset(request.preset)
    with ctx.manager.borrow(template_models(preset, ctx.device, spec=request.templating)) as models:
        results = TemplateEngine(preset, models).run(
            request.templating, prepared, adapter_dir, references, on_progress=ctx.on_progress,
            should_stop=ctx.should_stop, return_all=True)
    images = deliver(ctx, deliverable_results(results))
    placement = TemplatePlacement(**request.source.model_dump(), face_box=box(prepared.face.to_dict()),
                                  mask_box=box(prepared.region.mask_box.to_dict()))
    return TemplateResult(images=images, adapter_id=adapter_id, candidates=candidate_scores(results),
                          template=placement)


#: The function that runs each phase of the job plan; a kind without runners cannot be queued.
PHASE_RUNNERS: dict[tuple[JobKind, str], PhaseRunner] = {
    (JobKind.TRAIN, "intake"): run_intake,
    (JobKind.TRAIN, "training"): run_training,
    (JobKind.GENERATE, "generation"): run_generation,
    (JobKind.TEMPLATE, "templating"): run_templating,
}

assert {(kind, phase.name) for kind, plan in PLANS.items() for phase in plan.phases} == set(PHASE_RUNNERS), \
    "every phase of the job plan needs a runner (and nothing else has one)"
