"""Batch writers: records -> rows -> one idempotent multi-row insert per batch, per dialect.

Each writer owns one raw DBAPI connection (used by the ledger's writer thread only) and the
fastest idempotent path its database offers: SQLite ``INSERT OR IGNORE`` + ``executemany``,
PostgreSQL ``COPY`` into a temporary table then ``INSERT .. ON CONFLICT DO NOTHING``,
MariaDB/MySQL a multi-row ``INSERT .. ON DUPLICATE KEY UPDATE``. A replayed record (same
``run_id``) never creates a second row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Protocol

import sqlalchemy as sa

from .records import RECORD_FIELDS, UsageRecord
from .schema import llm_calls

Row = tuple[Any, ...]

_COLUMNS = ", ".join(RECORD_FIELDS)
_UTC = timezone.utc
_dumps = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode
_STRING_LIMITS = {
    c.name: c.type.length
    for c in llm_calls.columns
    if isinstance(c.type, sa.String) and c.type.length and c.name != "run_id"
}


class BatchWriter(Protocol):
    """Writes a batch of records in one transaction, skipping run_ids already stored."""

    def write(self, records: Sequence[UsageRecord]) -> None: ...

    def close(self) -> None: ...


def _json(value: Any, empty: str) -> str:
    return _dumps(value) if value else empty


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is not None and value.tzinfo is not _UTC:
        value = value.astimezone(_UTC)
    return value.replace(tzinfo=None)


def _sqlite_ts(value: datetime | None) -> str | None:
    naive = _naive_utc(value)
    # SQLAlchemy's SQLite DATETIME format, always with microseconds so text order is time order.
    return None if naive is None else naive.isoformat(" ", "microseconds")


def _clip(record: UsageRecord) -> UsageRecord:
    """Shorten over-long names to their column's length (a row is never lost to a long name)."""
    changes: dict[str, Any] = {}
    for name, limit in _STRING_LIMITS.items():
        value = getattr(record, name)
        if isinstance(value, str) and len(value) > limit:
            changes[name] = value[:limit]
    if not changes:
        return record
    return record.replace(**changes, notes=[*record.notes, "truncated:" + ",".join(changes)])


def _needs_clip(r: UsageRecord) -> bool:
    return any(
        isinstance(v, str) and len(v) > 255
        for v in (r.model, r.run_name, r.root_name, r.error_type, r.user_id, r.session_id)
    ) or (r.provider is not None and len(r.provider) > 64)


def to_row(
    r: UsageRecord,
    ts: Callable[[datetime | None], Any],
    cost: Callable[[Decimal | None], Any],
    flag: Callable[[bool], Any] = bool,
) -> Row:
    """One record as a tuple in column order, JSON columns serialized (hot loop: keep it flat)."""
    if _needs_clip(r):
        r = _clip(r)
    return (
        r.run_id,
        r.parent_run_id,
        r.root_run_id,
        r.root_name,
        r.run_name,
        r.provider,
        r.model,
        r.status,
        r.error_type,
        r.input_tokens,
        r.output_tokens,
        r.total_tokens,
        r.cache_read_tokens,
        r.cache_creation_tokens,
        r.reasoning_tokens,
        cost(r.cost_usd),
        r.price_source,
        flag(r.cache_hit),
        r.usage_source,
        _json(r.usage_details, "{}"),
        flag(r.streamed),
        ts(r.started_at),
        ts(r.ended_at),
        r.latency_ms,
        r.ttft_ms,
        r.user_id,
        r.session_id,
        _json(r.tags, "[]"),
        _json(r.metadata, "{}"),
        _json(r.notes, "[]"),
        r.ancestry,
    )


def _decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _same(value: Any) -> Any:
    return value


def _dedupe(records: Sequence[UsageRecord]) -> list[UsageRecord]:
    seen: set[str] = set()
    out: list[UsageRecord] = []
    for r in records:
        if r.run_id not in seen:
            seen.add(r.run_id)
            out.append(r)
    return out


class _RawWriter:
    """Shared connection handling: one raw DBAPI connection, reopened after a failure."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.engine.raw_connection()
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
            except Exception:  # the connection is already broken; nothing more to do
                pass

    def write(self, records: Sequence[UsageRecord]) -> None:
        conn = self._connection()
        try:
            self._write(conn, _dedupe(records))
            conn.commit()
        except BaseException:
            self._discard()
            raise

    def _write(self, conn: Any, records: Sequence[UsageRecord]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class SQLiteWriter(_RawWriter):
    """``INSERT OR IGNORE`` with ``executemany`` (timestamps as SQLAlchemy's text format)."""

    _sql = (
        f"INSERT OR IGNORE INTO llm_calls ({_COLUMNS}) "
        f"VALUES ({', '.join('?' for _ in RECORD_FIELDS)})"
    )

    def _write(self, conn: Any, records: Sequence[UsageRecord]) -> None:
        rows = [to_row(r, _sqlite_ts, _decimal_text, int) for r in records]
        cur = conn.cursor()
        try:
            cur.executemany(self._sql, rows)
        finally:
            cur.close()


class PostgresWriter(_RawWriter):
    """``COPY`` into a session-local staging table, then an idempotent ``INSERT .. SELECT``."""

    def _write(self, conn: Any, records: Sequence[UsageRecord]) -> None:
        rows = [to_row(r, _same, _same) for r in records]
        cur = conn.cursor()
        try:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _tokenledger_stage "
                "(LIKE llm_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY _tokenledger_stage ({_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                f"INSERT INTO llm_calls ({_COLUMNS}) SELECT {_COLUMNS} FROM _tokenledger_stage "
                "ON CONFLICT (run_id) DO NOTHING"
            )
        finally:
            cur.close()


class MySQLWriter(_RawWriter):
    """One multi-row ``INSERT .. ON DUPLICATE KEY UPDATE run_id = run_id`` (PyMySQL batches it)."""

    _sql = (
        f"INSERT INTO llm_calls ({_COLUMNS}) "
        f"VALUES ({', '.join('%s' for _ in RECORD_FIELDS)}) "
        "ON DUPLICATE KEY UPDATE run_id = run_id"
    )

    def _write(self, conn: Any, records: Sequence[UsageRecord]) -> None:
        rows = [to_row(r, _naive_utc, _same) for r in records]
        cur = conn.cursor()
        try:
            cur.executemany(self._sql, rows)
        finally:
            cur.close()


class CoreWriter:
    """Any other SQLAlchemy dialect: skip stored run_ids, then a Core ``executemany``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def write(self, records: Sequence[UsageRecord]) -> None:
        records = _dedupe(records)
        with self.engine.begin() as conn:
            ids = [r.run_id for r in records]
            stored = set(
                conn.execute(sa.select(llm_calls.c.run_id).where(llm_calls.c.run_id.in_(ids)))
                .scalars()
                .all()
            )
            params = [
                dict(zip(RECORD_FIELDS, to_row(r, _same, _same)))
                for r in records
                if r.run_id not in stored
            ]
            for p in params:
                for key in ("usage_details", "tags", "metadata", "notes"):
                    p[key] = json.loads(p[key])
            if params:
                conn.execute(llm_calls.insert(), params)

    def close(self) -> None:
        pass


def writer_for(engine: sa.Engine) -> BatchWriter:
    """The fastest idempotent writer for ``engine``'s database.

    Example:
        >>> type(writer_for(sa.create_engine("sqlite://"))).__name__
        'SQLiteWriter'
    """
    name = engine.dialect.name
    driver = engine.dialect.driver
    if name == "sqlite":
        return SQLiteWriter(engine)
    if name == "postgresql" and driver == "psycopg":
        return PostgresWriter(engine)
    if name in ("mysql", "mariadb"):
        return MySQLWriter(engine)
    return CoreWriter(engine)
