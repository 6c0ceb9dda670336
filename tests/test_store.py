"""The store: schema on every backend, batched idempotent writes, durability, and failures."""

from __future__ import annotations

import json
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import hide_table, in_forked_child, restore_table, rows_by_run_id

from langchain_tokenledger import Ledger, LedgerError, TokenLedgerHandler, UsageRecord
from langchain_tokenledger.records import RECORD_FIELDS
from langchain_tokenledger.schema import SCHEMA_VERSION
from langchain_tokenledger.store import resolve_url
from langchain_tokenledger.testing import FakeUsageChatModel

DOCUMENTED_COLUMNS = [
    "run_id", "parent_run_id", "root_run_id", "root_name", "run_name", "provider", "model",
    "status", "error_type", "input_tokens", "output_tokens", "total_tokens", "cache_read_tokens",
    "cache_creation_tokens", "reasoning_tokens", "cost_usd", "price_source", "cache_hit",
    "usage_source", "usage_details", "streamed", "started_at", "ended_at", "latency_ms",
    "ttft_ms", "user_id", "session_id", "tags", "metadata", "notes", "ancestry",
]  # fmt: skip

T0 = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
T1 = datetime(2026, 11, 1, 12, 30, 16, 0, tzinfo=timezone.utc)


def full_record(run_id: str = "01900000-0000-7000-8000-000000000001", **kw: Any) -> UsageRecord:
    """A record with every column filled."""
    values: dict[str, Any] = dict(
        run_id=run_id,
        parent_run_id="01900000-0000-7000-8000-0000000000aa",
        root_run_id="01900000-0000-7000-8000-0000000000aa",
        root_name="RunnableSequence",
        run_name="ChatOpenAI",
        provider="openai",
        model="gpt-4o-mini",
        status="ok",
        input_tokens=120,
        output_tokens=30,
        total_tokens=150,
        cache_read_tokens=100,
        cache_creation_tokens=0,
        reasoning_tokens=10,
        cost_usd=Decimal("0.000123456789"),
        price_source="override",
        usage_source="provider",
        usage_details={"input_tokens": 120, "input_token_details": {"cache_read": 100}},
        streamed=True,
        started_at=T0,
        ended_at=T1,
        latency_ms=876.544,
        ttft_ms=12.5,
        user_id="u1",
        session_id="s1",
        tags=["team-a", "nightly"],
        metadata={"user_id": "u1", "feature": "summarize", "n": 3},
        notes=["total_mismatch"],
        ancestry="01900000-0000-7000-8000-0000000000aa",
    )
    values.update(kw)
    return UsageRecord(**values)


@pytest.fixture(autouse=True, params=["process", "thread"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each writer: the writer process, and threads of this process
    (what a ledger falls back to when the writer process cannot run)."""
    monkeypatch.setenv("TOKENLEDGER_WRITER", request.param)
    return str(request.param)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def test_schema_has_the_documented_columns_and_version(ledger: Ledger) -> None:
    inspector = sa.inspect(ledger.engine)
    columns = [c["name"] for c in inspector.get_columns("llm_calls")]
    assert columns == DOCUMENTED_COLUMNS == list(RECORD_FIELDS)
    assert inspector.get_pk_constraint("llm_calls")["constrained_columns"] == ["run_id"]
    indexes = {ix["name"] for ix in inspector.get_indexes("llm_calls")}
    assert {
        "ix_llm_calls_root_run_id",
        "ix_llm_calls_started_at",
        "ix_llm_calls_model_started_at",
        "ix_llm_calls_user_id_started_at",
        "ix_llm_calls_session_id",
    } <= indexes
    assert ledger.query("SELECT value FROM tokenledger_meta WHERE name = 'schema_version'") == [
        {"value": str(SCHEMA_VERSION)}
    ]


def test_a_record_round_trips_exactly(ledger: Ledger) -> None:
    ledger.record(full_record())
    ledger.flush()

    [row] = rows_by_run_id(ledger)
    assert row["cost_usd"] == Decimal("0.000123456789")
    assert as_utc(row["started_at"]) == T0
    assert as_utc(row["ended_at"]) == T1
    assert row["tags"] == ["team-a", "nightly"]
    assert row["metadata"] == {"user_id": "u1", "feature": "summarize", "n": 3}
    assert row["usage_details"] == {"input_tokens": 120, "input_token_details": {"cache_read": 100}}
    assert row["notes"] == ["total_mismatch"]
    assert row["cache_hit"] is False
    assert row["streamed"] is True
    for name in ("run_id", "model", "input_tokens", "reasoning_tokens", "user_id", "ancestry"):
        assert row[name] == getattr(full_record(), name)


def test_unknown_usage_is_null_not_zero(ledger: Ledger) -> None:
    ledger.record(
        UsageRecord(
            run_id="r-none", status="error", error_type="RateLimitError", usage_source="none"
        )
    )
    ledger.flush()

    [row] = rows_by_run_id(ledger)
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (None, None, None)
    assert (row["cost_usd"], row["usage_source"], row["status"]) == (None, "none", "error")


def test_writes_are_idempotent_on_run_id(ledger: Ledger) -> None:
    first = full_record(input_tokens=1)
    ledger.record(first)
    ledger.record(full_record(input_tokens=2))  # same run_id, same batch
    ledger.flush()
    ledger.record(full_record(input_tokens=3))  # same run_id, a later batch
    ledger.record(full_record(run_id="01900000-0000-7000-8000-000000000002"))
    ledger.flush()

    rows = rows_by_run_id(ledger)
    assert [(r["run_id"], r["input_tokens"]) for r in rows] == [
        ("01900000-0000-7000-8000-000000000001", 1),
        ("01900000-0000-7000-8000-000000000002", 120),
    ]


def test_many_records_are_written_in_batches(backend_url: str) -> None:
    ledger = Ledger(backend_url, batch_size=64)
    for i in range(1000):
        ledger.record(full_record(run_id=f"run-{i:05d}", total_tokens=i))
    ledger.flush()

    [stats] = ledger.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls")
    assert (stats["n"], int(stats["s"])) == (1000, sum(range(1000)))
    assert ledger.pending == 0
    ledger.close()


def test_rows_are_visible_to_another_connection_once_flush_returns(backend_url: str) -> None:
    ledger = Ledger(backend_url)
    ledger.record(full_record())
    ledger.flush()

    other = sa.create_engine(backend_url)
    with other.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM llm_calls")).scalar() == 1
    other.dispose()
    ledger.close()


def test_close_flushes_is_idempotent_and_keeps_late_records_in_a_file(
    backend_url: str, tmp_path: Path
) -> None:
    ledger = Ledger(backend_url, fallback_dir=tmp_path)
    ledger.record(full_record())
    ledger.close()
    ledger.close()

    with pytest.raises(LedgerError, match="closed"):
        ledger.record(full_record(run_id="late"))
    [saved] = tmp_path.glob("tokenledger-unwritten-*.jsonl")
    assert json.loads(saved.read_text())["run_id"] == "late"
    reader = Ledger(backend_url)
    assert reader.query("SELECT COUNT(*) AS n FROM llm_calls") == [{"n": 1}]
    reader.close()


def test_overlong_names_are_clipped_and_flagged_not_lost(ledger: Ledger) -> None:
    ledger.record(full_record(model="m" * 300))
    ledger.flush()

    [row] = rows_by_run_id(ledger)
    assert row["model"] == "m" * 255
    assert row["notes"] == ["total_mismatch", "truncated:model"]


# -- bad input fails early -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "invalid ledger URL"),
        ("nosuchdb://x/y", "no database driver"),
        ("sqlite:////no/such/dir/ledger.db", "no directory"),
        ("postgresql://postgres@127.0.0.1:1/test", "cannot open ledger"),
        ("mysql://root@127.0.0.1:1/test", "cannot open ledger"),
    ],
)
def test_a_bad_url_fails_when_the_ledger_is_created(url: str, message: str) -> None:
    with pytest.raises(LedgerError, match=message):
        Ledger(url)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_pending": 10, "batch_size": 100}, "max_pending"),
        ({"linger": -1}, "linger"),
    ],
)
def test_bad_arguments_fail_early(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ledger("sqlite://", **kwargs)


def test_driverless_urls_get_the_installed_drivers() -> None:
    assert resolve_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert resolve_url("mysql://u@h/db").drivername == "mysql+pymysql"
    assert resolve_url("mariadb://u@h/db").drivername == "mariadb+pymysql"
    assert resolve_url("sqlite:///x.db").drivername == "sqlite"


def test_default_url_is_env_then_local_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENLEDGER_URL", raising=False)
    assert resolve_url().render_as_string() == "sqlite:///tokenledger.db"
    monkeypatch.setenv("TOKENLEDGER_URL", f"sqlite:///{tmp_path / 'env.db'}")
    ledger = Ledger()
    ledger.close()
    assert (tmp_path / "env.db").exists()
    assert not (tmp_path / "tokenledger.db").exists()


# -- failures: retried, bounded, never silently dropped --------------------------------------


def test_a_failed_batch_is_retried_until_the_database_recovers(
    backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(backend_url)
    hide_table(backend_url)
    ledger.record(full_record())
    with pytest.raises(LedgerError, match="1 records not written"):
        ledger.flush(timeout=0.5)
    assert ledger.pending == 1

    restore_table(backend_url)
    ledger.flush()

    assert ledger.query("SELECT COUNT(*) AS n FROM llm_calls") == [{"n": 1}]
    assert any("retrying" in r.message for r in caplog.records)
    assert any("recovered" in r.message for r in caplog.records)
    ledger.close()


def test_records_that_cannot_be_written_at_close_are_saved_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url, fallback_dir=tmp_path)
    hide_table(url)
    ledger.record(full_record())
    ledger.record(full_record(run_id="second"))

    with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
        ledger.close(timeout=0.3)

    [saved] = tmp_path.glob("tokenledger-unwritten-*.jsonl")
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert sorted(r["run_id"] for r in lines) == ["01900000-0000-7000-8000-000000000001", "second"]
    assert lines[0]["cost_usd"] == "0.000123456789"
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "2 LLM call records could not be written" in error.getMessage()
    assert str(saved) in error.getMessage()


def test_pending_records_are_bounded_by_back_pressure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url, batch_size=2, max_pending=4)
    hide_table(url)
    done = threading.Event()

    def produce() -> None:
        for i in range(10):
            ledger.record(full_record(run_id=f"r{i}"))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    # The writer holds one failing batch of 2 and the queue holds 4: the producer must wait.
    assert not done.wait(1.0)
    assert ledger.pending <= 2 + 4 + 1

    restore_table(url)
    producer.join()
    ledger.flush()
    assert ledger.query("SELECT COUNT(*) AS n FROM llm_calls") == [{"n": 10}]
    ledger.close()


def test_interpreter_exit_flushes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    script = (
        "from langchain_tokenledger import Ledger, UsageRecord\n"
        f"ledger = Ledger({url!r})\n"
        "for i in range(500):\n"
        "    ledger.record(UsageRecord(run_id=f'r{i}', total_tokens=2))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)

    reader = Ledger(url)
    assert reader.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls") == [
        {"n": 500, "s": 1000}
    ]
    reader.close()


def test_an_in_memory_ledger_keeps_every_row_under_concurrent_reads() -> None:
    ledger = Ledger("sqlite://")
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ledger.query("SELECT COUNT(*) AS n FROM llm_calls")

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(5000):
        ledger.record(UsageRecord(run_id=f"r{i}", total_tokens=1))
    ledger.flush()
    stop.set()
    reader.join()

    assert ledger.query("SELECT COUNT(*) AS n FROM llm_calls") == [{"n": 5000}]
    backing = Path(ledger.engine.url.database or "")
    assert backing.exists()
    ledger.close()
    assert not backing.parent.exists()


def test_a_row_the_database_refuses_is_isolated_and_saved_the_rest_written(
    ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = full_record(run_id="bad", status=None)  # type: ignore[arg-type]  # NOT NULL column
    good = [full_record(run_id=f"good-{i}") for i in range(6)]
    with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
        ledger.record_many([*good[:3], bad, *good[3:]])
        ledger.flush()

    assert [r["run_id"] for r in rows_by_run_id(ledger)] == [f"good-{i}" for i in range(6)]
    [saved] = tmp_path.glob("tokenledger-unwritten-*.jsonl")
    assert [json.loads(line)["run_id"] for line in saved.read_text().splitlines()] == ["bad"]
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "1 LLM call records could not be written" in error.getMessage()


def test_a_new_sqlite_ledger_has_16k_pages_and_an_existing_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    import sqlite3

    new = tmp_path / "new.db"
    Ledger(f"sqlite:///{new}").close()
    old = tmp_path / "old.db"
    sqlite3.connect(old).execute("CREATE TABLE other (x)").connection.close()  # 4 KB pages
    with Ledger(f"sqlite:///{old}", writer="thread") as ledger:
        ledger.record(UsageRecord(run_id="r1", total_tokens=3))
        ledger.flush()
        writer_pages = ledger._writer._connection().execute("PRAGMA wal_autocheckpoint")
        assert writer_pages.fetchone() == (16384,)  # 64 MB of 4 KB pages

    def page_size(path: Path) -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute("PRAGMA page_size").fetchone()[0])
        finally:
            conn.close()

    assert (page_size(new), page_size(old)) == (16384, 4096)
    with Ledger(f"sqlite:///{old}") as reopened:
        assert reopened.query("SELECT total_tokens FROM llm_calls") == [{"total_tokens": 3}]


def test_sqlite_batches_default_to_32000_rows_and_others_to_2000(backend_url: str) -> None:
    with Ledger(backend_url) as ledger:
        sqlite = ledger.url.get_backend_name() == "sqlite"
        assert ledger.batch_size == (32_000 if sqlite else 2000)


def test_the_writer_prices_packed_values_as_it_prices_records() -> None:
    """``price_values`` on what the handler packed (the writer thread's input) gives what
    ``price_of`` gives for the record: every pricing rule, every timestamp form."""
    import marshal

    from langchain_tokenledger.packing import pack_record
    from langchain_tokenledger.pricing import Pricer
    from langchain_tokenledger.store import price_of, price_values

    usage = {"input_tokens": 1000, "output_tokens": 200, "total_tokens": 1200}
    base = dict(
        run_id="r", model="gpt-4o-mini", provider="openai", input_tokens=1000,
        output_tokens=200, total_tokens=1200, usage_source="provider", usage_details=usage,
        started_at=T0,
    )  # fmt: skip
    cases = [
        UsageRecord(**base),
        UsageRecord(**{**base, "started_at": None}),
        UsageRecord(**{**base, "started_at": T0.replace(tzinfo=None)}),  # naive: UTC
        UsageRecord(**{**base, "started_at": datetime(2400, 1, 1, tzinfo=timezone.utc)}),
        UsageRecord(**{**base, "cache_hit": True}),
        UsageRecord(**{**base, "cost_usd": Decimal("0.125"), "price_source": "mine"}),
        UsageRecord(**{**base, "model": "no-such-model-anywhere"}),
        UsageRecord(**{**base, "model": None}),
        UsageRecord(**{**base, "usage_source": "none", "input_tokens": None}),
        UsageRecord(**{**base, "usage_source": "estimated", "cache_read_tokens": 500}),
        UsageRecord(**{**base, "notes": ["negative_count:input"], "reasoning_tokens": 50}),
        UsageRecord(
            **{**base, "usage_details": {**usage, "input_token_details": {"priority": 1000}}}
        ),
    ]
    pricer = Pricer()
    priced = [price_of(pricer, r) for r in cases]
    assert [price_values(pricer, marshal.loads(pack_record(r))) for r in cases] == priced
    assert priced[0][0] == Decimal("0.00027")  # 1000 x $0.15/M + 200 x $0.60/M
    assert priced[4][0] == Decimal(0) and priced[5] == (Decimal("0.125"), "mine", [])
    assert priced[6][0] is None and priced[8][0] is None


def test_a_call_that_cannot_be_priced_is_written_unpriced_and_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pricing never costs a row: a pricer fault leaves the cost NULL, notes ``pricing_failed``
    and is logged; a call that came with its own cost keeps it (thread writer: the pricer is
    in this process)."""
    from langchain_tokenledger.packing import pack_record

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}", writer="thread")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("rate card unreadable")

    monkeypatch.setattr(ledger.pricer, "price", broken)
    try:
        ledger.record(full_record("r1", cost_usd=None, price_source=None))
        ledger.record_packed(pack_record(full_record("r2", cost_usd=None, price_source=None)))
        ledger.record(full_record("r3", cost_usd=Decimal("0.5"), price_source="mine"))
        with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
            ledger.flush()
        stored = {r["run_id"]: r for r in rows_by_run_id(ledger)}
    finally:
        ledger.close()
    for run_id in ("r1", "r2"):
        assert stored[run_id]["cost_usd"] is None
        assert stored[run_id]["notes"] == ["total_mismatch", "pricing_failed"]
    assert (stored["r3"]["cost_usd"], stored["r3"]["notes"]) == (Decimal("0.5"), ["total_mismatch"])
    assert sum("pricing failed for run" in r.getMessage() for r in caplog.records) == 2


# -- a forked child (gunicorn --preload workers, multiprocessing's fork) ----------------------


fork_warning = pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # threads + fork


@fork_warning
def test_a_forked_child_writes_its_own_calls_and_leaves_its_parents_to_the_parent(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.record(UsageRecord(run_id="before", total_tokens=1))
    ledger.flush()  # the writer (thread, or process and ring) and its connection are open
    ledger.record_many([UsageRecord(run_id=f"parent-{i}", total_tokens=2) for i in range(100)])

    def child() -> int:
        if ledger.pending != 0:  # the parent's records are the parent's to write
            return 2
        ledger.record_many([UsageRecord(run_id=f"child-{i}", total_tokens=3) for i in range(10)])
        ledger.flush(timeout=60)
        ledger.close()
        return 0

    with caplog.at_level(logging.WARNING, logger="langchain_tokenledger"):
        assert in_forked_child(child) == 0
        ledger.record_many([UsageRecord(run_id=f"after-{i}", total_tokens=5) for i in range(5)])
        ledger.flush(timeout=60)

    # The child used none of the parent's connections or pipes: the parent's writes never failed.
    assert [r.getMessage() for r in caplog.records] == []
    assert ledger.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls") == [
        {"n": 1 + 100 + 10 + 5, "s": 1 + 200 + 30 + 25}
    ]


_release_call = threading.Event()


class BlockingChatModel(FakeUsageChatModel):
    """A chat model whose calls wait for ``_release_call``."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        assert _release_call.wait(60)
        return super()._generate(*args, **kwargs)


@fork_warning
def test_a_call_in_flight_when_the_process_forks_is_recorded_once_by_the_parent(
    sqlite_ledger: Ledger,
) -> None:
    handler = TokenLedgerHandler(sqlite_ledger)
    _release_call.clear()
    call = threading.Thread(
        target=BlockingChatModel().invoke, args=("hi",), kwargs={"config": {"callbacks": [handler]}}
    )
    call.start()
    while handler.in_flight == 0:
        time.sleep(0.001)

    def child() -> int:
        in_flight = handler.in_flight  # 0: the call in the parent's other thread is not ours
        sqlite_ledger.close()  # which writes the calls still in flight, as cancelled
        return in_flight

    assert in_forked_child(child) == 0
    _release_call.set()
    call.join()
    handler.flush()

    assert sqlite_ledger.query("SELECT status, total_tokens, notes FROM llm_calls") == [
        {"status": "ok", "total_tokens": 30, "notes": "[]"}
    ]


def _record_calls_without_flushing(ledger: Ledger | str, calls: int) -> None:
    handler = TokenLedgerHandler(ledger if isinstance(ledger, Ledger) else Ledger(ledger))
    for _ in range(calls):
        FakeUsageChatModel().invoke("hi", config={"callbacks": [handler]})


@fork_warning
@pytest.mark.parametrize("opened", ["before the fork", "in the child"])
def test_a_multiprocessing_child_s_calls_are_written_when_it_exits(
    tmp_path: Path, opened: str
) -> None:
    """Its processes end with ``os._exit``, which skips ``atexit``: the ledger closes anyway."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    parent = Ledger(url)
    parent.record(UsageRecord(run_id="parent", total_tokens=1))
    parent.flush()
    target = _record_calls_without_flushing
    args: tuple[Any, ...] = (parent, 7) if opened == "before the fork" else (url, 7)
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    process.join(120)

    assert process.exitcode == 0
    assert parent.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls") == [
        {"n": 1 + 7, "s": 1 + 7 * 30}
    ]
    parent.close()


def test_a_ledger_that_is_only_read_starts_no_threads(tmp_path: Path) -> None:
    before = set(threading.enumerate())  # other tests' threads may end meanwhile
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert ledger.query("SELECT COUNT(*) AS n FROM llm_calls") == [{"n": 0}]
    assert set(threading.enumerate()) - before == set()
    ledger.close()
