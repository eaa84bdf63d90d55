"""Prefetch and check every weight a model preset needs (``likeness models pull|check``).

Hub repositories go to the Hugging Face cache (the loaders find them there, offline);
``hf://owner/repo/file`` entries are single files of a repository. The ``tiny`` preset
is built locally instead. Detectors ship inside mediapipe and need nothing.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.models.presets import ModelPreset, get_preset, tiny_dir, tiny_is_built

# Only what diffusers/transformers load: skips duplicate .ckpt/.bin/fp16 copies of the same weights.
ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


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
    if name == "tiny":
        if tiny_is_built(cache_dir):
            return []
        return [f"tiny models under {tiny_dir(cache_dir)} (built by models pull)"]
    preset = get_preset(name, cache_dir)
    return [ref for ref in references(preset) if not available(ref, preset.revision)]


def pull(name: str, cache_dir: Path, console=None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = console or Console()
    if name == "tiny":
        with console.status("building tiny random-weight models (no download)..."):
            get_preset("tiny", cache_dir)
        console.print(f"tiny preset ready under {tiny_dir(cache_dir)} (random weights: its images are noise)")
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
