"""Shared fixtures: database backends, ledgers, and the local OpenAI-compatible server.

Backend tests run on SQLite always, and on PostgreSQL / MariaDB when
``TOKENLEDGER_TEST_POSTGRES_URL`` / ``TOKENLEDGER_TEST_MYSQL_URL`` are set (``.ci/run`` sets them;
with ``TOKENLEDGER_TEST_REQUIRE_BACKENDS=1`` a missing one fails instead of skipping).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

# Handler faults are logged and swallowed in users' apps; under the test suite they must raise.
os.environ["TOKENLEDGER_STRICT"] = "1"

from langchain_tokenledger import Ledger, store
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
def ledger(backend_url: str, tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on each backend in turn."""
    led = Ledger(backend_url, fallback_dir=tmp_path)
    yield led
    led.close()


@pytest.fixture
def default_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """The process-wide default ledger, on a fresh SQLite file for this test only."""
    monkeypatch.setenv("TOKENLEDGER_URL", f"sqlite:///{tmp_path / 'default.db'}")
    monkeypatch.setattr(store, "_default", None)
    ledger = store.default_ledger()
    yield ledger
    ledger.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on a fresh SQLite file (for tests whose subject is not the database)."""
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", fallback_dir=tmp_path)
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


@pytest.fixture
def byte_encoding() -> Iterator[Any]:
    """Estimates count one token per UTF-8 byte, for every model (a real, locally built encoding).

    tiktoken cannot download OpenAI's encodings offline; this one needs no data file.
    """
    import tiktoken

    from langchain_tokenledger import estimate

    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )
    estimate.clear_encodings()
    estimate.register_encoding("", encoding)
    yield encoding
    estimate.clear_encodings()


class RefusingProxy:
    """A local HTTP(S) proxy that counts the connections it gets and hangs up on each."""

    def __init__(self) -> None:
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def offline_tiktoken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[RefusingProxy]:
    """tiktoken as on a machine without network: empty cache, every download refused."""
    import tiktoken.registry

    from langchain_tokenledger import estimate

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded online
    proxy = RefusingProxy()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):  # the local OpenAI server stays reachable
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    estimate.clear_encodings()
    yield proxy
    estimate.clear_encodings()
    proxy.close()
