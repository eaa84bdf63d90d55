"""The evaluation harness: metrics every K steps through the trainer hook, table and plot per run."""

from __future__ import annotations

import csv

import pytest
import torch

from pipelines.eval.harness import EvalConfig, make_eval_callback, make_validation_callback, write_report
from pipelines.eval.metrics import (
    UnavailableLpips,
    get_lpips,
    image_alignment,
    lpips_to_references,
    without_token,
)
from pipelines.models.presets import with_overrides
from pipelines.training import TrainConfig, train
from pipelines.types import TokenSpec, TrainingExample
from tests.conftest import noise_image


def test_text_alignment_prompt_drops_only_the_instance_token():
    assert without_token("an oil painting of <subj> girl", "<subj>") == "an oil painting of girl"


def test_image_alignment_is_highest_for_the_photos_themselves(tiny_preset, astronaut, grace_hopper):
    from pipelines.models.clip import load_clip

    clip = load_clip(tiny_preset.clip)
    same = image_alignment(clip, [astronaut], [astronaut]).value
    other = image_alignment(clip, [noise_image(128, 5)], [astronaut]).value
    assert same == pytest.approx(1.0, abs=1e-5) and other < same


def test_lpips_is_never_downloaded_and_reports_not_available():
    metric = get_lpips("none")
    assert isinstance(metric, UnavailableLpips)
    value = lpips_to_references(metric, [noise_image(32)], [noise_image(32, 1)])
    assert value.value is None and value.note.startswith("not available")


def test_eval_every_k_steps_writes_table_and_plot(tiny_preset, astronaut, grace_hopper, tmp_path):
    preset = with_overrides(tiny_preset, resolution=32)
    examples = [TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a"),
                TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]
    tokens = TokenSpec("<subj>", "girl", ("<bg0>", "<bg1>"))
    config = EvalConfig(every=2, text_prompts=("an oil painting of {instance} {class_token}",), images_per_prompt=1,
                        num_inference_steps=2, lpips="none")
    callback = make_eval_callback(config, [astronaut, grace_hopper], preset.clip, preset.resolution)
    validation = make_validation_callback(["a photo of {instance} {class_token}"], tmp_path / "validation", every=4,
                                          resolution=32, num_inference_steps=2)
    result = train(examples, tokens, TrainConfig(max_train_steps=4, unet_rank=4, text_encoder_rank=4), preset,
                   tmp_path / "run", device="cpu", callbacks=[callback, validation])
    assert sorted(p.parent.name for p in (tmp_path / "validation").rglob("*.png")) == ["step-000000", "step-000004"]
    history = result.metrics["eval"]
    assert [h["step"] for h in history] == [0, 2, 4]
    for h in history:
        assert -1.0 <= h["image_alignment"] <= 1.0 and -1.0 <= h["text_alignment"] <= 1.0
        assert h["lpips"] is None and h["lpips_note"].startswith("not available")
    assert history[0]["image_alignment"] != history[-1]["image_alignment"], "training changes the generations"

    files = write_report({"staged": history, "other": history[:2]}, tmp_path / "report", title="quality")
    rows = list(csv.DictReader(files["csv"].open()))
    assert [(r["run"], r["step"]) for r in rows] == [("staged", "0"), ("staged", "2"), ("staged", "4"),
                                                     ("other", "0"), ("other", "2")]
    table = files["markdown"].read_text()
    assert "| staged | 4 |" in table and "lpips: not available" in table
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recording_processor_matches_sdpa_and_yields_16x16_maps(tiny_preset):
    from diffusers import UNet2DConditionModel

    from pipelines.training.attention import install_recorder, masked_attention_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_preset.base_model, subfolder="unet")
    torch.manual_seed(0)
    latents, text, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor([10, 500])
    with torch.no_grad():
        reference = unet(latents, t, encoder_hidden_states=text).sample
        store = install_recorder(unet, latent_size=16)
        store.reset(torch.tensor([3, 5]))
        recorded = unet(latents, t, encoder_hidden_states=text).sample
    assert torch.allclose(recorded, reference, atol=1e-5)
    maps = store.mean_map()
    assert maps.shape == (2, 16, 16) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    outside = torch.zeros(2, 1, 16, 16)
    assert float(masked_attention_loss(store, outside)) == 0.0  # nothing outside the person: no penalty
    outside[:, :, :8] = 1.0
    assert float(masked_attention_loss(store, outside)) > 0.0


def test_identity_similarity_prefers_the_same_person(astronaut, grace_hopper):
    from pipelines.eval.metrics import IdentityScorer

    scorer = IdentityScorer([astronaut])
    if scorer.why:
        pytest.skip(f"identity embedder not available: {scorer.why}")
    same, other = scorer.similarity([astronaut]).value, scorer.similarity([grace_hopper]).value
    assert same == pytest.approx(1.0, abs=1e-4) and other < same
    missing = scorer.similarity([noise_image(128)])
    assert missing.value is None and "faces found in 0/1" in missing.note
