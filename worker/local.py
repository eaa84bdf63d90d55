"""One-shot local run: photos folder -> intake -> training -> generation (or template mode) -> output folder.

The same pipeline functions the workers call, without API, database or broker. Used by
``likeness run`` and ``bench/e2e.py``; stage timings are recorded for the benchmark.
In template mode the template is judged and placed first (``masking``), so a template that
can never work fails before any photo is examined or any step trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from likeness.contract.requests import (
    GenerateRequest,
    RequestRejected,
    ResolvedTrain,
    TemplatePhotoVerdict,
    TemplateRequest,
    TrainRequest,
    resolve_generation,
    resolve_templating,
    resolve_train,
)
from pipelines.errors import DatasetRejected, InvalidConfig, PipelineError
from pipelines.generation.request import GenerationSpec
from pipelines.intake import intake_models, prepare_dataset
from pipelines.intake.config import IntakeConfig
from pipelines.intake.dataset import PhotoInput
from pipelines.intake.decode import PhotoRejected, decode_photo
from pipelines.intake.reasons import ReasonCode
from pipelines.models.presets import get_preset
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, never_stop, no_progress
from pipelines.templates.catalog import open_template
from pipelines.templates.spec import TemplateSpec
from worker.models import ModelManager, resolve_device

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


def resolve(config: LocalRunConfig) -> tuple[ResolvedTrain, GenerationSpec | TemplateSpec]:
    """Check both requests before anything loads, with the API's error codes."""
    try:
        train = resolve_train(config.train, preset=config.preset)
        if config.template is None:
            return train, resolve_generation(config.generate, preset=config.preset)
        verdict = TemplatePhotoVerdict(LOCAL_TEMPLATE_ID, "pending") if config.template.template_photo_id else None
        _, spec = resolve_templating(config.template, photo=verdict)
        if config.template_file is not None:
            spec = spec.model_copy(update={"template": config.template_file.name[:48]})
        return train, spec
    except RequestRejected as exc:
        raise InvalidConfig(exc.message, exc.details, code=exc.code) from None


def read_template(config: LocalRunConfig):
    """The template image of a template-mode run: a shipped one, or the file through the upload's decode checks."""
    if config.template is None:
        return None
    if config.template_file is None:
        return open_template(str(config.template.template))
    try:
        return decode_photo(config.template_file.read_bytes())
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
    """Run the whole pipeline; writes ``rank_XX.png``, ``rank_XX_x2.png`` and ``report.json`` to ``out_dir``.

    ``report.json`` is written for a rejected photo set too (``status: rejected``, each photo's verdict,
    reason and what to do), before :class:`DatasetRejected` is raised. ``on_verdicts`` gets those rows
    once intake has judged the photos, before any training. ``manager``: the model manager to borrow
    from (a warm worker keeps one across runs); default: a new one for this run.
    """
    from pipelines.generation.engine import GenerationEngine, generation_models
    from pipelines.intake.pipeline import check_inputs
    from pipelines.training import train

    manager = manager or ModelManager()

    timer = timer or StageTimer()

    def progress(event: ProgressEvent) -> None:
        timer(event)
        on_progress(event)

    # 1. check inputs before any model loads
    photos = read_photos(photos_dir)
    resolved_train, spec = resolve(config)
    template = read_template(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(config.preset, model_cache_dir)
    device = resolve_device(config.device)

    # 1b. template mode: judge and place the template first (detectors only)
    prepared = None
    if template is not None:
        from pipelines.templates.masking import masking_models, prepare_template

        try:
            with manager.borrow(masking_models(device)) as masking:
                prepared = prepare_template(template, masking, on_progress=progress, should_stop=should_stop)
        except PipelineError as exc:
            if exc.user_error:
                _write_rejection(out_dir, exc, preset.name, template=exc.details)
            raise

    # 2. intake
    intake = IntakeConfig(clip_model=preset.clip, upscaler_model=preset.upscaler_x2, device=device,
                          class_token=resolved_train.class_token, crop_size=preset.intake_crop_size)
    inputs = [PhotoInput(photo_id=photo.photo_id, data=photo.data) for photo in photos]
    check_inputs(inputs, intake)
    files = {photo.photo_id: photo.path.name for photo in photos}
    try:
        with manager.borrow(intake_models(intake)) as models:
            dataset = prepare_dataset(inputs, intake, models, on_progress=progress, should_stop=should_stop)
    except DatasetRejected as exc:
        verdicts = photo_verdicts(exc.details.get("report", []), files, trained=False)
        _write_rejection(out_dir, exc, preset.name, photos=verdicts, accepted=exc.details.get("accepted"),
                         min_photos=exc.details.get("min_photos"))
        if on_verdicts is not None:
            on_verdicts(verdicts)
        raise
    verdicts = photo_verdicts([r.to_dict() for r in dataset.report], files)
    if on_verdicts is not None:
        on_verdicts(verdicts)
    # 3. training (caching, training:stage1, training:stage2)
    work = out_dir / ".work"
    from pipelines.models.loading import base_spec

    with manager.borrow(base_spec(preset, device)) as base:  # the base generation borrows next
        trained = train(dataset.training_examples(), dataset.token_spec(), resolved_train.training, preset,
                        work / "training", base=base, on_progress=progress, should_stop=should_stop, device=device)
    adapter_dir = trained.adapter_dir
    # 4. generation or template mode (generating, ranking, upscaling)
    references = [item.crop for item in dataset.items]
    if isinstance(spec, TemplateSpec):
        from pipelines.templates.engine import TemplateEngine, template_models

        with manager.borrow(template_models(preset, device, spec=spec)) as models:
            results = TemplateEngine(preset, models).run(spec, prepared, adapter_dir, references, on_progress=progress,
                                                         should_stop=should_stop, return_all=True)
    else:
        with manager.borrow(generation_models(preset, device, request=spec)) as models:
            results = GenerationEngine(preset, models).generate(spec, adapter_dir, references, on_progress=progress,
                                                                should_stop=should_stop, return_all=True)
    # 5. delivering
    start = time.perf_counter()
    scored = [{"rank": r.rank, "seed": r.seed, "prompt": r.prompt, "faces": r.faces, "scores": dict(r.scores),
               "flagged": r.flagged} for r in sorted(results, key=lambda r: r.seed)]  # rank 0 = not delivered
    candidates = []
    upscale = spec.upscale
    mode = "template" if isinstance(spec, TemplateSpec) else "generation"
    for result in sorted((r for r in results if r.rank > 0), key=lambda r: r.rank):
        entry = {"rank": result.rank, "seed": result.seed, "prompt": result.prompt, "style": result.style,
                 "scores": dict(result.scores), "width": result.image.width, "height": result.image.height,
                 "face_refined": result.face_refined}
        entry["file"] = f"rank_{result.rank:02d}.png"
        result.image.save(out_dir / entry["file"])
        if result.upscaled is not None:
            entry["upscaled_file"] = f"rank_{result.rank:02d}_x{upscale}.png"
            result.upscaled.save(out_dir / entry["upscaled_file"])
        candidates.append(entry)
    report = {
        "preset": preset.name,
        "device": device,
        "request": {"train": resolved_train.model_dump(mode="json"), mode: spec.model_dump(mode="json")},
        "style": spec.style_label if mode == "template" else spec.style,
        "status": "succeeded",
        "photos": verdicts,
        "class_token": dataset.class_token,
        "class_scores": dict(dataset.class_scores),
        "checks": dict(dataset.checks),
        "training": {"steps": trained.steps, **_to_jsonable(trained.metrics)},
        "candidates": candidates,
        "all_candidates": scored,
    }
    if prepared is not None:
        report["template"] = {"name": spec.template, "size": list(prepared.size), "face_box": prepared.face.to_dict(),
                              "mask_box": prepared.region.mask_box.to_dict()}
    if not candidates:
        report["status"] = "failed"
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        raise InvalidConfig(f"none of the {len(results)} candidates could be delivered (each must show exactly one "
                            "face); see report.json", {"candidates": len(results)}, code="no_deliverable_image")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    timer.mark("delivering", start, time.perf_counter())
    report["timings_s"] = timer.durations()
    return report


def _to_jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))
