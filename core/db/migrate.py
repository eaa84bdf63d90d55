"""Run Alembic migrations from code (CLI ``migrate``, embedded start-up, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from core.config import get_settings
from core.db.session import get_engine, normalize_url
from core.private_files import private_dir

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url or get_settings().resolved_database_url).replace("%", "%%"))
    return cfg


def upgrade_to_head(url: str | None = None) -> None:
    """Create or upgrade every table (idempotent)."""
    url = url or get_settings().resolved_database_url
    if url.startswith("sqlite:///"):
        private_dir(Path(url.removeprefix("sqlite:///")).parent)
    command.upgrade(alembic_config(url), "head")


def downgrade_to_base(url: str | None = None) -> None:
    """Drop every table the migrations created."""
    command.downgrade(alembic_config(url), "base")


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
