"""Borrowing a loaded base pipeline for training and handing it back exactly as it was lent.

The worker keeps one base pipeline per (preset, device, dtype) and shares it between generation
and training. Training changes it in place: a tokenizer copy with the new tokens, a token
embedding wrapper, LoRA layers, attention processors, gradient checkpointing, requires_grad,
train mode, fp32 trainable weights, channels-last layouts and, in full mode, the weights
themselves. :class:`BaseSnapshot` records, before training, every object and flag that can change
(references and metadata only, no tensor copies) and puts them back afterwards:

- every submodule's attributes: its children (which removes LoRA wrappers and the token-embedding
  wrapper by putting the original layers back), parameters, buffers, hooks and flags
  (processors, gradient checkpointing, train/eval, peft bookkeeping);
- every parameter's requires_grad, dtype, device and memory layout;
- weights training changed (full mode) are read back from the base model's files on disk,
  tensor by tensor, instead of keeping a second copy in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_MISSING = object()


class BaseNotRestored(RuntimeError):
    """Putting a lent base back failed (e.g. its files could not be read): the pipeline is in an unknown
    state and its owner must discard it. The training error, if any, is chained as the cause/context."""


def _container_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return copy.copy(value)  # keeps OrderedDict and friends
    if isinstance(value, (set, list)):
        return type(value)(value)
    return None


@dataclass
class _ObjectState:
    """An object's ``__dict__``: each value by identity, containers also by (shallow) content."""

    obj: Any
    values: dict[str, tuple[Any, Any]]

    @classmethod
    def record(cls, obj: Any) -> _ObjectState:
        return cls(obj, {k: (v, _container_copy(v)) for k, v in vars(obj).items()})

    def restore(self) -> None:
        current = vars(self.obj)
        for key in [k for k in current if k not in self.values]:
            del current[key]
        for key, (value, contents) in self.values.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value
            if contents is not None and not _same_contents(value, contents):
                try:
                    value.clear()
                    value.update(contents) if isinstance(value, (dict, set)) else value.extend(contents)
                except Exception:  # noqa: BLE001  (diffusers' FrozenDict raises a bare Exception): put back a copy
                    current[key] = type(value)(contents)


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal plain values (tensors and modules compare by identity only)."""
    if a is b:
        return True
    if isinstance(a, (torch.Tensor, nn.Module)) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (arbitrary __eq__)
        return False


def _same_contents(value: Any, contents: Any) -> bool:
    if isinstance(value, dict):
        return list(value) == list(contents) and all(_same(value[k], contents[k]) for k in contents)
    if isinstance(value, set):
        return value == contents  # names (e.g. non-persistent buffer names)
    return len(value) == len(contents) and all(_same(a, b) for a, b in zip(value, contents))


@dataclass(frozen=True)
class _TensorMeta:
    requires_grad: bool
    dtype: torch.dtype
    device: torch.device
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _TensorMeta:
        return cls(tensor.requires_grad, tensor.dtype, tensor.device, tensor.stride())

    def matches(self, tensor: torch.Tensor) -> bool:
        return tensor.dtype == self.dtype and tensor.device == self.device and tensor.stride() == self.stride

    def like(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` in this tensor's dtype, device and memory layout (``values`` itself when it already
        is: weights read from the files then sit in memory exactly as ``from_pretrained`` left them, and
        CPU kernels, whose rounding can depend on a buffer's alignment, compute as before)."""
        if self.matches(values):
            return values
        out = torch.empty_strided(values.shape, self.stride, dtype=self.dtype, device=self.device)
        out.copy_(values)
        return out


class BaseSnapshot:
    """Everything training may change on a lent pipeline; :meth:`restore` puts it back."""

    def __init__(self, pipe, components: Mapping[str, nn.Module], objects: list[_ObjectState],
                 params: dict[str, list[tuple[str, nn.Parameter, _TensorMeta]]], grad_enabled: dict[str, bool]):
        self.pipe = pipe
        self.components = dict(components)
        self._objects = objects
        self._params = params
        self._flags = grad_enabled

    @classmethod
    def record(cls, pipe) -> BaseSnapshot:
        from peft.tuners.tuners_utils import BaseTunerLayer

        components = {n: c for n, c in pipe.components.items() if isinstance(c, nn.Module)}
        objects = [_ObjectState.record(pipe)]
        objects += [_ObjectState.record(c) for n, c in pipe.components.items()  # scheduler, tokenizer
                    if c is not None and n not in components and hasattr(c, "__dict__")]
        params: dict[str, list[tuple[str, nn.Parameter, _TensorMeta]]] = {}
        for name, module in components.items():
            if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
                raise ValueError(f"the lent base pipeline's {name} carries adapter layers; detach them before training")
            objects += [_ObjectState.record(m) for m in module.modules()]
            params[name] = [(n, p, _TensorMeta.of(p)) for n, p in module.named_parameters()]
        flags = {"cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn_tf32": torch.backends.cudnn.allow_tf32}
        return cls(pipe, components, objects, params, flags)

    def restore(self, reload: Mapping[str, Iterable[str]] | None = None, weights: BaseWeights | None = None) -> None:
        """Put the pipeline back. ``reload`` names, per component, the parameters whose values training
        changed; they are read from ``weights`` (the base model's files) in their original dtype and layout."""
        for state in self._objects:
            state.restore()
        torch.backends.cuda.matmul.allow_tf32 = self._flags["cuda_matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = self._flags["cudnn_tf32"]
        reloaded: set[int] = set()
        for component, names in (reload or {}).items():
            names = set(names)
            if not names:
                continue
            if weights is None:
                raise ValueError("restoring changed weights needs the base model's files")
            records = {n: (p, meta) for n, p, meta in self._params[component] if n in names}
            for name, values in weights.tensors(component, records):
                param, meta = records[name]
                param.data = meta.like(values)
                reloaded.add(id(param))
        for records in self._params.values():
            for _, param, meta in records:
                if id(param) not in reloaded and not meta.matches(param):
                    param.data = meta.like(param.data)  # a layout or dtype change without new values (channels-last)
                param.requires_grad_(meta.requires_grad)
                param.grad = None


class BaseWeights:
    """A base model's component weights on disk (a diffusers folder, or the local Hub cache), read
    one tensor at a time."""

    def __init__(self, base_model: str, revision: str | None = None):
        self.base_model = base_model
        self.revision = revision

    def folder(self, component: str) -> Path:
        path = Path(self.base_model).expanduser()
        if path.is_dir():
            return path / component
        from huggingface_hub import snapshot_download

        root = snapshot_download(self.base_model, revision=self.revision, local_files_only=True,
                                 allow_patterns=[f"{component}/*"])
        return Path(root) / component

    def files(self, component: str) -> list[Path]:
        """The weight files ``from_pretrained`` reads (no variant): safetensors, sharded or not, else .bin."""
        import json

        folder = self.folder(component)
        for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
            for suffix in (".safetensors", ".bin"):
                index = folder / f"{stem}{suffix}.index.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    return [folder / shard for shard in shards]
                single = folder / f"{stem}{suffix}"
                if single.is_file():
                    return [single]
        raise FileNotFoundError(f"no weight files for {component!r} under {folder}")

    def tensors(self, component: str, names: Iterable[str]):
        """Yield ``(name, tensor)`` for each of ``names`` (CPU tensors as stored); raises if any is missing."""
        wanted = set(names)
        for path in self.files(component):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in wanted.intersection(f.keys()):
                        yield key, f.get_tensor(key)
                        wanted.discard(key)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for key in wanted.intersection(state):
                    yield key, state[key]
                    wanted.discard(key)
        if wanted:
            raise KeyError(f"{component}: {len(wanted)} weights not found in the base model's files, "
                           f"e.g. {sorted(wanted)[:3]}")
