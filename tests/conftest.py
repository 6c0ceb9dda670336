"""Shared fixtures: database backends, ledgers, and the local OpenAI-compatible server.

Backend tests run on SQLite always, and on PostgreSQL / MariaDB when
``TOKENLEDGER_TEST_POSTGRES_URL`` / ``TOKENLEDGER_TEST_MYSQL_URL`` are set (``.ci/run`` sets them;
with ``TOKENLEDGER_TEST_REQUIRE_BACKENDS=1`` a missing one fails instead of skipping).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

# Handler faults are logged and swallowed in users' apps; under the test suite they must raise.
os.environ["TOKENLEDGER_STRICT"] = "1"

from langchain_tokenledger import Ledger
from langchain_tokenledger.testing import FakeOpenAIServer

BACKEND_ENV = {
    "postgresql": "TOKENLEDGER_TEST_POSTGRES_URL",
    "mysql": "TOKENLEDGER_TEST_MYSQL_URL",
}
BACKENDS = ["sqlite", "postgresql", "mysql"]


def clean_database(url: str) -> None:
    """Drop every view and every ledger table, so each test starts from an empty database."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            inspector = sa.inspect(conn)
            for view in inspector.get_view_names():
                conn.execute(sa.text(f"DROP VIEW IF EXISTS {view}"))
            for table in inspector.get_table_names():
                if table == "llm_calls" or table.startswith("tokenledger"):
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        engine.dispose()


def backend_url_for(name: str, tmp_path: Path) -> str:
    """A clean database URL for backend ``name`` (skips when that server is not configured)."""
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url = os.environ.get(BACKEND_ENV[name])
    if not url:
        if os.environ.get("TOKENLEDGER_TEST_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{BACKEND_ENV[name]} is not set but backends are required")
        pytest.skip(f"{BACKEND_ENV[name]} not set")
    clean_database(url)
    return url


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A clean database URL, once per backend (sqlite, postgresql, mysql)."""
    return backend_url_for(request.param, tmp_path)


@pytest.fixture
def ledger(backend_url: str) -> Iterator[Ledger]:
    """A ledger on each backend in turn."""
    led = Ledger(backend_url)
    yield led
    led.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on a fresh SQLite file (for tests whose subject is not the database)."""
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


@pytest.fixture(scope="session")
def openai_session_server() -> Iterator[FakeOpenAIServer]:
    """One local OpenAI-compatible server for the whole session."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def openai_server(openai_session_server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """The local OpenAI-compatible server, reset to defaults before each test."""
    openai_session_server.reset()
    yield openai_session_server
    openai_session_server.wait_idle()  # requests abandoned by their client are still answered
    openai_session_server.reset()
