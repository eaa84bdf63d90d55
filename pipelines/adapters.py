"""The per-subject adapter artifact and the verbs that put it on a warm pipeline.

An adapter folder holds safetensors only, in layouts other tools already read:

    manifest.json                      what this is (AdapterManifest), with its model family and preset
    pytorch_lora_weights.safetensors   LoRA mode: U-Net and text-encoder LoRA, diffusers keys
                                       (``pipe.load_lora_weights(folder)``, SD 1.5 and SDXL pipelines)
    tokens/<i>.safetensors             one learned embedding per new token: ``{token: vector}`` for a
                                       family with one text encoder (``pipe.load_textual_inversion(file,
                                       token=token)``); one vector per encoder under its A1111 name
                                       otherwise (SDXL: ``clip_l``, ``clip_g``; load each with
                                       ``load_textual_inversion(t, token=..., text_encoder=...,
                                       tokenizer=...)``)
    unet/, text_encoder*/              full mode: only the components training changed,
                                       diffusers format; text encoders keep the base vocabulary
                                       (new tokens live in ``tokens/`` in both modes)

The warm generation worker keeps one base pipeline loaded and lends it to many subjects:
``attach_adapter`` adds a subject's tokens (to each of its family's text encoders), LoRA (under
its own adapter name) or swapped components; ``detach_adapter`` puts the base back bit for bit.

What differs between families (encoder names, A1111 key prefixes and embedding names, the
pipeline class that packs LoRA files) is read from :mod:`pipelines.models.family`.
"""

from __future__ import annotations

import contextlib
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
from pipelines.models.family import ModelFamily, get_family
from pipelines.text.added_tokens import with_added_tokens

FORMAT = "likeness-adapter"
VERSION = 1
MANIFEST_NAME = "manifest.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TOKENS_DIR = "tokens"
KOHYA_EMBEDDINGS_DIR = "embeddings"
KOHYA_README_NAME = "HOW-TO-PROMPT.txt"


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
    family: str = "sd15"  # the model family trained on (pipelines.models.family); older adapters: sd15
    preset: str | None = None  # the model preset trained on; generation uses the same
    base_revision: str | None = None
    lora: LoraSpec | None = None
    training_config: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    components: tuple[str, ...] = ()  # full mode: the saved components; lora mode: those with LoRA
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self):
        get_family(self.family)  # raises InvalidConfig for an unknown family
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

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)


TokenRows = Mapping[str, torch.Tensor]  # text encoder name -> one token's vector in that encoder


# ---------------------------------------------------------------------------- saving


def save_adapter(
    folder: str | Path,
    manifest: AdapterManifest,
    *,
    unet_lora: Mapping[str, torch.Tensor] | None = None,
    text_encoder_lora: Mapping[str, torch.Tensor] | Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    token_embeddings: Mapping[str, torch.Tensor | TokenRows],
    full_components: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write an adapter folder. LoRA dicts are peft state dicts (``get_peft_model_state_dict``).

    ``text_encoder_lora``: ``{encoder name: state dict}`` (a bare state dict is the first encoder's).
    ``token_embeddings``: ``{token: {encoder name: vector}}`` (a bare vector: the first encoder's).
    ``full_components`` maps ``unet`` or a text encoder's name to a changed module; a text encoder
    must carry the base vocabulary only (the new tokens travel in ``token_embeddings``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    family = manifest.model_family
    full_components = dict(full_components or {})
    encoder_loras = {name: sd for name, sd in _per_encoder(family, text_encoder_lora or {}).items() if sd}
    rows = {token: _per_encoder(family, value) for token, value in token_embeddings.items()}
    if not (unet_lora or encoder_loras or token_embeddings or full_components):
        raise InvalidConfig("refusing to save an adapter with no weights")
    if set(rows) != set(manifest.tokens):
        raise InvalidConfig("token embeddings must cover exactly the manifest's tokens",
                            {"tokens": list(manifest.tokens), "embeddings": list(rows)})
    if any(set(per_encoder) != set(family.encoder_names) for per_encoder in rows.values()):
        raise InvalidConfig(f"each token needs one embedding per {family.name} text encoder",
                            {"encoders": list(family.encoder_names)})
    known = ("unet", *family.encoder_names)
    if unknown := set(full_components) - set(known):
        raise InvalidConfig(f"cannot save components {sorted(unknown)}", {"known": list(known)})
    folder.mkdir(parents=True, exist_ok=True)

    if unet_lora or encoder_loras:
        _save_lora(folder, family, manifest.lora or LoraSpec(), unet_lora, encoder_loras)
    (folder / TOKENS_DIR).mkdir(exist_ok=True)
    for index, token in enumerate(manifest.tokens):
        tensors = {_token_file_key(family, slot, token): rows[token][slot.encoder].detach().float().reshape(-1)
                   .contiguous().cpu() for slot in family.text_encoders}
        save_file(tensors, str(folder / TOKENS_DIR / f"{index}.safetensors"), metadata={"token": token})
    for name, module in full_components.items():
        module.save_pretrained(str(folder / name), safe_serialization=True)

    components = tuple(full_components) if full_components else (("unet",) if unet_lora else ()) + tuple(
        name for name in family.encoder_names if name in encoder_loras)
    manifest = _replace(manifest, components=components)
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return folder


def _per_encoder(family: ModelFamily, value):
    """``{encoder name: value}``: a bare tensor or state dict belongs to the family's first encoder."""
    if isinstance(value, torch.Tensor) or (value and all(isinstance(v, torch.Tensor) for v in value.values())
                                           and not set(value) <= set(family.encoder_names)):
        return {family.text_encoders[0].encoder: value}
    return dict(value)


def _token_file_key(family: ModelFamily, slot, token: str) -> str:
    """A token file's tensor name: the token itself for one encoder (the format before SDXL, which
    ``load_textual_inversion(file)`` reads), the encoder's A1111 name (``clip_l``, ``clip_g``) for several."""
    return token if len(family.text_encoders) == 1 else slot.embedding_key


def _save_lora(folder: Path, family: ModelFamily, spec: LoraSpec, unet_lora, encoder_loras) -> None:
    import diffusers

    # The family's pipeline class packs the component prefixes (text_encoder_2 for SDXL) and metadata.
    kwargs: dict[str, Any] = {
        "unet_lora_layers": _cpu_contiguous(unet_lora) if unet_lora else None,
        "unet_lora_adapter_metadata": spec.peft_kwargs("unet") if unet_lora else None,
    }
    for name in family.encoder_names:
        state = encoder_loras.get(name)
        kwargs[f"{name}_lora_layers"] = _cpu_contiguous(state) if state else None
        kwargs[f"{name}_lora_adapter_metadata"] = spec.peft_kwargs("text_encoder") if state else None
    getattr(diffusers, family.text_to_image).save_lora_weights(str(folder), safe_serialization=True, **kwargs)


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


def load_token_embeddings(folder: str | Path,
                          manifest: AdapterManifest | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{token: {text encoder name: vector}}`` of an adapter folder, in the manifest's token order."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = manifest or load_manifest(folder)
    family = manifest.model_family
    embeddings = {}
    for index, token in enumerate(manifest.tokens):
        state = load_file(str(folder / TOKENS_DIR / f"{index}.safetensors"))
        embeddings[token] = {slot.encoder: state[_token_file_key(family, slot, token)] for slot in family.text_encoders}
    return embeddings


def token_embedding_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files, tokens) for ``pipe.load_textual_inversion(files, token=tokens)`` (one-encoder families; for
    SDXL load each encoder's vectors from :func:`load_token_embeddings`, see :func:`load_tokens_with_diffusers`)."""
    manifest = load_manifest(folder)
    files = [str(Path(folder) / TOKENS_DIR / f"{i}.safetensors") for i in range(len(manifest.tokens))]
    return files, list(manifest.tokens)


def load_tokens_with_diffusers(pipe, folder: str | Path) -> None:
    """Put an adapter's tokens on a plain diffusers pipeline with its own ``load_textual_inversion``, once
    per text encoder of the family: what a user of the downloaded adapter does (documentation and tests)."""
    manifest = load_manifest(folder)
    rows = load_token_embeddings(folder, manifest)
    tokens = list(manifest.tokens)
    for slot in manifest.model_family.text_encoders:
        pipe.load_textual_inversion([rows[t][slot.encoder] for t in tokens], token=tokens,
                                    text_encoder=getattr(pipe, slot.encoder), tokenizer=getattr(pipe, slot.tokenizer))


def add_token_rows(tokenizer, text_encoder: nn.Module, rows: Mapping[str, torch.Tensor]):
    """Return ``tokenizer`` with ``rows``' tokens added (a copy: :mod:`pipelines.text.added_tokens`), and give
    ``text_encoder`` a new, larger embedding module holding those rows; the old module object is untouched
    (``text_encoder.set_input_embeddings(old)`` undoes this exactly).

    Returns ``(tokenizer, token_ids, old_embedding)``.
    """
    tokens = list(rows)
    new_tokenizer, ids = with_added_tokens(tokenizer, tokens)
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
class _ReplacedTokens:
    """What attaching tokens to one text encoder replaced, to put back on detach."""

    tokenizer_name: str
    tokenizer: Any
    text_encoder: nn.Module
    embedding: nn.Module
    vocab_size: int


@dataclass
class AttachedAdapter:
    folder: Path
    manifest: AdapterManifest
    adapter_name: str
    token_ids: list[int]  # in the first text encoder's vocabulary (the same ids in every encoder)
    lora_components: tuple[str, ...]
    # What attach replaced, to put back on detach.
    _replaced_tokens: list[_ReplacedTokens] = field(default_factory=list)
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

    # 2. Tokens: per text encoder, a private tokenizer copy and a larger embedding module on the current encoder.
    try:
        rows = load_token_embeddings(folder, manifest)
        for index, slot in enumerate(manifest.model_family.text_encoders):
            text_encoder, tokenizer = getattr(pipe, slot.encoder), getattr(pipe, slot.tokenizer)
            vocab_size = text_encoder.config.vocab_size
            new_tokenizer, ids, old = add_token_rows(tokenizer, text_encoder,
                                                     {t: per_encoder[slot.encoder] for t, per_encoder in rows.items()})
            attached._replaced_tokens.append(_ReplacedTokens(slot.tokenizer, tokenizer, text_encoder, old, vocab_size))
            setattr(pipe, slot.tokenizer, new_tokenizer)
            if index == 0:
                attached.token_ids = ids

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
    for replaced in reversed(attached._replaced_tokens):
        replaced.text_encoder.set_input_embeddings(replaced.embedding)
        replaced.text_encoder.config.vocab_size = replaced.vocab_size
        setattr(pipe, replaced.tokenizer_name, replaced.tokenizer)
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


@dataclass(frozen=True)
class KohyaExport:
    """What :func:`export_kohya` wrote: the LoRA, one embedding file per token, and how to prompt."""

    lora: Path
    embeddings: dict[str, Path]  # token -> its embedding file
    readme: Path

    @property
    def files(self) -> list[Path]:
        return [self.lora, *self.embeddings.values(), self.readme]


def export_kohya(folder: str | Path, out_dir: str | Path, name: str = "likeness") -> KohyaExport:
    """Write the adapter in the format A1111 and ComfyUI load, into ``out_dir``:

    * ``<name>.safetensors``: the LoRA in kohya naming (``lora_unet_*``, and per text encoder its prefix:
      ``lora_te_*`` for SD 1.5, ``lora_te1_*``/``lora_te2_*`` for SDXL), ``.lora_down``/``.lora_up``/``.alpha``;
    * ``embeddings/<name>-<token>.safetensors``, one per token, holding per text encoder its A1111 name
      (``emb_params`` for SD 1.5; ``clip_l`` and ``clip_g`` for SDXL), each ``[1, width]``; A1111 and ComfyUI
      call an embedding by its file name, so ``name`` (the subject's) keeps two subjects' ``<subj>`` apart;
    * ``HOW-TO-PROMPT.txt``: which files go where and a prompt that uses them.

    Keys come from diffusers' ``convert_state_dict_to_kohya``; three things it leaves to the caller:
    A1111 names CLIP layers from ``CLIPTextModel``'s root (``text_model.``, which diffusers' LoRA
    files leave out), the prefix of each encoder is the family's (diffusers writes ``lora_te1_`` /
    ``lora_te2_``; SD 1.x's one encoder is ``lora_te_``), and the alpha it writes is the rank (scale 1)
    where the adapter's may differ."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    folder, out_dir = Path(folder), Path(out_dir)
    manifest = load_manifest(folder)
    family = manifest.model_family
    lora_file = folder / LORA_WEIGHTS_NAME
    if manifest.mode != "lora" or not lora_file.is_file():
        raise InvalidConfig("only LoRA-mode adapters with LoRA weights can be exported to kohya format",
                            {"mode": manifest.mode})
    spec = manifest.lora or LoraSpec()
    state = {}
    for key, value in load_file(str(lora_file)).items():
        component, _, rest = key.partition(".")
        if component in family.encoder_names and not rest.startswith("text_model."):
            key = f"{component}.text_model.{rest}"
        state[key] = value
    # diffusers' converter names encoders lora_te1_ / lora_te2_ by position; the family says what A1111 expects
    prefixes = {f"lora_te{i}_": f"{slot.kohya_prefix}_" for i, slot in enumerate(family.text_encoders, start=1)}
    kohya: dict[str, torch.Tensor] = {}
    for key, value in convert_state_dict_to_kohya(state).items():
        for diffusers_prefix, prefix in prefixes.items():
            if key.startswith(diffusers_prefix):
                key = prefix + key[len(diffusers_prefix):]
                break
        if key.endswith(".alpha"):
            value = torch.tensor(float(spec.alpha if spec.alpha is not None else int(value)))
        kohya[key] = value.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_out = out_dir / f"{name}.safetensors"
    save_file(kohya, str(lora_out), metadata={"ss_network_module": "networks.lora", "ss_base_model_version":
                                              family.name, "likeness_tokens": json.dumps(list(manifest.tokens))})
    embeddings = {}
    (out_dir / KOHYA_EMBEDDINGS_DIR).mkdir(exist_ok=True)
    for token, per_encoder in load_token_embeddings(folder, manifest).items():
        path = out_dir / KOHYA_EMBEDDINGS_DIR / f"{embedding_name(name, token)}.safetensors"
        save_file({slot.embedding_key: per_encoder[slot.encoder].reshape(1, -1).contiguous()
                   for slot in family.text_encoders}, str(path), metadata={"token": token})
        embeddings[token] = path
    readme = out_dir / KOHYA_README_NAME
    readme.write_text(how_to_prompt(manifest, name))
    return KohyaExport(lora_out, embeddings, readme)


def embedding_name(name: str, token: str) -> str:
    """What A1111 and ComfyUI call a token's embedding (its file name): ``likeness-1a2b-v1-subj`` for ``<subj>``
    (only letters, digits, ``_`` and ``-`` kept)."""
    return f"{name}-{re.sub(r'[^A-Za-z0-9_-]', '', token) or 'token'}"


def how_to_prompt(manifest: AdapterManifest, name: str) -> str:
    """The short text that travels with a kohya export: where each file goes and a prompt that uses them."""
    family = manifest.model_family
    instance = embedding_name(name, manifest.instance_token)
    backgrounds = [embedding_name(name, t) for t in manifest.tokens if t != manifest.instance_token]
    lines = [
        f"Likeness adapter for {manifest.class_token} ({family.name}; trained on {manifest.preset or 'a base'} "
        f"for {manifest.steps} steps).",
        "",
        "Files:",
        f"  {name}.safetensors  the LoRA: put it in models/Lora (A1111) or models/loras (ComfyUI).",
        f"  {KOHYA_EMBEDDINGS_DIR}/{instance}.safetensors  the learned subject token: put it in embeddings/ "
        "(A1111) or models/embeddings (ComfyUI).",
    ]
    if backgrounds:
        lines.append(f"  {len(backgrounds)} more token files ({', '.join(backgrounds[:3])}"
                     f"{', ...' if len(backgrounds) > 3 else ''}): the training photos' backgrounds; not needed "
                     "for prompting.")
    lines += [
        "",
        "Prompt (A1111):",
        # weight 1: the file's alpha already carries the trained scale
        f"  <lora:{name}:1> a portrait photo of {instance} {manifest.class_token}, studio light",
        "Prompt (ComfyUI: load the LoRA with a LoraLoader node, then in the text):",
        f"  a portrait photo of embedding:{instance} {manifest.class_token}, studio light",
        "",
        f"Use a {family.name.upper()} base model at {family.native_resolution} x {family.native_resolution} "
        "and keep the subject words together: the token, then the class word.",
    ]
    return "\n".join(lines) + "\n"


def kohya_zip(folder: str | Path, out_file: str | Path, name: str = "likeness") -> Path:
    """The kohya export as one zip (what ``GET /v1/subjects/{id}/adapter?format=kohya`` returns)."""
    import tempfile
    import zipfile

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        export = export_kohya(folder, work, name)
        with zipfile.ZipFile(out_file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in export.files:
                archive.write(path, path.relative_to(work).as_posix())
    return out_file
