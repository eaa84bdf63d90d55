"""Vision building blocks for intake and ranking: faces, persons, identity, segmentation.

Nothing here caches a model: each module has a ``load_*`` function (the CLI and tests call
it) and a ``*_spec`` function (the worker's model manager loads and shares by it). Backends
that need optional packages (facexlib, ultralytics) import them only when chosen.
"""
