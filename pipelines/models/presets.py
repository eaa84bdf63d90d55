"""Model presets: every weight a pipeline run needs, by Hugging Face id or local path.

``sd15`` and ``sdxl`` name real weights (fetched once by ``likeness models pull``); ``tiny`` and
``tiny-sdxl`` name random-weight stand-ins that :func:`materialize_tiny` and
:func:`materialize_tiny_sdxl` build locally in the same layouts, so code paths are identical and
tests download nothing. A preset names its model family (``pipelines.models.family``): what the
trainer, engines and exporters ask about its components.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipelines.errors import InvalidConfig
from pipelines.models.family import get_family


@dataclass(frozen=True)
class ModelPreset:
    name: str
    base_model: str  # diffusers pipeline folder or hub id, in its family's layout
    clip: str  # CLIP dual encoder: class-token choice, ranking, evaluation (ViT-L/14 in production)
    aesthetic_head: str  # safetensors MLP/linear head over CLIP image embeddings (LAION aesthetic)
    upscaler_x2: str  # Real-ESRGAN weights file, loaded with spandrel
    upscaler_x4: str
    vae: str | None = None  # improved VAE (sd-vae-ft-mse, sdxl-vae-fp16-fix) swapped in at generation
    controlnets: dict[str, str] = field(default_factory=dict)  # condition kind -> ControlNet folder/id
    resolution: int = 512  # training and generation resolution of the base model
    # Delivery rule: a candidate must show exactly one detectable face. Off only for the
    # random-weight ``tiny`` preset, whose images are noise and can never contain a face.
    require_one_face: bool = True
    revision: str | None = None
    family_name: str = "sd15"  # see pipelines.models.family: what the trainer and engines ask
    # side of intake's square face crops; None: the family's native resolution (tiny presets scale it)
    crop_size: int | None = None

    @property
    def public_base_model(self) -> str:
        """The base model as anyone can name it: the hub id, or the preset's name when it is a folder on this
        machine (a manifest or a download never shows a server's paths)."""
        local = self.base_model.startswith(("/", ".", "~")) or Path(self.base_model).expanduser().exists()
        return self.name if local else self.base_model

    @property
    def family(self):
        return get_family(self.family_name)

    @property
    def intake_crop_size(self) -> int:
        return self.crop_size or self.family.native_resolution

    def to_dict(self) -> dict:
        return asdict(self)


SD15 = ModelPreset(
    name="sd15",
    base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    clip="openai/clip-vit-large-patch14",
    aesthetic_head="hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
    upscaler_x2="hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth",
    upscaler_x4="hf://ai-forever/Real-ESRGAN/RealESRGAN_x4.pth",
    vae="stabilityai/sd-vae-ft-mse",
    controlnets={
        "pose": "lllyasviel/control_v11p_sd15_openpose",
        "depth": "lllyasviel/control_v11f1p_sd15_depth",
        "canny": "lllyasviel/control_v11p_sd15_canny",  # template mode: the template's edges (no annotator)
    },
    resolution=512,
)


SDXL = ModelPreset(
    name="sdxl",
    base_model="stabilityai/stable-diffusion-xl-base-1.0",
    clip=SD15.clip,
    aesthetic_head=SD15.aesthetic_head,
    upscaler_x2=SD15.upscaler_x2,
    upscaler_x4=SD15.upscaler_x4,
    vae="madebyollin/sdxl-vae-fp16-fix",  # SDXL's VAE overflows in fp16; this one does not
    controlnets={
        "pose": "xinsir/controlnet-openpose-sdxl-1.0",
        "depth": "diffusers/controlnet-depth-sdxl-1.0",
        "canny": "diffusers/controlnet-canny-sdxl-1.0",
    },
    resolution=1024,
    family_name="sdxl",
)


#: the tiny preset's ControlNets, built in this order (each its own seed)
TINY_CONTROLNETS = ("pose", "depth", "canny")


def _tiny(root: Path) -> ModelPreset:
    return ModelPreset(
        name="tiny",
        base_model=str(root / "sd"),
        clip=str(root / "clip"),
        aesthetic_head=str(root / "aesthetic.safetensors"),
        upscaler_x2=str(root / "realesrgan_x2.safetensors"),
        upscaler_x4=str(root / "realesrgan_x4.safetensors"),
        vae=str(root / "vae"),
        controlnets={kind: str(root / f"controlnet_{kind}") for kind in TINY_CONTROLNETS},
        resolution=128,
        require_one_face=False,
    )


def _tiny_sdxl(root: Path, tiny: ModelPreset) -> ModelPreset:
    """SDXL's layout at toy size; ranking and upscaling share the tiny preset's CLIP, head and upscalers
    (as ``sdxl`` shares ``sd15``'s), so one worker keeps one of each."""
    return ModelPreset(
        name="tiny-sdxl",
        base_model=str(root / "sdxl"),
        clip=tiny.clip,
        aesthetic_head=tiny.aesthetic_head,
        upscaler_x2=tiny.upscaler_x2,
        upscaler_x4=tiny.upscaler_x4,
        vae=str(root / "vae"),
        controlnets={kind: str(root / f"controlnet_{kind}") for kind in TINY_CONTROLNETS},
        resolution=128,
        require_one_face=False,
        family_name="sdxl",
        crop_size=256,  # SDXL's 1024 scaled as tiny's 128 scales SD 1.5's 512
    )


PRESET_NAMES = ("tiny", "sd15", "tiny-sdxl", "sdxl")
TINY_PRESETS = ("tiny", "tiny-sdxl")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIKENESS_MODEL_CACHE", Path.home() / ".cache" / "likeness" / "models"))


def get_preset(name: str, cache_dir: Path | None = None) -> ModelPreset:
    """The preset called ``name``; for the tiny presets, their models are built on first use."""
    if name == "sd15":
        return SD15
    if name == "sdxl":
        return SDXL
    if name == "tiny":
        return materialize_tiny(tiny_dir(cache_dir or default_cache_dir()))
    if name == "tiny-sdxl":
        cache_dir = cache_dir or default_cache_dir()
        return materialize_tiny_sdxl(tiny_sdxl_dir(cache_dir), materialize_tiny(tiny_dir(cache_dir)))
    raise InvalidConfig(f"unknown model preset {name!r}", {"known": list(PRESET_NAMES)})


def tiny_dir(cache_dir: Path) -> Path:
    """Where the tiny models of the current builder version live under ``cache_dir``."""
    from pipelines.models.tiny import BUILD_VERSION

    return cache_dir / f"tiny-v{BUILD_VERSION}"


def tiny_sdxl_dir(cache_dir: Path) -> Path:
    from pipelines.models.tiny_sdxl import BUILD_VERSION

    return cache_dir / f"tiny-sdxl-v{BUILD_VERSION}"


def tiny_is_built(cache_dir: Path, name: str = "tiny") -> bool:
    """Whether the tiny preset ``name`` (``tiny``, ``tiny-sdxl``) is completely built under ``cache_dir``."""
    built = (tiny_dir(cache_dir) / ".complete").exists()
    if name == "tiny-sdxl":
        built = built and (tiny_sdxl_dir(cache_dir) / ".complete").exists()
    return built


def materialize_tiny(root: Path) -> ModelPreset:
    """Build the tiny models into ``root`` unless a complete build is already there.

    Building goes to a temporary sibling folder that is renamed into place, so
    concurrent processes (API, several workers, tests) never see half a build.
    """
    def build(staging: Path) -> None:
        from pipelines.models import tiny

        tiny.build_stable_diffusion(staging / "sd")
        tiny.build_vae(staging / "vae")
        tiny.build_clip(staging / "clip")
        tiny.build_aesthetic_head(staging / "aesthetic.safetensors")
        tiny.build_realesrgan(staging / "realesrgan_x2.safetensors", scale=2)
        tiny.build_realesrgan(staging / "realesrgan_x4.safetensors", scale=4)
        for offset, kind in enumerate(TINY_CONTROLNETS):
            tiny.build_controlnet(staging / f"controlnet_{kind}", seed_offset=offset)

    _build_once(root, build)
    return _tiny(root)


def materialize_tiny_sdxl(root: Path, tiny: ModelPreset) -> ModelPreset:
    """Build the tiny SDXL models into ``root`` unless a complete build is there (as :func:`materialize_tiny`)."""

    def build(staging: Path) -> None:
        from pipelines.models import tiny_sdxl

        tiny_sdxl.build_stable_diffusion_xl(staging / "sdxl")
        tiny_sdxl.build_vae(staging / "vae")
        for offset, kind in enumerate(TINY_CONTROLNETS):
            tiny_sdxl.build_controlnet(staging / f"controlnet_{kind}", seed_offset=offset)

    _build_once(root, build)
    return _tiny_sdxl(root, tiny)


def _build_once(root: Path, build) -> None:
    """Run ``build(staging)`` in a temporary sibling of ``root`` and rename it into place, unless a
    complete build (``.complete``) is already there."""
    import shutil
    import tempfile

    marker = root / ".complete"
    if marker.exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build(staging)
        (staging / ".complete").write_text("ok\n")
        try:
            staging.rename(root)
        except OSError:
            if not marker.exists():  # lost a race to another builder only if theirs is complete
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def with_overrides(preset: ModelPreset, **changes) -> ModelPreset:
    return replace(preset, **changes)


def preset_family(name: str):
    """The model family of preset ``name``, read without building or loading anything (the API asks it
    for a style's per-family defaults)."""
    tiny = _tiny(Path())
    described = {"sd15": SD15, "sdxl": SDXL, "tiny": tiny, "tiny-sdxl": _tiny_sdxl(Path(), tiny)}
    if name not in described:
        raise InvalidConfig(f"unknown model preset {name!r}", {"known": list(PRESET_NAMES)})
    return described[name].family
