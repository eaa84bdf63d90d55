"""Template mode: the subject put into a chosen photo (a shipped template or an uploaded one).

Importing this package stays torch-free (the API lists templates and checks requests through
it); the engine and the masking are imported on first use.

* :mod:`pipelines.templates.catalog`: the shipped templates (``library/``, with ``LICENSES.md``);
* :mod:`pipelines.templates.spec`: :class:`TemplateSpec`, the resolved request;
* :mod:`pipelines.templates.masking`: judge a template, mask face and hair, crop, paste back;
* :mod:`pipelines.templates.engine`: :class:`TemplateEngine` and its model bundle.
"""

from __future__ import annotations

from pipelines.templates.catalog import ShippedTemplate, get_template, list_templates
from pipelines.templates.spec import TemplateSpec

__all__ = [
    "ShippedTemplate",
    "TemplateEngine",
    "TemplateModels",
    "TemplateSpec",
    "get_template",
    "list_templates",
    "template_models",
]


def __getattr__(name: str):
    if name in ("TemplateEngine", "TemplateModels", "template_models"):
        from pipelines.templates import engine

        return getattr(engine, name)
    raise AttributeError(name)
