"""Model families: what differs between SD 1.5 and SDXL, described once.

The trainer, the engines, the adapter exporters, the intake crops and the worker's model
manager ask a :class:`ModelFamily` instead of testing a family's name. Adding a family means
adding one description here (and the component code it names), nothing else.

Nothing here imports torch: the API reads sizes and names from it without the ML stack.
Class names are strings resolved from ``diffusers`` where used, so a family whose classes a
given diffusers release lacks fails only when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.errors import InvalidConfig


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family and its tokenizer, as the diffusers pipeline names them."""

    encoder: str  # pipeline component: "text_encoder", "text_encoder_2"
    tokenizer: str  # pipeline component: "tokenizer", "tokenizer_2"
    kohya_prefix: str  # A1111 / kohya LoRA key prefix: "lora_te", "lora_te1", "lora_te2"
    embedding_key: str  # A1111 / ComfyUI textual-inversion tensor name: "emb_params", "clip_l", "clip_g"
    pooled: bool = False  # its projected pooled output conditions the U-Net (SDXL's second encoder)
    # which hidden states the U-Net attends to: None, the encoder's (normed) last output; -2, the
    # penultimate layer's (SDXL, both encoders, concatenated along the width)
    hidden_state: int | None = None


@dataclass(frozen=True)
class ModelFamily:
    name: str
    text_encoders: tuple[TextEncoderSlot, ...]
    native_resolution: int  # training and generation side of the square, in pixels
    # width x height per aspect ratio at the native resolution (multiples of 64)
    sizes: dict[str, tuple[int, int]]
    # U-Net conditioning on (original size, crop top-left, target size) (SDXL's micro-conditioning)
    size_conditioning: bool
    # diffusers class names, looked up in ``diffusers`` where they are used
    text_to_image: str
    controlnet_text_to_image: str
    image_to_image: str
    inpaint: str
    controlnet_inpaint: str
    # LoRA targets (peft ``target_modules``) in the U-Net and in each text encoder
    unet_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    kohya_unet_prefix: str = "lora_unet"
    # the VAE's latent scale when its config does not carry one
    vae_scaling_factor: float = 0.18215
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(slot.encoder for slot in self.text_encoders)

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        return tuple(slot.tokenizer for slot in self.text_encoders)

    @property
    def pooled_text(self) -> bool:
        """Whether the U-Net takes a pooled text embedding (``added_cond_kwargs["text_embeds"]``)."""
        return any(slot.pooled for slot in self.text_encoders)

    def size(self, aspect: str) -> tuple[int, int]:
        try:
            return self.sizes[aspect]
        except KeyError:
            raise InvalidConfig(f"the {self.name} family has no size for aspect {aspect!r}",
                                {"known": sorted(self.sizes)}) from None

    def size_at(self, aspect: str, resolution: int) -> tuple[int, int]:
        """(width, height) of ``aspect`` for a preset whose square side is ``resolution`` (the engines' sizes)."""
        sizes = self.scaled_sizes(resolution)
        if aspect not in sizes:
            raise InvalidConfig(f"unknown aspect {aspect!r}", {"aspect": aspect, "known": sorted(sizes)},
                                code="unknown_aspect")
        return sizes[aspect]

    def scaled_sizes(self, resolution: int) -> dict[str, tuple[int, int]]:
        """The aspect sizes for a preset whose square side is ``resolution`` (tiny presets), multiples of 8."""
        ratio = resolution / self.native_resolution
        return {aspect: (_multiple_of_8(w * ratio), _multiple_of_8(h * ratio)) for aspect, (w, h) in self.sizes.items()}


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


SD15 = ModelFamily(
    name="sd15",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "lora_te", "emb_params"),),
    native_resolution=512,
    sizes={"1:1": (512, 512), "4:5": (512, 640), "9:16": (512, 912)},
    size_conditioning=False,
    text_to_image="StableDiffusionPipeline",
    controlnet_text_to_image="StableDiffusionControlNetPipeline",
    image_to_image="StableDiffusionImg2ImgPipeline",
    inpaint="StableDiffusionInpaintPipeline",
    controlnet_inpaint="StableDiffusionControlNetInpaintPipeline",
)

SDXL = ModelFamily(
    name="sdxl",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "lora_te1", "clip_l", hidden_state=-2),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "lora_te2", "clip_g", pooled=True, hidden_state=-2),
    ),
    native_resolution=1024,
    sizes={"1:1": (1024, 1024), "4:5": (896, 1120), "9:16": (768, 1344)},
    size_conditioning=True,
    text_to_image="StableDiffusionXLPipeline",
    controlnet_text_to_image="StableDiffusionXLControlNetPipeline",
    image_to_image="StableDiffusionXLImg2ImgPipeline",
    inpaint="StableDiffusionXLInpaintPipeline",
    controlnet_inpaint="StableDiffusionXLControlNetInpaintPipeline",
    vae_scaling_factor=0.13025,
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD15, SDXL)}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidConfig(f"unknown model family {name!r}", {"known": sorted(FAMILIES)}) from None
