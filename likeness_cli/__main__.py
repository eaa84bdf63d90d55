"""``python -m likeness_cli``: the ``likeness`` command."""

from likeness_cli.main import main

main()
