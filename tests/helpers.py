"""Helpers shared by the test modules: reading back what a ledger committed, making its table
unreachable for a while, running code in a forked child, and the README."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from langchain_tokenledger import Ledger
from langchain_tokenledger.schema import llm_calls

README = Path(__file__).resolve().parent.parent / "README.md"


def committed_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The rows already in SQL (no flush: what a reader sees right now), in start order."""
    with ledger.engine.connect() as conn:
        stmt = sa.select(llm_calls).order_by(llm_calls.c.started_at, llm_calls.c.run_id)
        return [dict(r) for r in conn.execute(stmt).mappings()]


def rows_by_run_id(ledger: Ledger) -> list[dict[str, Any]]:
    """The committed rows, decoded by the column types, in ``run_id`` order."""
    with ledger.engine.connect() as conn:
        stmt = sa.select(llm_calls).order_by(llm_calls.c.run_id)
        return [dict(r) for r in conn.execute(stmt).mappings()]


def rows(ledger: Ledger) -> list[dict[str, Any]]:
    """Every row, decoded by the column types, once the writer has committed all of them."""
    ledger.flush()
    return committed_rows(ledger)


def hide_table(url: str) -> None:
    """Rename ``llm_calls`` away: writes fail (as with a database that is down) until restored."""
    _rename(url, "llm_calls", "llm_calls_hidden")


def restore_table(url: str) -> None:
    """Undo :func:`hide_table`."""
    _rename(url, "llm_calls_hidden", "llm_calls")


def _rename(url: str, old: str, new: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))
    engine.dispose()


def readme_queries() -> str:
    """The README's query section (between its ``queries:start``/``queries:end`` markers)."""
    text = README.read_text(encoding="utf-8")
    return text[text.index("<!-- queries:start") : text.index("<!-- queries:end -->")]


def in_forked_child(body: Callable[[], int]) -> int:
    """Run ``body`` in a forked child (which never returns into pytest); its exit code.

    A failure in the child prints its traceback and exits 1.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def lock_is_free_in_forked_child(lock: Callable[[], Any]) -> bool:
    """Whether a forked child can take the lock that ``lock()`` returns there (within 10 s).

    ``lock`` is called in the child, after the fork hooks have run, so a module global that a
    hook re-creates is read as the child sees it.
    """
    return in_forked_child(lambda: 0 if lock().acquire(timeout=10) else 3) == 0
