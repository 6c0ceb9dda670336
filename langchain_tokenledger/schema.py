"""The ledger's SQL schema: the ``llm_calls`` table, its indexes, and ``tokenledger_meta``.

The schema is a public API: users query it with plain SQL, so names and meanings only change
with a new :data:`SCHEMA_VERSION` and a migration. The same tables are created on SQLite,
PostgreSQL and MariaDB/MySQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from .records import RECORD_FIELDS

SCHEMA_VERSION = 1
"""Bumped whenever a column or view changes meaning; recorded in ``tokenledger_meta``."""

metadata_obj = sa.MetaData()

_RunId = sa.String(36)
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_Cost = sa.Numeric(24, 12, asdecimal=True)

llm_calls = sa.Table(
    "llm_calls",
    metadata_obj,
    sa.Column("run_id", _RunId, primary_key=True, comment="LangChain run id of the LLM call"),
    sa.Column("parent_run_id", _RunId, comment="run that made the call"),
    sa.Column("root_run_id", _RunId, comment="outermost run of the trace"),
    sa.Column("root_name", sa.String(255), comment="name of the root run"),
    sa.Column("run_name", sa.String(255), comment="name of the LLM run"),
    sa.Column("provider", sa.String(64), comment="ls_provider, e.g. openai"),
    sa.Column("model", sa.String(255), comment="model name the provider answered with"),
    sa.Column("status", sa.String(16), nullable=False, comment="ok | error | cancelled"),
    sa.Column("error_type", sa.String(255), comment="exception class name of a failed call"),
    sa.Column("input_tokens", sa.BigInteger, comment="billed input tokens, cache reads included"),
    sa.Column("output_tokens", sa.BigInteger, comment="billed output tokens, reasoning included"),
    sa.Column("total_tokens", sa.BigInteger, comment="billed input + output"),
    sa.Column("cache_read_tokens", sa.BigInteger, comment="input tokens read from prompt cache"),
    sa.Column("cache_creation_tokens", sa.BigInteger, comment="input tokens written to cache"),
    sa.Column("reasoning_tokens", sa.BigInteger, comment="output tokens spent reasoning"),
    sa.Column("cost_usd", _Cost, comment="exact cost in USD; NULL when it cannot be priced"),
    sa.Column("price_source", sa.String(64), comment="genai-prices version or 'override'"),
    sa.Column("cache_hit", sa.Boolean, nullable=False, comment="answered from an LLM cache"),
    sa.Column("usage_source", sa.String(16), nullable=False, comment="provider|estimated|..."),
    sa.Column("usage_details", _Json, comment="the call's full usage as received"),
    sa.Column("streamed", sa.Boolean, nullable=False, comment="the call streamed its output"),
    sa.Column("started_at", _Timestamp, comment="UTC start of the call"),
    sa.Column("ended_at", _Timestamp, comment="UTC end of the call"),
    sa.Column("latency_ms", sa.Float, comment="ended_at - started_at in milliseconds"),
    sa.Column("ttft_ms", sa.Float, comment="time to first streamed token in milliseconds"),
    sa.Column("user_id", sa.String(255), comment="metadata user_id"),
    sa.Column("session_id", sa.String(255), comment="metadata session_id/thread_id/..."),
    sa.Column("tags", _Json, comment="JSON list of the run's and the handler's tags"),
    sa.Column("metadata", _Json, comment="JSON object of the run's and the handler's metadata"),
    sa.Column("notes", _Json, comment="JSON list of flags explaining anything unusual"),
    sa.Column("ancestry", sa.Text, comment="run ids from the root to the parent, '/'-separated"),
    sa.Index("ix_llm_calls_root_run_id", "root_run_id"),
    sa.Index("ix_llm_calls_started_at", "started_at"),
    sa.Index("ix_llm_calls_model_started_at", "model", "started_at"),
    sa.Index("ix_llm_calls_user_id_started_at", "user_id", "started_at"),
    sa.Index("ix_llm_calls_session_id", "session_id"),
)

tokenledger_meta = sa.Table(
    "tokenledger_meta",
    metadata_obj,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

assert tuple(c.name for c in llm_calls.columns) == RECORD_FIELDS, "schema and record disagree"


def create_schema(engine: sa.Engine) -> None:
    """Create the tables (and views) if missing and record the schema version.

    Example:
        >>> engine = sa.create_engine("sqlite://")
        >>> create_schema(engine)
        >>> schema_version(engine)
        1
    """
    metadata_obj.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        found = conn.execute(
            sa.select(tokenledger_meta.c.value).where(tokenledger_meta.c.name == "schema_version")
        ).scalar()
        if found is None:
            conn.execute(
                tokenledger_meta.insert().values(name="schema_version", value=str(SCHEMA_VERSION))
            )
        elif int(found) > SCHEMA_VERSION:
            raise RuntimeError(
                f"this ledger has schema version {found}, newer than this "
                f"langchain-tokenledger understands ({SCHEMA_VERSION}): upgrade the package"
            )
    from .views import create_views

    create_views(engine)


def schema_version(engine: sa.Engine) -> int | None:
    """The schema version recorded in the database, or ``None`` if it has no ledger."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("tokenledger_meta"):
            return None
        found = conn.execute(
            sa.select(tokenledger_meta.c.value).where(tokenledger_meta.c.name == "schema_version")
        ).scalar()
    return None if found is None else int(found)
