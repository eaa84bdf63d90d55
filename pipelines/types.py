"""Plain data passed between pipeline stages (intake -> training -> generation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class TokenSpec:
    """The new tokens a subject's adapter adds, and the class word it pairs them with.

    Prompts read ``"<context> <instance_token> <class_token>"``; ``context_tokens`` are the
    per-photo background tokens (``<bg0>``, ``<bg1>``, ...) when captions use them.
    """

    instance_token: str
    class_token: str
    context_tokens: tuple[str, ...] = ()

    @property
    def new_tokens(self) -> tuple[str, ...]:
        return (self.instance_token, *self.context_tokens)


@dataclass(frozen=True)
class TrainingExample:
    image: Image.Image  # RGB face crop, square
    prompt: str  # full caption, e.g. "<bg3> <subj> girl"
    mask: Image.Image | None = None  # "L" person mask, same size as image (255 = person)
    photo_id: str = ""
    extra: dict = field(default_factory=dict)
