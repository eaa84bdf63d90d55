"""The engine core shared by text-to-image generation and template mode.

* :mod:`pipelines.engine.components`: the models an engine serves (:class:`EngineModels`), what a
  request needs loaded (:class:`Needs`), and the per-call diffusers pipeline built over the base,
  whose class comes from the preset's model family (``pipelines.models.family``), never from a
  test of the family's name;
* :mod:`pipelines.engine.core`: :class:`EngineCore`: an adapter scope that always detaches, the
  batched denoising loop (candidate ``i`` from the noise of its own seed), and the tail every job
  shares: candidates -> post-passes -> safety flags -> rank -> upscale -> results;
* :mod:`pipelines.engine.postpasses`: the passes over candidates before ranking, in one list
  (:data:`~pipelines.engine.postpasses.POST_PASSES`).

The front ends are thin: :class:`pipelines.generation.engine.GenerationEngine` renders candidates
from noise (with ControlNets), :class:`pipelines.templates.engine.TemplateEngine` inpaints them into
a template photo. A new model family is one description in ``pipelines/models/family.py``; a new
post-pass is one entry in ``POST_PASSES``.

Importing this package imports nothing heavy; its modules import torch.
"""
