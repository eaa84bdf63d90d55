"""The face-refinement pass: redraw each candidate's face at the family's native resolution.

A face that covers a small part of the image gets few latent pixels, so it comes out soft or
deformed; A1111's ADetailer and EasyPhoto's second pass answer by re-rendering the face alone. Per
candidate, with the subject's adapter still attached:

1. detect the face with the bundled detector the ranking already holds (the best one; a candidate
   with no face is delivered unrefined, never dropped for that alone);
2. take a square crop around the face's feathered mask, with margin, at the preset's resolution
   (the family's native one: 512 for SD 1.5, 1024 for SDXL);
3. re-render it with the family's image-to-image pipeline at a moderate strength, the candidate's own
   prompt and seed (so a candidate re-run alone is refined the same way);
4. match the new face's colours to the candidate's (Lab, inside the mask) and paste it back through
   the feathered mask: outside the mask every pixel is the candidate's own, bit for bit.

Ranking then scores what is delivered: the refined images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from PIL import Image

from pipelines.engine.job import Candidate, Job, Renderer
from pipelines.progress import Stage, StageProgress
from pipelines.templates.masking import Region, face_only_mask, lab_color_transfer, paste
from pipelines.types import TokenSpec
from pipelines.vision.faces import detect_faces

#: the img2img strength: enough to redraw eyes, mouth and skin, little enough to keep the face's pose
STRENGTH = 0.35
#: the crop square is this many times the face mask's longer side (context for the re-render)
CONTEXT = 1.5
#: a detection below this confidence is not a face to refine
MIN_SCORE = 0.5


def face_region(image: Image.Image, detector) -> Region | None:
    """The region to redraw in ``image``: its best face's feathered mask and a square around it."""
    faces = detect_faces(image, detector, MIN_SCORE)
    if not faces:
        return None
    return Region.around(face_only_mask(image.size, faces[0]), CONTEXT)


class FaceRefinePass:
    """A post-pass (:class:`pipelines.engine.job.PostPass`): on when the job's delivery asks for it."""

    def applies(self, engine: Renderer, job: Job) -> bool:
        return job.delivery.face_refine

    def __call__(self, engine: Renderer, candidates: list[Candidate], job: Job,
                 tokens: TokenSpec) -> list[Candidate]:
        regions = [face_region(c.image, engine.models.ranking.face_detector) for c in candidates]
        todo = [i for i, region in enumerate(regions) if region is not None]
        if not todo:
            return candidates
        refined = self.refine(engine, [candidates[i] for i in todo], [regions[i] for i in todo], job)
        out = list(candidates)
        for i, image in zip(todo, refined):
            out[i] = replace(candidates[i], image=image, face_refined=True)
        return out

    def refine(self, engine: Renderer, candidates: Sequence[Candidate], regions: Sequence[Region],
               job: Job) -> list[Image.Image]:
        """Re-render every region's crop (one batched call), match colours, paste back."""
        resolution = engine.preset.resolution
        spec = job.spec
        crops = [region.crop_image(c.image, resolution) for c, region in zip(candidates, regions)]
        pipe, _ = engine.pipeline("image_to_image", spec)
        steps = max(1, min(int(spec.steps * STRENGTH), spec.steps))
        # The pass's own progress stays inside the generating stage's clients already saw finish; only
        # cancel is checked here, at every step.
        progress = StageProgress(None, Stage.GENERATING, total=len(crops) * steps)
        drawn = engine.render(pipe, spec, [c.prompt for c in candidates], [c.seed for c in candidates], progress,
                              job.should_stop, per_candidate={"image": crops}, strength=STRENGTH)
        out = []
        for candidate, region, crop, new in zip(candidates, regions, crops, drawn):
            new = lab_color_transfer(new, crop, region.crop_mask(resolution))
            out.append(paste(candidate.image, new, region))
        return out


__all__ = ["CONTEXT", "STRENGTH", "FaceRefinePass", "face_region"]
