"""Shared fixtures: real PostgreSQL / Redis servers on free loopback ports, audit databases, node processes."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.common import without_venv_scripts
from tests.support.node import NodeProcess
from tests.support.pg import PostgresServer
from tests.support.redis import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    # DCMTK's storescp/storescu/echoscu, not pynetdicom's apps of the same names in an activated venv.
    os.environ["PATH"] = without_venv_scripts(os.environ.get("PATH", ""))


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Undo what a CLI's `main` run in-process did to the root logger. Its handler writes to the
    stream of that test (capsys closes it at the end); a thread that logs later would otherwise
    hit the closed stream ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit database: SQLite in tmp_path, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def node_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., NodeProcess]]:
    """Make (not start) node processes sharing this test's database; all are stopped afterwards."""
    nodes: list[NodeProcess] = []

    def make(name: str = "node", **kwargs: object) -> NodeProcess:
        root = tmp_path / name
        root.mkdir()
        node = NodeProcess(root, database_url, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> Iterator[NodeProcess]:
    """A running node (SIGTERM at the end must exit 0: graceful stop)."""
    n = node_factory().start()
    yield n
    assert n.stop() == 0, n.log_text()[-3000:]
