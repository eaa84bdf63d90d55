"""One-shot local run: photos folder -> intake -> training -> generation (or template mode) -> output folder.

The phases the workers run (:mod:`worker.phases`), without API, database or broker: a train job and
a generate (or template) job on a :class:`FolderEdge`. Used by ``likeness run`` and ``bench/e2e.py``;
stage timings are recorded for the benchmark. In template mode the template is judged first (as the
service judges an uploaded one), so a template that can never work fails before any photo is
examined or any step trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from likeness.contract.plan import JobKind
from likeness.contract.requests import (
    GenerateRequest,
    RequestRejected,
    ResolvedGenerate,
    ResolvedTemplate,
    ResolvedTrain,
    TemplatePhotoVerdict,
    TemplateRequest,
    TemplateSource,
    TrainRequest,
    resolve_generate,
    resolve_template,
    resolve_train,
)
from likeness.contract.results import AdapterRef, Resumed
from pipelines.errors import DatasetRejected, InvalidConfig, PipelineError
from pipelines.intake.dataset import PhotoInput
from pipelines.intake.decode import PhotoRejected
from pipelines.intake.reasons import ReasonCode
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, never_stop, no_progress
from pipelines.templates.catalog import open_template
from worker.jobs import JobSnapshot
from worker.models import ModelManager, resolve_device
from worker.phases import PhaseContext, decode_template, jsonable, place_template, run_phases

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"}


@dataclass
class StageTimer:
    """Wall time per stage, measured from the first to the last event of each stage."""

    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def __call__(self, event: ProgressEvent) -> None:
        now = self.clock()
        self.started.setdefault(event.stage, now)
        self.ended[event.stage] = now

    def mark(self, stage: str, start: float, end: float) -> None:
        self.started[stage] = min(self.started.get(stage, start), start)
        self.ended[stage] = max(self.ended.get(stage, end), end)

    def durations(self) -> dict[str, float]:
        # A stage ends where the next one starts (events only mark its inside).
        order = sorted(self.started, key=self.started.get)
        out = {}
        for i, stage in enumerate(order):
            end = self.started[order[i + 1]] if i + 1 < len(order) else self.ended[stage]
            out[stage] = max(end - self.started[stage], self.ended[stage] - self.started[stage])
        return out


#: the template photo id of ``LocalRunConfig.template_file`` in a local template request
LOCAL_TEMPLATE_ID = "local-file"
#: the adapter a local run trains (and its generation uses)
LOCAL_ADAPTER_ID, LOCAL_ADAPTER_VERSION = "local", 1


@dataclass(frozen=True)
class LocalRunConfig:
    """A local run: the same requests a client sends to the API, checked by the same contract.

    ``template`` set: template mode instead of ``generate``; with ``template_file``, the request names
    it as ``template_photo_id=LOCAL_TEMPLATE_ID`` (an uploaded template, with the upload's decode checks).
    """

    train: TrainRequest = field(default_factory=TrainRequest)
    generate: GenerateRequest = field(default_factory=lambda: GenerateRequest(style="studio_headshot"))
    preset: str = "tiny"
    device: str = "auto"
    template: TemplateRequest | None = None
    template_file: Path | None = None


@dataclass(frozen=True)
class LocalPhoto:
    photo_id: str  # never the file name: phones reuse stems (IMG_0001.JPG and IMG_0001.HEIC)
    path: Path
    data: bytes


def read_photos(folder: Path) -> list[LocalPhoto]:
    if not folder.is_dir():
        raise InvalidConfig(f"{folder} is not a folder", code="photos_not_found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise InvalidConfig(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}", code="no_photos")
    return [LocalPhoto(f"photo-{i:03d}", path, path.read_bytes()) for i, path in enumerate(files, start=1)]


def resolve(config: LocalRunConfig) -> tuple[ResolvedTrain, ResolvedGenerate | ResolvedTemplate]:
    """Check both requests before anything loads, with the API's error codes."""
    try:
        train = resolve_train(config.train, preset=config.preset)
        if config.template is None:
            return train, resolve_generate(config.generate, preset=config.preset, adapter_version=LOCAL_ADAPTER_VERSION)
        verdict = TemplatePhotoVerdict(LOCAL_TEMPLATE_ID, "pending") if config.template.template_photo_id else None
        resolved = resolve_template(config.template, preset=config.preset, adapter_version=LOCAL_ADAPTER_VERSION,
                                    photo=verdict)
        if config.template_file is not None:
            label = config.template_file.name[:48]
            resolved = resolved.model_copy(update={"templating": resolved.templating.model_copy(
                update={"template": label})})
        return train, resolved
    except RequestRejected as exc:
        raise InvalidConfig(exc.message, exc.details, code=exc.code) from None


def read_template(config: LocalRunConfig):  # noqa: ANN201 - PIL image or None
    """The template image of a template-mode run: a shipped one, or the file through the upload's decode checks."""
    if config.template is None:
        return None
    if config.template_file is None:
        return open_template(str(config.template.template))
    try:
        return decode_template(config.template_file.read_bytes())
    except OSError as exc:
        raise InvalidConfig(f"cannot read the template {config.template_file}: {exc}",
                            code="template_not_found") from None
    except PhotoRejected as exc:
        raise InvalidConfig(f"template {config.template_file.name}: {exc.message}", exc.details,
                            code=f"template_{exc.reason.value}") from None


def photo_verdicts(rows: list[dict[str, Any]], files: dict[str, str], trained: bool = True) -> list[dict[str, Any]]:
    """Intake's per-photo report rows with the file name and what the person can do about a refusal;
    ``used``: the photo went into training (never, when the set was rejected)."""
    return [{**row, "file": files.get(row["photo_id"]), "used": trained and bool(row["accepted"]),
             "what_to_do": ReasonCode(row["reason_code"]).what_to_do} for row in rows]


def _write_rejection(out_dir: Path, exc: PipelineError, preset: str, **extra: Any) -> None:
    """``report.json`` of a run refused before training (the photo set or the template)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({
        "status": "rejected", "error": {"code": exc.error_code, "message": exc.message}, "preset": preset, **extra,
    }, indent=2, default=str))


class FolderEdge:
    """A local run's edge of its jobs (:class:`worker.phases.JobEdge`): photos from a folder, everything
    else in memory, ranked images as ``rank_XX.png`` / ``rank_XX_x<f>.png`` in ``out_dir``."""

    def __init__(self, photos: list[LocalPhoto], out_dir: Path, template=None,  # noqa: ANN001 - PIL image
                 on_verdicts: Callable[[list[dict[str, Any]]], None] | None = None):
        self._photos = photos
        self.out_dir = out_dir
        self._template = template
        self._on_verdicts = on_verdicts
        self.verdicts: list[dict[str, Any]] = []
        self.delivered_files: list[dict[str, Any]] = []
        self._dataset = None
        self._adapter_dir: Path | None = None

    def photos(self, job: JobSnapshot) -> list[PhotoInput]:
        return [PhotoInput(photo_id=photo.photo_id, data=photo.data) for photo in self._photos]

    def photos_judged(self, job: JobSnapshot, reports: list[dict[str, Any]], crops: dict[str, Any]) -> None:
        # no crops kept: the set was rejected, so no photo goes into training
        self.verdicts = photo_verdicts(jsonable(reports), {p.photo_id: p.path.name for p in self._photos},
                                       trained=bool(crops))
        if self._on_verdicts is not None:
            self._on_verdicts(self.verdicts)

    def keep_dataset(self, job: JobSnapshot, dataset, folder: Path) -> None:  # noqa: ANN001
        self._dataset = dataset

    def dataset(self, job: JobSnapshot, workdir: Path):  # noqa: ANN201
        return self._dataset

    def checkpoint_dir(self, job: JobSnapshot, workdir: Path) -> None:
        """A local run starts fresh and nothing takes it over: no checkpoints."""

    def mirror_checkpoint(self, job: JobSnapshot, folder: Path) -> None:
        """Never called (no checkpoints)."""

    def training_resumed(self, job: JobSnapshot, resumed: Resumed) -> None:
        """Never (no checkpoints)."""

    def training_preview(self, job: JobSnapshot, step: int, image) -> None:  # noqa: ANN001 - PIL image
        """``previews/step-NNNNNN.png`` in the output folder."""
        folder = self.out_dir / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"step-{step:06d}.png")

    def keep_adapter(self, job: JobSnapshot, adapter_dir: Path, manifest: dict[str, Any], workdir: Path) -> AdapterRef:
        self._adapter_dir = adapter_dir
        return AdapterRef(id=LOCAL_ADAPTER_ID, version=LOCAL_ADAPTER_VERSION)

    def adapter(self, job: JobSnapshot, version: int) -> tuple[str, Path]:
        if self._adapter_dir is None:
            raise InvalidConfig("nothing was trained in this run", code="adapter_not_found")
        return LOCAL_ADAPTER_ID, self._adapter_dir

    def reference_crops(self, job: JobSnapshot) -> list:
        return [item.crop for item in self._dataset.items] if self._dataset is not None else []

    def template_image(self, job: JobSnapshot, source: TemplateSource):  # noqa: ANN201
        return self._template

    def deliver(self, job: JobSnapshot, result: Any) -> None:  # noqa: ANN401
        entry = {"rank": result.rank, "seed": result.seed, "prompt": result.prompt, "style": result.style,
                 "scores": jsonable(dict(result.scores)), "width": result.image.width,
                 "height": result.image.height, "face_refined": result.face_refined,
                 "file": f"rank_{result.rank:02d}.png"}
        result.image.save(self.out_dir / entry["file"])
        if result.upscaled is not None:
            factor = round(result.upscaled.width / result.image.width)
            entry["upscaled_file"] = f"rank_{result.rank:02d}_x{factor}.png"
            result.upscaled.save(self.out_dir / entry["upscaled_file"])
        self.delivered_files.append(entry)

    def delivered(self, job: JobSnapshot) -> None:
        """The files are written as they come."""


def local_job(kind: JobKind, request: ResolvedTrain | ResolvedGenerate | ResolvedTemplate) -> JobSnapshot:
    """A job of a local run, as the phases see a queued one."""
    return JobSnapshot(id=f"local-{kind.value}", client_id="local", subject_id="local", kind=kind.value,
                       request=request.model_dump(mode="json"), completed_stages=(), attempts=1, max_attempts=1,
                       progress=0.0, result={})


def run_local(
    photos_dir: Path,
    out_dir: Path,
    config: LocalRunConfig,
    model_cache_dir: Path,
    on_progress: ProgressFn = no_progress,
    should_stop: CancelFn = never_stop,
    timer: StageTimer | None = None,
    manager=None,  # noqa: ANN001 - worker.models.ModelManager
    on_verdicts: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """A train job then a generate (or template) job, through the phases the workers run
    (:mod:`worker.phases`) on a :class:`FolderEdge`; writes ``rank_XX.png``, ``rank_XX_x2.png`` and
    ``report.json`` to ``out_dir``.

    ``report.json`` is written for a rejected photo set or a failed generation too (``status``
    ``rejected`` / ``failed``, the error, each photo's verdict, reason and what to do) before the error
    is raised. ``on_verdicts`` gets those rows once intake has judged the photos, before any training.
    ``manager``: the model manager to borrow from (a warm worker keeps one across runs); default: a new
    one for this run.
    """
    timer = timer or StageTimer()

    def progress(event: ProgressEvent) -> None:
        timer(event)
        on_progress(event)

    # 1. check inputs before any model loads
    photos = read_photos(photos_dir)
    train, second = resolve(config)
    template = read_template(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    edge = FolderEdge(photos, out_dir, template, on_verdicts)
    work = out_dir / ".work"

    manager = manager or ModelManager()

    def context(kind: JobKind, request) -> PhaseContext:  # noqa: ANN001
        return PhaseContext(local_job(kind, request), edge, manager, resolve_device(config.device),
                            model_cache_dir, progress, should_stop, work)

    kind = JobKind.TEMPLATE if isinstance(second, ResolvedTemplate) else JobKind.GENERATE
    # 2. template mode: judge the template first (detectors only), as the service does at upload
    if template is not None:
        try:
            place_template(manager, resolve_device(config.device), template, progress, should_stop)
        except PipelineError as exc:
            if exc.user_error:  # a template refused once judged still leaves its report
                _write_rejection(out_dir, exc, config.preset, template=exc.details)
            raise
    # 3. the train job (intake, training), then the generate or template job
    report: dict[str, Any] = {"preset": config.preset, "device": resolve_device(config.device),
                              "request": {"train": train.model_dump(mode="json"),
                                          kind.value: _spec(second).model_dump(mode="json")},
                              "style": _style(second), "status": "succeeded"}
    results: dict[str, Any] = {}
    try:
        trained = run_phases(context(JobKind.TRAIN, train))
        results["train"] = trained.stored()
        made = run_phases(context(kind, second))
        results[kind.value] = made.stored()
    except PipelineError as exc:
        report.update(status="rejected" if isinstance(exc, DatasetRejected) else "failed",
                      error={"code": exc.error_code, "message": exc.message},
                      **_rejected_photos(exc), **_summary(edge, results))
        _write_report(out_dir, report)
        raise
    report.update(_summary(edge, results))
    _write_report(out_dir, report)
    report["timings_s"] = timer.durations()
    return report


def _spec(resolved: ResolvedGenerate | ResolvedTemplate):  # noqa: ANN202
    return resolved.templating if isinstance(resolved, ResolvedTemplate) else resolved.generation


def _style(resolved: ResolvedGenerate | ResolvedTemplate) -> str | None:
    return resolved.templating.style_label if isinstance(resolved, ResolvedTemplate) else resolved.generation.style


def _rejected_photos(exc: PipelineError) -> dict[str, Any]:
    if not isinstance(exc, DatasetRejected):
        return {}
    return {"accepted": exc.details.get("accepted"), "min_photos": exc.details.get("min_photos")}


def _summary(edge: FolderEdge, results: dict[str, Any]) -> dict[str, Any]:
    """What the report shows: each photo's verdict, the jobs' typed results (as the service stores them on
    its jobs) and, spelled out for a reader, the class word, training metrics and delivered files."""
    summary: dict[str, Any] = {"photos": edge.verdicts, "results": results}
    train = results.get("train", {})
    if "intake" in train:
        summary.update(class_token=train["intake"]["class_token"], class_scores=train["intake"]["class_scores"],
                       checks=train["intake"]["checks"])
    if "training" in train:
        summary["training"] = train["training"]
    made = results.get("generate") or results.get("template") or {}
    if made:
        summary.update(candidates=edge.delivered_files, all_candidates=made.get("candidates", []))
    if "template" in made:
        summary["template"] = made["template"]
    return summary


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
