"""Prefetch and check every weight a model preset needs (``likeness models pull|check``).

Hub repositories go to the Hugging Face cache (the loaders find them there, offline);
``hf://owner/repo/file`` entries are single files of a repository. The tiny presets
(``tiny``, ``tiny-sdxl``) are built locally instead. Detectors ship inside mediapipe and need nothing.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.models.presets import TINY_PRESETS, get_preset
from pipelines.models.weights import ALLOW_PATTERNS, check, is_local, references, split_file

__all__ = ["HubOffline", "check", "pull"]


class HubOffline(PipelineError):
    code = "hub_offline"


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
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    if constants.HF_HUB_OFFLINE:  # the settings say there is no hub: say so rather than retry it
        raise HubOffline(f"HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to pull preset {name} "
                         "(or copy a Hugging Face cache that has it into HF_HOME)", {"preset": name})
    preset = get_preset(name, cache_dir)
    refs = references(preset)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console) as bars:
        task = bars.add_task(f"preset {name}", total=len(refs))
        for ref in refs:
            bars.update(task, description=f"{name}: {ref}")
            if not is_local(ref):
                if ref.startswith("hf://"):
                    repo, filename = split_file(ref)
                    hf_hub_download(repo, filename)  # huggingface_hub shows a byte-level bar per file
                else:
                    snapshot_download(ref, revision=preset.revision, allow_patterns=ALLOW_PATTERNS)
            bars.advance(task)
    console.print(f"preset {name}: {len(refs)} weights in the Hugging Face cache")
