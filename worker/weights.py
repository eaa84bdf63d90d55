"""Prefetch and check every weight a model preset needs (``likeness models pull|check``).

Hub repositories go to the Hugging Face cache (the loaders find them there, offline);
``hf://owner/repo/file`` entries are single files of a repository. The tiny presets
(``tiny``, ``tiny-sdxl``) are built locally instead. Detectors ship inside mediapipe and need nothing.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.models.presets import TINY_PRESETS, ModelPreset, get_preset, tiny_dir, tiny_is_built, tiny_sdxl_dir

# Only the files diffusers/transformers load: configs, tokenizers and the (possibly sharded) safetensors
# weights named ``model`` / ``diffusion_pytorch_model``. Skips .ckpt/.bin copies, fp16 variants
# (``*.fp16.safetensors``) and the single-file checkpoints base repositories also carry (SDXL's 6.9 GB
# ``sd_xl_base_1.0.safetensors``, SD 1.5's ``v1-5-pruned*.safetensors``).
ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*model.safetensors", "*model-*-of-*.safetensors"]


def references(preset: ModelPreset) -> list[str]:
    refs = [preset.base_model, preset.clip, preset.aesthetic_head, preset.upscaler_x2, preset.upscaler_x4]
    refs += [preset.vae] if preset.vae else []
    refs += list(preset.controlnets.values())
    return refs


def _split_file(ref: str) -> tuple[str, str]:
    owner, repo, filename = ref.removeprefix("hf://").split("/", 2)
    return f"{owner}/{repo}", filename


def is_local(ref: str) -> bool:
    return not ref.startswith("hf://") and Path(ref).exists()


def available(ref: str, revision: str | None = None) -> bool:
    from huggingface_hub import hf_hub_download, snapshot_download

    if is_local(ref):
        return True
    try:
        if ref.startswith("hf://"):
            repo, filename = _split_file(ref)
            hf_hub_download(repo, filename, local_files_only=True)
        else:
            folder = Path(snapshot_download(ref, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                            local_files_only=True))
            if not any(folder.rglob("*.safetensors")):
                return False
        return True
    except Exception:
        return False


def check(name: str, cache_dir: Path) -> list[str]:
    """References of ``name`` that are not available offline (empty: ready)."""
    if name in TINY_PRESETS:
        if tiny_is_built(cache_dir, name):
            return []
        folder = tiny_sdxl_dir(cache_dir) if name == "tiny-sdxl" else tiny_dir(cache_dir)
        return [f"{name} models under {folder} (built by models pull)"]
    preset = get_preset(name, cache_dir)
    return [ref for ref in references(preset) if not available(ref, preset.revision)]


def pull(name: str, cache_dir: Path, console=None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = console or Console()
    if name in TINY_PRESETS:
        with console.status(f"building {name} random-weight models (no download)..."):
            preset = get_preset(name, cache_dir)
        console.print(f"{name} preset ready under {Path(preset.base_model).parent} "
                      "(random weights: its images are noise)")
        return
    from huggingface_hub import hf_hub_download, snapshot_download

    preset = get_preset(name, cache_dir)
    refs = references(preset)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console) as bars:
        task = bars.add_task(f"preset {name}", total=len(refs))
        for ref in refs:
            bars.update(task, description=f"{name}: {ref}")
            if not is_local(ref):
                if ref.startswith("hf://"):
                    repo, filename = _split_file(ref)
                    hf_hub_download(repo, filename)  # huggingface_hub shows a byte-level bar per file
                else:
                    snapshot_download(ref, revision=preset.revision, allow_patterns=ALLOW_PATTERNS)
            bars.advance(task)
    console.print(f"preset {name}: {len(refs)} weights in the Hugging Face cache")
