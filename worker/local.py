"""One-shot local run: photos folder -> intake -> training -> generation -> output folder.

The same pipeline functions the workers call, without API, database or broker. Used by
``likeness run`` and ``bench/e2e.py``; stage timings are recorded for the benchmark.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidConfig
from pipelines.progress import CancelFn, ProgressEvent, ProgressFn, never_stop, no_progress

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


@dataclass(frozen=True)
class LocalRunConfig:
    style: str
    n: int = 8
    k: int = 4
    preset: str = "tiny"
    device: str = "auto"
    seed: int = 0
    upscale: int | None = 2
    train_overrides: dict[str, Any] = field(default_factory=dict)
    generation_overrides: dict[str, Any] = field(default_factory=dict)


def read_photos(folder: Path) -> list[tuple[str, bytes]]:
    if not folder.is_dir():
        raise InvalidConfig(f"{folder} is not a folder", code="photos_not_found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise InvalidConfig(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}", code="no_photos")
    return [(p.stem, p.read_bytes()) for p in files]


def run_local(
    photos_dir: Path,
    out_dir: Path,
    config: LocalRunConfig,
    model_cache_dir: Path,
    on_progress: ProgressFn = no_progress,
    should_stop: CancelFn = never_stop,
    timer: StageTimer | None = None,
    engine=None,
) -> dict[str, Any]:
    """Run the whole pipeline; writes ``rank_XX.png``, ``rank_XX_x2.png`` and ``report.json`` to ``out_dir``.

    ``engine``: an already loaded ``GenerationEngine`` (a warm worker); default: load one here.
    """
    from pipelines.generation.engine import GenerationEngine
    from pipelines.generation.request import GenerationRequest
    from pipelines.intake import prepare_dataset
    from pipelines.intake.config import IntakeConfig
    from pipelines.intake.dataset import PhotoInput
    from pipelines.models.presets import get_preset
    from pipelines.training import train
    from pipelines.training.config import TrainConfig
    from worker.model_cache import resolve_device

    timer = timer or StageTimer()

    def progress(event: ProgressEvent) -> None:
        timer(event)
        on_progress(event)

    # 1. check inputs before any model loads
    from pipelines.generation.request import check_request

    photos = read_photos(photos_dir)
    request = GenerationRequest(style=config.style, n=config.n, k=config.k, seed=config.seed, upscale=config.upscale,
                                **config.generation_overrides)
    check_request(request)
    train_config = TrainConfig.from_dict(dict(config.train_overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(config.preset, model_cache_dir)
    device = resolve_device(config.device)

    # 2. intake
    intake = IntakeConfig(clip_model=preset.clip, upscaler_model=preset.upscaler_x2, device=device)
    dataset = prepare_dataset(
        [PhotoInput(photo_id=name, data=data) for name, data in photos], intake,
        on_progress=progress, should_stop=should_stop,
    )
    # 3. training (caching, training:stage1, training:stage2)
    work = out_dir / ".work"
    trained = train(
        dataset.training_examples(), dataset.token_spec(), train_config, preset,
        work / "training", on_progress=progress, should_stop=should_stop, device=device,
    )
    adapter_dir = trained.adapter_dir
    # 4. generation (generating, ranking, upscaling)
    engine = engine or GenerationEngine(preset, device)
    references = [item.crop for item in dataset.items]
    results = engine.generate(request, adapter_dir, references, on_progress=progress, should_stop=should_stop,
                              return_all=True)
    # 5. delivering
    start = time.perf_counter()
    scored = [{"rank": r.rank, "seed": r.seed, "prompt": r.prompt, "scores": dict(r.scores), "flagged": r.flagged}
              for r in sorted(results, key=lambda r: r.seed)]  # every candidate; rank 0 = not delivered
    candidates = []
    for result in sorted((r for r in results if r.rank > 0), key=lambda r: r.rank):
        entry = {"rank": result.rank, "seed": result.seed, "prompt": result.prompt, "style": result.style,
                 "scores": dict(result.scores), "width": result.image.width, "height": result.image.height}
        entry["file"] = f"rank_{result.rank:02d}.png"
        result.image.save(out_dir / entry["file"])
        if result.upscaled is not None:
            entry["upscaled_file"] = f"rank_{result.rank:02d}_x{config.upscale}.png"
            result.upscaled.save(out_dir / entry["upscaled_file"])
        candidates.append(entry)
    report = {
        "preset": preset.name,
        "device": device,
        "style": config.style,
        "photos": [r.to_dict() for r in dataset.report],
        "class_token": dataset.class_token,
        "class_scores": dict(dataset.class_scores),
        "checks": dict(dataset.checks),
        "training": {"steps": trained.steps, **_to_jsonable(trained.metrics)},
        "candidates": candidates,
        "all_candidates": scored,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    timer.mark("delivering", start, time.perf_counter())
    report["timings_s"] = timer.durations()
    return report


def _to_jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))
