"""The ledger's SQL views, and the per-dialect SQL that the views and the query API share.

Three views are created with the schema, on SQLite, PostgreSQL and MariaDB/MySQL alike:

* ``usage_by_model``: one row per ``provider`` x ``model``;
* ``usage_by_day``: one row per UTC ``day`` x ``provider`` x ``model``;
* ``usage_by_root_run``: one row per root run (``root_run_id``, ``root_name``, ``started_at``,
  ``ended_at``, ``user_id``, ``session_id``, ``models``).

Each carries the same measures (:data:`MEASURES`), so a query written against one reads the same
against the others.

Example:
    >>> import sqlalchemy as sa
    >>> from langchain_tokenledger.schema import create_schema
    >>> engine = sa.create_engine("sqlite://")
    >>> create_schema(engine)  # creates the views too
    >>> with engine.connect() as conn:
    ...     conn.execute(sa.text("SELECT calls, cost_usd FROM usage_by_model")).all()
    []
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

logger = logging.getLogger("langchain_tokenledger")

Dialect = Literal["sqlite", "postgresql", "mysql"]
"""The SQL dialects the views and the query API speak (MariaDB is ``mysql``)."""

MEASURES: tuple[str, ...] = (
    "calls",
    "errors",
    "cache_hits",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "cost_usd",
)
"""The measures every view and every summary row carries, in this order.

``calls``: LLM calls (rows); ``errors``: calls with status ``error`` (``cancelled`` ones are
not errors); ``cache_hits``: calls answered from an LLM cache; the token measures: sums of the
billed token columns (NULL counts as 0); ``cost_usd``: sum of the priced calls' cost.
"""

VIEW_NAMES: tuple[str, ...] = ("usage_by_model", "usage_by_day", "usage_by_root_run")
"""The views :func:`create_views` creates."""

_TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
)
_DIGEST_KEY = "views_digest"
_PG_LOCK_KEY = 0x746C5F76  # "tl_v": serializes view DDL between processes on PostgreSQL
_METADATA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def dialect_of(bind: sa.Engine | sa.Connection) -> Dialect:
    """The :data:`Dialect` of an engine or connection; ``ValueError`` for other databases.

    Example:
        >>> dialect_of(sa.create_engine("sqlite://"))
        'sqlite'
    """
    name = bind.dialect.name
    if name in ("mysql", "mariadb"):
        return "mysql"
    if name in ("sqlite", "postgresql"):
        return name  # type: ignore[return-value]
    raise ValueError(
        f"the ledger's views and queries support SQLite, PostgreSQL and MariaDB/MySQL, not {name}"
    )


# -- expressions shared by the views and the query API -------------------------------------


def _as_int(dialect: Dialect, expr: str) -> str:
    """``expr`` as a plain integer (PostgreSQL and MySQL widen ``SUM(bigint)`` to numeric)."""
    if dialect == "postgresql":
        return f"CAST({expr} AS BIGINT)"
    if dialect == "mysql":
        return f"CAST({expr} AS SIGNED)"
    return expr


def measures_sql(dialect: Dialect, prefix: str = "") -> str:
    """The select-list of :data:`MEASURES` over ``llm_calls`` columns (``prefix`` e.g. ``"c."``).

    Example:
        >>> measures_sql("sqlite").splitlines()[0]
        'COUNT(*) AS calls,'
    """
    p = prefix
    parts = [
        "COUNT(*) AS calls",
        _as_int(dialect, f"SUM(CASE WHEN {p}status = 'error' THEN 1 ELSE 0 END)") + " AS errors",
        _as_int(dialect, f"SUM(CASE WHEN {p}cache_hit THEN 1 ELSE 0 END)") + " AS cache_hits",
        *(_as_int(dialect, f"COALESCE(SUM({p}{col}), 0)") + f" AS {col}" for col in _TOKEN_COLUMNS),
        f"COALESCE(SUM({p}cost_usd), 0) AS cost_usd",
    ]
    return ",\n".join(parts)


def day_sql(dialect: Dialect, column: str = "started_at") -> str:
    """The UTC calendar day of a timestamp column.

    Example:
        >>> day_sql("postgresql")
        "CAST(started_at AT TIME ZONE 'UTC' AS DATE)"
    """
    if dialect == "sqlite":
        return f"substr({column}, 1, 10)"  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' UTC
    if dialect == "postgresql":
        return f"CAST({column} AT TIME ZONE 'UTC' AS DATE)"
    return f"DATE({column})"  # DATETIME(6), stored in UTC


def hour_sql(dialect: Dialect, column: str = "started_at") -> str:
    """The UTC hour (``YYYY-MM-DD HH:00:00``) of a timestamp column.

    Example:
        >>> hour_sql("sqlite")
        "substr(started_at, 1, 13) || ':00:00'"
    """
    if dialect == "sqlite":
        return f"substr({column}, 1, 13) || ':00:00'"
    if dialect == "postgresql":
        return f"date_trunc('hour', {column} AT TIME ZONE 'UTC')"
    return f"DATE_FORMAT({column}, '%Y-%m-%d %H:00:00')"


def check_metadata_key(key: str) -> str:
    """``key`` if it is a safe metadata key (letters, digits, ``_``; at most 64), else ValueError.

    Example:
        >>> check_metadata_key("feature")
        'feature'
    """
    if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
        raise ValueError(
            f"invalid metadata key {key!r}: use letters, digits and '_' (at most 64, "
            "not starting with a digit)"
        )
    return key


def metadata_sql(dialect: Dialect, key: str, column: str = "metadata") -> str:
    """The text form of ``metadata.<key>`` (NULL when missing or JSON null).

    Strings as they are, numbers as their JSON text, booleans as ``true``/``false``, the same on
    every database. ``key`` is validated with :func:`check_metadata_key` before it is inlined.

    Example:
        >>> metadata_sql("postgresql", "feature")
        "metadata ->> 'feature'"
    """
    key = check_metadata_key(key)
    if dialect == "postgresql":
        return f"{column} ->> '{key}'"
    path = f"'$.{key}'"
    if dialect == "mysql":
        # JSON_VALUE turns true into 1; take booleans' JSON text instead.
        extract = f"JSON_EXTRACT({column}, {path})"
        return (
            f"CASE JSON_TYPE({extract}) WHEN 'BOOLEAN' THEN JSON_UNQUOTE({extract}) "
            f"ELSE JSON_VALUE({column}, {path}) END"
        )
    return (
        f"CASE json_type({column}, {path}) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
        f"ELSE CAST(json_extract({column}, {path}) AS TEXT) END"
    )


def tag_join_sql(dialect: Dialect, table: str = "c") -> tuple[str, str]:
    """A ``LEFT JOIN`` giving one row per tag of ``table`` (untagged rows once, tag NULL).

    Returns ``(join clause, tag expression)``.

    Example:
        >>> tag_join_sql("sqlite")
        ('LEFT JOIN json_each(c.tags) AS t', 't.value')
    """
    if dialect == "sqlite":
        return f"LEFT JOIN json_each({table}.tags) AS t", "t.value"
    if dialect == "postgresql":
        return (
            f"LEFT JOIN LATERAL jsonb_array_elements_text({table}.tags) AS t(tag) ON TRUE",
            "t.tag",
        )
    return (
        f"LEFT JOIN JSON_TABLE({table}.tags, '$[*]' COLUMNS (tag VARCHAR(255) PATH '$')) AS t "
        "ON TRUE",
        "t.tag",
    )


def has_tag_sql(dialect: Dialect, param: str, table: str = "c") -> str:
    """A condition: ``table.tags`` contains the string bound to ``:param``.

    Example:
        >>> has_tag_sql("mysql", "tag_0")
        'JSON_CONTAINS(c.tags, JSON_QUOTE(:tag_0))'
    """
    if dialect == "sqlite":
        return f"EXISTS (SELECT 1 FROM json_each({table}.tags) AS jt WHERE jt.value = :{param})"
    if dialect == "postgresql":
        return f"{table}.tags @> jsonb_build_array(CAST(:{param} AS TEXT))"
    return f"JSON_CONTAINS({table}.tags, JSON_QUOTE(:{param}))"


# -- the views -------------------------------------------------------------------------------


def view_selects(dialect: Dialect) -> dict[str, str]:
    """The ``SELECT`` behind each view, for ``dialect``.

    Example:
        >>> list(view_selects("sqlite"))
        ['usage_by_model', 'usage_by_day', 'usage_by_root_run']
    """
    measures = measures_sql(dialect)
    day = day_sql(dialect)
    root = "COALESCE(root_run_id, run_id)"
    return {
        "usage_by_model": (
            f"SELECT provider, model,\n{measures},\n"
            "MIN(started_at) AS first_call_at, MAX(ended_at) AS last_call_at\n"
            "FROM llm_calls\nGROUP BY provider, model"
        ),
        "usage_by_day": (
            f"SELECT {day} AS day, provider, model,\n{measures}\n"
            f"FROM llm_calls\nGROUP BY {day}, provider, model"
        ),
        "usage_by_root_run": (
            f"SELECT {root} AS root_run_id, MAX(root_name) AS root_name,\n"
            "MIN(started_at) AS started_at, MAX(ended_at) AS ended_at,\n"
            "MAX(user_id) AS user_id, MAX(session_id) AS session_id,\n"
            f"COUNT(DISTINCT model) AS models,\n{measures}\n"
            f"FROM llm_calls\nGROUP BY {root}"
        ),
    }


def view_statements(dialect: Dialect) -> list[str]:
    """The DDL that (re)creates every view on ``dialect``, in order.

    Example:
        >>> view_statements("postgresql")[0].splitlines()[0]
        'CREATE OR REPLACE VIEW usage_by_model AS'
    """
    out: list[str] = []
    for name, select in view_selects(dialect).items():
        if dialect == "sqlite":
            # SQLite has no CREATE OR REPLACE; IF NOT EXISTS keeps a concurrent opener harmless.
            out.append(f"DROP VIEW IF EXISTS {name}")
            out.append(f"CREATE VIEW IF NOT EXISTS {name} AS\n{select}")
        else:
            out.append(f"CREATE OR REPLACE VIEW {name} AS\n{select}")
    return out


def _digest(statements: list[str]) -> str:
    return hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()


def create_views(engine: sa.Engine) -> None:
    """Create (or refresh) the views; a no-op when they exist and are current.

    Idempotent and safe for several processes opening the same ledger: the DDL only runs when a
    view is missing or its definition changed (tracked in ``tokenledger_meta``), so opening a
    ledger never waits on a long report reading a view. Databases other than SQLite, PostgreSQL
    and MariaDB/MySQL get no views (logged).

    Example:
        >>> from langchain_tokenledger.schema import create_schema
        >>> engine = sa.create_engine("sqlite://")
        >>> create_schema(engine)
        >>> sorted(sa.inspect(engine).get_view_names())
        ['usage_by_day', 'usage_by_model', 'usage_by_root_run']
    """
    from .schema import tokenledger_meta as meta

    try:
        dialect = dialect_of(engine)
    except ValueError as exc:
        logger.warning("langchain-tokenledger: no views created: %s", exc)
        return
    statements = view_statements(dialect)
    digest = _digest(statements)
    with engine.begin() as conn:
        if _current(conn, meta, digest):
            return
        if dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            if _current(conn, meta, digest):
                return
        for statement in statements:
            conn.execute(sa.text(statement))
        _store_digest(conn, meta, dialect, digest)


def _current(conn: sa.Connection, meta: sa.Table, digest: str) -> bool:
    stored = conn.execute(sa.select(meta.c.value).where(meta.c.name == _DIGEST_KEY)).scalar()
    if stored != digest:
        return False
    return set(VIEW_NAMES) <= set(sa.inspect(conn).get_view_names())


def _store_digest(conn: sa.Connection, meta: sa.Table, dialect: Dialect, digest: str) -> None:
    values = {"name": _DIGEST_KEY, "value": digest}
    if dialect == "sqlite":
        lite = sqlite.insert(meta).values(values)
        stmt: sa.Executable = lite.on_conflict_do_update(
            index_elements=[meta.c.name], set_={"value": lite.excluded.value}
        )
    elif dialect == "postgresql":
        pg = postgresql.insert(meta).values(values)
        stmt = pg.on_conflict_do_update(
            index_elements=[meta.c.name], set_={"value": pg.excluded.value}
        )
    else:
        my = mysql.insert(meta).values(values)
        stmt = my.on_duplicate_key_update(value=my.inserted.value)
    conn.execute(stmt)
