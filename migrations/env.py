"""Alembic environment for the loraops registry.

loraops passes an open connection in ``config.attributes["connection"]`` (see loraops/registry/db.py); the
`alembic` command line in a checkout connects to $LORAOPS_DB or the SQLite file in $LORAOPS_HOME instead.
"""
from __future__ import annotations

from alembic import context

from loraops import settings
from loraops.registry.db import make_engine, writer
from loraops.registry.models import Base

config = context.config
target_metadata = Base.metadata
OPTIONS = {"target_metadata": target_metadata, "render_as_batch": True, "compare_type": True}


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url") or settings.db_url(), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif config.attributes.get("connection") is not None:
    run_online(config.attributes["connection"])
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or settings.db_url())
    with writer(engine).connect() as connection:
        run_online(connection)
        connection.commit()
