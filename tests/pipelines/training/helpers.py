"""Helpers of the trainer's tests: the token set and a look at what an adapter folder holds."""

from __future__ import annotations

from safetensors.torch import load_file

from pipelines.types import TokenSpec

TOKENS = TokenSpec("<subj>", "girl", ("<bg0>", "<bg1>"))


def adapter_tensors(folder):
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(str(path)).items()})
    return tensors
