"""Style packs: versioned YAML files shipped in ``pipelines/styles/``.

A pack names prompt templates (with ``{instance}`` and ``{class}`` placeholders), a
negative prompt, sampler settings, an aspect ratio and optionally a ControlNet
template image. This module never imports torch: the API lists packs through it.

One pack serves every model family: :meth:`StylePack.for_family` applies the family's defaults
(``styles/families/<family>.yaml``: steps, guidance for every pack) and then the pack's own
``families: {<family>: ...}`` block. The size of an aspect comes from the family description
(``pipelines.models.family``), not from the pack.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import InvalidConfig

STYLES_DIR = Path(__file__).resolve().parent.parent / "styles"
TEMPLATES_DIR = STYLES_DIR / "templates"
FAMILY_DEFAULTS_DIR = STYLES_DIR / "families"
ASPECTS = ("1:1", "9:16", "4:5")
CONTROLNET_KINDS = ("pose", "depth")
PLACEHOLDERS = frozenset({"instance", "class"})


class StyleControlNet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    template: str  # file name under pipelines/styles/templates/
    scale: float = Field(1.0, ge=0.0, le=2.0)


class StyleDefaults(BaseModel):
    """Sampler settings that differ on one model family (unset: the pack's own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = None


class StylePack(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int
    title: str
    description: str = ""
    prompts: tuple[str, ...] = Field(min_length=1)
    negative_prompt: str = ""
    guidance_scale: float = 7.0
    steps: int = 25
    aspect: str = "1:1"
    controlnet: StyleControlNet | None = None
    portrait: bool = True  # a face fills the frame: face refinement is on by default ("auto")
    families: dict[str, StyleDefaults] = Field(default_factory=dict)  # per model family ("sdxl": ...)

    @field_validator("prompts")
    @classmethod
    def _prompts_use_placeholders(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        for prompt in prompts:
            fields = placeholders(prompt)
            if "instance" not in fields or not fields <= PLACEHOLDERS:
                raise ValueError(f"prompt {prompt!r} must use {{instance}} and only {{instance}}/{{class}}")
        return prompts

    @field_validator("aspect")
    @classmethod
    def _known_aspect(cls, aspect: str) -> str:
        if aspect not in ASPECTS:
            raise ValueError(f"aspect {aspect!r} not in {ASPECTS}")
        return aspect

    def prompt_for(self, index: int) -> str:
        """Candidate ``index`` cycles through the pack's prompt variations."""
        return self.prompts[index % len(self.prompts)]

    def for_family(self, family: str) -> StylePack:
        """This pack as it runs on model family ``family``: the family's defaults, then the pack's own."""
        changes: dict[str, object] = {}
        for layer in (family_defaults(family), self.families.get(family)):
            if layer is not None:
                changes |= layer.model_dump(exclude_none=True)
        return self.model_copy(update=changes) if changes else self


def placeholders(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def fill_prompt(template: str, instance: str, class_word: str) -> str:
    """``template`` with its placeholders filled; collapses the double space an empty token leaves."""
    text = template.replace("{instance}", instance).replace("{class}", class_word)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _load_all() -> dict[str, StylePack]:
    packs: dict[str, StylePack] = {}
    for path in sorted(STYLES_DIR.glob("*.yaml")):
        pack = StylePack.model_validate(yaml.safe_load(path.read_text()))
        if pack.name != path.stem:
            raise ValueError(f"style file {path.name} declares name {pack.name!r}")
        packs[pack.name] = pack
    return packs


@functools.cache
def family_defaults(family: str) -> StyleDefaults | None:
    """Every pack's settings on ``family`` (``styles/families/<family>.yaml``); None: the packs' own."""
    path = FAMILY_DEFAULTS_DIR / f"{family}.yaml"
    if not path.is_file():
        return None
    return StyleDefaults.model_validate(yaml.safe_load(path.read_text()))


def list_styles() -> list[StylePack]:
    return list(_load_all().values())


def get_style(name: str) -> StylePack:
    try:
        return _load_all()[name]
    except KeyError:
        raise InvalidConfig(
            f"unknown style {name!r}", {"style": name, "known": sorted(_load_all())}, code="unknown_style"
        ) from None


def template_path(name: str) -> Path:
    """The shipped template image ``name``; refuses anything outside the templates folder."""
    path = (TEMPLATES_DIR / name).resolve()
    if path.parent != TEMPLATES_DIR or not path.is_file():
        known = sorted(p.name for p in TEMPLATES_DIR.iterdir() if p.is_file())
        raise InvalidConfig(
            f"unknown template image {name!r}", {"template": name, "known": known}, code="unknown_template"
        )
    return path
