"""The CUDA paths (bf16 autocast with fp32 trainables, fused AdamW, channels-last, TF32, torch.compile)
on a borrowed bf16 base, restored bit for bit. Needs a GPU: ``pytest -m gpu tests/pipelines/training``."""

from __future__ import annotations

import pytest
import torch

from pipelines.models.loading import load_base_pipeline
from pipelines.models.presets import with_overrides
from pipelines.training import TrainCallback, TrainConfig, train
from tests.pipelines.training.helpers import TOKENS
from tests.pipelines.training.test_base import assert_same, state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def preset(tiny_preset):
    return with_overrides(tiny_preset, resolution=64)


def generate(pipe):
    return pipe("a photo of girl", num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator("cuda").manual_seed(3)).images


@pytest.mark.parametrize("overrides", [
    {"mode": "lora"},
    {"mode": "lora", "compile": True, "gradient_checkpointing": True, "attention_loss_weight": 0.0},
    {"mode": "full", "checkpoint_every": 2},
    {"mode": "full", "optimizer_in_backward": True},
])
def test_cuda_training_on_a_borrowed_bf16_base(examples, preset, tmp_path, overrides):
    base = load_base_pipeline(preset, "cuda")  # the worker's dtype on CUDA: bf16
    assert base.unet.dtype == torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    before, image = state(base), generate(base)
    seen = {}

    def inspect(s):
        if s.step == 1:
            trainable = [p for p in s.pipe.unet.parameters() if p.requires_grad]
            seen["fp32"] = bool(trainable) and all(p.dtype == torch.float32 for p in trainable)
            seen["channels_last"] = s.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            seen["tf32"] = torch.backends.cuda.matmul.allow_tf32

    config = TrainConfig(**{"max_train_steps": 4, "unet_rank": 4, "text_encoder_rank": 4, "progress_every": 2,
                            "checkpoint_every": 0, **overrides})
    result = train(examples, TOKENS, config, preset, tmp_path / "run", base=base, device="cuda",
                   callbacks=[TrainCallback(every=1, fn=inspect)])
    assert result.metrics["mixed_precision"] == "bf16" and result.metrics["final_loss"] > 0
    assert seen == {"fp32": True, "channels_last": True, "tf32": True}
    assert_same(state(base), before)
    assert torch.equal(generate(base), image)
