"""Keep the training snapshot that looks most like the person.

A training run keeps a few adapter snapshots (:func:`snapshot_steps`: by default at 40, 60 and
80 % of the steps; the finished adapter is the 100 % one). Afterwards each snapshot, attached in
turn to the already-loaded base pipeline, renders a small fixed validation set (the same seeds
for every snapshot: a plain prompt and one styled prompt, few denoising steps), which is scored

* by **identity**: face-embedding similarity of the plain images to the accepted photos
  (:class:`pipelines.eval.metrics.IdentityScorer`), and
* by **text alignment**: CLIP similarity of the styled images to their prompt without the
  subject's token (:func:`pipelines.eval.metrics.text_alignment`); it drops when a model
  overfits and draws the training photos whatever the prompt says.

:func:`select_snapshot` then picks one (its docstring states the rule). Everything here
that decides is pure; rendering and scoring take loaded models, nothing is loaded here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.progress import raise_if_canceled

#: when the snapshots are taken, as fractions of the run's steps (1.0: the finished adapter)
SNAPSHOT_FRACTIONS: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0)
#: a snapshot whose text alignment is below this fraction of the best one so far is overfit
TEXT_ALIGNMENT_FLOOR = 0.9


def snapshot_steps(total_steps: int, fractions: Sequence[float] = SNAPSHOT_FRACTIONS) -> list[int]:
    """The steps (ascending, distinct, 1..total) at which snapshots are kept; ``total_steps`` is always one."""
    steps = {min(max(math.ceil(f * total_steps - 1e-9), 1), total_steps) for f in fractions if 0 < f <= 1}
    return sorted(steps | {total_steps})


@dataclass(frozen=True)
class SnapshotScore:
    """One snapshot's validation scores; None: not measurable (no face found, no embedder installed)."""

    step: int
    identity: float | None
    text_alignment: float | None


def select_snapshot(scores: Sequence[SnapshotScore], floor: float = TEXT_ALIGNMENT_FLOOR) -> int:
    """The step of the snapshot to keep: **the most identity before text alignment falls below
    ``floor`` times its best**.

    1. Walk the snapshots in step order, keeping the best text alignment seen so far. The first
       snapshot whose text alignment is below ``floor`` x that best is *overfit*: it and every
       later snapshot are out (a model that no longer follows the prompt does not come back by
       training longer). The first snapshot is never out, so some snapshot always remains.
    2. Of the remaining ones, keep the highest identity; on a tie, the earlier step (as like the
       person, less trained, less overfit).
    3. When no remaining snapshot has an identity score, keep the last remaining one (the
       furthest training got before overfitting; with every score missing, the finished adapter).

    A missing text alignment never marks a snapshot overfit.
    """
    if not scores:
        raise ValueError("no snapshots to select from")
    ordered = sorted(scores, key=lambda s: s.step)
    kept: list[SnapshotScore] = []
    best_text: float | None = None
    for score in ordered:
        text = score.text_alignment
        if text is not None and best_text is not None and text < floor * best_text:
            break
        if text is not None:
            best_text = text if best_text is None else max(best_text, text)
        kept.append(score)
    measured = [s for s in kept if s.identity is not None]
    if not measured:
        return kept[-1].step
    return max(measured, key=lambda s: (s.identity, -s.step)).step


# ---------------------------------------------------------------------------- validation set


@dataclass(frozen=True)
class ValidationSet:
    """What every snapshot renders: the same prompts and seeds, few steps."""

    plain_prompt: str = "a photo of {instance} {class_token}"
    styled_prompt: str = "an oil painting of {instance} {class_token} in a garden"
    seeds: tuple[int, ...] = (0, 1)
    num_inference_steps: int = 12
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the preset's training resolution


#: denoising steps of the validation set per preset: the random-weight presets render noise whatever
#: the step count, so 2 keep their runs (and the tests) quick while every piece still runs
VALIDATION_STEPS = {"tiny": 2, "tiny-sdxl": 2}


def validation_set(preset_name: str) -> ValidationSet:
    return ValidationSet(num_inference_steps=VALIDATION_STEPS.get(preset_name, ValidationSet.num_inference_steps))


@dataclass
class Validation:
    """The rendered images of one snapshot."""

    step: int
    plain: list = field(default_factory=list)  # PIL images, one per seed
    styled: list = field(default_factory=list)


PreviewFn = Callable[[int, object], None]  # (step, PIL image)


def render_validation(pipe, instance_token: str, class_token: str, config: ValidationSet, resolution: int,
                      step: int) -> Validation:
    """The validation images of whatever adapter is attached to ``pipe`` now."""
    import torch

    fill = {"instance": instance_token, "class_token": class_token}
    side = config.resolution or resolution
    out = Validation(step)
    for prompt, images in ((config.plain_prompt, out.plain), (config.styled_prompt, out.styled)):
        generators = [torch.Generator().manual_seed(seed) for seed in config.seeds]
        images += pipe(prompt.format(**fill), num_images_per_prompt=len(config.seeds), height=side, width=side,
                       num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                       generator=generators).images
    return out


def score_validation(validation: Validation, identity, clip, styled_text: str) -> SnapshotScore:
    """``identity``: an :class:`~pipelines.eval.metrics.IdentityScorer` over the accepted photos;
    ``clip``: a loaded CLIP embedder; ``styled_text``: the styled prompt without the subject's token."""
    from pipelines.eval.metrics import text_alignment

    likeness = identity.similarity(validation.plain).value
    text = text_alignment(clip, validation.styled, [styled_text] * len(validation.styled)).value
    return SnapshotScore(validation.step, likeness, text)


def validate_snapshots(pipe, snapshots: Sequence[tuple[int, Path]], instance_token: str, class_token: str,
                       identity, clip, resolution: int, config: ValidationSet = ValidationSet(), *,
                       on_validated: Callable[[Validation], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> list[SnapshotScore]:
    """Attach each ``(step, adapter folder)`` to ``pipe`` in turn (detached again, whatever happens),
    render the validation set and score it; ``on_validated`` gets each snapshot's images as soon as
    they exist (the previews a client sees while the job runs)."""
    from pipelines.adapters import adapter_attached
    from pipelines.eval.metrics import without_token
    styled_text = without_token(config.styled_prompt.format(instance=instance_token, class_token=class_token),
                                instance_token)
    scores = []
    for step, folder in snapshots:
        raise_if_canceled(should_stop)
        with adapter_attached(pipe, folder, adapter_name=f"validation_{step}"):
            validation = render_validation(pipe, instance_token, class_token, config, resolution, step)
        if on_validated is not None:
            on_validated(validation)
        scores.append(score_validation(validation, identity, clip, styled_text))
    return scores
