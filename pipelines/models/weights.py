"""Which weights a model preset needs, whether they are on this machine, and the preset ``auto``.

Checked before any work (``likeness run``, ``likeness serve``, a job's first phase): a preset
whose weights are missing fails in one line that names them and the command that fetches them,
instead of minutes of hub retries inside a loader. Every check reads the local caches only
(never the network). ``hf://owner/repo/file`` entries are single files of a hub repository;
other names are whole repositories (or local folders). The ``tiny`` preset is built locally on
first use (``tiny``, ``tiny-sdxl``) and needs nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.models.presets import TINY_PRESETS, ModelPreset, get_preset, tiny_dir, tiny_is_built, tiny_sdxl_dir

# Only the files diffusers/transformers load: configs, tokenizers and the (possibly sharded) safetensors
# weights named ``model`` / ``diffusion_pytorch_model``. Skips .ckpt/.bin copies, fp16 variants
# (``*.fp16.safetensors``) and the single-file checkpoints base repositories also carry (SDXL's 6.9 GB
# ``sd_xl_base_1.0.safetensors``, SD 1.5's ``v1-5-pruned*.safetensors``).
ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*model.safetensors", "*model-*-of-*.safetensors"]
#: ``auto`` picks the first of these whose weights are all local, else ``tiny``
AUTO_CANDIDATES = ("sd15", "sdxl")


class WeightsMissing(PipelineError):
    """The preset's weights are not on this machine (the operator fetches them; retrying will not help)."""

    code = "weights_missing"


def references(preset: ModelPreset) -> list[str]:
    refs = [preset.base_model, preset.clip, preset.aesthetic_head, preset.upscaler_x2, preset.upscaler_x4]
    refs += [preset.vae] if preset.vae else []
    refs += list(preset.controlnets.values())
    return refs


def split_file(ref: str) -> tuple[str, str]:
    owner, repo, filename = ref.removeprefix("hf://").split("/", 2)
    return f"{owner}/{repo}", filename


def is_local(ref: str) -> bool:
    return not ref.startswith("hf://") and Path(ref).exists()


def available(ref: str, revision: str | None = None) -> bool:
    """Whether ``ref`` can be loaded offline (the Hugging Face cache or a local path)."""
    if is_local(ref):
        return True
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # a room without the ML stack has no hub cache either
        return False
    try:
        if ref.startswith("hf://"):
            repo, filename = split_file(ref)
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
    """References of preset ``name`` that are not available offline (empty: ready)."""
    if name in TINY_PRESETS:
        if tiny_is_built(cache_dir, name):
            return []
        folder = tiny_sdxl_dir(cache_dir) if name == "tiny-sdxl" else tiny_dir(cache_dir)
        return [f"{name} models under {folder} (built by models pull)"]
    preset = get_preset(name, cache_dir)
    return [ref for ref in references(preset) if not available(ref, preset.revision)]


def pull_command(name: str) -> str:
    return f"likeness models pull --preset {name}"


def require_weights(name: str, cache_dir: Path) -> None:
    """Raise :class:`WeightsMissing` (one line: what is missing, the command that fetches it) unless
    every weight of preset ``name`` is local. The tiny presets build themselves and always pass."""
    if name in TINY_PRESETS or (name, cache_dir) in _READY:
        return
    missing = check(name, cache_dir)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise WeightsMissing(f"preset {name} is missing {len(missing)} weight{'s' if len(missing) != 1 else ''} on "
                             f"this machine ({shown}); run: {pull_command(name)}",
                             {"preset": name, "missing": missing, "command": pull_command(name)})
    _READY.add((name, cache_dir))


_READY: set[tuple[str, Path]] = set()  # presets found complete in this process (a pull only adds weights)


@functools.lru_cache(maxsize=8)
def resolve_preset(name: str, cache_dir: Path) -> str:
    """``name``, with ``auto`` resolved once per process: the first real preset whose weights are all
    here, otherwise ``tiny`` (random weights: its images are noise)."""
    if name != "auto":
        return name
    return next((candidate for candidate in AUTO_CANDIDATES if not check(candidate, cache_dir)), "tiny")
