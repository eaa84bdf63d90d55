"""The per-subject adapter artifact and the verbs that put it on a warm pipeline.

An adapter folder holds safetensors only, in layouts other tools already read:

    manifest.json                      what this is (AdapterManifest)
    pytorch_lora_weights.safetensors   LoRA mode: U-Net and text-encoder LoRA, diffusers keys
                                       (``pipe.load_lora_weights(folder)``)
    tokens/<i>.safetensors             one learned embedding per new token, ``{token: vector}``
                                       (``pipe.load_textual_inversion(file, token=token)``)
    unet/, text_encoder/               full mode: only the components training changed,
                                       diffusers format; the text encoder keeps the base vocabulary
                                       (new tokens live in ``tokens/`` in both modes)

The warm generation worker keeps one base pipeline loaded and lends it to many subjects:
``attach_adapter`` adds a subject's tokens, LoRA (under its own adapter name) or swapped
components; ``detach_adapter`` puts the base back bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import InvalidConfig, ModelNotFound

FORMAT = "likeness-adapter"
VERSION = 1
MANIFEST_NAME = "manifest.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TOKENS_DIR = "tokens"
FULL_COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class LoraSpec:
    unet_rank: int = 16
    text_encoder_rank: int = 8
    alpha: float | None = None  # None -> alpha == rank (scale 1.0)
    unet_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def peft_kwargs(self, component: str) -> dict[str, Any]:
        """LoraConfig keyword arguments for ``unet`` or ``text_encoder`` (JSON-serialisable)."""
        rank = self.unet_rank if component == "unet" else self.text_encoder_rank
        targets = self.unet_target_modules if component == "unet" else self.text_encoder_target_modules
        return {
            "r": rank,
            "lora_alpha": float(self.alpha if self.alpha is not None else rank),
            "target_modules": list(targets),
            "lora_dropout": 0.0,
            "bias": "none",
        }


@dataclass(frozen=True)
class AdapterManifest:
    mode: str  # "lora" | "full"
    base_model: str  # the hub id, or the preset's name for a locally built base (never a path)
    instance_token: str
    class_token: str
    tokens: tuple[str, ...]  # every added token, in the order they were added
    base_revision: str | None = None
    lora: LoraSpec | None = None
    training_config: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    components: tuple[str, ...] = ()  # full mode: the saved components; lora mode: those with LoRA
    format: str = FORMAT
    version: int = VERSION
    preset: str | None = None  # the model preset trained on (tiny, sd15)

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise InvalidConfig(f"adapter mode must be 'lora' or 'full', not {self.mode!r}")
        if self.instance_token not in self.tokens:
            raise InvalidConfig("the instance token must be one of the adapter's tokens",
                                {"instance_token": self.instance_token, "tokens": list(self.tokens)})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        data["components"] = list(self.components)
        data["training_config"] = dict(self.training_config)
        data["metrics"] = dict(self.metrics)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterManifest:
        data = dict(data)
        if data.get("format") != FORMAT:
            raise InvalidConfig(f"not a {FORMAT} manifest (format={data.get('format')!r})")
        if int(data.get("version", 0)) > VERSION:
            raise InvalidConfig(f"adapter format version {data['version']} is newer than this code ({VERSION})")
        lora = data.get("lora")
        if lora is not None:
            lora = LoraSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()})
        return cls(**{**data, "lora": lora, "tokens": tuple(data["tokens"]),
                      "components": tuple(data.get("components", ()))})

    @classmethod
    def from_json(cls, text: str) -> AdapterManifest:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------- saving


def save_adapter(
    folder: str | Path,
    manifest: AdapterManifest,
    *,
    unet_lora: Mapping[str, torch.Tensor] | None = None,
    text_encoder_lora: Mapping[str, torch.Tensor] | None = None,
    token_embeddings: Mapping[str, torch.Tensor],
    full_components: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write an adapter folder. LoRA dicts are peft state dicts (``get_peft_model_state_dict``).

    ``full_components`` maps ``unet``/``text_encoder`` to changed modules; a text encoder
    must carry the base vocabulary only (the new tokens travel in ``token_embeddings``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    full_components = dict(full_components or {})
    if not (unet_lora or text_encoder_lora or token_embeddings or full_components):
        raise InvalidConfig("refusing to save an adapter with no weights")
    if set(token_embeddings) != set(manifest.tokens):
        raise InvalidConfig("token embeddings must cover exactly the manifest's tokens",
                            {"tokens": list(manifest.tokens), "embeddings": list(token_embeddings)})
    if unknown := set(full_components) - set(FULL_COMPONENTS):
        raise InvalidConfig(f"cannot save components {sorted(unknown)}", {"known": list(FULL_COMPONENTS)})
    folder.mkdir(parents=True, exist_ok=True)

    if unet_lora or text_encoder_lora:
        _save_lora(folder, manifest.lora or LoraSpec(), unet_lora, text_encoder_lora)
    (folder / TOKENS_DIR).mkdir(exist_ok=True)
    for index, token in enumerate(manifest.tokens):
        vector = token_embeddings[token].detach().float().reshape(-1).contiguous().cpu()
        save_file({token: vector}, str(folder / TOKENS_DIR / f"{index}.safetensors"))
    for name, module in full_components.items():
        module.save_pretrained(str(folder / name), safe_serialization=True)

    components = tuple(full_components) if full_components else tuple(
        name for name, sd in (("unet", unet_lora), ("text_encoder", text_encoder_lora)) if sd
    )
    manifest = _replace(manifest, components=components)
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return folder


def _save_lora(folder: Path, spec: LoraSpec, unet_lora, text_encoder_lora) -> None:
    from diffusers import StableDiffusionPipeline

    # The SD loader mixin only packs prefixes and metadata; SDXL would add text_encoder_2.
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=_cpu_contiguous(unet_lora) if unet_lora else None,
        text_encoder_lora_layers=_cpu_contiguous(text_encoder_lora) if text_encoder_lora else None,
        safe_serialization=True,
        unet_lora_adapter_metadata=spec.peft_kwargs("unet") if unet_lora else None,
        text_encoder_lora_adapter_metadata=spec.peft_kwargs("text_encoder") if text_encoder_lora else None,
    )


def _cpu_contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _replace(manifest: AdapterManifest, **changes) -> AdapterManifest:
    from dataclasses import replace

    return replace(manifest, **changes)


# ---------------------------------------------------------------------------- loading


def load_manifest(folder: str | Path) -> AdapterManifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ModelNotFound(f"no adapter manifest at {path}", {"folder": str(folder)})
    return AdapterManifest.from_json(path.read_text())


def load_token_embeddings(folder: str | Path, manifest: AdapterManifest | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = manifest or load_manifest(folder)
    embeddings = {}
    for index, token in enumerate(manifest.tokens):
        state = load_file(str(folder / TOKENS_DIR / f"{index}.safetensors"))
        embeddings[token] = state[token]
    return embeddings


def token_embedding_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files, tokens) for ``pipe.load_textual_inversion(files, token=tokens)``."""
    manifest = load_manifest(folder)
    files = [str(Path(folder) / TOKENS_DIR / f"{i}.safetensors") for i in range(len(manifest.tokens))]
    return files, list(manifest.tokens)


def add_token_rows(tokenizer, text_encoder: nn.Module, rows: Mapping[str, torch.Tensor]):
    """Return a copy of ``tokenizer`` with ``rows``' tokens added, and give ``text_encoder``
    a new, larger embedding module holding those rows; the old module object is untouched
    (``text_encoder.set_input_embeddings(old)`` undoes this exactly).

    Returns ``(tokenizer, token_ids, old_embedding)``.
    """
    tokens = list(rows)
    clashes = [t for t in tokens if t in tokenizer.get_vocab()]
    if clashes:
        raise InvalidConfig(f"tokens already in the vocabulary: {clashes}", {"tokens": clashes})
    new_tokenizer = copy.deepcopy(tokenizer)
    new_tokenizer.add_tokens(tokens)
    ids = new_tokenizer.convert_tokens_to_ids(tokens)
    old = text_encoder.get_input_embeddings()
    size = max(old.num_embeddings, max(ids) + 1)
    new = nn.Embedding(size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    new.requires_grad_(old.weight.requires_grad)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        for token_id, token in zip(ids, tokens):
            vector = rows[token].reshape(-1)
            if vector.numel() != old.embedding_dim:
                raise InvalidConfig(f"embedding for {token!r} has {vector.numel()} values; the text encoder "
                                    f"expects {old.embedding_dim}")
            new.weight[token_id] = vector.to(new.weight.device, new.weight.dtype)
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = size
    return new_tokenizer, ids, old


# ---------------------------------------------------------------------------- attach / detach


@dataclass
class AttachedAdapter:
    folder: Path
    manifest: AdapterManifest
    adapter_name: str
    token_ids: list[int]
    lora_components: tuple[str, ...]
    # What attach replaced, to put back on detach.
    _tokenizer: Any = None
    _text_encoder: nn.Module | None = None
    _embedding: nn.Module | None = None
    _vocab_size: int = 0
    _swapped: dict[str, nn.Module] = field(default_factory=dict)
    detached: bool = False


def _default_adapter_name(folder: Path) -> str:
    return "subject_" + re.sub(r"\W", "_", folder.resolve().name)


def attach_adapter(pipe, folder: str | Path, adapter_name: str | None = None) -> AttachedAdapter:
    """Put a subject's adapter on ``pipe`` (tokens, then LoRA or full-mode components)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    adapter_name = adapter_name or _default_adapter_name(folder)
    attached = AttachedAdapter(folder, manifest, adapter_name, token_ids=[], lora_components=())

    # 1. Full mode: swap in the changed components (originals kept for detach).
    if manifest.mode == "full":
        for name in manifest.components:
            original = getattr(pipe, name)
            replacement = _load_component(type(original), folder / name, original)
            attached._swapped[name] = original
            setattr(pipe, name, replacement)

    # 2. Tokens: a private tokenizer copy and a larger embedding module on the current text encoder.
    try:
        rows = load_token_embeddings(folder, manifest)
        text_encoder = pipe.text_encoder
        attached._tokenizer = pipe.tokenizer
        attached._text_encoder = text_encoder
        attached._vocab_size = text_encoder.config.vocab_size
        tokenizer, attached.token_ids, attached._embedding = add_token_rows(pipe.tokenizer, text_encoder, rows)
        pipe.tokenizer = tokenizer

        # 3. LoRA under a per-subject adapter name, made the only active one.
        if manifest.mode == "lora" and (folder / LORA_WEIGHTS_NAME).is_file():
            pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
            attached.lora_components = manifest.components
            pipe.set_adapters([adapter_name])
    except BaseException:
        _undo(pipe, attached)
        raise
    return attached


def _load_component(cls, path: Path, like: nn.Module) -> nn.Module:
    module = cls.from_pretrained(str(path), torch_dtype=next(like.parameters()).dtype)
    return module.to(next(like.parameters()).device).eval()


def detach_adapter(pipe, attached: AttachedAdapter) -> None:
    """Undo ``attach_adapter``: the pipe is bit-for-bit the base again."""
    if attached.detached:
        return
    _undo(pipe, attached)


def _undo(pipe, attached: AttachedAdapter) -> None:
    if attached.lora_components:
        pipe.delete_adapters([attached.adapter_name])
        if not _remaining_lora_adapters(pipe):
            pipe.unload_lora_weights()  # removes the peft wrapper layers themselves
    if attached._embedding is not None:
        attached._text_encoder.set_input_embeddings(attached._embedding)
        attached._text_encoder.config.vocab_size = attached._vocab_size
    if attached._tokenizer is not None:
        pipe.tokenizer = attached._tokenizer
    for name, original in attached._swapped.items():
        setattr(pipe, name, original)
    attached.detached = True


def _remaining_lora_adapters(pipe) -> bool:
    try:
        return any(pipe.get_list_adapters().values())
    except (ValueError, AttributeError):
        return False


@contextlib.contextmanager
def adapter_attached(pipe, folder: str | Path, adapter_name: str | None = None) -> Iterator[AttachedAdapter]:
    attached = attach_adapter(pipe, folder, adapter_name)
    try:
        yield attached
    finally:
        detach_adapter(pipe, attached)


# ---------------------------------------------------------------------------- kohya export


def export_kohya(folder: str | Path, out_file: str | Path) -> Path:
    """Write the LoRA in kohya/A1111 naming (``lora_unet_*``/``lora_te_*`` with
    ``.lora_down``/``.lora_up``/``.alpha``); the learned tokens go next to it as
    A1111 embeddings (``<stem>.<i>.safetensors`` with ``emb_params``).

    Keys come from diffusers' ``convert_state_dict_to_kohya``; three things it leaves to the caller:
    A1111 names CLIP layers from ``CLIPTextModel``'s root (``text_model.``, which diffusers' LoRA
    files leave out), SD 1.x names its one text encoder ``lora_te_`` (``lora_te1_`` is SDXL's
    first), and the alpha it writes is the rank (scale 1) where the adapter's may differ."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    folder, out_file = Path(folder), Path(out_file)
    manifest = load_manifest(folder)
    lora_file = folder / LORA_WEIGHTS_NAME
    if manifest.mode != "lora" or not lora_file.is_file():
        raise InvalidConfig("only LoRA-mode adapters with LoRA weights can be exported to kohya format",
                            {"mode": manifest.mode})
    spec = manifest.lora or LoraSpec()
    kohya: dict[str, torch.Tensor] = {}
    state = {("text_encoder.text_model." + k[len("text_encoder."):]
              if k.startswith("text_encoder.") and not k.startswith("text_encoder.text_model.") else k): v
             for k, v in load_file(str(lora_file)).items()}
    for key, value in convert_state_dict_to_kohya(state).items():
        if key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]
        if key.endswith(".alpha"):
            value = torch.tensor(float(spec.alpha if spec.alpha is not None else int(value)))
        kohya[key] = value.contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out_file), metadata={"ss_network_module": "networks.lora",
                                             "likeness_tokens": json.dumps(list(manifest.tokens))})
    for index, (token, vector) in enumerate(load_token_embeddings(folder, manifest).items()):
        save_file({"emb_params": vector.reshape(1, -1).contiguous()},
                  str(out_file.with_name(f"{out_file.stem}.{index}.safetensors")), metadata={"token": token})
    return out_file
