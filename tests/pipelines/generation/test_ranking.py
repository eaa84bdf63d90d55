"""Ranking: k of n sorted by the documented score; faceless or crowded candidates never delivered."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.ranking
from pipelines.errors import InvalidConfig
from pipelines.ranking import (
    RANKING_PRESETS,
    SCORE_NAMES,
    AestheticHead,
    RankingWeights,
    combine,
    load_aesthetic_head,
    load_ranking_models,
    rank,
    strip_token,
)
from pipelines.vision.faces import detect_faces
from tests.conftest import noise_image
from tests.pipelines.generation.conftest import WholeImageFace


@pytest.fixture(scope="module")
def models(tiny_preset):
    """The tiny CLIP and aesthetic head, BlazeFace and the bundled identity embedder (if installed)."""
    return load_ranking_models(tiny_preset)


@pytest.fixture(scope="module")
def one_face_models(models):
    """Every image counts as one face; no identity embedder."""
    return dataclasses.replace(models, face_detector=WholeImageFace(), face_embedder=None)


def test_ranking_drops_faceless_candidates_with_the_real_detector(models, astronaut, grace_hopper):
    images = [noise_image(256, seed) for seed in range(3)] + [astronaut, grace_hopper]
    prompts = ["a photo of <subj> girl"] * len(images)
    kept = rank(images, prompts, [grace_hopper], 3, models, RANKING_PRESETS["balanced"], instance_token="<subj>")
    assert sorted(c.index for c in kept) == [3, 4]  # only the two photos, although k=3
    assert [c.rank for c in kept] == [1, 2]
    assert kept[0].score >= kept[1].score
    assert all(c.faces == 1 and c.deliverable for c in kept)

    everyone = rank(
        images, prompts, [grace_hopper], 3, models, RANKING_PRESETS["balanced"], instance_token="<subj>",
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


def test_several_faces_are_never_delivered(models, astronaut, grace_hopper):
    pair = Image.new("RGB", (1024, 600))
    pair.paste(astronaut, (0, 0))
    pair.paste(grace_hopper, (512, 0))
    assert len(detect_faces(pair, models.face_detector)) == 2
    no_identity = dataclasses.replace(models, face_embedder=None)
    kept = rank([pair, astronaut], ["<subj> girl", "<subj> girl"], [], 2, no_identity, instance_token="<subj>")
    assert [c.index for c in kept] == [1]
    assert kept[0].scores["identity"] is None  # no references/embedder: not available


def test_returns_k_of_n_sorted_by_the_documented_score(one_face_models):
    head, clip = one_face_models.aesthetic, one_face_models.clip
    images = [noise_image(64, seed) for seed in range(6)]
    kept = rank(images, ["a photo of <subj> man"] * 6, [], 4, one_face_models, instance_token="<subj>")
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
    }
    z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)
    expected = 1.0 * z(raw["aesthetic"]) + 2.0 * z(raw["identity"])  # text has no spread -> 0
    got = combine(raw, RankingWeights(aesthetic=1.0, identity=2.0, text=0.5))
    assert got == pytest.approx(list(expected))
    # A score that is not available is left out; the others keep their weights.
    absent = combine({**raw, "identity": [None] * 3}, RankingWeights(aesthetic=1.0, identity=2.0, text=0.5))
    assert absent == pytest.approx(list(z(raw["aesthetic"])))


def _documented_presets() -> dict[str, dict[str, float]]:
    """The preset table of pipelines.ranking's docstring, parsed."""
    lines = pipelines.ranking.__doc__.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["preset"])
    columns = lines[header].split()[1:]
    presets = {}
    for line in lines[header + 2 :]:
        if line.startswith("="):
            break
        name, *values = line.split()
        presets[name] = dict(zip(columns, map(float, values[: len(columns)])))
    return presets


def test_documented_preset_weights_are_the_ones_computed(models, astronaut, grace_hopper):
    """Every preset weights exactly the scores ``rank`` computes, with the documented weights."""
    documented = _documented_presets()
    assert set(documented) == set(RANKING_PRESETS)
    assert all(columns.keys() == set(SCORE_NAMES) for columns in documented.values())
    for name, weights in RANKING_PRESETS.items():
        assert dataclasses.asdict(weights) == documented[name], name
        assert sum(documented[name].values()) == pytest.approx(1.0)
    assert "lpips" not in dataclasses.asdict(RankingWeights())  # dropped: never computed by rank

    if not getattr(models.face_embedder, "available", False):
        pytest.skip("no bundled face embedder installed: identity is not computed here")
    images = [astronaut, grace_hopper, astronaut.rotate(10), grace_hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    prompts = ["a photo of <subj> girl", "an oil painting of <subj> girl", "<subj> girl", "a photo of <subj> girl"]
    for name, weights in RANKING_PRESETS.items():
        ranked = rank(images, prompts, [astronaut], 4, models, weights, instance_token="<subj>", return_all=True)
        for score in SCORE_NAMES:  # every weighted score is computed for real, none is left out
            assert all(c.scores[score] is not None for c in ranked), (name, score)
        by_index = sorted(ranked, key=lambda c: c.index)
        expected = np.zeros(len(images))
        for score, weight in documented[name].items():
            x = np.array([c.scores[score] for c in by_index])
            expected += weight * (x - x.mean()) / x.std() if x.std() > 1e-12 else 0.0
        assert [c.scores["combined"] for c in by_index] == pytest.approx(list(expected)), name


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


def test_rank_checks_inputs(models):
    with pytest.raises(InvalidConfig):
        rank([noise_image(32)], [], [], 1, models)
    with pytest.raises(InvalidConfig):
        rank([noise_image(32)], ["x"], [], 0, models)
