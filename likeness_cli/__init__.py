"""The ``likeness`` command line: the top of the import graph (it may use every room)."""
