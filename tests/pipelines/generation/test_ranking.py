"""Ranking: k of n sorted by the documented score; faceless or crowded candidates never delivered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.ranking import (
    RANKING_PRESETS,
    AestheticHead,
    RankingWeights,
    combine,
    load_aesthetic_head,
    rank,
    strip_token,
)
from tests.conftest import noise_image


@pytest.fixture(scope="module")
def clip(tiny_preset):
    from pipelines.models.clip import get_clip

    return get_clip(tiny_preset.clip)


def test_ranking_drops_faceless_candidates_with_the_real_detector(clip, tiny_preset, astronaut, grace_hopper):
    images = [noise_image(256, seed) for seed in range(3)] + [astronaut, grace_hopper]
    prompts = ["a photo of <subj> girl"] * len(images)
    kept = rank(
        images,
        prompts,
        [grace_hopper],
        k=3,
        weights=RANKING_PRESETS["balanced"],
        clip=clip,
        aesthetic=tiny_preset.aesthetic_head,
        instance_token="<subj>",
    )
    assert sorted(c.index for c in kept) == [3, 4]  # only the two photos, although k=3
    assert [c.rank for c in kept] == [1, 2]
    assert kept[0].score >= kept[1].score
    assert all(c.faces == 1 and c.deliverable for c in kept)

    everyone = rank(
        images,
        prompts,
        [grace_hopper],
        k=3,
        weights=RANKING_PRESETS["balanced"],
        clip=clip,
        aesthetic=tiny_preset.aesthetic_head,
        instance_token="<subj>",
        return_all=True,
    )
    faceless = [c for c in everyone if c.index < 3]
    assert all(c.faces == 0 and not c.deliverable and c.rank == 0 for c in faceless)
    if faceless[0].scores["identity"] is not None:  # an identity embedder is installed
        assert all(c.scores["identity"] == -1.0 for c in faceless)
        identities = [c.scores["identity"] for c in everyone]
        assert (
            min(identities) == -1.0
            and everyone[[c.index for c in everyone].index(4)].scores["identity"] > 0.99
        )


def test_several_faces_are_never_delivered(clip, tiny_preset, astronaut, grace_hopper):
    from pipelines.vision.faces import detect_faces

    pair = Image.new("RGB", (1024, 600))
    pair.paste(astronaut, (0, 0))
    pair.paste(grace_hopper, (512, 0))
    assert len(detect_faces(pair)) == 2
    kept = rank(
        [pair, astronaut],
        ["<subj> girl", "<subj> girl"],
        [],
        k=2,
        clip=clip,
        aesthetic=tiny_preset.aesthetic_head,
        instance_token="<subj>",
        face_embedder="none",
    )
    assert [c.index for c in kept] == [1]
    assert kept[0].scores["identity"] is None  # no references/embedder: not available


def test_returns_k_of_n_sorted_by_the_documented_score(clip, tiny_preset):
    head = load_aesthetic_head(tiny_preset.aesthetic_head)
    images = [noise_image(64, seed) for seed in range(6)]
    one_face = lambda image: [_box(image)]
    kept = rank(
        images,
        ["a photo of <subj> man"] * 6,
        [],
        k=4,
        clip=clip,
        aesthetic=head,
        instance_token="<subj>",
        face_detector=one_face,
        face_embedder="none",
    )
    assert len(kept) == 4
    with torch.inference_mode():
        raw = head(clip.embed_images(images)).tolist()
    # The aesthetic preset is the method's: order by the aesthetic predictor alone.
    assert [c.index for c in kept] == list(np.argsort(raw)[::-1][:4])
    assert [c.scores["aesthetic"] for c in kept] == pytest.approx(sorted(raw, reverse=True)[:4], abs=1e-5)
    scores = [c.score for c in kept]
    assert scores == sorted(scores, reverse=True)


def test_combined_score_is_the_weighted_sum_of_z_scores():
    raw = {
        "aesthetic": [1.0, 2.0, 3.0],
        "identity": [0.9, 0.1, 0.5],
        "text": [0.2, 0.2, 0.2],
        "lpips": [None] * 3,
    }
    z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)
    expected = 1.0 * z(raw["aesthetic"]) + 2.0 * z(raw["identity"])  # text has no spread -> 0; lpips absent
    got = combine(raw, RankingWeights(aesthetic=1.0, identity=2.0, text=0.5, lpips=1.0))
    assert got == pytest.approx(list(expected))
    # Lower LPIPS is better.
    assert combine({**raw, "lpips": [0.1, 0.5, 0.9]}, RankingWeights(0, 0, 0, 1.0))[0] > 0


def test_lpips_is_pluggable(clip, tiny_preset):
    images = [noise_image(64, seed) for seed in range(3)]
    refs = [noise_image(64, 9)]
    distance = lambda image, references: float(np.asarray(image)[0, 0, 0])
    kept = rank(
        images,
        ["x"] * 3,
        refs,
        k=3,
        weights=RankingWeights(aesthetic=0.0, lpips=1.0),
        clip=clip,
        aesthetic=tiny_preset.aesthetic_head,
        face_detector=lambda im: [_box(im)],
        face_embedder="none",
        lpips=distance,
    )
    lp = [c.scores["lpips"] for c in kept]
    assert lp == sorted(lp) and len(set(lp)) == 3  # smallest distance first


def test_aesthetic_head_layouts(tmp_path):
    # The improved-aesthetic-predictor .pth: layers 0,2,4,6,7 (dropouts between), no activations.
    torch.manual_seed(0)
    dims = [(32, 24), (24, 12), (12, 8), (8, 4), (4, 1)]
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), dims):
        layer = torch.nn.Linear(d_in, d_out)
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = (
            layer.weight.detach(),
            layer.bias.detach(),
        )
    torch.save(state, tmp_path / "head.pth")
    head = load_aesthetic_head(str(tmp_path / "head.pth"))
    x = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    expected = x
    for index in (0, 2, 4, 6, 7):
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    with torch.no_grad():
        assert head(x).tolist() == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-5)
    # A single linear layer (the "linear" LAION head) works too.
    linear = AestheticHead.from_state_dict(
        {"layers.0.weight": torch.ones(1, 32), "layers.0.bias": torch.zeros(1)}, relu=True
    )
    with torch.no_grad():
        assert linear(torch.ones(2, 32)).tolist() == [32.0, 32.0]


def test_instance_token_is_removed_for_text_alignment():
    assert strip_token("oil painting of <subj> girl, canvas", "<subj>") == "oil painting of girl, canvas"


def test_rank_checks_inputs(clip, tiny_preset):
    with pytest.raises(InvalidConfig):
        rank([noise_image(32)], [], [], k=1, clip=clip, aesthetic=tiny_preset.aesthetic_head)
    with pytest.raises(InvalidConfig):
        rank([noise_image(32)], ["x"], [], k=0, clip=clip, aesthetic=tiny_preset.aesthetic_head)


def _box(image):
    from pipelines.vision.boxes import Box

    return Box(0, 0, image.width, image.height)
