"""Reading the ledger: read-only SQL with bound parameters (more in later releases)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa


def run_query(engine: sa.Engine, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run ``sql`` with bound ``params`` in a transaction that is rolled back; rows as dicts."""
    with engine.connect() as conn:
        try:
            result = conn.execute(sa.text(sql), dict(params))
            return [dict(row) for row in result.mappings()]
        finally:
            conn.rollback()
