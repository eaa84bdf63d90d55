"""``likeness bot`` as a real process (its own session, log in a file), for the bot's tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.bot.standin import TOKEN, BotApiStandIn

ROOT = Path(__file__).resolve().parents[2]

FAST = {  # short pauses so a test does not wait on human-scale timings
    "LIKENESS_BOT_STATUS_INTERVAL_S": "0.3",
    "LIKENESS_BOT_POLL_MAX_S": "1",
    "LIKENESS_BOT_ALBUM_WAIT_S": "1.5",
}


def bot_env(tg: BotApiStandIn, api_url: str, api_key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKENESS_")}
    return {**env, "LIKENESS_TELEGRAM_TOKEN": TOKEN, "LIKENESS_TELEGRAM_API_URL": tg.url, "LIKENESS_API_URL": api_url,
            "LIKENESS_API_KEY": api_key, **FAST, **extra}


class BotProcess:
    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()):
        self.env, self.log_path, self.args = env, log_path, args
        self.proc: subprocess.Popen | None = None

    def start(self) -> BotProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "likeness", "bot", *self.args], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=log, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: nothing gets to clean up or save."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> BotProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
