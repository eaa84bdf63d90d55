"""Generation: style packs, the generation spec, the warm engine, ranking and upscaling glue.

Importing this package stays torch-free (the API uses styles and specs); the engine is
imported on first use of :class:`GenerationEngine` / :class:`Result`.
"""

from __future__ import annotations

from pipelines.generation.request import SAMPLERS, ControlNetSpec, GenerationSpec, aspect_size
from pipelines.generation.styles import StylePack, get_style, list_styles

__all__ = [
    "SAMPLERS",
    "ControlNetSpec",
    "GenerationEngine",
    "GenerationModels",
    "GenerationSpec",
    "Result",
    "StylePack",
    "aspect_size",
    "generation_models",
    "get_style",
    "list_styles",
]


def __getattr__(name: str):
    if name in ("GenerationEngine", "GenerationModels", "Result", "generation_models"):
        from pipelines.generation import engine

        return getattr(engine, name)
    raise AttributeError(name)
