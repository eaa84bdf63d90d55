"""Template jobs run the face-refinement pass too: it redraws only the face's feathered region."""

from __future__ import annotations

from pipelines.engine.face_refine import face_region
from pipelines.templates.engine import changed_pixels
from tests.pipelines.generation.test_face_refine import FixedFace, with_detector


def test_template_jobs_refine_the_face_too(template_engine, prepared, id_photo):
    from pipelines.templates.spec import TemplateSpec

    engine = with_detector(template_engine, FixedFace(prepared.face))
    spec = TemplateSpec(template="id_photo", prompt="{instance} {class}, photo", n=1, k=1, steps=4,
                        guidance_scale=1.0, upscale=None, face_refine=True)
    (refined,) = engine.run(spec, prepared)
    (plain,) = engine.run(spec.model_copy(update={"face_refine": False}), prepared)
    assert refined.face_refined and not plain.face_refined
    region = face_region(plain.image, engine.models.ranking.face_detector)
    changed = changed_pixels(plain.image, refined.image)
    assert changed.any() and not changed[region.mask == 0].any()
    assert not changed_pixels(id_photo, refined.image)[prepared.region.mask + region.mask == 0].any()
