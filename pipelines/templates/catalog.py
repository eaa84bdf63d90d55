"""The shipped templates of template mode: photos a subject is put into, with their captions.

``library/templates.yaml`` lists them (name, version, title, file, caption, source); the
photos and ``LICENSES.md`` (where each comes from, under which licence) sit next to it. This
module never imports torch: the API lists templates and serves their thumbnails through it.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import InvalidConfig

LIBRARY_DIR = Path(__file__).resolve().parent / "library"
LICENSES_FILE = LIBRARY_DIR / "LICENSES.md"
THUMBNAIL_SIDE = 256  # long side of a thumbnail, pixels
NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class ShippedTemplate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(ge=1)
    title: str
    file: str  # file name in library/
    caption: str = Field(min_length=1, max_length=300)  # words added to "<instance> <class>," in the prompt
    source: str  # a source id of LICENSES.md
    licence: str  # short form; LICENSES.md has the details

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME.match(name):
            raise ValueError(f"template name {name!r} must be lower-case letters, digits and _")
        return name

    @property
    def path(self) -> Path:
        return LIBRARY_DIR / self.file


@functools.lru_cache(maxsize=1)
def _load_all() -> dict[str, ShippedTemplate]:
    entries = yaml.safe_load((LIBRARY_DIR / "templates.yaml").read_text())
    templates: dict[str, ShippedTemplate] = {}
    for entry in entries:
        template = ShippedTemplate.model_validate(entry)
        if template.name in templates:
            raise ValueError(f"template {template.name!r} is listed twice")
        if not template.path.is_file() or template.path.parent != LIBRARY_DIR:
            raise ValueError(f"template {template.name!r}: no file {template.file!r} in {LIBRARY_DIR}")
        templates[template.name] = template
    return templates


def list_templates() -> list[ShippedTemplate]:
    return list(_load_all().values())


def get_template(name: str) -> ShippedTemplate:
    try:
        return _load_all()[name]
    except KeyError:
        raise InvalidConfig(f"unknown template {name!r}", {"template": name, "known": sorted(_load_all())},
                            code="unknown_template") from None


def open_template(name: str):
    """The shipped template ``name`` as an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(get_template(name).path) as image:
        return image.convert("RGB")


@functools.lru_cache(maxsize=64)
def template_size(name: str) -> tuple[int, int]:
    """(width, height) of template ``name`` (read from the file's header)."""
    from PIL import Image

    with Image.open(get_template(name).path) as image:
        return image.size


@functools.lru_cache(maxsize=32)
def thumbnail_jpeg(name: str, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of template ``name`` whose long side is at most ``side`` pixels (made once per process)."""
    from PIL import Image

    image = open_template(name)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


__all__ = ["LIBRARY_DIR", "LICENSES_FILE", "ShippedTemplate", "get_template", "list_templates", "open_template",
           "template_size", "thumbnail_jpeg"]
