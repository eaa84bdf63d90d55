"""The bot's request options (``LIKENESS_BOT_TRAIN_OPTIONS`` / ``LIKENESS_BOT_GENERATE_OPTIONS``) reach the
requests it sends, and a wrong one stops the bot at start instead of failing every user's job."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from likeness.bot.config import BotSettings


def _settings(monkeypatch, **env: str) -> BotSettings:
    for name, value in {"LIKENESS_TELEGRAM_TOKEN": "1:x", "LIKENESS_API_KEY": "k", **env}.items():
        monkeypatch.setenv(name, value)
    return BotSettings(_env_file=None)


def test_the_configured_options_are_what_the_bot_asks_for(monkeypatch):
    settings = _settings(monkeypatch, LIKENESS_BOT_TRAIN_OPTIONS='{"steps": 40, "class_token": "man"}',
                         LIKENESS_BOT_GENERATE_OPTIONS='{"n": 3, "k": 2, "upscale": "none"}')
    train = settings.train_request()
    assert (train.steps, train.class_token) == (40, "man")
    generate = settings.generate_request("cinematic", seed=11)
    # "none" is read as x1
    assert (generate.style, generate.n, generate.k, generate.upscale, generate.seed) == ("cinematic", 3, 2, 1, 11)


def test_without_options_the_bot_asks_for_the_best_4_of_8(monkeypatch):
    monkeypatch.delenv("LIKENESS_BOT_TRAIN_OPTIONS", raising=False)
    monkeypatch.delenv("LIKENESS_BOT_GENERATE_OPTIONS", raising=False)
    settings = _settings(monkeypatch)
    assert settings.train_request().steps is None  # the preset's default
    generate = settings.generate_request("noir", seed=5)
    assert (generate.style, generate.n, generate.k, generate.seed) == ("noir", 8, 4, 5)


def test_a_fixed_seed_in_the_options_wins_over_the_random_one(monkeypatch):
    settings = _settings(monkeypatch, LIKENESS_BOT_GENERATE_OPTIONS='{"seed": 7}')
    assert settings.generate_request("cinematic", seed=12345).seed == 7


@pytest.mark.parametrize("name, value", [
    ("LIKENESS_BOT_TRAIN_OPTIONS", '{"stepz": 40}'),  # not a train field
    ("LIKENESS_BOT_TRAIN_OPTIONS", '{"steps": 3}'),  # below the least steps
    ("LIKENESS_BOT_GENERATE_OPTIONS", '{"upscale": 3}'),  # only 2, 4 or "none"
])
def test_a_wrong_option_is_refused_at_start(monkeypatch, name, value):
    with pytest.raises(ValidationError, match=name.removeprefix("LIKENESS_").lower()):
        _settings(monkeypatch, **{name: value})
