"""Batch writers: records -> rows -> idempotent multi-row inserts, one transaction per batch.

Each writer owns one raw DBAPI connection (used by the ledger's writer thread only) and the
fastest idempotent path its database offers: SQLite ``INSERT .. ON CONFLICT DO NOTHING`` with
many rows per statement, PostgreSQL ``COPY`` into a temporary table then ``INSERT .. ON CONFLICT
DO NOTHING``, MariaDB/MySQL a multi-row ``INSERT .. ON DUPLICATE KEY UPDATE``. A replayed
record (same ``run_id``) never creates a second row.

Serialization is the writer's main CPU cost and it holds the GIL, so it competes with the
application's own threads: each writer builds rows with a function compiled for its database
(one C-level attribute fetch, one local per column, no per-column loop), the price is written
into the row (no priced copy of the record), JSON columns go through orjson when it is installed
(langchain-core brings it on CPython) or a prebuilt stdlib C encoder, and timestamps and costs
take the cheapest exact conversion.
"""

from __future__ import annotations

import contextlib
import json
import json.encoder
import logging
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from itertools import chain
from typing import Any, Protocol, cast

import sqlalchemy as sa

from .records import RECORD_FIELDS, UsageRecord, record_values
from .schema import llm_calls

logger = logging.getLogger("langchain_tokenledger")

Row = tuple[Any, ...]
"""A record's values in column order, as bound to the insert statement.

A tuple, not a list: the garbage collector stops tracking a tuple of plain values the first
time it sees one, so a batch waiting for the database is not traversed over and over.
"""
Price = tuple[Decimal | None, str | None, list[str]]
"""``(cost_usd, price_source, notes)`` of a record, as the writer thread computes it."""

_COLUMNS = ", ".join(RECORD_FIELDS)
_UTC = timezone.utc
_STRING_LIMITS = {
    c.name: c.type.length
    for c in llm_calls.columns
    if isinstance(c.type, sa.String) and c.type.length and c.name != "run_id"
}


class BatchWriter(Protocol):
    """Writes batches of records in one transaction each, skipping run_ids already stored.

    Writing has two halves so that the ledger can overlap them: :meth:`prepare` turns records
    into rows (pure CPU, holds the GIL), :meth:`execute` sends rows to the database (mostly
    waiting on it, GIL released) and may be retried with the same rows. ``prices`` (one per
    record) is what the writer thread priced them at; ``None`` writes the records' own
    ``cost_usd``/``price_source``/``notes``.
    """

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]: ...

    def prepare_values(
        self, values: Sequence[Sequence[Any]], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        """:meth:`prepare` from each record's field values in column order, as
        :func:`~langchain_tokenledger.records.record_values` gives them or as a packed record
        holds them (what the ledger's writer thread has: it never builds the records)."""
        ...

    def execute(self, rows: list[Row]) -> None: ...

    def write(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> None: ...

    def close(self) -> None: ...

    def abandon(self) -> None:
        """Forget the connection without closing it (in a forked child: it is the parent's)."""
        ...


def _stdlib_dumps() -> Callable[[Any], str]:
    """Compact JSON (non-ASCII kept, unknown objects as ``str``) from a prebuilt C encoder.

    ``json.dumps`` with any option builds a new encoder on every call, which costs more than
    encoding a small dict.
    """
    stdlib = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # no C accelerator (e.g. PyPy)
        return stdlib
    # markers=None skips the circular-reference check: a cycle raises RecursionError instead,
    # which _json handles like any other unencodable value.
    encode = make_encoder(
        None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    join = "".join

    def dumps(value: Any) -> str:
        return join(encode(value, 0))

    return dumps


_stdlib = _stdlib_dumps()


def _make_dumps() -> Callable[[Any], str]:
    """orjson (about 4x faster on these small objects) with the stdlib encoder's output.

    Unknown objects, datetimes and dataclasses become ``str(obj)`` as with the stdlib; what
    orjson refuses (integers beyond 64 bits, ...) is left to the stdlib encoder. Non-string
    keys are only asked for when a dict has one: ``OPT_NON_STR_KEYS`` makes every call 50%
    slower, and the output for string keys is the same with or without it.
    """
    try:
        import orjson
    except ImportError:  # PyPy, or a stripped-down install
        return _stdlib
    orjson_dumps = orjson.dumps
    options = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    non_str_keys = options | orjson.OPT_NON_STR_KEYS

    def dumps(value: Any) -> str:
        try:
            return orjson_dumps(value, default=str, option=options).decode()
        except TypeError:  # orjson.JSONEncodeError: a non-str key, or a value orjson refuses
            pass
        try:
            return orjson_dumps(value, default=str, option=non_str_keys).decode()
        except TypeError:
            return _stdlib(value)

    return dumps


_dumps = _make_dumps()


def _json(value: Any, empty: str) -> str:
    if not value:
        return empty
    try:
        return _dumps(value)
    except (TypeError, ValueError, RecursionError):
        # Keys JSON cannot hold, or a cycle: keep the content readable rather than lose the row.
        logger.warning("langchain-tokenledger: a JSON column could not be encoded; kept as text")
        return _stdlib({"unencodable": repr(value)} if empty == "{}" else [repr(value)])


Timestamp = datetime | float | str | None
"""A timestamp as a record holds it (``datetime``) or as a packed record does (UTC POSIX
seconds, or ISO text; see :mod:`~langchain_tokenledger.packing`)."""


def _as_datetime(value: Timestamp) -> datetime | None:
    """The ``datetime`` a packed timestamp stands for (a ``datetime`` or ``None`` as is)."""
    if value.__class__ is float:
        return datetime.fromtimestamp(value, _UTC)
    if value.__class__ is str:
        return datetime.fromisoformat(value)
    return value  # type: ignore[return-value]


def _naive_utc(value: Timestamp) -> datetime | None:
    value = _as_datetime(value)
    if value is None:
        return None
    if value.tzinfo is not None and value.tzinfo is not _UTC:
        value = value.astimezone(_UTC)
    return value.replace(tzinfo=None)


def _decimal(value: Decimal | str | None) -> Decimal | None:
    """A cost as a ``Decimal`` (a packed record holds its text)."""
    return Decimal(value) if isinstance(value, str) else value


def _sqlite_ts(value: Timestamp) -> str | None:
    """SQLAlchemy's SQLite DATETIME text, always with microseconds (text order = time order).

    Built from cached pieces: formatting seven numbers with ``%02d`` (or ``isoformat``) costs
    2.5x as much. A packed timestamp (UTC POSIX seconds) is cut into its minute, second and
    microsecond without a ``datetime``, rounding as ``datetime.fromtimestamp`` does (half to
    even, on the same double).

    Example:
        >>> _sqlite_ts(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc))
        '2026-01-02 03:04:05.000006'
        >>> _sqlite_ts(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc).timestamp())
        '2026-01-02 03:04:05.000006'
    """
    if value.__class__ is float and 0.0 <= value < _LAST_SECOND:
        seconds = int(value)
        micro = round((value - seconds) * 1e6)
        if micro == 1_000_000:
            seconds, micro = seconds + 1, 0
        minute = seconds // 60
        return (
            f"{_MINUTE_TEXTS.get(minute) or _minute_text(minute)}"
            f"{_TWO_DIGITS[seconds - minute * 60]}.{str(micro + 1_000_000)[1:]}"
        )
    value = _as_datetime(value)
    if value is None:
        return None
    if value.tzinfo is not _UTC:  # the handler's timestamps are UTC already
        value = value.astimezone(_UTC) if value.tzinfo is not None else value
    two = _TWO_DIGITS
    return (
        f"{_DATE_TEXTS.get(value.toordinal()) or _date_text(value)}"
        f"{two[value.hour]}:{two[value.minute]}:{two[value.second]}."
        f"{str(value.microsecond + 1_000_000)[1:]}"
    )


_LAST_SECOND = 253402300799.0  # 9999-12-31 23:59:59 UTC; later floats take the datetime path
_TWO_DIGITS = tuple(f"{i:02d}" for i in range(100))
_DATE_TEXTS: dict[int, str] = {}
"""Proleptic ordinal of a day -> ``"YYYY-MM-DD "`` (its first part of a SQLite timestamp)."""


def _date_text(value: datetime) -> str:
    if len(_DATE_TEXTS) >= 4096:  # e.g. a backfill of old calls: keep the cache small
        _DATE_TEXTS.clear()
    text = _DATE_TEXTS[value.toordinal()] = f"{value.year:04d}-{value.month:02d}-{value.day:02d} "
    return text


_MINUTE_TEXTS: dict[int, str] = {}
"""Minutes since the epoch -> ``"YYYY-MM-DD HH:MM:"`` (the start of a SQLite timestamp)."""


def _minute_text(minute: int) -> str:
    if len(_MINUTE_TEXTS) >= 4096:
        _MINUTE_TEXTS.clear()
    hour, rest = divmod(minute % 1440, 60)
    day = _EPOCH_ORDINAL + minute // 1440
    date = _DATE_TEXTS.get(day) or _date_text(datetime.fromordinal(day))
    text = _MINUTE_TEXTS[minute] = f"{date}{_TWO_DIGITS[hour]}:{_TWO_DIGITS[rest]}:"
    return text


_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()


def _decimal_text(value: Decimal | str | None) -> str | None:
    # SQLite's NUMERIC affinity parses both "0.0001" and "1E-4" to the same number; a packed
    # record's cost is this text already.
    return None if value is None else str(value)


RowFunction = Callable[[Sequence[Any], "Price | None"], Row]
"""``row(values, price)``: a record's field values (native or packed) as its row (see
:func:`to_row`)."""

_JSON_EMPTY = {"usage_details": "{}", "tags": "[]", "metadata": "{}", "notes": "[]"}
_BOOLEANS = frozenset(c.name for c in llm_calls.columns if isinstance(c.type, sa.Boolean))


def _row_function(
    ts: Callable[[Timestamp], Any],
    cost: Callable[[Decimal | str | None], Any],
    *,
    null: object = None,
    bools_as_ints: bool = False,
) -> RowFunction:
    """Compile :func:`to_row` for one pair of converters into a flat function (hot loop).

    The generated function unpacks the record into one local per column, shortens over-long
    names to their column's length (a row is never lost to a long name; the row's notes say
    which were clipped), converts and returns the row as one tuple display: 15% less time than
    patching a list of the values column by column. ``null`` replaces ``None`` in the row,
    ``bools_as_ints`` writes booleans as ``1``/``0`` (see :class:`SQLiteWriter`).
    """
    names = RECORD_FIELDS
    lines = [
        "def row(values, price):",
        f"    ({', '.join(names)},) = values",
        "    if price is not None:",
        "        cost_usd, price_source, notes = price",
        "    clipped = ''",
    ]
    for name, limit in _STRING_LIMITS.items():
        lines += [
            f"    if {name}.__class__ is str and len({name}) > {limit}:",
            f"        {name} = {name}[:{limit}]",
            f"        clipped += ',{name}'",
        ]
    lines += [
        "    if clipped:",
        "        notes = [*notes, 'truncated:' + clipped[1:]]",
    ]
    items: list[str] = []
    for name in names:
        empty = _JSON_EMPTY.get(name)
        if empty is not None:  # never None
            items.append(f"_json({name}, {empty!r}) if {name} else {empty!r}")
            continue
        if name in ("started_at", "ended_at"):
            item = f"_ts({name})"
        elif name == "cost_usd":
            item = f"_cost({name})"
        elif bools_as_ints and name in _BOOLEANS:
            item = f"(1 if {name} is True else 0 if {name} is False else {name})"
        else:
            item = name
        if null is not None:
            item = f"_null if {name} is None else {item}"
        items.append(item)
    lines.append("    return (\n        " + ",\n        ".join(items) + ",\n    )")
    namespace: dict[str, Any] = {
        "_ts": ts,
        "_cost": cost,
        "_json": _json,
        "_null": null,
    }
    exec("\n".join(lines) + "\n", namespace)
    return cast(RowFunction, namespace["row"])


_row_functions: dict[tuple[Callable[..., Any], Callable[..., Any]], RowFunction] = {}


def _row_function_for(
    ts: Callable[[Timestamp], Any], cost: Callable[[Decimal | str | None], Any]
) -> RowFunction:
    function = _row_functions.get((ts, cost))
    if function is None:
        function = _row_functions[(ts, cost)] = _row_function(ts, cost)
    return function


def to_row(
    r: UsageRecord,
    ts: Callable[[Timestamp], Any],
    cost: Callable[[Decimal | str | None], Any],
    price: Price | None = None,
) -> Row:
    """One record as a tuple in column order, JSON columns serialized.

    ``price`` (``(cost_usd, price_source, notes)``) replaces the record's own; ``ts`` and
    ``cost`` convert the timestamps and the cost. The writers use a compiled function per pair
    of converters (see :func:`_row_function`); this looks it up.

    Example:
        >>> row = to_row(UsageRecord(run_id="r1", tags=["a"]), _sqlite_ts, _decimal_text)
        >>> row[0], row[RECORD_FIELDS.index("tags")], row[RECORD_FIELDS.index("notes")]
        ('r1', '["a"]', '[]')
    """
    return _row_function_for(ts, cost)(record_values(r), price)


def _rows(
    row: RowFunction, values: Sequence[Sequence[Any]], prices: Sequence[Price] | None
) -> list[Row]:
    if prices is None:
        return [row(v, None) for v in values]
    return [row(v, p) for v, p in zip(values, prices, strict=True)]


def to_rows(
    records: Sequence[UsageRecord],
    prices: Sequence[Price] | None,
    ts: Callable[[Timestamp], Any],
    cost: Callable[[Decimal | str | None], Any],
) -> list[Row]:
    """:func:`to_row` of each record (with its price).

    Rows may repeat a ``run_id``: every writer keeps the first and skips the others.
    """
    return _rows(_row_function_for(ts, cost), [record_values(r) for r in records], prices)


def _first_of_each(rows: list[Row]) -> list[Row]:
    if len({row[0] for row in rows}) == len(rows):
        return rows
    seen: set[str] = set()
    unique: list[Row] = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            unique.append(row)
    return unique


_abandoned: list[Any] = []
"""A forked child's copies of its parent's connections: kept, so never closed here."""


class _RawWriter:
    """Shared connection handling: one raw DBAPI connection, reopened after a failure."""

    _ts: Callable[[Timestamp], Any] = staticmethod(_as_datetime)
    _cost: Callable[[Decimal | str | None], Any] = staticmethod(_decimal)

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._conn: Any = None
        self._row = self._row_function()

    def _row_function(self) -> RowFunction:
        return _row_function(self._ts, self._cost)

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.engine.raw_connection()
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken; nothing more to do
                conn.invalidate()

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return _rows(self._row, [record_values(r) for r in records], prices)

    def prepare_values(
        self, values: Sequence[Sequence[Any]], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return _rows(self._row, values, prices)

    def execute(self, rows: list[Row]) -> None:
        conn = self._connection()
        try:
            self._execute(conn, rows)
            conn.commit()
        except BaseException:
            self._discard()
            raise

    def write(self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None) -> None:
        self.execute(self.prepare(records, prices))

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Closing it, or the pool's reset when the proxy is collected, would speak on the
        # parent's socket (SQLAlchemy's recipe for a fork: the record forgets its connection).
        _abandoned.append(conn.dbapi_connection)
        record = getattr(conn, "_connection_record", None)
        if record is not None:
            record.dbapi_connection = None
        conn.dbapi_connection = None


def _sqlite_max_variables() -> int:
    """Most ``?`` parameters one statement may have (SQLite's compile-time limit)."""
    limit_id = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)  # Python 3.11+
    if limit_id is not None:
        probe = sqlite3.connect(":memory:")
        try:
            return int(probe.getlimit(limit_id))  # type: ignore[attr-defined,unused-ignore]
        finally:
            probe.close()
    return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999


_SQLITE_NULL = float("nan")
"""What SQLite rows hold for NULL (see :class:`SQLiteWriter`)."""


class SQLiteWriter(_RawWriter):
    """``INSERT .. ON CONFLICT (run_id) DO NOTHING``, up to 1024 rows per statement.

    Timestamps are written as SQLAlchemy's SQLite text format.

    SQLite releases the GIL while it executes a statement, and a thread that wants the GIL back
    waits up to the holder's switch interval (5 ms); one statement per row (``executemany``)
    would pay that wait once per row whenever another thread keeps the GIL busy. Batches are
    cut into power-of-two chunks, so a handful of cached statements cover any batch size. The
    writer's connection gets a larger page cache (the ledger's indexes outgrow SQLite's 2 MB
    default cache after a few ten thousand rows) and checkpoints the WAL every 64 MB (SQLite's
    default is 1,000 pages): every checkpoint waits for two fsyncs, and the index pages every
    batch rewrites (the user and session indexes take inserts all over) are copied into the
    database once per checkpoint. A ledger the package creates has 16 KB pages (see
    ``store._sqlite_pragmas``): with 32,000-row batches, a batch touches and rewrites fewer,
    fuller index pages, and the insert takes a fifth to a quarter less time per row than with
    4 KB pages and 8,000-row batches (``benchmarks/write_rate.py``, "SQLite insert" step).

    Rows hold ``NaN`` for NULL and ``1``/``0`` for booleans: the ``sqlite3`` module binds a
    ``float``, ``int`` or ``str`` directly but sends ``None`` and ``bool`` through its adapter
    lookup first, which costs ten times as much (about 1 us per value, GIL held) and was a
    fifth of the insert's CPU. SQLite stores a bound NaN as NULL and a bound bool as the
    integer, so the stored rows are the same (``tests/test_writers.py`` checks both).
    """

    _ROW = f"({', '.join('?' for _ in RECORD_FIELDS)})"
    _PRAGMAS = ("PRAGMA cache_size = -32768",)
    _WAL_CHECKPOINT_BYTES = 64 << 20
    _ts = staticmethod(_sqlite_ts)
    _cost = staticmethod(_decimal_text)

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        most = max(1, min(1024, _sqlite_max_variables() // len(RECORD_FIELDS)))
        self._chunk = 1 << (most.bit_length() - 1)
        self._statements: dict[int, str] = {}

    def _row_function(self) -> RowFunction:
        return _row_function(self._ts, self._cost, null=_SQLITE_NULL, bools_as_ints=True)

    def _connection(self) -> Any:
        if self._conn is None:
            conn = super()._connection()
            cur = conn.cursor()
            try:
                for pragma in self._PRAGMAS:
                    cur.execute(pragma)
                (page_size,) = cur.execute("PRAGMA page_size").fetchone()
                pages = max(1000, self._WAL_CHECKPOINT_BYTES // page_size)
                cur.execute(f"PRAGMA wal_autocheckpoint = {pages}")
            finally:
                cur.close()
        return self._conn

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = (
                # ON CONFLICT (run_id), not OR IGNORE: OR IGNORE would also skip, silently, a
                # row that breaks another constraint (a NULL status).
                f"INSERT INTO llm_calls ({_COLUMNS}) VALUES "
                + ", ".join([self._ROW] * rows)
                + " ON CONFLICT (run_id) DO NOTHING"
            )
        return sql

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            start, size = 0, self._chunk
            while start < len(rows):
                while len(rows) - start < size:
                    size //= 2
                chunk = rows[start : start + size]
                cur.execute(self._statement(size), list(chain.from_iterable(chunk)))
                start += size
        finally:
            cur.close()


class PostgresWriter(_RawWriter):
    """``COPY`` straight into ``llm_calls``, or, when that meets a stored ``run_id``, ``COPY``
    into a session-local staging table and an idempotent ``INSERT .. SELECT`` from it.

    Replayed records are rare, and the direct ``COPY`` spares the server the staging table and
    a second pass over the batch: a sixth less time per batch. A batch that repeats a
    ``run_id`` itself takes the staging path at once. Both paths store the same values.
    """

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            if len({row[0] for row in rows}) == len(rows) and self._copy_new(cur, rows):
                return
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _tokenledger_stage "
                "(LIKE llm_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self._copy(cur, "_tokenledger_stage", rows)
            cur.execute(
                f"INSERT INTO llm_calls ({_COLUMNS}) SELECT {_COLUMNS} FROM _tokenledger_stage "
                "ON CONFLICT (run_id) DO NOTHING"
            )
        finally:
            cur.close()

    def _copy_new(self, cur: Any, rows: list[Row]) -> bool:
        """``COPY`` the rows into ``llm_calls``; False (and nothing written) if one is stored."""
        from psycopg.errors import UniqueViolation

        cur.execute("SAVEPOINT tokenledger_copy")
        try:
            self._copy(cur, "llm_calls", rows)
        except UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT tokenledger_copy")
            return False
        cur.execute("RELEASE SAVEPOINT tokenledger_copy")
        return True

    @staticmethod
    def _copy(cur: Any, table: str, rows: list[Row]) -> None:
        with cur.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN") as copy:
            write_row = copy.write_row
            for row in rows:
                write_row(row)


class MySQLWriter(_RawWriter):
    """One multi-row ``INSERT .. ON DUPLICATE KEY UPDATE run_id = run_id`` (PyMySQL batches it)."""

    _sql = (
        f"INSERT INTO llm_calls ({_COLUMNS}) "
        f"VALUES ({', '.join('%s' for _ in RECORD_FIELDS)}) "
        "ON DUPLICATE KEY UPDATE run_id = run_id"
    )
    _ts = staticmethod(_naive_utc)

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            cur.executemany(self._sql, rows)
        finally:
            cur.close()


class CoreWriter:
    """Any other SQLAlchemy dialect: skip stored run_ids, then a Core ``executemany``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._row = _row_function(_as_datetime, _decimal)

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return _rows(self._row, [record_values(r) for r in records], prices)

    def prepare_values(
        self, values: Sequence[Sequence[Any]], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return _rows(self._row, values, prices)

    def execute(self, rows: list[Row]) -> None:
        rows = _first_of_each(rows)
        with self.engine.begin() as conn:
            ids = [row[0] for row in rows]
            stored = set(
                conn.execute(sa.select(llm_calls.c.run_id).where(llm_calls.c.run_id.in_(ids)))
                .scalars()
                .all()
            )
            params = [
                dict(zip(RECORD_FIELDS, row, strict=True)) for row in rows if row[0] not in stored
            ]
            for p in params:
                for key in ("usage_details", "tags", "metadata", "notes"):
                    p[key] = json.loads(p[key])
            if params:
                conn.execute(llm_calls.insert(), params)

    def write(self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None) -> None:
        self.execute(self.prepare(records, prices))

    def close(self) -> None:
        pass

    def abandon(self) -> None:
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
