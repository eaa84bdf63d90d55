"""Generation: style packs, requests, the warm engine, ranking and upscaling glue.

Importing this package stays torch-free (the API uses styles and request checks);
the engine is imported on first use of :class:`GenerationEngine` / :class:`Result`.
"""

from __future__ import annotations

from pipelines.generation.request import (
    ControlNetSpec,
    GenerationLimits,
    GenerationRequest,
    ResolvedRequest,
    aspect_size,
    check_request,
)
from pipelines.generation.styles import StylePack, get_style, list_styles

__all__ = [
    "ControlNetSpec",
    "GenerationEngine",
    "GenerationLimits",
    "GenerationModels",
    "GenerationRequest",
    "ResolvedRequest",
    "Result",
    "StylePack",
    "aspect_size",
    "check_request",
    "generation_models",
    "get_style",
    "list_styles",
]


def __getattr__(name: str):
    if name in ("GenerationEngine", "GenerationModels", "Result", "generation_models"):
        from pipelines.generation import engine

        return getattr(engine, name)
    raise AttributeError(name)
