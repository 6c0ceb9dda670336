"""The store's sustained write rate, and what one row costs to price and serialize.

Records are built up front (realistic content, time-ordered uuid7 run ids), then handed straight
to the ledger and flushed: rows/s = records / (all hand-over calls + ``flush``). Two ways: as
records (:meth:`Ledger.record`), and as ``TokenLedgerHandler`` packs its calls
(:meth:`Ledger.record_packed`): a call that succeeded as its parts, the usage as the provider
reported it, which the writer normalizes (:func:`~langchain_tokenledger.packing.call_values`).
Pricing happens in the writer and is included. Backends are measured round-robin and the
median is reported. PostgreSQL and MariaDB are skipped when their server cannot be reached.

Run::

    python benchmarks/write_rate.py                      # ~1-2 minutes
    python benchmarks/write_rate.py --records 50000 --rounds 1
    TOKENLEDGER_BENCH_POSTGRES_URL=postgresql://u@host/db python benchmarks/write_rate.py
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import marshal
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _bench import median, priced_copy, realistic_records, stopwatch, table
from sqlalchemy.exc import SQLAlchemyError

from langchain_tokenledger import Ledger, UsageRecord
from langchain_tokenledger.packing import pack_parts, pack_record, unpack_values
from langchain_tokenledger.pricing import Pricer
from langchain_tokenledger.records import RECORD_FIELDS
from langchain_tokenledger.schema import create_schema
from langchain_tokenledger.store import _create_engine, price_values
from langchain_tokenledger.views import VIEW_NAMES
from langchain_tokenledger.writers import PostgresWriter, Row, SQLiteWriter

POSTGRES_URL = os.environ.get(
    "TOKENLEDGER_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/perfbench"
)
MYSQL_URL = os.environ.get(
    "TOKENLEDGER_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/perfbench"
)
TARGETS = {"SQLite": 30_000, "PostgreSQL": 20_000}


@dataclass
class Backend:
    """A database to measure: a display name and how to get a fresh, empty ledger URL."""

    name: str
    fresh_url: Callable[[], str]
    records: int


def _drop_ledger_tables(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            inspector = sa.inspect(conn)
            for view in VIEW_NAMES:
                conn.execute(sa.text(f"DROP VIEW IF EXISTS {view}"))
            for name in inspector.get_table_names():
                if name == "llm_calls" or name.startswith("tokenledger"):
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    finally:
        engine.dispose()


def _ensure_database(url: str) -> None:
    """Create the scratch database named in ``url`` if its server has none by that name."""
    parsed = sa.make_url(url)
    name = parsed.database
    if not name:
        return
    postgres = parsed.get_backend_name() == "postgresql"
    admin = sa.create_engine(
        parsed.set(database="postgres" if postgres else "mysql"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            if not postgres:
                conn.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
            elif (
                conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).scalar()
                is None
            ):
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def _server_backend(name: str, url: str, records: int) -> Backend | None:
    try:
        _ensure_database(url)
        _drop_ledger_tables(url)
    except (SQLAlchemyError, ImportError) as exc:
        print(f"({name} skipped: {url} unreachable: {str(exc).splitlines()[0]})", file=sys.stderr)
        return None

    def fresh() -> str:
        _drop_ledger_tables(url)
        return url

    return Backend(name, fresh, records)


def backends(args: argparse.Namespace, workdir: Path) -> list[Backend]:
    """SQLite always; PostgreSQL and MariaDB when reachable."""
    counter = iter(range(1_000_000))

    def fresh_sqlite() -> str:
        return f"sqlite:///{workdir / f'rate-{next(counter)}.db'}"

    found = [Backend("SQLite", fresh_sqlite, args.records)]
    for name, url, n in (
        ("PostgreSQL", args.postgres, args.records),
        ("MariaDB", args.mysql, args.mysql_records),
    ):
        if url:
            backend = _server_backend(name, url, n)
            if backend is not None:
                found.append(backend)
    return found


def one_trial(url: str, records: Sequence[UsageRecord] | Sequence[bytes]) -> tuple[float, float]:
    """``(rows/s, seconds per hand-over call)`` for writing ``records`` into a fresh ledger
    (records, or calls packed as the handler packs them)."""
    ledger = Ledger(url)
    try:
        hand: Callable[[Any], None] = (
            ledger.record_packed if isinstance(records[0], bytes) else ledger.record
        )
        with stopwatch() as total:
            with stopwatch() as handing:
                for r in records:
                    hand(r)
            ledger.flush()
        [n] = ledger.query("SELECT COUNT(*) AS n FROM llm_calls")
        assert n["n"] == len(records), f"expected {len(records)} rows, found {n['n']}"
    finally:
        ledger.close()
    return len(records) / total[0], handing[0] / len(records)


def as_handler_packs(r: UsageRecord) -> bytes:
    """``r`` as ``TokenLedgerHandler`` hands it over: a call that succeeded as its parts, with
    the usage as reported and LangChain's ``ls_*`` keys in the run's metadata; others as values.
    """
    if r.status != "ok" or r.started_at is None or r.latency_ms is None:
        return pack_record(r)
    run_metadata = {"ls_provider": r.provider, "ls_model_name": r.model, "ls_model_type": "chat"}
    parts = (
        r.run_id,
        r.parent_run_id,
        r.root_run_id,
        r.root_name,
        r.run_name,
        r.provider,
        r.model,
        r.status,
        None,
        r.usage_details,
        (),
        r.started_at.timestamp(),
        r.latency_ms / 1000,
        r.ttft_ms / 1000 if r.ttft_ms is not None else None,
        tuple(r.tags),
        None,
        {},
        {**run_metadata, **r.metadata},
        r.ancestry,
    )
    packed = pack_parts(parts)
    assert packed is not None
    return packed


def generic_row(r: UsageRecord) -> tuple[Any, ...]:
    """What a straightforward writer does: json.dumps, isoformat and str, column by column."""
    out: list[Any] = []
    for name in RECORD_FIELDS:
        value = getattr(r, name)
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = str(value)
        out.append(value)
    return tuple(out)


def per_row_costs(
    records: Sequence[UsageRecord], rounds: int, workdir: Path
) -> list[tuple[str, float]]:
    """Median seconds per row of each writer-side step, measured interleaved.

    The steps are the writer's own: it unpacks each call the handler packed to its field
    values (normalizing the usual call, which the handler packs as reported), prices those and
    builds the row from them (``prepare_values`` on slices of 32), never building a record; the
    insert step writes the rows of ``records``, already built, into an empty SQLite ledger.
    """
    packed = [pack_record(r) for r in records]
    as_reported = [as_handler_packs(r) for r in records]
    values = [marshal.loads(p) for p in packed]
    priced = [marshal.loads(pack_record(priced_copy(r))) for r in records]
    memo_warm = Pricer()
    for v in values:
        price_values(memo_warm, v)
    unused = sa.create_engine("sqlite://")  # prepare_values() never connects
    sqlite_writer, postgres_writer = SQLiteWriter(unused), PostgresWriter(unused)
    sqlite_rows = _prepare_all(sqlite_writer, priced)
    counter = iter(range(1_000_000))

    def insert() -> Callable[[], object]:
        """A fresh ledger (not timed); the step writes ``sqlite_rows`` into it."""
        engine = _create_engine(
            sa.make_url(f"sqlite:///{workdir / f'step-{next(counter)}.db'}"), {}
        )
        create_schema(engine)
        writer = SQLiteWriter(engine)

        def step() -> None:
            for start in range(0, len(sqlite_rows), 2000):
                writer.execute(sqlite_rows[start : start + 2000])
            writer.close()
            engine.dispose()

        return step

    steps: dict[str, Callable[[], Callable[[], object]]] = {
        "unpacking (`marshal.loads`)": lambda: lambda: [marshal.loads(p) for p in packed],
        "unpacking a call packed as reported, normalizing it (`unpack_values`)": lambda: (
            lambda: [unpack_values(p) for p in as_reported]
        ),
        # A fresh Pricer per round: realistic token counts rarely repeat, so the writer mostly
        # misses the pricer's result memo (its rate-card cache stays warm after the first call).
        "pricing (`price_values`), new token counts": lambda: functools.partial(
            _price_all, _fresh_pricer(values[0]), values
        ),
        "pricing (`price_values`), repeated token counts": lambda: functools.partial(
            _price_all, memo_warm, values
        ),
        "row for SQLite (`SQLiteWriter.prepare_values`)": lambda: functools.partial(
            _prepare_all, sqlite_writer, priced
        ),
        "row for PostgreSQL (`PostgresWriter.prepare_values`)": lambda: functools.partial(
            _prepare_all, postgres_writer, priced
        ),
        "generic row (`json.dumps`, `isoformat`, `str`)": lambda: (
            lambda: [generic_row(r) for r in records]
        ),
        "SQLite insert of built rows into an empty ledger (`execute`)": insert,
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    with writer_process_gc():
        for _ in range(rounds):
            for name, setup in steps.items():
                step = setup()
                with stopwatch() as t:
                    step()
                samples[name].append(t[0] / len(records))
    return [(name, median(v)) for name, v in samples.items()]


@contextlib.contextmanager
def writer_process_gc() -> Iterator[None]:
    """The garbage collector as the writer process sets it (``writer_process.main``): what is
    alive now is frozen, and young collections run every 10,000 allocations. Otherwise the
    steps would pay for collections over the 200,000 records this benchmark holds."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(10_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _prepare_all(
    writer: SQLiteWriter | PostgresWriter, values: Sequence[Sequence[Any]]
) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(values), 32):
        rows += writer.prepare_values(values[start : start + 32])
    return rows


def _fresh_pricer(first: Sequence[Any]) -> Pricer:
    pricer = Pricer()
    price_values(pricer, first)  # resolve a rate card outside the timing
    return pricer


def _price_all(pricer: Pricer, values: Sequence[Sequence[Any]]) -> None:
    for v in values:
        price_values(pricer, v)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the write-rate benchmark; print and return its markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per trial")
    parser.add_argument("--mysql-records", type=int, default=50_000, help="records for MariaDB")
    parser.add_argument("--rounds", type=int, default=3, help="trials per backend")
    parser.add_argument("--postgres", default=POSTGRES_URL, help="PostgreSQL URL ('' to skip)")
    parser.add_argument("--mysql", default=MYSQL_URL, help="MariaDB/MySQL URL ('' to skip)")
    args = parser.parse_args(argv)

    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tokenledger-bench-") as tmp:
        found = backends(args, Path(tmp))
        records = realistic_records(max(b.records for b in found))
        forms: dict[str, Sequence[UsageRecord] | Sequence[bytes]] = {
            "`Ledger.record`": records,
            "as the handler packs them": [as_handler_packs(r) for r in records],
        }
        rates: dict[tuple[str, str], list[float]] = {(b.name, f): [] for b in found for f in forms}
        handoff: dict[tuple[str, str], list[float]] = {key: [] for key in rates}
        one_trial(f"sqlite:///{Path(tmp) / 'warm-up.db'}", records[:100])  # writer process up
        for _ in range(args.rounds):
            for b in found:
                for form, items in forms.items():
                    rate, per_call = one_trial(b.fresh_url(), items[: b.records])
                    rates[b.name, form].append(rate)
                    handoff[b.name, form].append(per_call)
        rows = []
        for b in found:
            target = TARGETS.get(b.name)
            for form in forms:
                rate = median(rates[b.name, form])
                verdict = (
                    "(information)"
                    if target is None
                    else (f"{target:,} ({'met' if rate >= target else 'NOT met'})")
                )
                rows.append(
                    [
                        b.name,
                        form,
                        f"{b.records:,}",
                        f"{rate:,.0f}",
                        verdict,
                        f"{median(handoff[b.name, form]) * 1e6:.2f} us",
                    ]
                )
        out.append(
            f"Sustained write rate (records handed to the ledger, priced and written by "
            f"the writer process; median of {args.rounds}):\n\n"
            + table(
                ["backend", "handed over", "records", "rows/s", "target rows/s", "hand-over call"],
                rows,
            )
        )
        costs = per_row_costs(priced_sample(records), rounds=5, workdir=Path(tmp))
        out.append(
            "Writer-side cost per row (median of 5, interleaved):\n\n"
            + table(["step", "us/row"], [[name, f"{s * 1e6:.2f}"] for name, s in costs])
        )
    for block in out:
        print(block + "\n", flush=True)
    return out


def priced_sample(records: Sequence[UsageRecord], n: int = 20_000) -> list[UsageRecord]:
    """The first ``n`` records (the per-row costs do not need the whole set)."""
    return list(records[:n])


if __name__ == "__main__":
    main()
