"""``python -m likeness``: runs the installed ``likeness`` command.

The command line lives above this package (it drives the API and the workers), so it is found
through the entry point the install registered rather than imported from here.
"""

from importlib.metadata import entry_points


def _main() -> None:
    (command,) = entry_points(group="console_scripts", name="likeness")
    command.load()()


_main()
