"""What a pipeline stage needs loaded, described as data: keys and loaders, never caches.

Pipelines do not keep models. Every loadable component has a loader and a spec function
next to its class (``clip_spec``, ``base_spec``, ``face_detector_spec``, ...). A
:class:`ModelSpec` is a key, ``(what, source, device, dtype)``, and a zero-argument loader.
A :class:`BundleSpec` names the parts one pipeline function takes and assembles the
loaded parts into its typed bundle (``IntakeModels``, ``RankingModels``,
``GenerationModels``).

Two ways to turn specs into models:

* CLI, tests, benchmarks: ``spec.load()`` loads every part now (each key once per call).
* The worker: ``manager.borrow(spec)`` (:mod:`worker.models`) loads each key once per
  process, shares it between every bundle naming the same key (the CLIP that picks the
  class word at intake is the object that ranks candidates) and locks it for the job.

Nothing here imports torch: the API and the worker's manager read keys without the ML stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")

#: dtype slot of a key for models that are not torch modules (MediaPipe graphs, dlib)
NO_DTYPE = "-"


class ModelKey(NamedTuple):
    what: str  # the kind of model: "base", "clip", "aesthetic", "face_detector", "controlnet:pose", ...
    source: str  # its weights (hub id or path, "@revision" appended) or, for bundled detectors, the backend
    device: str  # "cpu", "cuda", "cuda:1": as the worker resolved it
    dtype: str  # "float32", "bfloat16", ...; "-" when not a torch model

    def __str__(self) -> str:
        return f"{self.what}[{self.source}]@{self.device}/{self.dtype}"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; None -> ``"-"``."""
    if dtype is None:
        return NO_DTYPE
    return str(dtype).removeprefix("torch.")


def device_name(device: Any) -> str:
    return str(device)


@dataclass(frozen=True)
class ModelSpec:
    """One loadable model: its key and how to load it (nothing is loaded until ``load()``)."""

    key: ModelKey
    loader: Callable[[], Any] = field(compare=False, repr=False)

    @classmethod
    def of(cls, what: str, source: str, device: Any, dtype: Any, loader: Callable[[], Any]) -> ModelSpec:
        return cls(ModelKey(what, str(source), device_name(device), dtype_name(dtype)), loader)

    def load(self) -> Any:
        return self.loader()

    def specs(self) -> list[ModelSpec]:
        return [self]

    def assemble(self, get: Callable[[ModelSpec], Any]) -> Any:
        return get(self)


@dataclass(frozen=True)
class BundleSpec(Generic[T]):
    """Named parts (model specs or nested bundles) and the function that assembles them.

    ``build`` receives ``{name: loaded part}`` and returns the bundle a pipeline takes; it
    must not load anything itself.
    """

    parts: Mapping[str, ModelSpec | BundleSpec | None]
    build: Callable[[dict[str, Any]], T] = field(compare=False, repr=False)

    def specs(self) -> list[ModelSpec]:
        """Every model spec inside, once per key, in key order (the order a borrower locks them)."""
        unique: dict[ModelKey, ModelSpec] = {}
        for part in self.parts.values():
            if part is not None:
                for spec in part.specs():
                    unique.setdefault(spec.key, spec)
        return [unique[key] for key in sorted(unique)]

    def assemble(self, get: Callable[[ModelSpec], Any]) -> T:
        """The bundle, with each model spec turned into a model by ``get``."""
        return self.build({name: None if part is None else part.assemble(get) for name, part in self.parts.items()})

    def load(self) -> T:
        """Load every part now (no cache beyond this call): for the CLI, tests and benchmarks."""
        loaded: dict[ModelKey, Any] = {}

        def get(spec: ModelSpec) -> Any:
            if spec.key not in loaded:
                loaded[spec.key] = spec.load()
            return loaded[spec.key]

        return self.assemble(get)


__all__ = ["NO_DTYPE", "BundleSpec", "ModelKey", "ModelSpec", "device_name", "dtype_name"]
