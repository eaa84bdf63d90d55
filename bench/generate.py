"""Generation benchmark: candidates/s (text-to-image and template mode), ranking, ×2 upscaling,
adapter swap on a warm pipeline.

    python bench/generate.py                                   # CPU: tiny preset, small n
    python bench/generate.py --device cuda --arch sd15-random  # GPU: SD 1.5 shapes, random weights

Template mode (``--no-template`` skips it) puts the subject into the shipped ``astronaut`` template
(512x512): masking once, then per candidate the face-and-hair crop inpainted at the model's
resolution (pose + canny ControlNets, strength 0.45), colour transfer and paste-back; the GPU
target is 16 template candidates <= 4 s on SD 1.5 shapes at 512 px.

``sd15-random`` builds the SD 1.5 architecture (U-Net 320/640/1280/1280, CLIP ViT-L/14
text encoder, VAE 128/256/512/512), a CLIP ViT-L/14 dual encoder, the LAION aesthetic
MLP and a Real-ESRGAN x2 (64 filters, 23 blocks) with random weights, so timings match
real weights without downloading any. A rank-16 LoRA adapter with one learned token is
attached for the generation run, as in production. Figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from pipelines.adapters import AdapterManifest, LoraSpec, attach_adapter, detach_adapter, save_adapter
from pipelines.generation import GenerationEngine, GenerationModels, GenerationSpec
from pipelines.generation.request import aspect_size
from pipelines.models.presets import get_preset, with_overrides
from pipelines.models.sd15_random import sd15_random_controlnet, sd15_random_pipeline
from pipelines.ranking import RANKING_PRESETS, AestheticHead, RankingModels, rank
from pipelines.upscale import load_upscaler, upscale
from pipelines.vision.faces import load_face_detector


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- SD 1.5 with random weights


class RandomClipL14:
    """ViT-L/14 CLIP (random weights) behind the ClipEmbedder interface."""

    def __init__(self, device, dtype, tokenizer):
        from transformers import (
            CLIPConfig,
            CLIPImageProcessor,
            CLIPModel,
            CLIPProcessor,
            CLIPTextConfig,
            CLIPVisionConfig,
        )

        from pipelines.models.clip import ClipEmbedder

        config = CLIPConfig(
            text_config=CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            ).to_dict(),
            vision_config=CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            ).to_dict(),
            projection_dim=768,
        )
        with torch.device(device):
            self.model = CLIPModel(config).to(dtype).eval()
        self.processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
        self.device, self.dtype = torch.device(device), dtype
        self.embed_images = ClipEmbedder.embed_images.__get__(self)
        self.embed_texts = ClipEmbedder.embed_texts.__get__(self)
        self.dim = 768


def laion_aesthetic_mlp(device) -> AestheticHead:
    dims = [768, 1024, 128, 64, 16, 1]
    linears = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
    return AestheticHead(linears, relu=False).to(device)


def realesrgan_x2(path: Path) -> str:
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=2, shuffle_factor=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


# ---------------------------------------------------------------------------- adapter


def lora_adapter(folder: Path, engine: GenerationEngine, rank_: int) -> Path:
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    spec = LoraSpec(unet_rank=rank_, text_encoder_rank=rank_ // 2)
    unet = copy.deepcopy(engine.pipe.unet).float()
    unet.add_adapter(LoraConfig(**spec.peft_kwargs("unet"), init_lora_weights="gaussian"))
    unet_lora = get_peft_model_state_dict(unet)
    del unet
    hidden = engine.pipe.text_encoder.config.hidden_size
    manifest = AdapterManifest(
        mode="lora",
        base_model="bench",
        instance_token="<subj>",
        class_token="girl",
        tokens=("<subj>",),
        lora=spec,
    )
    return save_adapter(
        folder, manifest, unet_lora=unet_lora, token_embeddings={"<subj>": torch.randn(hidden) * 0.01}
    )


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=("tiny", "sd15-random"), default="tiny")
    parser.add_argument("--n", type=int, default=None, help="candidates (CPU 4, GPU 100)")
    parser.add_argument("--k", type=int, default=None, help="images upscaled (CPU 2, GPU 16)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="candidates per denoising batch (CPU 4, GPU 50)"
    )
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (CPU 10, GPU 25)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--resolution", type=int, default=None, help="override the preset's resolution")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--template", action=argparse.BooleanOptionalAction, default=True,
                        help="also time template mode (default: on)")
    parser.add_argument("--template-n", type=int, default=None, help="template candidates (CPU 4, GPU 16)")
    parser.add_argument("--template-steps", type=int, default=None,
                        help="template schedule length; a pass runs 0.45 of it (CPU 10, GPU 30)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.n or (100 if gpu else 4)
    k = args.k or (16 if gpu else 2)
    args.steps = args.steps or (25 if gpu else 10)
    batch_size = args.batch_size or (50 if gpu else 4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    rows: list[tuple[str, str]] = []

    t0 = time.perf_counter()
    options = {
        "batch_size": batch_size,
        "vae_slicing": gpu,  # bounds VAE decode memory for 50-image batches at 512²
    }
    if args.arch == "sd15-random":
        tiny_preset = get_preset("tiny")
        preset = with_overrides(
            tiny_preset,
            name="sd15-random",
            resolution=args.resolution or 512,
            upscaler_x2=realesrgan_x2(work / "realesrgan_x2.safetensors"),
        )
        # A prebuilt base: the engine serves whatever pipeline it is given.
        pipeline = sd15_random_pipeline(work, "cuda" if torch.cuda.is_available() else "cpu").to(device, dtype)
        ranking = RankingModels(
            clip=RandomClipL14(device, dtype, pipeline.tokenizer),
            aesthetic=laion_aesthetic_mlp(device).to(dtype),
            face_detector=load_face_detector(),
        )
        models = GenerationModels(
            base=pipeline, ranking=ranking, upscalers={2: load_upscaler(preset.upscaler_x2, device)}
        )
        engine = GenerationEngine(preset, models, **options)
    else:
        preset = get_preset("tiny")
        if args.resolution:
            preset = with_overrides(preset, resolution=args.resolution)
        engine = GenerationEngine.load(preset, device, dtype, identity_backend="none", **options)
        ranking = engine.models.ranking
    # Serving options of the base itself (the engine never changes the base it is lent).
    if args.channels_last:
        engine.pipe.unet.to(memory_format=torch.channels_last)
    if args.compile:
        engine.pipe.unet.compile(mode="max-autotune-no-cudagraphs", fullgraph=False)
    ranking.face_embedder = None  # identity needs reference photos; timed here: aesthetic, text, faces
    upscaler = engine.upscaler(2)
    adapter = lora_adapter(work / "adapter", engine, rank_=16 if args.arch == "sd15-random" else 4)
    sync(device)
    rows.append(("setup (build/load models, make adapter)", f"{time.perf_counter() - t0:.1f} s"))

    spec = GenerationSpec(
        prompts=("portrait photo of {instance} {class}, studio light",),
        n=n,
        k=k,
        steps=args.steps,
        guidance_scale=args.guidance,
        upscale=None,
        controlnets=(),
        batch_size=batch_size,
    )
    width, height = aspect_size("1:1", preset.resolution)
    prompts = ["portrait photo of <subj> girl, studio light"] * n

    # Adapter swap on the warm pipeline (attach + detach), median of 5 after a warm-up.
    swaps = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        attached = attach_adapter(engine.pipe, adapter)
        detach_adapter(engine.pipe, attached)
        sync(device)
        swaps.append(time.perf_counter() - start)
    swap_s = statistics.median(swaps[1:])

    # Warm-up (kernels, compile), then the timed run with the adapter attached.
    warm = spec.model_copy(update={"n": min(batch_size, n), "steps": 2})
    attached = attach_adapter(engine.pipe, adapter)
    try:
        engine.denoise(warm, prompts[: warm.n], width, height)
        sync(device)
        start = time.perf_counter()
        images = engine.denoise(spec, prompts, width, height)
        sync(device)
        gen_s = time.perf_counter() - start
        refine_s = time_face_refinement(engine, spec, images[:k], prompts[:k])
    finally:
        detach_adapter(engine.pipe, attached)

    # Ranking: aesthetic + CLIP text + face detection of every candidate (warm models).
    rank(images[:2], prompts[:2], [], 1, ranking, instance_token="<subj>", return_all=True)
    sync(device)
    start = time.perf_counter()
    rank(images, prompts, [], k, ranking, RANKING_PRESETS["balanced"], instance_token="<subj>", return_all=True)
    sync(device)
    rank_s = time.perf_counter() - start

    # ×2 upscaling of k images.
    upscale(images[:1], upscaler, 2, tile=args.tile, overlap=16)
    sync(device)
    start = time.perf_counter()
    upscale(images[:k], upscaler, 2, tile=args.tile, overlap=16)
    sync(device)
    up_s = time.perf_counter() - start

    template_rows = time_template_mode(args, engine, ranking, adapter, device, gpu, batch_size) if args.template else []

    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    rows += [
        ("device / arch / dtype", f"{name} / {args.arch} / {str(dtype).removeprefix('torch.')}"),
        (
            "generation",
            (
                f"{n} candidates {width}x{height}, {args.steps} Euler steps, guidance {args.guidance}, "
                f"batch {batch_size}, LoRA attached"
            ),
        ),
        ("generation time", f"{gen_s:.2f} s ({n / gen_s:.2f} candidates/s)"),
        (f"ranking {n} candidates", f"{rank_s:.2f} s"),
        (f"x2 upscale {k} images (tile {args.tile})", f"{up_s:.2f} s"),
        ("adapter swap (attach+detach, warm)", f"{swap_s * 1000:.0f} ms"),
        ("face refinement (per image, img2img strength 0.35 on the face crop)", f"{refine_s:.2f} s"),
        *template_rows,
    ]
    width_col = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width_col)} | value |\n|{'-' * (width_col + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width_col)} | {value} |")


def time_face_refinement(engine: GenerationEngine, spec: GenerationSpec, images, prompts) -> float:
    """Seconds per image that the face-refinement pass adds: re-render of the face crop, colour match,
    paste-back (random weights draw no face to detect, so a centred face box stands in)."""
    from pipelines.engine.face_refine import CONTEXT, FaceRefinePass
    from pipelines.engine.job import Candidate, Delivery, Job
    from pipelines.templates.masking import Region, face_only_mask
    from pipelines.vision.boxes import Box

    width, height = images[0].size
    face = Box(0.3 * width, 0.2 * height, 0.7 * width, 0.65 * height)
    regions = [Region.around(face_only_mask(image.size, face), CONTEXT) for image in images]
    candidates = [Candidate(image, spec.seed + i, prompt) for i, (image, prompt) in enumerate(zip(images, prompts))]
    job = Job(spec, Delivery(k=len(images), ranking="aesthetic", upscale=None, negative_prompt="", style=None,
                             face_refine=True))
    refine = FaceRefinePass().refine
    refine(engine, candidates[:1], regions[:1], job)  # warm-up
    sync(engine.device)
    start = time.perf_counter()
    refine(engine, candidates, regions, job)
    sync(engine.device)
    return (time.perf_counter() - start) / len(images)


def time_template_mode(args, engine: GenerationEngine, ranking: RankingModels, adapter: Path, device: torch.device,
                       gpu: bool, batch_size: int) -> list[tuple[str, str]]:
    """Template mode on the same warm base: masking once, then n candidates inpainted and pasted back."""
    from pipelines.progress import Stage
    from pipelines.templates.catalog import get_template, open_template
    from pipelines.templates.engine import TemplateEngine, TemplateModels
    from pipelines.templates.masking import masking_models
    from pipelines.templates.spec import TemplateSpec

    n = args.template_n or (16 if gpu else 4)
    steps = args.template_steps or (30 if gpu else 10)
    if args.arch == "sd15-random":
        controlnets = {kind: sd15_random_controlnet(engine.pipe.unet, seed)
                       for seed, kind in enumerate(("pose", "canny"))}
    else:
        controlnets = {kind: engine.controlnet(kind) for kind in ("pose", "canny")}
    models = TemplateModels(base=engine.pipe, ranking=ranking, masking=masking_models(str(device)).load(),
                            controlnets=controlnets, improved_vae=engine.models.improved_vae,
                            upscalers=dict(engine.models.upscalers))
    templates = TemplateEngine(engine.preset, models, batch_size=batch_size, vae_slicing=gpu)
    shipped = get_template("astronaut")
    image = open_template(shipped.name)
    start = time.perf_counter()
    prepared = templates.prepare(image)
    mask_s = time.perf_counter() - start
    spec = TemplateSpec(template=shipped.name, prompt="{instance} {class}, " + shipped.caption, n=n, k=min(2, n),
                        steps=steps, guidance_scale=args.guidance, upscale=None, batch_size=batch_size)
    templates.run(spec.model_copy(update={"n": min(batch_size, n), "steps": 4}), prepared, adapter)  # warm-up
    marks: dict[str, float] = {}

    def mark(event) -> None:
        marks.setdefault(str(event.stage), time.perf_counter())

    sync(device)
    start = time.perf_counter()
    templates.run(spec, prepared, adapter, on_progress=mark)
    sync(device)
    total_s = time.perf_counter() - start
    composite_s = marks.get(str(Stage.RANKING), start + total_s) - start
    crop = prepared.region.crop.side
    return [
        ("template mode", f"{n} candidates in {shipped.name} ({image.width}x{image.height}, face crop {crop} px -> "
                          f"{engine.preset.resolution}), {spec.first_pass_steps} of {steps} Euler steps (strength "
                          f"{spec.strength}), pose + canny ControlNets, guidance {args.guidance}, batch {batch_size}, "
                          "LoRA attached"),
        ("template masking (detect, segment, pose; once per job)", f"{mask_s:.2f} s"),
        ("template candidates (inpaint + colour + paste)", f"{composite_s:.2f} s ({n / composite_s:.2f} candidates/s)"),
        (f"template candidates + ranking {n}", f"{total_s:.2f} s"),
    ]


if __name__ == "__main__":
    main()
