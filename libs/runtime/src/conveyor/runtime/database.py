"""Async engine, and schema migrations with alembic run at service start.

Each service owns one PostgreSQL schema (``scheduler``, ``recorder``) with its own alembic
version table. Migrations run under an advisory lock so that replicas starting together
do not race.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conveyor.runtime.settings import DatabaseSettings, database_url

__all__ = ["create_db_engine", "run_alembic_env", "upgrade_schema"]


def create_db_engine(settings: DatabaseSettings) -> AsyncEngine:
    return create_async_engine(
        settings.url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_pre_ping=settings.pool_pre_ping,
    )


def upgrade_schema(url: str, *, migrations: Path, schema: str) -> None:
    """Bring ``schema`` to the newest revision found in ``migrations`` (blocking)."""
    from alembic import command
    from alembic.config import Config

    engine = create_engine(database_url(url))
    try:
        with engine.begin() as conn:
            lock = zlib.crc32(f"conveyor-migrate-{schema}".encode())
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            cfg = Config()
            cfg.set_main_option("script_location", str(migrations))
            cfg.attributes["connection"] = conn
            cfg.attributes["schema"] = schema
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def run_alembic_env(target_metadata: MetaData | None = None) -> None:
    """Body of every service's ``migrations/env.py``: online mode on the given connection."""
    from alembic import context

    config = context.config
    connection: Any = config.attributes["connection"]
    schema: str = config.attributes["schema"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=schema,
        include_schemas=True,
    )
    with context.begin_transaction():
        context.run_migrations()
