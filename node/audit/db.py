"""Engine creation and schema migration for the audit database (SQLite or PostgreSQL)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine as Engine  # re-exported for type hints outside node.audit
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


#: Execution option of the connections that only read (:meth:`node.audit.store.AuditStore.reading`).
READ_ONLY = "cxrnode_read_only"


def make_engine(url: str, echo: bool = False) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and write transactions that take the lock first."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True, future=True)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit BEGIN is deferred,
        # and a deferred transaction that later writes can fail with "database is locked").
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss: persist-before-ack
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # A read (READ_ONLY) takes a WAL snapshot and never waits for a writer; everything else takes
        # the write lock first.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def alembic_config(url: str) -> Config:
    """A programmatic Alembic config: works from an installed package, no alembic.ini needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


#: PostgreSQL advisory lock key held while migrating ("cxrn" in ASCII).
MIGRATION_LOCK = 0x6378726E


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; run at every start).

    Two nodes sharing one PostgreSQL database may start at the same time: the migration runs under a
    transaction-scoped advisory lock, so the second waits for the first and then finds the schema at
    head (without it both create the version table and one start fails)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.debug("audit schema at head (%s)", engine.url.get_backend_name())


class DatabaseUnreachable(Exception):
    """The database server or file cannot be reached; the message names it (password hidden)."""


def database_exists(url: str) -> bool:
    """Whether `url` holds an audit schema a node has made (alembic's version table), creating nothing.

    Admin commands open the database only when this holds: a mistyped or missing configuration
    must not give them a new, empty database that they then report from or write into.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (
        not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).is_file()
    ):
        return False
    engine = create_engine(url, future=True)
    try:
        with engine.connect() as conn:
            return bool(inspect(conn).has_table("alembic_version"))
    except SQLAlchemyError as e:
        raise DatabaseUnreachable(f"cannot open the audit database {redact_url(url)}: {e}") from e
    finally:
        engine.dispose()


def ping(engine: Engine) -> str:
    """One round trip to the database (readiness); raises whatever the driver raises."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return f"{engine.dialect.name} reachable"


def redact_url(url: str) -> str:
    """A database URL fit for messages and logs: the password hidden."""
    return make_url(url).render_as_string(hide_password=True)
