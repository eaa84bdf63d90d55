"""Vision building blocks for intake and ranking: faces, persons, identity, segmentation.

Every detector here keeps its loaded model in a module-level cache, so a warm worker
loads it once. Backends that need optional packages (facexlib, ultralytics) import
them only when chosen.
"""
