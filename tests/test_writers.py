"""Tests for langchain_tokenledger.writers: what the rows hold and what SQLite stores.

The writers build rows with fast, specialised code; these tests pin their output to plain
reference conversions, value by value and type by type.
"""

from __future__ import annotations

import dataclasses
import gc
import marshal
import math
import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from langchain_tokenledger.packing import pack_record
from langchain_tokenledger.records import RECORD_FIELDS, UsageRecord
from langchain_tokenledger.schema import create_schema
from langchain_tokenledger.store import _create_engine
from langchain_tokenledger.writers import (
    _DATE_TEXTS,
    _MINUTE_TEXTS,
    CoreWriter,
    MySQLWriter,
    PostgresWriter,
    Price,
    SQLiteWriter,
    _decimal_text,
    _json,
    _sqlite_ts,
    to_row,
    writer_for,
)

UTC = timezone.utc


def reference_ts(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text of ``value`` in UTC (naive: UTC already)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - the reference format
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def random_datetimes(n: int, seed: int = 5) -> Iterator[datetime]:
    rng = random.Random(seed)
    zones = [UTC, None, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    for _ in range(n):
        value = datetime(
            rng.choice([2, 999, 1000, 1970, 2026, rng.randint(2, 9998)]),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, 1, 999_999, rng.randint(0, 999_999)]),
        )
        yield value.replace(tzinfo=rng.choice(zones))


def test_sqlite_timestamps_are_sqlalchemys_text() -> None:
    for value in random_datetimes(5000):
        assert _sqlite_ts(value) == reference_ts(value), value
    assert _sqlite_ts(None) is None


def packed_timestamp(value: datetime) -> float | str:
    """A timestamp as a packed record holds it (see packing.py)."""
    values = marshal.loads(pack_record(record(0, started_at=value)))
    started = values[RECORD_FIELDS.index("started_at")]
    assert isinstance(started, (float, str))
    return started


def test_sqlite_timestamps_of_packed_values_are_the_same_text() -> None:
    """The writer formats a packed timestamp (POSIX float, or ISO text) without a datetime."""
    packed_floats = 0
    for value in random_datetimes(5000):
        packed = packed_timestamp(value)
        packed_floats += isinstance(packed, float)
        assert _sqlite_ts(packed) == reference_ts(value), (value, packed)
    assert packed_floats > 300  # the float path was taken


@pytest.mark.parametrize(
    "stamp",
    [
        0.0,
        0.0000005,  # half a microsecond: rounds to even (0)
        0.0000015,  # rounds to 2
        59.9999995,  # rounds up into the next minute
        86399.9999996,  # and into the next day
        1767225599.9999995,  # the last instant of 2025, as a double
        1780000000.123456,
        4294967295.999999,
        253402300798.5,  # late in year 9999: the datetime path
    ],
)
def test_sqlite_text_of_a_float_rounds_as_fromtimestamp(stamp: float) -> None:
    assert _sqlite_ts(stamp) == reference_ts(datetime.fromtimestamp(stamp, UTC))


def test_sqlite_text_of_random_floats_rounds_as_fromtimestamp() -> None:
    rng = random.Random(11)
    for _ in range(20000):
        stamp = rng.choice([rng.uniform(0, 2**32), rng.randint(0, 2**32) + rng.random() / 1e5])
        assert _sqlite_ts(stamp) == reference_ts(datetime.fromtimestamp(stamp, UTC)), stamp


def test_the_day_cache_stays_small() -> None:
    start = datetime(2000, 1, 1, 12, tzinfo=UTC)
    for days in range(6000):
        value = start + timedelta(days=days, microseconds=days)
        assert _sqlite_ts(value) == reference_ts(value)
        assert _sqlite_ts(value.timestamp()) == reference_ts(value)
    assert 0 < len(_DATE_TEXTS) <= 4096
    assert 0 < len(_MINUTE_TEXTS) <= 4096


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1, "b": [1.5, None, True]}, '{"a":1,"b":[1.5,null,true]}'),
        ({1: "one", None: 2}, '{"1":"one","null":2}'),  # non-string keys
        ({"nested": {2: {"k": 3}}}, '{"nested":{"2":{"k":3}}}'),
        ({"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}, '{"at":"2026-01-02 03:04:05+00:00"}'),
        ({"p": Point(1)}, '{"p":"Point(x=1)"}'),  # str() of what JSON cannot hold
        ({"cost": Decimal("1.10")}, '{"cost":"1.10"}'),
        ({"big": 2**70}, '{"big":1180591620717411303424}'),  # beyond orjson: stdlib
        (["é", "中"], '["é","中"]'),
        ([], "[]"),
    ],
)
def test_json_columns(value: Any, expected: str) -> None:
    assert _json(value, "[]" if isinstance(value, list) else "{}") == expected


def test_json_columns_survive_a_cycle() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert _json(cycle, "[]") == '["[[...]]"]'


def record(i: int, **changes: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "run_id": f"run-{i}",
        "parent_run_id": None,
        "root_run_id": "root",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "cost_usd": Decimal("0.000283200"),
        "price_source": "genai-prices 0.2.3",
        "cache_hit": bool(i % 2),
        "streamed": not i % 3,
        "usage_details": {"input_tokens": 10, "output_tokens": 5},
        "started_at": datetime(2026, 1, 2, 3, 4, 5, i, tzinfo=UTC),
        "ended_at": datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
        "latency_ms": 1000.5,
        "tags": ["a"],
        "metadata": {"user_id": "u"},
    }
    values.update(changes)
    return UsageRecord(**values)


RECORDS = [
    record(0),
    record(1, cost_usd=None, price_source=None, latency_ms=float("nan"), started_at=None),
    record(2, model=None, provider=None, input_tokens=None, root_run_id=None, ancestry=""),
    record(3, model="m" * 300, run_name="r" * 256, notes=["http_status:429"]),
    record(4, total_tokens=True, error_type="E", ttft_ms=0.0, user_id="u", session_id="s"),
    record(5, cost_usd=Decimal(0), latency_ms=1e300, started_at=datetime(2026, 1, 2, 3, 4, 5)),
    record(0, model="a duplicate run_id: the first row is kept"),
]
PRICES: list[Price] = [(Decimal("0.5"), "override", ["n"]), (None, None, [])]
PRICES += [(r.cost_usd, r.price_source, r.notes) for r in RECORDS[2:]]  # their own


def stored(path: Path) -> list[tuple[Any, ...]]:
    """Every stored value as (SQLite type, SQL literal), in insertion order."""
    columns = ", ".join(f"typeof({c}), quote({c})" for c in RECORD_FIELDS)
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT {columns} FROM llm_calls ORDER BY rowid").fetchall()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = _create_engine(sa.make_url(f"sqlite:///{tmp_path / 'ledger.db'}"), {})
    create_schema(engine)
    yield engine
    engine.dispose()


def test_sqlite_stores_what_plain_rows_store(sqlite_engine: sa.Engine, tmp_path: Path) -> None:
    """The SQLite writer's rows (NaN for NULL, 1/0 for booleans) store the same values, to
    the type, as the plain rows (None, True/False) bound by a plain ``executemany``."""
    writer = SQLiteWriter(sqlite_engine)
    writer.write(RECORDS, PRICES)
    writer.close()

    reference = tmp_path / "reference.db"
    engine = _create_engine(sa.make_url(f"sqlite:///{reference}"), {})
    create_schema(engine)
    engine.dispose()
    plain = [to_row(r, _sqlite_ts, _decimal_text, p) for r, p in zip(RECORDS, PRICES, strict=True)]
    assert any(v is None for row in plain for v in row)
    assert any(v is True for row in plain for v in row)
    with sqlite3.connect(reference) as conn:
        marks = ", ".join("?" for _ in RECORD_FIELDS)
        conn.executemany(
            f"INSERT INTO llm_calls VALUES ({marks}) ON CONFLICT (run_id) DO NOTHING", plain
        )

    assert stored(tmp_path / "ledger.db") == stored(reference)
    rows = stored(tmp_path / "ledger.db")
    assert len(rows) == len(RECORDS) - 1
    by_name = [dict(zip(RECORD_FIELDS, row[1::2], strict=True)) for row in rows]
    assert by_name[0]["model"] == "'gpt-4o-mini'"  # the first of the two run-0 rows
    assert by_name[1]["latency_ms"] == by_name[1]["cost_usd"] == "NULL"
    assert (by_name[0]["cache_hit"], by_name[1]["cache_hit"]) == ("0", "1")
    assert by_name[3]["model"] == "'" + "m" * 255 + "'"
    assert by_name[3]["notes"] == '\'["http_status:429","truncated:run_name,model"]\''


def test_rows_for_other_databases_keep_none_and_booleans() -> None:
    writer = PostgresWriter(sa.create_engine("sqlite://"))  # prepare() never connects
    records, prices = RECORDS[:3], PRICES[:3]
    rows = writer.prepare(records, prices)
    columns = [dict(zip(RECORD_FIELDS, row, strict=True)) for row in rows]
    assert columns[0]["cache_hit"] is False and columns[1]["cache_hit"] is True
    assert columns[1]["cost_usd"] is None and columns[1]["started_at"] is None
    assert columns[0]["cost_usd"] == Decimal("0.5") and columns[0]["notes"] == '["n"]'
    assert columns[2]["model"] is None
    assert rows == [
        to_row(r, writer._ts, writer._cost, p) for r, p in zip(records, prices, strict=True)
    ]


def comparable(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with every NaN alike (two NaN objects compare unequal)."""
    return [
        tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in row) for row in rows
    ]


@pytest.mark.parametrize("kind", [SQLiteWriter, PostgresWriter, MySQLWriter, CoreWriter])
@pytest.mark.parametrize("priced", [True, False])
def test_rows_from_packed_values_are_the_rows_of_the_records(kind: type, priced: bool) -> None:
    """What the writer thread does (rows straight from what the handler packed) gives the same
    rows, value for value and type for type, as rows built from the records."""
    writer = kind(sa.create_engine("sqlite://"))  # prepare() never connects
    prices = PRICES if priced else None
    packed = [marshal.loads(pack_record(r)) for r in RECORDS]
    from_values = writer.prepare_values(packed, prices)
    from_records = writer.prepare(RECORDS, prices)
    assert comparable(from_values) == comparable(from_records)
    types = [[type(v) for v in row] for row in from_values]
    assert types == [[type(v) for v in row] for row in from_records]


def test_a_long_name_is_clipped_and_noted_under_a_price() -> None:
    row = to_row(record(9, user_id="u" * 300), _sqlite_ts, _decimal_text, (None, None, ["x"]))
    values = dict(zip(RECORD_FIELDS, row, strict=True))
    assert values["user_id"] == "u" * 255
    assert values["notes"] == '["x","truncated:user_id"]'


# -- PostgreSQL: COPY straight into the table, or through the staging table ------------------


def postgres_writer(url: str) -> PostgresWriter:
    engine = _create_engine(sa.make_url(url), {})
    create_schema(engine)
    return PostgresWriter(engine)


def stored_text(writer: PostgresWriter) -> list[tuple[str, ...]]:
    """Every stored value as PostgreSQL's text, in run_id order."""
    columns = ", ".join(f"{c}::text" for c in RECORD_FIELDS)
    with writer.engine.connect() as conn:
        result = conn.exec_driver_sql(f"SELECT {columns} FROM llm_calls ORDER BY run_id")
        return [tuple(row) for row in result]


@pytest.mark.parametrize("backend_url", ["postgresql"], indirect=True)
def test_postgres_copy_paths_store_the_same_values(
    backend_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = postgres_writer(backend_url)
    # Not the duplicate run_id, nor a boolean token count (PostgreSQL refuses a bool bigint).
    chosen = [i for i, r in enumerate(RECORDS[:-1]) if r.total_tokens is not True]
    unique, prices = [RECORDS[i] for i in chosen], [PRICES[i] for i in chosen]
    try:
        writer.write(unique, prices)  # straight into llm_calls
        direct = stored_text(writer)
        with writer.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM llm_calls")
        monkeypatch.setattr(PostgresWriter, "_copy_new", lambda *_: False)
        writer.write(unique, prices)  # through the staging table
        assert stored_text(writer) == direct
        assert len(direct) == len(unique)
    finally:
        writer.close()
        writer.engine.dispose()


@pytest.mark.parametrize("backend_url", ["postgresql"], indirect=True)
def test_postgres_replays_and_repeats_keep_the_first_row(backend_url: str) -> None:
    writer = postgres_writer(backend_url)
    try:
        writer.write([record(0, model="first")])
        writer.write([record(0, model="replayed"), record(1)])  # a stored run_id
        writer.write([record(2, model="first"), record(2, model="repeated")])  # in one batch
        with writer.engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT run_id, model FROM llm_calls ORDER BY run_id")
            assert [tuple(row) for row in stored] == [
                ("run-0", "first"),
                ("run-1", "gpt-4o-mini"),
                ("run-2", "first"),
            ]
    finally:
        writer.close()
        writer.engine.dispose()


@pytest.mark.parametrize("backend_url", ["postgresql"], indirect=True)
def test_postgres_a_refused_row_fails_the_batch(backend_url: str) -> None:
    import psycopg

    writer = postgres_writer(backend_url)
    try:
        with pytest.raises(psycopg.IntegrityError):
            writer.write([record(0), record(1, status=None)])
        writer.write([record(2)])  # the writer recovers
        assert [row[0] for row in stored_text(writer)] == ["run-2"]
    finally:
        writer.close()
        writer.engine.dispose()


# -- After a fork: the child abandons its copy of the parent's connection ---------------------


def test_an_abandoned_connection_is_left_as_the_parent_holds_it(backend_url: str) -> None:
    """Neither closed, nor reset, nor rolled back: it is the parent's, mid-transaction maybe.

    A forked child shares its parent's socket; a rollback sent from the child would end the
    parent's transaction under it.
    """
    engine = _create_engine(sa.make_url(backend_url), {})
    create_schema(engine)
    writer = writer_for(engine)
    writer.write([record(0), record(1)])
    dbapi = writer._conn.dbapi_connection  # type: ignore[attr-defined]
    cursor = dbapi.cursor()
    cursor.execute("DELETE FROM llm_calls WHERE run_id = 'run-0'")  # the parent's transaction

    writer.abandon()  # what the child does
    writer.close()
    gc.collect()
    engine.dispose(close=False)

    cursor.execute("SELECT COUNT(*) FROM llm_calls")
    assert cursor.fetchone()[0] == 1  # the delete is still pending, uncommitted
    dbapi.rollback()
    cursor.execute("SELECT COUNT(*) FROM llm_calls")
    assert cursor.fetchone()[0] == 2
    cursor.close()
    dbapi.close()
    engine.dispose()
