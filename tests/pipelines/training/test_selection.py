"""Checkpoint selection: which snapshots a run keeps, the rule that picks one, and the validation of
each snapshot on a borrowed base (tiny preset, random weights: identity is mechanics only here)."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters import load_manifest
from pipelines.models.loading import load_base_pipeline
from pipelines.training import TrainConfig, train
from pipelines.training.selection import (
    SnapshotScore,
    ValidationSet,
    select_snapshot,
    snapshot_steps,
    validate_snapshots,
)
from tests.pipelines.training.helpers import TOKENS, adapter_tensors

# ------------------------------------------------------------------ when snapshots are kept


@pytest.mark.parametrize("total, expected", [(20, [8, 12, 16, 20]), (10, [4, 6, 8, 10]), (3, [2, 3]), (1, [1]),
                                             (800, [320, 480, 640, 800])])
def test_snapshots_at_40_60_80_and_100_percent_of_the_steps(total, expected):
    assert snapshot_steps(total) == expected


# ------------------------------------------------------------------ the rule, on scripted score tables


def table(*rows):
    return [SnapshotScore(step, identity, text) for step, identity, text in rows]


@pytest.mark.parametrize("rows, expected", [
    # identity grows, text alignment holds: the last snapshot
    (((8, 0.50, 0.30), (12, 0.60, 0.30), (16, 0.70, 0.29), (20, 0.80, 0.29)), 20),
    # the likest snapshot is in the middle
    (((8, 0.50, 0.30), (12, 0.90, 0.30), (16, 0.70, 0.30), (20, 0.60, 0.30)), 12),
    # overfitting guard: the likest (20) no longer follows prompts (0.20 < 0.9 x 0.30); nor does anything after it
    (((8, 0.50, 0.30), (12, 0.60, 0.31), (16, 0.70, 0.20), (20, 0.95, 0.31)), 12),
    # exactly at the floor is still fine (0.27 = 0.9 x 0.30)
    (((8, 0.50, 0.30), (12, 0.60, 0.27)), 12),
    # ties on identity: the earlier (less trained) snapshot
    (((8, 0.70, 0.30), (12, 0.70, 0.30), (16, 0.60, 0.30)), 8),
    # no identity anywhere (no face in the images, no embedder): the last one before overfitting
    (((8, None, 0.30), (12, None, 0.30), (16, None, 0.10), (20, None, 0.30)), 12),
    # no scores at all: the finished adapter
    (((8, None, None), (12, None, None), (20, None, None)), 20),
    # a snapshot without a face is skipped, one without text alignment never counts as overfit
    (((8, 0.50, 0.30), (12, None, 0.30), (16, 0.55, None), (20, 0.52, 0.30)), 16),
    # the order the table comes in does not matter
    (((20, 0.80, 0.30), (8, 0.90, 0.30), (12, 0.10, 0.30)), 8),
])
def test_the_rule_picks_the_likest_snapshot_before_overfitting(rows, expected):
    assert select_snapshot(table(*rows)) == expected


def test_the_floor_is_a_parameter():
    rows = table((8, 0.5, 0.30), (12, 0.9, 0.25))
    assert select_snapshot(rows, floor=0.9) == 8
    assert select_snapshot(rows, floor=0.8) == 12


def test_no_snapshots_is_an_error():
    with pytest.raises(ValueError):
        select_snapshot([])


# ------------------------------------------------------------------ snapshots and their validation


class RecordingIdentity:
    """Stands in for the face embedder (random weights draw no faces): a score per call, in order."""

    def __init__(self, values):
        self.values = list(values)
        self.seen = []

    def similarity(self, images):
        from pipelines.eval.metrics import MetricValue

        self.seen.append(images)
        return MetricValue(self.values.pop(0), "scripted")


def test_snapshots_are_adapters_and_each_renders_the_same_validation_set(examples, preset, tmp_path):
    from pipelines.models.clip import load_clip

    config = TrainConfig(max_train_steps=10, unet_rank=4, text_encoder_rank=4, progress_every=2)
    steps = snapshot_steps(10)
    trained = train(examples, TOKENS, config, preset, tmp_path / "run", device="cpu", snapshot_steps=steps)
    assert sorted(trained.snapshots) == [4, 6, 8]  # the finished adapter is the 10-step one
    for step, folder in trained.snapshots.items():
        assert load_manifest(folder).steps == step
    assert load_manifest(trained.adapter_dir).steps == 10
    tensors = [adapter_tensors(folder) for folder in (*trained.snapshots.values(), trained.adapter_dir)]
    assert tensors[0].keys() == tensors[-1].keys()
    assert any(not torch.equal(tensors[0][k], tensors[-1][k]) for k in tensors[0])  # training went on after step 4

    pipe = load_base_pipeline(preset, "cpu", torch.float32)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    identity, shown = RecordingIdentity([0.1, 0.2, 0.3, 0.4]), []
    snapshots = sorted({**trained.snapshots, 10: trained.adapter_dir}.items())
    scores = validate_snapshots(pipe, snapshots, "<subj>", "girl", identity, load_clip(preset.clip), preset.resolution,
                                ValidationSet(num_inference_steps=2), on_validated=shown.append)
    assert [s.step for s in scores] == [4, 6, 8, 10]
    assert [s.identity for s in scores] == [0.1, 0.2, 0.3, 0.4]
    assert all(s.text_alignment is not None for s in scores)
    assert [v.step for v in shown] == [4, 6, 8, 10]
    assert all(len(v.plain) == 2 and len(v.styled) == 2 for v in shown)
    assert [len(images) for images in identity.seen] == [2, 2, 2, 2]  # identity is measured on the plain prompt
    # each snapshot draws something of its own from the same seeds
    assert shown[0].plain[0].tobytes() != shown[-1].plain[0].tobytes()
    # detached again: the base is what it was
    after = dict(pipe.unet.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(before[n], p) for n, p in after.items())


def test_a_rerun_starts_without_the_earlier_runs_snapshots(examples, preset, tmp_path):
    config = TrainConfig(max_train_steps=4, unet_rank=4, text_encoder_rank=4, progress_every=2)
    stale = tmp_path / "run" / "snapshots" / "step-000001"
    stale.mkdir(parents=True)
    trained = train(examples, TOKENS, config, preset, tmp_path / "run", device="cpu", snapshot_steps=[2])
    assert not stale.exists() and sorted(trained.snapshots) == [2]
