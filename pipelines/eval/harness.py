"""Evaluation every K training steps, and the per-run table and plot.

``make_eval_callback`` returns a :class:`~pipelines.training.TrainCallback`: at step 0,
every ``every`` steps and at the end it generates from the live pipeline and records
Image Alignment, Text Alignment, LPIPS and identity similarity in ``metrics["eval"]``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.eval.metrics import (
    IdentityScorer,
    get_lpips,
    image_alignment,
    lpips_to_references,
    text_alignment,
    without_token,
)
from pipelines.training.trainer import TrainCallback

METRICS = ("image_alignment", "text_alignment", "lpips", "identity")

# Background, style and composition changes, as in the published comparison.
TEXT_PROMPTS = (
    "a photo of {instance} {class_token} on a beach at sunset",
    "an oil painting of {instance} {class_token}",
    "a photo of {instance} {class_token} in a city street at night",
    "a watercolor portrait of {instance} {class_token} wearing a hat",
)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 50
    image_prompt: str = "a photo of {instance} {class_token}"
    text_prompts: tuple[str, ...] = TEXT_PROMPTS
    images_per_prompt: int = 2
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    resolution: int | None = None  # None -> the training resolution
    seed: int = 0
    lpips: str = "auto"  # "auto" | "none"
    identity: str = "auto"  # pipelines.vision.identity backend, "none" to skip


class Evaluator:
    """``clip``: a loaded :class:`~pipelines.models.clip.ClipEmbedder` (e.g. borrowed from the
    worker's model manager) or its path, loaded here once. ``face_embedder``/``face_detector``:
    loaded models for the identity metric, else ``config.identity`` is loaded here."""

    def __init__(self, config: EvalConfig, references: Sequence[Image.Image], clip, resolution: int,
                 device: str = "cpu", *, face_embedder=None, face_detector=None):
        from pipelines.models.clip import load_clip

        self.config = config
        self.references = [im.convert("RGB") for im in references]
        self.clip = load_clip(clip, device=device) if isinstance(clip, str) else clip
        self.reference_embeddings = self.clip.embed_images(self.references)
        self.lpips = get_lpips(config.lpips, device=device)
        self.identity = (
            IdentityScorer(self.references, config.identity, embedder=face_embedder, face_detector=face_detector)
            if config.identity != "none"
            else None
        )
        self.resolution = config.resolution or resolution

    def _generate(self, pipe, prompt: str) -> list[Image.Image]:
        c = self.config
        generators = [torch.Generator().manual_seed(c.seed + i) for i in range(c.images_per_prompt)]
        return pipe(prompt, num_images_per_prompt=c.images_per_prompt, height=self.resolution, width=self.resolution,
                    num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                    generator=generators).images

    def evaluate(self, pipe, instance_token: str, class_token: str) -> dict[str, Any]:
        c = self.config
        fill = {"instance": instance_token, "class_token": class_token}
        subject_images = self._generate(pipe, c.image_prompt.format(**fill))
        styled, texts = [], []
        for template in c.text_prompts:
            prompt = template.format(**fill)
            images = self._generate(pipe, prompt)
            styled += images
            texts += [without_token(prompt, instance_token)] * len(images)
        values = {
            "image_alignment": image_alignment(self.clip, subject_images, self.reference_embeddings),
            "text_alignment": text_alignment(self.clip, styled, texts),
            "lpips": lpips_to_references(self.lpips, subject_images, self.references),
            "identity": self.identity.similarity(subject_images) if self.identity is not None else None,
        }
        out: dict[str, Any] = {}
        for name, metric in values.items():
            out[name] = None if metric is None else metric.value
            if metric is not None and metric.value is None:
                out[f"{name}_note"] = metric.note
        return out

    def __call__(self, state) -> dict[str, Any]:
        return self.evaluate(state.pipe, state.tokens.instance_token, state.tokens.class_token)


def make_eval_callback(config: EvalConfig, references: Sequence[Image.Image], clip, resolution: int,
                       device: str = "cpu", **models):
    """``clip``: a loaded CLIP or its path; ``models``: ``face_embedder``/``face_detector`` (see Evaluator)."""
    return TrainCallback(every=config.every, fn=Evaluator(config, references, clip, resolution, device, **models))


def make_validation_callback(prompts: Sequence[str], out_dir: str | Path, every: int, resolution: int,
                             num_inference_steps: int = 25, seed: int = 0):
    """Save one image per prompt at step 0, every ``every`` steps and at the end:
    ``out_dir/step-000050/00.png``. Prompts may use ``{instance}`` and ``{class_token}``."""
    out_dir = Path(out_dir)

    def save(state) -> None:
        folder = out_dir / f"step-{state.step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        fill = {"instance": state.tokens.instance_token, "class_token": state.tokens.class_token}
        for i, template in enumerate(prompts):
            image = state.pipe(template.format(**fill), height=resolution, width=resolution,
                               num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed + i)).images[0]
            image.save(folder / f"{i:02d}.png")

    return TrainCallback(every=every, fn=save)


# ---------------------------------------------------------------------------- reports


def history_rows(run: str, history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"run": run, "step": h["step"], **{m: h.get(m) for m in METRICS}} for h in history]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(runs: dict[str, Sequence[dict[str, Any]]], out_dir: str | Path, title: str = "evaluation",
                 notes: dict[str, str] | None = None) -> dict[str, Path]:
    """Markdown table, CSV and a PNG plot (one panel per metric, one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for run, history in runs.items() for row in history_rows(run, history)]
    csv_path = out_dir / f"{title}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "step", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "| run | step | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    lines += [f"| {r['run']} | {r['step']} | " + " | ".join(_fmt(r[m]) for m in METRICS) + " |" for r in rows]
    unavailable = {m: h.get(f"{m}_note") for history in runs.values() for h in history for m in METRICS
                   if h.get(f"{m}_note")}
    if unavailable or notes:
        lines += ["", *[f"- {m}: {note}" for m, note in {**unavailable, **(notes or {})}.items()]]
    md_path = out_dir / f"{title}.md"
    md_path.write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS):
        for run, history in runs.items():
            points = [(h["step"], h[metric]) for h in history if h.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run)
        ax.set_title(metric + ("" if any(h.get(metric) is not None for hs in runs.values() for h in hs)
                               else " (not available)"))
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png_path = out_dir / f"{title}.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return {"markdown": md_path, "csv": csv_path, "plot": png_path}
