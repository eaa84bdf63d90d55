"""A train job keeps the snapshot the selection rule picks: the subject's adapter, its kohya export and the
job's result are that snapshot's (tiny preset on CPU; the scores are scripted on top of the real
validation, since random weights draw no faces)."""

from __future__ import annotations

import io
import shutil
import zipfile

import pytest
import torch

from tests.conftest import MODEL_CACHE, encode
from tests.pipelines.intake.conftest import person_variants
from tests.worker.conftest import read_job, settings_with, subject_with_photos

STEPS = 10
#: identity per snapshot step: the 6-step snapshot looks most like the person
SCRIPTED_IDENTITY = {4: 0.30, 6: 0.90, 8: 0.60, 10: 0.50}


def _train(settings, photos: list[bytes], **request) -> tuple[str, str]:  # noqa: ANN003
    from core.db.models import Job, JobKind, JobState
    from likeness.contract.requests import TrainRequest, resolve_train
    from tests.app.fixtures import session_scope
    from worker import runner

    client_id, subject_id = subject_with_photos(settings, photos)
    with session_scope() as session:
        resolved = resolve_train(TrainRequest(steps=STEPS, seed=3, **request), preset="tiny")
        job = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.TRAIN, state=JobState.QUEUED,
                  request=resolved.model_dump(mode="json"), completed_stages=[])
        session.add(job)
        session.flush()
        job_id = job.id
    assert runner.run_job(job_id, settings=settings) == "succeeded", read_job(job_id).error_message
    return job_id, subject_id


def _tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    out = {}
    for name, data in sorted(files.items()):
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load(data).items()})
    return out


@pytest.mark.slow
def test_the_subjects_adapter_and_export_are_the_selected_snapshot_bit_for_bit(sqlite_db, queue, grace_hopper,
                                                                              tmp_path, monkeypatch):
    from core.storage import adapter_export_key, adapter_prefix, get_blob_store, preview_key
    from likeness.contract.results import read_result
    from pipelines.adapters import kohya_zip
    from pipelines.training import selection

    kept: dict[int, object] = {}
    measured = []
    real = selection.validate_snapshots

    def scripted(pipe, snapshots, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        for step, folder in snapshots:  # what each snapshot held when it was validated
            kept[step] = shutil.copytree(folder, tmp_path / "kept" / f"{step}")
        measured.extend(real(pipe, snapshots, *args, **kwargs))
        # the tiny CLIP's text alignment of noise is arbitrary: the overfitting guard must not decide here
        return [selection.SnapshotScore(s.step, SCRIPTED_IDENTITY[s.step], 0.3) for s in measured]

    from worker import phases

    monkeypatch.setattr(phases, "validate_snapshots", scripted)
    settings = settings_with(model_cache_dir=MODEL_CACHE, device="cpu")
    photos = [encode(variant, quality=92) for variant in person_variants(grace_hopper, 6)]
    job_id, subject_id = _train(settings, photos)

    result = read_result("train", read_job(job_id).result)
    selection_result = result.checkpoint_selection
    assert selection_result is not None and selection_result.selected_step == 6
    assert [c.step for c in selection_result.candidates] == [4, 6, 8, 10]
    assert [c.identity for c in selection_result.candidates] == [SCRIPTED_IDENTITY[s] for s in (4, 6, 8, 10)]
    assert [s.step for s in measured] == [4, 6, 8, 10] and all(s.text_alignment is not None for s in measured)
    assert [p.step for p in result.previews] == [4, 6, 8, 10]
    assert result.training.steps == STEPS and result.training.selection_s > 0

    store = get_blob_store(settings)
    assert all(store.exists(preview_key(subject_id, job_id, step)) for step in (4, 6, 8, 10))
    prefix = adapter_prefix(subject_id, result.adapter.version)
    stored = {key.removeprefix(prefix): store.get(key) for key in store.list(prefix)}
    selected = {p.relative_to(kept[6]).as_posix(): p.read_bytes() for p in kept[6].rglob("*") if p.is_file()}
    final = {p.relative_to(kept[10]).as_posix(): p.read_bytes() for p in kept[10].rglob("*") if p.is_file()}
    adapter, chosen, last = _tensors(stored), _tensors(selected), _tensors(final)
    assert adapter.keys() == chosen.keys() and adapter
    assert all(torch.equal(adapter[k], chosen[k]) for k in adapter)  # bit for bit the 6-step snapshot
    assert any(not torch.equal(adapter[k], last[k]) for k in adapter)  # not the finished adapter
    assert {k: v for k, v in stored.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in selected.items() if k.endswith(".safetensors")}

    # the kohya export is the selected snapshot's too
    exported = zipfile.ZipFile(io.BytesIO(store.get(adapter_export_key(subject_id, result.adapter.version, "kohya"))))
    name = f"likeness-{subject_id[:8]}-v{result.adapter.version}"
    expected = zipfile.ZipFile(kohya_zip(kept[6], tmp_path / "expected.zip", name))
    tensors = sorted(n for n in expected.namelist() if n.endswith(".safetensors"))
    assert tensors and sorted(n for n in exported.namelist() if n.endswith(".safetensors")) == tensors
    ours = _tensors({n: exported.read(n) for n in tensors})
    theirs = _tensors({n: expected.read(n) for n in tensors})
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_selection_is_on_for_lora_off_for_full_and_can_be_turned_off():
    from likeness.contract.requests import TrainRequest, resolve_train

    assert resolve_train(TrainRequest(), preset="tiny").select_checkpoint is True
    assert resolve_train(TrainRequest(select_checkpoint=False), preset="tiny").select_checkpoint is False
    assert resolve_train(TrainRequest(mode="full"), preset="tiny").select_checkpoint is False
    assert resolve_train(TrainRequest(mode="full", select_checkpoint=True), preset="tiny").select_checkpoint is True
    # a job stored before the option existed ran without it
    from likeness.contract.requests import read_resolved

    stored = resolve_train(TrainRequest(), preset="tiny").model_dump(mode="json")
    del stored["select_checkpoint"]
    assert read_resolved("train", stored).select_checkpoint is False


def test_a_selection_without_identity_scores_reads_back():
    """Random weights draw no face: every identity is None, which the stored result leaves out."""
    from likeness.contract.results import CheckpointCandidate, CheckpointSelection, TrainResult, read_result

    result = TrainResult(checkpoint_selection=CheckpointSelection(selected_step=10, candidates=[
        CheckpointCandidate(step=4, identity=None, text_alignment=0.25),
        CheckpointCandidate(step=10, identity=None, text_alignment=None)]))
    assert read_result("train", result.stored()) == result
