"""Training checkpoints through the blob store: a training lost on one machine resumes on another,
a half-uploaded checkpoint is never used, and a job's checkpoints go when it ends."""

from __future__ import annotations

import pytest
import torch

from pipelines.training import checkpoint as ckpt
from tests.worker.conftest import make_job, read_job, settings_with

PREFIX = "subjects/s1/checkpoints/j1/"


@pytest.fixture
def store(tmp_path):
    from core.storage import LocalBlobStore

    return LocalBlobStore(tmp_path / "blobs")


def _checkpoint(folder, step: int, fingerprint: str = "fp"):
    return ckpt.save_checkpoint(folder, ckpt.Checkpoint(step, fingerprint, {"w": torch.full((4,), float(step))},
                                                        {"state": {}, "param_groups": []}, torch.zeros(8)))


@pytest.mark.slow  # two tiny trainings: ~35 s on a busy 2-core machine
def test_training_lost_on_one_machine_resumes_on_another_from_the_blob_store(tmp_path, store, tiny_preset,
                                                                             astronaut, grace_hopper):
    from pipelines.errors import Canceled
    from pipelines.models.presets import with_overrides
    from pipelines.training import TrainConfig, train
    from pipelines.types import TokenSpec, TrainingExample
    from worker.checkpoints import mirror_checkpoint, restore_checkpoint

    preset = with_overrides(tiny_preset, resolution=32)
    examples = [TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a"),
                TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]
    tokens = TokenSpec("<subj>", "girl", ("<bg0>", "<bg1>"))
    config = TrainConfig(max_train_steps=8, checkpoint_every=2, unet_rank=4, text_encoder_rank=4, progress_every=2)
    calls = []

    def machine_a_dies_after_three_steps() -> bool:
        calls.append(1)
        return len(calls) > 6  # three checks before the first step, then one per step

    machine_a = tmp_path / "machine-a"
    with pytest.raises(Canceled):
        train(examples, tokens, config, preset, machine_a / "training", device="cpu",
              checkpoint_dir=machine_a / "checkpoints", should_stop=machine_a_dies_after_three_steps,
              on_checkpoint=lambda folder: mirror_checkpoint(store, PREFIX, folder))
    # only the newest mirrored checkpoint is kept, complete: step 2, where stage 1 (30 % of 8 steps) ends
    assert store.list(PREFIX) == [PREFIX + "step-000002/meta.json", PREFIX + "step-000002/state.pt"]

    machine_b = tmp_path / "machine-b"
    assert restore_checkpoint(store, PREFIX, machine_b / "checkpoints") == 2
    assert restore_checkpoint(store, PREFIX, machine_b / "checkpoints") is None  # already here: no download
    events = []
    result = train(examples, tokens, config, preset, machine_b / "training", device="cpu",
                   checkpoint_dir=machine_b / "checkpoints", on_progress=events.append,
                   on_checkpoint=lambda folder: mirror_checkpoint(store, PREFIX, folder))
    assert result.metrics["resumed_from_step"] == 2 and result.steps == 8
    # announced although the checkpoint is exactly at a stage boundary (stage 1 is skipped, stage 2 starts fresh)
    resumed = [e for e in events if "resumed_from_step" in e.metrics]
    assert [(e.stage, e.metrics["resumed_from_step"], e.message) for e in resumed] == [
        ("training:stage2", 2.0, "resumed from checkpoint at step 2")]
    assert "training:stage1" not in {e.stage for e in events}
    assert min(e.metrics["step"] for e in events if "step" in e.metrics) > 2  # steps 1-2 were not trained again


def test_a_half_uploaded_checkpoint_is_never_used(tmp_path, store):
    from worker.checkpoints import mirror_checkpoint, restore_checkpoint

    local = tmp_path / "a"
    assert mirror_checkpoint(store, PREFIX, _checkpoint(local, 2))
    # A worker killed while uploading step 4: its state is there, its meta.json (uploaded last) is not.
    store.put(PREFIX + "step-000004/state.pt", (local / "step-000002" / ckpt.STATE_NAME).read_bytes())
    target = tmp_path / "b"
    assert restore_checkpoint(store, PREFIX, target) == 2
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(target, "fp")).step == 2
    # A truncated state under a complete-looking folder fails meta.json's size check: not restored.
    assert mirror_checkpoint(store, PREFIX, _checkpoint(local, 6))
    store.put(PREFIX + "step-000006/state.pt", b"truncated")
    assert restore_checkpoint(store, PREFIX, target) is None
    assert ckpt.latest_checkpoint(target, "fp").name == "step-000002"
    # mirroring step 6 deleted the older uploads, the half one included
    assert {key.split("/")[-2] for key in store.list(PREFIX)} == {"step-000006"}


def test_a_newer_local_checkpoint_is_not_replaced_by_an_older_mirrored_one(tmp_path, store):
    from worker.checkpoints import mirror_checkpoint, restore_checkpoint

    assert mirror_checkpoint(store, PREFIX, _checkpoint(tmp_path / "old", 2))
    _checkpoint(tmp_path / "here", 6)
    assert restore_checkpoint(store, PREFIX, tmp_path / "here") is None
    assert ckpt.latest_checkpoint(tmp_path / "here", "fp").name == "step-000006"


def test_a_store_failure_while_mirroring_does_not_stop_training(tmp_path, store, monkeypatch):
    from worker.checkpoints import mirror_checkpoint

    def unreachable(*args, **kwargs):  # noqa: ANN002, ANN003
        raise ConnectionError("store down")

    monkeypatch.setattr(store, "put", unreachable)
    assert mirror_checkpoint(store, PREFIX, _checkpoint(tmp_path, 2)) is False


@pytest.mark.parametrize("ending", ["succeeded", "failed", "canceled_while_running", "canceled_before_start"])
def test_a_jobs_checkpoints_are_deleted_when_it_ends(sqlite_db, monkeypatch, queue, ending):
    from core.db.models import Job
    from core.storage import checkpoint_prefix, get_blob_store
    from likeness.contract.plan import JobKind
    from pipelines.errors import Canceled, InvalidConfig
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def training(ctx):
        assert ctx.edge.store.list(checkpoint_prefix(ctx.job.subject_id, ctx.job.id))  # still there while it runs
        if ending == "failed":
            raise InvalidConfig("bad")
        if ending == "canceled_while_running":
            raise Canceled("canceled by request")
        return None

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), lambda ctx: None)
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    settings = settings_with()
    job_id = make_job()
    job = read_job(job_id)
    store = get_blob_store(settings)
    store.put(checkpoint_prefix(job.subject_id, job_id) + "step-000100/meta.json", b"{}")
    if ending == "canceled_before_start":
        with session_scope() as session:
            session.get(Job, job_id).cancel_requested = True
    outcome = runner.run_job(job_id, settings=settings)
    assert outcome == ending.split("_")[0]
    assert store.list(checkpoint_prefix(job.subject_id, job_id)) == []


def test_lease_expiry_hands_a_job_on_while_busy_queues_are_not_flooded(sqlite_db, queue):
    """An owner silent past the lease (``job_stale_after_s``) is presumed dead; a job merely waiting in a
    busy queue is resent only after ``job_requeue_after_s``."""
    from core.db.models import Job
    from core.storage import checkpoint_prefix, get_blob_store
    from tests.app.fixtures import session_scope
    from worker.recovery import sweep

    settings = settings_with(job_heartbeat_s=5, job_stale_after_s=30, job_requeue_after_s=300)
    lost = make_job(attempts=1, state="running", worker="gone-host:1", heartbeat_age_s=40)
    alive = make_job(attempts=1, state="running", worker="busy-host:2", heartbeat_age_s=4)
    waiting = make_job(attempts=1, state="running", worker=None, heartbeat_age_s=40)  # handed over to the gpu queue
    exhausted = make_job(attempts=3, max_attempts=3, state="running", worker="gone-host:3", heartbeat_age_s=40)
    exhausted_job = read_job(exhausted)
    store = get_blob_store(settings)
    store.put(checkpoint_prefix(exhausted_job.subject_id, exhausted) + "step-000100/meta.json", b"{}")
    with session_scope() as session:
        session.get(Job, waiting).completed_stages = ["intake"]

    report = sweep(settings)
    assert report.requeued == [lost] and report.failed == [exhausted]
    assert read_job(lost).worker is None and read_job(lost).attempts == 2
    assert read_job(alive).worker == "busy-host:2" and read_job(waiting).worker is None
    assert read_job(exhausted).error_code == "worker_lost"
    assert store.list(checkpoint_prefix(exhausted_job.subject_id, exhausted)) == []  # nobody will resume it
    assert sweep(settings).requeued == []  # the requeued one is not sent again at the next beat


def test_a_lease_shorter_than_two_heartbeats_is_refused():
    from pydantic import ValidationError

    from core.config import Settings

    with pytest.raises(ValidationError, match="at least twice"):
        Settings(environment="test", job_heartbeat_s=5, job_stale_after_s=8)
    assert (Settings(environment="test").job_heartbeat_s, Settings(environment="test").job_stale_after_s) == (5, 30)
