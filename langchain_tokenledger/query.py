"""Reading the ledger: read-only SQL, per-run usage, grouped summaries, top runs, streaming rows.

Every function takes the ledger's SQLAlchemy engine (``ledger.engine``) and reads only; the
:class:`~langchain_tokenledger.Ledger` methods ``query``, ``usage``, ``summary`` and
``to_pandas`` delegate here. Results are plain Python: ints for counts, :class:`~decimal.Decimal`
for money (at most 12 decimal places, trailing zeros dropped, the same on every database),
timezone-aware UTC datetimes, ``datetime.date`` for days.

Example:
    >>> from langchain_tokenledger import Ledger, UsageRecord
    >>> ledger = Ledger("sqlite://")
    >>> ledger.record(UsageRecord(run_id="r1", model="m", input_tokens=3, output_tokens=2,
    ...                           total_tokens=5))
    >>> ledger.flush()
    >>> [(row["model"], row.calls, row.total_tokens) for row in summarize(ledger.engine)]
    [('m', 1, 5)]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa

from .records import RECORD_FIELDS, TOKEN_FIELDS, ModelUsage, UsageRecord
from .schema import llm_calls
from .views import (
    MEASURES,
    Dialect,
    check_metadata_key,
    day_sql,
    dialect_of,
    has_tag_sql,
    hour_sql,
    measures_sql,
    metadata_sql,
    tag_join_sql,
)

if TYPE_CHECKING:
    from .pricing import Pricer

_UTC = timezone.utc
_PLACES = Decimal("1e-12")

When: TypeAlias = "datetime | date | timedelta | str"
"""A point in time: see :func:`parse_when` (``"7d"``, ``"2026-11-01"``, a datetime, ...)."""


class QueryError(ValueError):
    """A statement or argument the ledger refuses: a write, several statements, a bad group
    key or time, a missing or unknown parameter.

    Example:
        >>> check_read_only("DELETE FROM llm_calls")
        Traceback (most recent call last):
        ...
        langchain_tokenledger.query.QueryError: only read statements are allowed (SELECT, WITH, \
VALUES, TABLE, EXPLAIN, SHOW, DESCRIBE); refused DELETE
    """


# -- read-only SQL ------------------------------------------------------------------------

_READ_KEYWORDS = ("SELECT", "WITH", "VALUES", "TABLE", "EXPLAIN", "SHOW", "DESCRIBE", "DESC")


@functools.lru_cache(maxsize=4)
def _lexer(dialect: Dialect | None) -> re.Pattern[str]:
    """Tokens that can hide a ``;``: comments, strings, quoted names (per dialect)."""
    mysql = dialect == "mysql"
    single = r"'(?:[^'\\]|''|\\.)*(?:'|\Z)" if mysql else r"'(?:[^']|'')*(?:'|\Z)"
    parts = [
        r"(?P<space>\s+)",
        # MySQL: '-- ' needs a space ('1--1' is arithmetic), '#' starts a comment, and a
        # backslash escapes a quote inside a string.
        r"(?P<comment>--(?=\s|\Z)[^\n]*|\#[^\n]*)" if mysql else r"(?P<comment>--[^\n]*)",
        r"(?P<block>/\*.*?(?:\*/|\Z))",
        f"(?P<single>{single})",
        r"(?P<dollar>\$(?P<tag>\w*)\$.*?(?:\$(?P=tag)\$|\Z))" if dialect == "postgresql" else "",
        r'(?P<double>"(?:[^"]|"")*(?:"|\Z))',
        r"(?P<backtick>`(?:[^`]|``)*(?:`|\Z))",
        r"(?P<word>[A-Za-z_][A-Za-z0-9_$]*)",
        r"(?P<semicolon>;)",
        r"(?P<other>.)",
    ]
    return re.compile("|".join(p for p in parts if p), re.DOTALL)


def _words(sql: str, dialect: Dialect | None) -> list[str]:
    """The statement's keywords and identifiers outside strings and comments, and each ``;``."""
    return [
        m.group() for m in _lexer(dialect).finditer(sql) if m.lastgroup in ("word", "semicolon")
    ]


def check_read_only(sql: str, dialect: Dialect | None = None) -> str:
    """``sql`` if it is one read statement (a trailing ``;`` is fine); :class:`QueryError` if not.

    The first line of defence; :func:`read_only` then runs it in a read-only transaction, so a
    write hidden in a ``WITH`` is refused by the database itself.

    Example:
        >>> check_read_only("SELECT model, SUM(cost_usd) FROM llm_calls GROUP BY model;")
        'SELECT model, SUM(cost_usd) FROM llm_calls GROUP BY model;'
    """
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("empty statement: give one SELECT")
    words = _words(sql, dialect)
    while words and words[-1] == ";":
        words.pop()
    if ";" in words:
        raise QueryError("one statement at a time: remove the ';' between statements")
    if not words:
        raise QueryError("empty statement: give one SELECT")
    first = words[0].upper()
    if first not in _READ_KEYWORDS:
        allowed = ", ".join(k for k in _READ_KEYWORDS if k != "DESC")
        raise QueryError(f"only read statements are allowed ({allowed}); refused {first}")
    upper = [w.upper() for w in words]
    if "INTO" in upper:
        raise QueryError("SELECT ... INTO writes (a table, a variable or a file); refused")
    return sql


@contextmanager
def read_only(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection in a read-only transaction that is always rolled back.

    PostgreSQL ``SET TRANSACTION READ ONLY``, MariaDB/MySQL ``START TRANSACTION READ ONLY``,
    SQLite ``PRAGMA query_only`` (reset afterwards).

    Example:
        >>> with read_only(sa.create_engine("sqlite://")) as conn:
        ...     conn.execute(sa.text("SELECT 1")).scalar()
        1
    """
    name = engine.dialect.name
    with engine.connect() as conn:
        try:
            if name == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = ON")
            elif name == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            elif name in ("mysql", "mariadb"):
                conn.exec_driver_sql("START TRANSACTION READ ONLY")
            yield conn
        finally:
            conn.rollback()
            if name == "sqlite":
                try:
                    conn.exec_driver_sql("PRAGMA query_only = OFF")
                    conn.rollback()
                except Exception:  # a pooled connection must never stay read-only
                    conn.invalidate()
                    raise


def _statement(sql: str, dialect: Dialect | None, params: Mapping[str, Any]) -> sa.TextClause:
    check_read_only(sql, dialect)
    stmt = sa.text(sql)
    wanted = set(stmt.compile().params)
    missing = sorted(wanted - set(params))
    unknown = sorted(set(params) - wanted)
    if unknown:
        uses = ", ".join(":" + w for w in sorted(wanted)) or "none"
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)} (the statement uses {uses})")
    if missing:
        raise QueryError(f"missing parameter(s) {', '.join(':' + m for m in missing)}")
    return stmt


def _dialect_or_none(engine: sa.Engine) -> Dialect | None:
    try:
        return dialect_of(engine)
    except ValueError:
        return None


def run_query_columns(
    engine: sa.Engine, sql: str, params: Mapping[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Like :func:`run_query`, also returning the column names (known even with no rows).

    Example:
        >>> run_query_columns(sa.create_engine("sqlite://"), "SELECT 1 AS one WHERE 0", {})
        (['one'], [])
    """
    stmt = _statement(sql, _dialect_or_none(engine), params)
    with read_only(engine) as conn:
        result = conn.execute(stmt, dict(params))
        columns = list(result.keys())
        return columns, [dict(row) for row in result.mappings()]


def run_query(engine: sa.Engine, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run one read statement with bound ``:name`` parameters, read-only; rows as dicts.

    Writes, several statements, and missing or unknown parameters raise :class:`QueryError`.

    Example:
        >>> run_query(sa.create_engine("sqlite://"), "SELECT :x + 1 AS y", {"x": 1})
        [{'y': 2}]
    """
    return run_query_columns(engine, sql, params)[1]


# -- values ---------------------------------------------------------------------------------


def money(value: Any) -> Decimal:
    """A cost as an exact :class:`Decimal` (12 places at most, no trailing zeros; NULL is 0).

    SQLite has no decimal type and returns floats; they are rounded to the column's 12 places.

    Example:
        >>> money(0.1 + 0.2), money(Decimal("1.500000000000")), money(None)
        (Decimal('0.3'), Decimal('1.5'), Decimal('0'))
    """
    if value is None:
        return Decimal(0)
    d = (
        value
        if isinstance(value, Decimal)
        else Decimal(repr(value) if isinstance(value, float) else value)
    )
    d = d.quantize(_PLACES).normalize()
    if d.as_tuple().exponent > 0:  # type: ignore[operator]
        d = d.quantize(Decimal(1))
    return d


def as_utc(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite text, naive UTC, or aware).

    Example:
        >>> as_utc("2026-11-01 12:00:00.000000")
        datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value.astimezone(_UTC)


def _as_date(value: Any) -> date | None:
    if value is None or (isinstance(value, date) and not isinstance(value, datetime)):
        return value
    if isinstance(value, datetime):
        return value.date()
    return date.fromisoformat(str(value))


_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: When, *, now: datetime | None = None) -> datetime:
    """A point in time as an aware UTC datetime.

    Accepts a datetime (naive means UTC), a date (its UTC midnight), a timedelta (that long
    ago), or a string: ``"7d"``, ``"24h"``, ``"30m"``, ``"2w"``, ``"90s"`` (ago), ``"2026-11-01"``
    or an ISO 8601 datetime.

    Example:
        >>> parse_when("2026-11-01")
        datetime.datetime(2026, 11, 1, 0, 0, tzinfo=datetime.timezone.utc)
        >>> now = datetime(2026, 11, 8, tzinfo=timezone.utc)
        >>> parse_when("7d", now=now)
        datetime.datetime(2026, 11, 1, 0, 0, tzinfo=datetime.timezone.utc)
    """
    if isinstance(value, datetime):
        return as_utc(value)  # type: ignore[return-value]
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=_UTC)
    current = now or datetime.now(_UTC)
    if isinstance(value, timedelta):
        return current - value
    if isinstance(value, str):
        text = value.strip()
        match = _RELATIVE.fullmatch(text)
        if match:
            return current - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        try:
            if len(text) == 10:
                return parse_when(date.fromisoformat(text))
            return parse_when(datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise QueryError(
        f"invalid time {value!r}: use e.g. 7d, 24h, 30m, 2026-11-01 or 2026-11-01T12:00:00Z"
    )


def _bind_time(dialect: Dialect, value: datetime) -> Any:
    """A UTC datetime in the form ``started_at`` is stored in."""
    if dialect == "postgresql":
        return value
    naive = value.astimezone(_UTC).replace(tzinfo=None)
    if dialect == "sqlite":
        return naive.isoformat(" ", "microseconds")
    return naive


# -- typed rows -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """The measures every summary, view and run row carries (see :data:`~.views.MEASURES`).

    Example:
        >>> Totals(calls=2, errors=0, cache_hits=1, input_tokens=9, output_tokens=3,
        ...        total_tokens=12, cache_read_tokens=0, reasoning_tokens=0,
        ...        cost_usd=Decimal("0.01")).measures()["cost_usd"]
        Decimal('0.01')
    """

    calls: int
    errors: int
    cache_hits: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cache_read_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal

    def measures(self) -> dict[str, Any]:
        """The measures as a dict, in :data:`~.views.MEASURES` order."""
        return {name: getattr(self, name) for name in MEASURES}


def _measures_from(row: sa.RowMapping) -> dict[str, Any]:
    out: dict[str, Any] = {name: int(row[name] or 0) for name in MEASURES[:-1]}
    out["cost_usd"] = money(row["cost_usd"])
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SummaryRow(Totals):
    """One group of :func:`summarize`: the group ``keys`` and the measures.

    ``row["model"]`` reads a group key (or a measure); ``row.as_dict()`` gives both, flat.

    Example:
        >>> row = SummaryRow(keys={"model": "gpt-4o-mini"}, calls=1, errors=0, cache_hits=0,
        ...                  input_tokens=9, output_tokens=3, total_tokens=12,
        ...                  cache_read_tokens=0, reasoning_tokens=0, cost_usd=Decimal(0))
        >>> row["model"], row["total_tokens"]
        ('gpt-4o-mini', 12)
    """

    keys: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        if name in self.keys:
            return self.keys[name]
        if name in MEASURES:
            return getattr(self, name)
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Group keys then measures, in one flat dict."""
        return {**self.keys, **self.measures()}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRow(Totals):
    """One root run of :func:`top_runs` (a row of the ``usage_by_root_run`` view).

    Example:
        >>> RunRow(root_run_id="r", root_name="chain", started_at=None, ended_at=None,
        ...        user_id=None, session_id=None, models=1, calls=1, errors=0, cache_hits=0,
        ...        input_tokens=1, output_tokens=1, total_tokens=2, cache_read_tokens=0,
        ...        reasoning_tokens=0, cost_usd=Decimal(0)).total_tokens
        2
    """

    root_run_id: str
    root_name: str | None
    started_at: datetime | None
    ended_at: datetime | None
    user_id: str | None
    session_id: str | None
    models: int

    def as_dict(self) -> dict[str, Any]:
        """The run's columns then its measures, in one flat dict."""
        head = ("root_run_id", "root_name", "started_at", "ended_at", "user_id", "session_id")
        return {**{k: getattr(self, k) for k in head}, "models": self.models, **self.measures()}


# -- usage of one run -----------------------------------------------------------------------


def _under(run_id: str) -> sa.ColumnElement[bool]:
    """The call itself, or a call whose root or ancestry path holds ``run_id`` (whole ids)."""
    c = llm_calls.c
    return sa.or_(
        c.run_id == run_id,
        c.root_run_id == run_id,
        c.ancestry == run_id,
        c.ancestry.startswith(run_id + "/", autoescape=True),
        c.ancestry.endswith("/" + run_id, autoescape=True),
        c.ancestry.contains("/" + run_id + "/", autoescape=True),
    )


def _check_run_id(run_id: Any) -> str:
    text = str(run_id).strip() if run_id is not None else ""
    if not text:
        raise QueryError("run_id must be a non-empty run id (a UUID or its string)")
    return text


def usage_for_run(engine: sa.Engine, run_id: str) -> dict[str, dict[str, Any]]:
    """Per-model totals of every call under ``run_id`` (the root, any inner run, or the call).

    The ``{model_name: {prompt_tokens, completion_tokens, total_tokens, successful_requests,
    total_cost, ...}}`` shape of :meth:`~langchain_tokenledger.ModelUsage.as_dict`, the same as
    ``track_usage`` gives live; ``{}`` when nothing is recorded under ``run_id``.

    Example:
        >>> usage_for_run(sa.create_engine("sqlite://"), "no-such-run")  # doctest: +SKIP
        {}
    """
    run_id = _check_run_id(run_id)
    c = llm_calls.c
    name = sa.func.coalesce(c.model, "unknown")

    def count(cond: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((cond, 1), else_=0))

    def total(col: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(col), 0)

    stmt = (
        sa.select(
            name.label("model"),
            count(c.status == "ok").label("ok"),
            count(c.status != "ok").label("failed"),
            count(c.cache_hit == sa.true()).label("cache_hits"),
            count(sa.and_(c.cost_usd.is_(None), c.total_tokens > 0)).label("unpriced"),
            total(c.input_tokens).label("input_tokens"),
            total(c.output_tokens).label("output_tokens"),
            total(c.total_tokens).label("total_tokens"),
            total(c.cache_read_tokens).label("cache_read_tokens"),
            total(c.cache_creation_tokens).label("cache_creation_tokens"),
            total(c.reasoning_tokens).label("reasoning_tokens"),
            sa.func.sum(c.cost_usd).label("cost_usd"),
        )
        .where(_under(run_id))
        .group_by(name)
        .order_by(name)
    )
    out: dict[str, dict[str, Any]] = {}
    with read_only(engine) as conn:
        for row in conn.execute(stmt).mappings():
            usage = ModelUsage(
                model=row["model"],
                prompt_tokens=int(row["input_tokens"]),
                completion_tokens=int(row["output_tokens"]),
                total_tokens=int(row["total_tokens"]),
                cached_tokens=int(row["cache_read_tokens"]),
                cache_creation_tokens=int(row["cache_creation_tokens"]),
                reasoning_tokens=int(row["reasoning_tokens"]),
                successful_requests=int(row["ok"]),
                failed_requests=int(row["failed"]),
                cache_hits=int(row["cache_hits"]),
                total_cost=money(row["cost_usd"]),
                unpriced_requests=int(row["unpriced"]),
            )
            out[row["model"]] = usage.as_dict()
    return out


def _record(row: sa.RowMapping) -> UsageRecord:
    values = dict(row)
    for name in ("started_at", "ended_at"):
        values[name] = as_utc(values[name])
    if values["cost_usd"] is not None:
        values["cost_usd"] = money(values["cost_usd"])
    for name, empty in (("usage_details", {}), ("tags", []), ("metadata", {}), ("notes", [])):
        if values[name] is None:
            values[name] = empty
    values["ancestry"] = values["ancestry"] or ""
    return UsageRecord(**values)


def calls_under(engine: sa.Engine, run_id: str) -> list[UsageRecord]:
    """Every call recorded under ``run_id`` (root, inner run or the call), oldest first.

    Example:
        >>> calls_under(sa.create_engine("sqlite://"), "no-such-run")  # doctest: +SKIP
        []
    """
    run_id = _check_run_id(run_id)
    stmt = (
        sa.select(llm_calls)
        .where(_under(run_id))
        .order_by(llm_calls.c.started_at, llm_calls.c.run_id)
    )
    with read_only(engine) as conn:
        return [_record(row) for row in conn.execute(stmt).mappings()]


# -- grouped summaries ----------------------------------------------------------------------

GROUP_KEYS: tuple[str, ...] = (
    "model",
    "provider",
    "day",
    "hour",
    "root_name",
    "status",
    "user_id",
    "session_id",
    "tag",
)
"""The keys :func:`summarize` groups by, besides ``metadata.<key>``."""

_COLUMN_KEYS = frozenset({"model", "provider", "root_name", "status", "user_id", "session_id"})
_TIME_KEYS = ("day", "hour")


def group_keys(by: Sequence[str] | str) -> list[str]:
    """``by`` as a validated list of group keys (a string may list them comma-separated).

    Example:
        >>> group_keys("day, model")
        ['day', 'model']
        >>> group_keys(["metadata.feature"])
        ['metadata.feature']
    """
    raw = by.split(",") if isinstance(by, str) else list(by)
    keys = [k.strip() if isinstance(k, str) else k for k in raw]
    if isinstance(by, str) and keys == [""]:
        return []
    out: list[str] = []
    for key in keys:
        if not isinstance(key, str) or not key:
            raise QueryError(f"invalid group key {key!r}")
        if key.startswith("metadata."):
            try:
                check_metadata_key(key[len("metadata.") :])
            except ValueError as exc:
                raise QueryError(str(exc)) from None
        elif key not in GROUP_KEYS:
            raise QueryError(
                f"unknown group key {key!r}: choose from {', '.join(GROUP_KEYS)} or metadata.<key>"
            )
        if key in out:
            raise QueryError(f"group key {key!r} given twice")
        out.append(key)
    return out


def _key_sql(dialect: Dialect, key: str) -> str:
    if key in _COLUMN_KEYS:
        return f"c.{key}"
    if key == "day":
        return day_sql(dialect, "c.started_at")
    if key == "hour":
        return hour_sql(dialect, "c.started_at")
    if key == "tag":
        return tag_join_sql(dialect)[1]
    return metadata_sql(dialect, key[len("metadata.") :], "c.metadata")


def _meta_text(key: str, value: Any) -> str | None:
    """A metadata filter value in the text form :func:`~.views.metadata_sql` compares with."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    raise QueryError(f"metadata filter {key!r}: compare with a string, number, bool or None")


def _filters(
    dialect: Dialect,
    since: When | None,
    until: When | None,
    tags: Iterable[str] | str | None,
    metadata: Mapping[str, Any] | None,
) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if since is not None:
        where.append("c.started_at >= :since")
        params["since"] = _bind_time(dialect, parse_when(since))
    if until is not None:
        where.append("c.started_at < :until")
        params["until"] = _bind_time(dialect, parse_when(until))
    for i, tag in enumerate([tags] if isinstance(tags, str) else list(tags or ())):
        if not isinstance(tag, str) or not tag:
            raise QueryError(f"invalid tag {tag!r}: tags are non-empty strings")
        where.append(has_tag_sql(dialect, f"tag_{i}"))
        params[f"tag_{i}"] = tag
    for i, (key, value) in enumerate((metadata or {}).items()):
        try:
            expr = metadata_sql(dialect, key, "c.metadata")
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        text = _meta_text(key, value)
        if text is None:
            where.append(f"{expr} IS NULL")
        else:
            where.append(f"{expr} = :meta_{i}")
            params[f"meta_{i}"] = text
    return where, params


def _key_value(key: str, value: Any) -> Any:
    if key == "day":
        return _as_date(value)
    if key == "hour":
        return as_utc(value)
    if key.startswith("metadata.") and value is not None:
        return str(value)
    return value


def _order(keys: Sequence[str]) -> Any:
    time_keys = [k for k in keys if k in _TIME_KEYS]
    other = [k for k in keys if k not in _TIME_KEYS]

    def sort_key(row: SummaryRow) -> tuple[Any, ...]:
        head = tuple((row.keys[k] is None, row.keys[k]) for k in time_keys)
        tail = tuple((row.keys[k] is None, str(row.keys[k])) for k in other)
        return (*head, -row.cost_usd, -row.calls, *tail)

    return sort_key


def summarize(
    engine: sa.Engine,
    by: Sequence[str] | str = ("model",),
    *,
    since: When | None = None,
    until: When | None = None,
    tags: Iterable[str] | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> list[SummaryRow]:
    """Totals grouped by ``by``, over the calls that pass every filter.

    Args:
        by: group keys, any of :data:`GROUP_KEYS` or ``metadata.<key>`` (a sequence, or one
            comma-separated string); ``()`` gives one row of grand totals. ``day`` and ``hour``
            are UTC; with ``tag`` a call counts once under each of its tags (untagged calls
            under ``None``), so those rows add up to more than the total.
        since: calls started at or after (see :func:`parse_when`: ``"7d"``, a date, ...).
        until: calls started before (exclusive).
        tags: calls carrying every one of these tags.
        metadata: calls whose ``metadata[key]`` equals the value (compared as text; ``None``
            matches a missing key).

    Rows come chronologically by ``day``/``hour``, then most expensive first.

    Example:
        >>> rows = summarize(engine, by=("day", "model"), since="7d")  # doctest: +SKIP
        >>> rows[0].keys, rows[0].cost_usd  # doctest: +SKIP
        ({'day': datetime.date(2026, 11, 1), 'model': 'gpt-4o'}, Decimal('0.0125'))
    """
    keys = group_keys(by)
    dialect = dialect_of(engine)
    where, params = _filters(dialect, since, until, tags, metadata)
    select = [f"{_key_sql(dialect, key)} AS k{i}" for i, key in enumerate(keys)]
    select.append(measures_sql(dialect, "c."))
    sql = f"SELECT {', '.join(select)}\nFROM llm_calls AS c"
    if "tag" in keys:
        sql += "\n" + tag_join_sql(dialect)[0]
    if where:
        sql += "\nWHERE " + " AND ".join(where)
    if keys:
        sql += "\nGROUP BY " + ", ".join(str(i + 1) for i in range(len(keys)))
    with read_only(engine) as conn:
        raw = list(conn.execute(sa.text(sql), params).mappings())
    rows = [
        SummaryRow(
            keys={key: _key_value(key, r[f"k{i}"]) for i, key in enumerate(keys)},
            **_measures_from(r),
        )
        for r in raw
    ]
    return sorted(rows, key=_order(keys))


def top_runs(
    engine: sa.Engine,
    top: int = 10,
    *,
    since: When | None = None,
    until: When | None = None,
) -> list[RunRow]:
    """The ``top`` most expensive root runs (by ``cost_usd``) that started in the window.

    Example:
        >>> [r.root_name for r in top_runs(engine, top=3, since="7d")]  # doctest: +SKIP
        ['nightly-report', 'chat', 'chat']
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise QueryError(f"top must be a positive integer, got {top!r}")
    dialect = dialect_of(engine)
    where: list[str] = []
    params: dict[str, Any] = {"top": top}
    if since is not None:
        where.append("started_at >= :since")
        params["since"] = _bind_time(dialect, parse_when(since))
    if until is not None:
        where.append("started_at < :until")
        params["until"] = _bind_time(dialect, parse_when(until))
    sql = "SELECT * FROM usage_by_root_run"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY cost_usd DESC, total_tokens DESC, root_run_id LIMIT :top"
    with read_only(engine) as conn:
        raw = list(conn.execute(sa.text(sql), params).mappings())
    return [
        RunRow(
            root_run_id=r["root_run_id"],
            root_name=r["root_name"],
            started_at=as_utc(r["started_at"]),
            ended_at=as_utc(r["ended_at"]),
            user_id=r["user_id"],
            session_id=r["session_id"],
            models=int(r["models"]),
            **_measures_from(r),
        )
        for r in raw
    ]


# -- cache savings --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheSavings:
    """What LLM-cache hits saved for one model: the replayed usage, and its price today.

    Example:
        >>> CacheSavings("openai", "gpt-4o-mini", hits=2, input_tokens=18, output_tokens=6,
        ...              cost_usd=None).hits
        2
    """

    provider: str | None
    model: str | None
    hits: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal | None
    """What the replayed calls would have cost (``None`` when the model has no price)."""


def cache_savings(
    engine: sa.Engine,
    pricer: Pricer,
    *,
    since: When | None = None,
    until: When | None = None,
) -> list[CacheSavings]:
    """Per model, the tokens and cost that LLM-cache hits did not spend, most saved first.

    A cache hit bills nothing and keeps the replayed call's usage in ``usage_details``;
    that usage is priced with ``pricer`` (``ledger.pricer``).

    Example:
        >>> cache_savings(ledger.engine, ledger.pricer, since="30d")  # doctest: +SKIP
        [CacheSavings(provider='openai', model='gpt-4o-mini', hits=12, ...)]
    """
    c = llm_calls.c
    stmt = sa.select(c.provider, c.model, c.usage_details).where(c.cache_hit == sa.true())
    if since is not None:
        stmt = stmt.where(c.started_at >= parse_when(since))
    if until is not None:
        stmt = stmt.where(c.started_at < parse_when(until))
    groups: dict[tuple[str | None, str | None], list[Mapping[str, Any]]] = {}
    with read_only(engine) as conn:
        for provider, model, details in conn.execute(stmt):
            groups.setdefault((provider, model), []).append(details or {})
    out: list[CacheSavings] = []
    for (provider, model), usages in groups.items():
        cost: Decimal | None = Decimal(0)
        for usage in usages:
            priced = pricer.price(model=model, provider=provider, usage=usage).cost_usd
            cost = None if cost is None or priced is None else cost + priced
        out.append(
            CacheSavings(
                provider=provider,
                model=model,
                hits=len(usages),
                input_tokens=sum(int(u.get("input_tokens") or 0) for u in usages),
                output_tokens=sum(int(u.get("output_tokens") or 0) for u in usages),
                cost_usd=None if cost is None else money(cost),
            )
        )
    out.sort(key=lambda s: (-(s.cost_usd or 0), -s.input_tokens - s.output_tokens, str(s.model)))
    return out


# -- every call, streamed -------------------------------------------------------------------


def iter_calls(
    engine: sa.Engine,
    *,
    since: When | None = None,
    until: When | None = None,
    batch_size: int = 1000,
) -> Iterator[UsageRecord]:
    """Every call in the window, oldest first, streamed with a server-side cursor.

    Memory stays constant whatever the ledger's size: rows are fetched ``batch_size`` at a time.

    Example:
        >>> sum(r.total_tokens or 0 for r in iter_calls(engine, since="1d"))  # doctest: +SKIP
        1234
    """
    c = llm_calls.c
    stmt = sa.select(llm_calls).order_by(c.started_at, c.run_id)
    if since is not None:
        stmt = stmt.where(c.started_at >= parse_when(since))
    if until is not None:
        stmt = stmt.where(c.started_at < parse_when(until))
    with read_only(engine) as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
        try:
            for row in result.mappings():
                yield _record(row)
        finally:
            result.close()


# -- pandas -------------------------------------------------------------------------------------


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "to_pandas() needs pandas: pip install 'langchain-tokenledger[pandas]'"
        ) from None
    return pandas


def to_pandas(
    engine: sa.Engine, sql: str | None = None, params: Mapping[str, Any] | None = None
) -> Any:
    """A ``pandas.DataFrame`` of every call (typed), or of a read-only ``sql`` with ``params``.

    Every call: one row per ``llm_calls`` row, ``started_at``/``ended_at`` as UTC datetimes,
    ``cost_usd`` as float (use :func:`summarize` for exact sums), JSON columns as Python
    objects. Needs the ``pandas`` extra; without it an ``ImportError`` names the extra.

    Example:
        >>> df = to_pandas(engine)  # doctest: +SKIP
        >>> df.groupby("model")["cost_usd"].sum()  # doctest: +SKIP
    """
    pd = _pandas()
    if sql is not None:
        columns, rows = run_query_columns(engine, sql, params or {})
        return pd.DataFrame.from_records(rows, columns=columns)
    if params:
        raise QueryError("parameters need a sql statement: to_pandas(sql, **params)")
    records = [{name: getattr(r, name) for name in RECORD_FIELDS} for r in iter_calls(engine)]
    df = pd.DataFrame.from_records(records, columns=list(RECORD_FIELDS))
    for name in ("started_at", "ended_at"):
        df[name] = pd.to_datetime(df[name], utc=True)
    for name in TOKEN_FIELDS:
        df[name] = df[name].astype("Int64")
    for name in ("latency_ms", "ttft_ms", "cost_usd"):
        df[name] = pd.to_numeric(df[name].map(_float), errors="coerce").astype("float64")
    return df


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "GROUP_KEYS",
    "CacheSavings",
    "QueryError",
    "RunRow",
    "SummaryRow",
    "Totals",
    "cache_savings",
    "calls_under",
    "check_read_only",
    "group_keys",
    "iter_calls",
    "money",
    "parse_when",
    "read_only",
    "run_query",
    "summarize",
    "to_pandas",
    "top_runs",
    "usage_for_run",
]
