"""Bot tests: the Bot API stand-in (``standin.py``), the bot as a process (``process.py``), and for
the service-facing tests the real app in-process (tests/app's fixtures)."""

from tests.app.conftest import *  # noqa: F403 - pg_url, settings, app, http, make_client, store
