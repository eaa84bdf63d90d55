"""The bot's settings, read from ``LIKENESS_*`` environment variables (or ``.env``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from likeness.contract.requests import GenerateRequest, TrainRequest

#: Telegram's cloud Bot API hands bots files of at most 20 MB (``getFile``).
TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024


class BotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIKENESS_", env_file=".env", extra="ignore")

    telegram_token: SecretStr = Field(description="The bot's token from @BotFather.")
    telegram_api_url: str = Field("https://api.telegram.org", description="Bot API server (a local one works).")
    telegram_webhook_secret: SecretStr | None = Field(None, description="Webhook mode: secret Telegram sends back.")
    api_url: str = Field("http://127.0.0.1:8000", description="The Likeness API.")
    api_key: SecretStr = Field(description="An API key of a client with the `bot` role.")

    # Where the conversation lives: Redis when set (distributed mode), else a SQLite file in data_dir.
    redis_url: str = ""
    data_dir: Path = Path("./data")
    bot_redis_prefix: str = "likeness:bot:"

    bot_min_photos: int = Field(5, ge=1, description="Accepted photos before the Train button appears.")
    bot_max_photos: int = Field(20, ge=1, le=50)
    bot_trainings_per_day: int = Field(3, ge=1, description="Per Telegram user.")
    bot_generations_per_hour: int = Field(10, ge=1, description="Per Telegram user.")
    bot_retention_days: float = Field(30, gt=0, description="A user's photos, model and portraits are deleted "
                                                            "after this many days without a message.")
    bot_max_file_bytes: int = Field(TELEGRAM_DOWNLOAD_LIMIT, description="Files above are refused unread.")
    bot_train_options: dict[str, Any] = Field(default_factory=dict, description="TrainRequest fields (JSON).")
    bot_generate_options: dict[str, Any] = Field(default_factory=lambda: {"n": 8, "k": 4},
                                                  description="GenerateRequest fields besides style (JSON).")
    bot_status_interval_s: float = Field(2.0, ge=0, description="Least time between two edits of a status.")
    bot_poll_max_s: float = Field(5.0, gt=0, description="Longest pause between two polls of a job.")
    bot_album_wait_s: float = Field(1.5, ge=0, description="How long the photos of one album are gathered.")

    @field_validator("bot_train_options")
    @classmethod
    def _train_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        TrainRequest(**value)
        return value

    @field_validator("bot_generate_options")
    @classmethod
    def _generate_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        GenerateRequest(**{**value, "style": "cinematic"})
        return value

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "bot.sqlite3"

    def train_request(self) -> TrainRequest:
        return TrainRequest(**self.bot_train_options)

    def generate_request(self, style: str, seed: int) -> GenerateRequest:
        return GenerateRequest(**{"seed": seed, **self.bot_generate_options, "style": style})
