"""What a generation delivers: never an empty success."""

from __future__ import annotations

import pytest


def test_a_generation_whose_candidates_all_fail_the_one_face_rule_fails_clearly(tiny_preset):
    """With the delivery rule on (as on real models), noise candidates show no face: the job must fail
    with ``no_deliverable_image`` and say how many candidates were dropped and why."""
    from pipelines.generation import GenerationEngine, GenerationSpec
    from pipelines.models.presets import with_overrides
    from worker.phases import NoDeliverableImage, deliverable_results

    spec = GenerationSpec(prompts=("a photo of {instance} {class}",), n=3, k=2, steps=2, guidance_scale=1.0,
                          upscale=None)
    preset = with_overrides(tiny_preset, resolution=64, require_one_face=True)
    engine = GenerationEngine.load(preset, "cpu", request=spec)
    results = engine.generate(spec, return_all=True)
    assert len(results) == 3 and all(r.rank == 0 and r.faces == 0 for r in results)
    with pytest.raises(NoDeliverableImage) as err:
        deliverable_results(results)
    assert err.value.error_code == "no_deliverable_image"
    assert err.value.details == {"candidates": 3, "dropped": {"no_face": 3}}
    assert "3 no_face" in err.value.message


def test_each_delivered_image_says_whether_its_face_was_refined(sqlite_db, tmp_path):
    """The service edge writes ``face_refined`` on the image rows; the API schema and the client read it."""
    from types import SimpleNamespace

    from PIL import Image as PILImage
    from sqlalchemy import select

    from app.api.schemas import ImagePublic
    from core.db.models import Image
    from core.storage import LocalBlobStore
    from likeness.client.models import Image as ClientImage
    from tests.app.fixtures import session_scope
    from tests.worker.conftest import make_job, read_job, settings_with
    from worker.jobs import JobSnapshot
    from worker.service_edge import ServiceEdge

    job = JobSnapshot.of(read_job(make_job()))
    edge = ServiceEdge(settings_with(), LocalBlobStore(tmp_path / "blobs"))
    for rank, refined in ((1, True), (2, False)):
        edge.deliver(job, SimpleNamespace(rank=rank, seed=rank, prompt="p", image=PILImage.new("RGB", (8, 8)),
                                          scores={"identity": 0.5}, face_refined=refined))
    edge.delivered(job)

    with session_scope() as session:
        rows = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.rank)).all()
        answered = [ImagePublic.model_validate(row).model_dump(mode="json") for row in rows]
    assert [a["face_refined"] for a in answered] == [True, False]
    assert [ClientImage.model_validate(a).face_refined for a in answered] == [True, False]
