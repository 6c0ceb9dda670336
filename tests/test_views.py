"""The SQL views, and every SQL query in the README, on SQLite, PostgreSQL and MariaDB.

One small, hand-computed ledger (:func:`write_calls`) is written on each backend; every view and
every documented query must return exactly the rows worked out here by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import readme_queries

from langchain_tokenledger import Ledger, UsageRecord
from langchain_tokenledger.query import as_utc, money
from langchain_tokenledger.schema import create_schema, tokenledger_meta
from langchain_tokenledger.views import (
    MEASURES,
    VIEW_NAMES,
    check_metadata_key,
    create_views,
    dialect_of,
    view_statements,
)

UTC = timezone.utc

# The first instant of the current UTC month: "this month" queries see the calls after it.
NOW = datetime.now(UTC)
MONTH = datetime(NOW.year, NOW.month, 1, tzinfo=UTC)
DAY1 = MONTH.date()
DAY2 = (MONTH + timedelta(days=1)).date()
LAST_MONTH_DAY = (MONTH - timedelta(days=3)).date()


def call(run_id: str, root: str, root_name: str, at: datetime, **kw: Any) -> UsageRecord:
    """One LLM call of root run ``root`` starting at ``at`` and lasting one second."""
    values: dict[str, Any] = {
        "parent_run_id": root,
        "root_run_id": root,
        "root_name": root_name,
        "run_name": "ChatOpenAI",
        "provider": "openai",
        "started_at": at,
        "ended_at": at + timedelta(seconds=1),
        "latency_ms": 1000.0,
        "ancestry": root,
    }
    return UsageRecord(run_id=run_id, **{**values, **kw})


def calls() -> list[UsageRecord]:
    """Seven calls in five root runs; one is last month, one failed, one is a cache hit."""
    alice_qa = {"user_id": "alice", "feature": "qa"}
    bob_summarize = {"user_id": "bob", "feature": "summarize"}
    return [
        call("a1", "A", "answer", MONTH + timedelta(hours=10), model="gpt-4o-mini",
             input_tokens=100, output_tokens=20, total_tokens=120, cache_read_tokens=40,
             cost_usd=Decimal("0.000027"), user_id="alice", metadata=alice_qa, tags=["prod"]),
        call("a2", "A", "answer", MONTH + timedelta(hours=10, seconds=1), model="gpt-4o",
             input_tokens=50, output_tokens=50, total_tokens=100, cost_usd=Decimal("0.000625"),
             user_id="alice", metadata=alice_qa, tags=["prod"], parent_run_id="A-inner",
             ancestry="A/A-inner"),
        call("b1", "B", "summarize", MONTH + timedelta(hours=12), model="gpt-4o",
             input_tokens=1000, output_tokens=200, total_tokens=1200, cost_usd=Decimal("0.0045"),
             user_id="bob", metadata=bob_summarize, tags=["prod", "batch"]),
        call("b2", "B", "summarize", MONTH + timedelta(hours=12, seconds=5), model="gpt-4o-mini",
             status="error", error_type="RateLimitError", usage_source="none",
             user_id="bob", metadata=bob_summarize, tags=["prod", "batch"]),
        call("c1", "C", "answer", MONTH + timedelta(days=1, hours=9), model="gpt-4o-mini",
             input_tokens=0, output_tokens=0, total_tokens=0, cost_usd=Decimal(0),
             cache_hit=True, usage_source="cache",
             usage_details={"input_tokens": 100, "output_tokens": 20, "total_tokens": 120},
             user_id="alice", metadata={"user_id": "alice"}),
        call("d1", "D", "answer", MONTH - timedelta(days=3) + timedelta(hours=8),
             model="gpt-4o-mini", input_tokens=10, output_tokens=5, total_tokens=15,
             cost_usd=Decimal("0.000004"), user_id="carol",
             metadata={"user_id": "carol", "feature": "qa"}),
        call("e1", "E", "plan", MONTH + timedelta(days=1, hours=14), model="o4-mini",
             input_tokens=20, output_tokens=100, total_tokens=120, reasoning_tokens=64,
             cost_usd=Decimal("0.00046"), user_id="carol",
             metadata={"user_id": "carol", "feature": "plan"}),
    ]  # fmt: skip


@pytest.fixture
def filled(ledger: Ledger) -> Ledger:
    """The ledger of every backend, holding :func:`calls`."""
    ledger.record_many(calls())
    ledger.flush()
    return ledger


def m(**kw: Any) -> dict[str, Any]:
    """Measures: zeros except those given."""
    out: dict[str, Any] = dict.fromkeys(MEASURES, 0)
    out.update(kw)
    return out


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in one shape on every backend: numbers as Decimal, days as dates, times as UTC."""
    out = []
    for row in rows:
        norm: dict[str, Any] = {}
        for key, value in row.items():
            if value is None:
                norm[key] = value
            elif key == "day":
                norm[key] = date.fromisoformat(str(value)[:10])
            elif key.endswith("_at"):
                norm[key] = as_utc(value)
            elif isinstance(value, str):
                norm[key] = value
            else:
                norm[key] = money(value)
        out.append(norm)
    return out


def at(hours: float = 0, days: int = 0, seconds: int = 0) -> datetime:
    return MONTH + timedelta(days=days, hours=hours, seconds=seconds)


# -- the views -----------------------------------------------------------------------------


def test_the_views_exist_once_a_ledger_opens(ledger: Ledger) -> None:
    names = set(sa.inspect(ledger.engine).get_view_names())
    assert names >= {"usage_by_model", "usage_by_day", "usage_by_root_run"}
    assert VIEW_NAMES == ("usage_by_model", "usage_by_day", "usage_by_root_run")


def test_usage_by_model(filled: Ledger) -> None:
    rows = normalized(filled.query("SELECT * FROM usage_by_model ORDER BY model"))
    assert rows == [
        {"provider": "openai", "model": "gpt-4o", **m(calls=2, input_tokens=1050,
         output_tokens=250, total_tokens=1300, cost_usd=Decimal("0.005125")),
         "first_call_at": at(10, seconds=1), "last_call_at": at(12, seconds=1)},
        {"provider": "openai", "model": "gpt-4o-mini", **m(calls=4, errors=1, cache_hits=1,
         input_tokens=110, output_tokens=25, total_tokens=135, cache_read_tokens=40,
         cost_usd=Decimal("0.000031")),
         "first_call_at": MONTH - timedelta(days=3) + timedelta(hours=8),
         "last_call_at": at(9, days=1, seconds=1)},
        {"provider": "openai", "model": "o4-mini", **m(calls=1, input_tokens=20,
         output_tokens=100, total_tokens=120, reasoning_tokens=64, cost_usd=Decimal("0.00046")),
         "first_call_at": at(14, days=1), "last_call_at": at(14, days=1, seconds=1)},
    ]  # fmt: skip


def test_usage_by_day_is_per_utc_day_and_model(filled: Ledger) -> None:
    rows = normalized(filled.query("SELECT * FROM usage_by_day ORDER BY day, model"))
    assert rows == [
        {"day": LAST_MONTH_DAY, "provider": "openai", "model": "gpt-4o-mini",
         **m(calls=1, input_tokens=10, output_tokens=5, total_tokens=15,
             cost_usd=Decimal("0.000004"))},
        {"day": DAY1, "provider": "openai", "model": "gpt-4o",
         **m(calls=2, input_tokens=1050, output_tokens=250, total_tokens=1300,
             cost_usd=Decimal("0.005125"))},
        {"day": DAY1, "provider": "openai", "model": "gpt-4o-mini",
         **m(calls=2, errors=1, input_tokens=100, output_tokens=20, total_tokens=120,
             cache_read_tokens=40, cost_usd=Decimal("0.000027"))},
        {"day": DAY2, "provider": "openai", "model": "gpt-4o-mini", **m(calls=1, cache_hits=1)},
        {"day": DAY2, "provider": "openai", "model": "o4-mini",
         **m(calls=1, input_tokens=20, output_tokens=100, total_tokens=120,
             reasoning_tokens=64, cost_usd=Decimal("0.00046"))},
    ]  # fmt: skip


def root_run(
    root: str, name: str, start: datetime, end: datetime, user: str, models: int, **kw: Any
) -> dict[str, Any]:
    """A row of ``usage_by_root_run``."""
    head = {"root_run_id": root, "root_name": name, "started_at": start, "ended_at": end}
    return {**head, "user_id": user, "session_id": None, "models": models, **m(**kw)}


def test_usage_by_root_run_has_one_row_per_root(filled: Ledger) -> None:
    rows = normalized(filled.query("SELECT * FROM usage_by_root_run ORDER BY root_run_id"))
    assert rows == [
        root_run("A", "answer", at(10), at(10, seconds=2), "alice", 2, calls=2, input_tokens=150,
                 output_tokens=70, total_tokens=220, cache_read_tokens=40,
                 cost_usd=Decimal("0.000652")),
        root_run("B", "summarize", at(12), at(12, seconds=6), "bob", 2, calls=2, errors=1,
                 input_tokens=1000, output_tokens=200, total_tokens=1200,
                 cost_usd=Decimal("0.0045")),
        root_run("C", "answer", at(9, days=1), at(9, days=1, seconds=1), "alice", 1, calls=1,
                 cache_hits=1),
        root_run("D", "answer", at(8, days=-3), at(8, days=-3, seconds=1), "carol", 1, calls=1,
                 input_tokens=10, output_tokens=5, total_tokens=15, cost_usd=Decimal("0.000004")),
        root_run("E", "plan", at(14, days=1), at(14, days=1, seconds=1), "carol", 1, calls=1,
                 input_tokens=20, output_tokens=100, total_tokens=120, reasoning_tokens=64,
                 cost_usd=Decimal("0.00046")),
    ]  # fmt: skip


def test_view_measures_are_integers_whatever_the_database(filled: Ledger) -> None:
    (row,) = filled.query("SELECT calls, errors, total_tokens FROM usage_by_model "
                          "WHERE model = 'gpt-4o-mini'")  # fmt: skip
    assert row == {"calls": 4, "errors": 1, "total_tokens": 135}
    assert [type(v) for v in row.values()] == [int, int, int]


# -- creating the views ------------------------------------------------------------------------


@pytest.fixture
def statements(ledger: Ledger) -> Iterator[list[str]]:
    """Every SQL statement the ledger's engine runs from here on."""
    seen: list[str] = []

    def listen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(ledger.engine, "before_cursor_execute", listen)
    yield seen
    sa.event.remove(ledger.engine, "before_cursor_execute", listen)


def ddl(statements: list[str]) -> list[str]:
    return [s.split(" AS")[0] for s in statements if re.match(r"\s*(CREATE|DROP)", s)]


def test_opening_an_up_to_date_ledger_runs_no_ddl(ledger: Ledger, statements: list[str]) -> None:
    create_schema(ledger.engine)
    create_views(ledger.engine)
    assert ddl(statements) == []


def test_stale_or_missing_views_are_recreated(ledger: Ledger, statements: list[str]) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP VIEW usage_by_day"))
    statements.clear()
    create_views(ledger.engine)
    expected = ddl(view_statements(dialect_of(ledger.engine)))
    assert ddl(statements) == expected
    assert len(expected) == (6 if ledger.engine.dialect.name == "sqlite" else 3)
    assert "usage_by_day" in sa.inspect(ledger.engine).get_view_names()

    statements.clear()
    meta = tokenledger_meta
    with ledger.engine.begin() as conn:
        conn.execute(meta.update().where(meta.c.name == "views_digest").values(value="old"))
    create_views(ledger.engine)
    assert ddl(statements) == expected
    statements.clear()
    create_views(ledger.engine)
    assert ddl(statements) == []


def test_views_follow_the_data_written_after_they_were_created(ledger: Ledger) -> None:
    assert ledger.query("SELECT COUNT(*) AS n FROM usage_by_root_run") == [{"n": 0}]
    ledger.record_many(calls())
    ledger.flush()
    assert ledger.query("SELECT COUNT(*) AS n FROM usage_by_root_run") == [{"n": 5}]


def test_other_databases_are_refused_clearly() -> None:
    engine = sa.create_engine("sqlite://")
    engine.dialect.name = "duckdb"
    with pytest.raises(
        ValueError, match="support SQLite, PostgreSQL and MariaDB/MySQL, not duckdb"
    ):
        dialect_of(engine)


@pytest.mark.parametrize("key", ["user-id", "a.b", "1abc", "x'y", "", "k" * 65])
def test_metadata_keys_are_validated_before_they_reach_sql(key: str) -> None:
    with pytest.raises(ValueError, match="invalid metadata key"):
        check_metadata_key(key)


# -- every SQL example of the README ----------------------------------------------------

DIALECT_LABELS = {
    "SQLite": ("sqlite",),
    "PostgreSQL": ("postgresql",),
    "MariaDB/MySQL": ("mysql",),
    "any database": ("sqlite", "postgresql", "mysql"),
}


def documented_queries() -> dict[tuple[str, str], str]:
    """``{(title, dialect): sql}`` for every ```sql block of the README.

    A block's title is the nearest heading or bold ``**`name`**`` above it; its first line says
    which database it is for (``-- SQLite``, ``-- any database``, ...).
    """
    out: dict[tuple[str, str], str] = {}
    title, block = "", None
    for line in readme_queries().splitlines():
        if block is not None:
            if line == "```":
                label, *body = block
                for dialect in DIALECT_LABELS[label.removeprefix("-- ")]:
                    assert (title, dialect) not in out, f"two {dialect} queries for {title!r}"
                    out[(title, dialect)] = "\n".join(body)
                block = None
            else:
                block.append(line)
        elif line == "```sql":
            block = []
        elif heading := re.fullmatch(r"#{2,4} (.+)|\*\*`(\w+)`\*\*.*", line):
            title = heading.group(1) or heading.group(2)
    return out


EXPECTED: dict[str, list[dict[str, Any]]] = {
    "usage_by_model": [
        {"provider": "openai", "model": "gpt-4o", "calls": 2, "errors": 0, "total_tokens": 1300,
         "cost_usd": Decimal("0.005125")},
        {"provider": "openai", "model": "o4-mini", "calls": 1, "errors": 0, "total_tokens": 120,
         "cost_usd": Decimal("0.00046")},
        {"provider": "openai", "model": "gpt-4o-mini", "calls": 4, "errors": 1,
         "total_tokens": 135, "cost_usd": Decimal("0.000031")},
    ],
    "usage_by_day": [
        {"day": LAST_MONTH_DAY, "calls": 1, "cost_usd": Decimal("0.000004")},
        {"day": DAY1, "calls": 4, "cost_usd": Decimal("0.005152")},
        {"day": DAY2, "calls": 2, "cost_usd": Decimal("0.00046")},
    ],
    "usage_by_root_run": [
        {"root_run_id": "B", "root_name": "summarize", "calls": 2, "errors": 1,
         "cost_usd": Decimal("0.0045")},
    ],
    "Cost per user this month": [
        {"user_id": "bob", "calls": 2, "total_tokens": 1200, "cost_usd": Decimal("0.0045")},
        {"user_id": "alice", "calls": 3, "total_tokens": 220, "cost_usd": Decimal("0.000652")},
        {"user_id": "carol", "calls": 1, "total_tokens": 120, "cost_usd": Decimal("0.00046")},
    ],
    "Cost per feature (any metadata key)": [
        {"feature": "summarize", "calls": 2, "cost_usd": Decimal("0.0045")},
        {"feature": "qa", "calls": 3, "cost_usd": Decimal("0.000656")},
        {"feature": "plan", "calls": 1, "cost_usd": Decimal("0.00046")},
        {"feature": None, "calls": 1, "cost_usd": Decimal(0)},
    ],
    "The 10 most expensive runs": [
        {"root_run_id": "B", "root_name": "summarize", "user_id": "bob", "started_at": at(12),
         "calls": 2, "total_tokens": 1200, "cost_usd": Decimal("0.0045")},
        {"root_run_id": "A", "root_name": "answer", "user_id": "alice", "started_at": at(10),
         "calls": 2, "total_tokens": 220, "cost_usd": Decimal("0.000652")},
        {"root_run_id": "E", "root_name": "plan", "user_id": "carol",
         "started_at": at(14, days=1), "calls": 1, "total_tokens": 120,
         "cost_usd": Decimal("0.00046")},
        {"root_run_id": "D", "root_name": "answer", "user_id": "carol",
         "started_at": at(8, days=-3), "calls": 1, "total_tokens": 15,
         "cost_usd": Decimal("0.000004")},
        {"root_run_id": "C", "root_name": "answer", "user_id": "alice",
         "started_at": at(9, days=1), "calls": 1, "total_tokens": 0, "cost_usd": Decimal(0)},
    ],
    "Cache savings": [
        {"model": "gpt-4o-mini", "cache_hits": 1, "saved_input_tokens": 100,
         "saved_output_tokens": 20},
    ],
}  # fmt: skip


def test_every_documented_query_has_an_expected_result_on_every_database() -> None:
    queries = documented_queries()
    titles = {title for title, _ in queries}
    assert titles == set(EXPECTED)
    assert len(queries) == 3 * len(EXPECTED)


@pytest.mark.parametrize("title", list(EXPECTED))
def test_documented_query(filled: Ledger, title: str) -> None:
    sql = documented_queries()[(title, dialect_of(filled.engine))]
    assert normalized(filled.query(sql)) == EXPECTED[title]
