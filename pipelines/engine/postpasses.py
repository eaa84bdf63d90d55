"""The passes over candidates before ranking, in the order they run: add a pass here, nowhere else.

Each pass follows :class:`pipelines.engine.job.PostPass`: it says whether it applies to a job and
returns the candidates (each may carry a new image and say what the pass did). Passes run with the
subject's adapter attached and borrow the engine's loaded models; ranking sees what they deliver.
"""

from __future__ import annotations

from pipelines.engine.face_refine import FaceRefinePass
from pipelines.engine.job import PostPass

POST_PASSES: tuple[PostPass, ...] = (FaceRefinePass(),)

__all__ = ["POST_PASSES"]
