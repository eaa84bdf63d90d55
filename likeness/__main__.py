"""``python -m likeness``: the command line (same as the ``likeness`` script)."""

from likeness.cli import main

main()
