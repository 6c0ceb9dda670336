"""``tokenledger``: the ledger's answers in a terminal.

Commands: ``report`` (grouped totals), ``runs`` (most expensive root runs), ``show RUN_ID`` (a
run's tree of calls), ``export`` (every call to CSV, JSON lines or Parquet, streamed), ``sql``
(one read-only statement), ``reprice`` (recompute stored costs with today's prices or a price
table) and ``demo`` (an offline demo). ``--db`` defaults to
``$TOKENLEDGER_URL``, then ``sqlite:///tokenledger.db``; ``--json`` prints JSON for scripts.
Tables use rich when it is installed (the ``cli`` extra), plain text otherwise. Errors are one
line on stderr: exit status 2 for bad arguments, 1 when the database cannot answer.

Example:
    $ tokenledger report --by day,model --since 7d
    $ tokenledger runs --top 5 --json
    $ tokenledger sql "SELECT model, SUM(cost_usd) AS cost FROM llm_calls GROUP BY model"
    $ tokenledger reprice --model gpt-4o-mini --prices prices.toml --dry-run
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from .handler import strict_mode
from .pricing import load_price_table
from .query import (
    QueryError,
    SummaryRow,
    calls_under,
    group_keys,
    iter_calls,
    parse_when,
    run_query_columns,
    summarize,
    top_runs,
)
from .records import RECORD_FIELDS, TOKEN_FIELDS, UsageRecord
from .schema import schema_version
from .store import Ledger, LedgerError, _create_engine, resolve_url
from .views import MEASURES

PROG = "tokenledger"
EXPORT_FORMATS = ("csv", "jsonl", "parquet")

_HEADERS = {
    "calls": "calls",
    "errors": "errors",
    "cache_hits": "cache hits",
    "input_tokens": "input",
    "output_tokens": "output",
    "total_tokens": "total tokens",
    "cache_read_tokens": "cached",
    "reasoning_tokens": "reasoning",
    "cost_usd": "cost (USD)",
    "root_run_id": "run",
    "root_name": "name",
    "started_at": "started (UTC)",
    "user_id": "user",
}


class UsageError(Exception):
    """Bad arguments: reported on one line, exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class Failure(Exception):
    """The database could not answer: reported on one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


# -- values ---------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A JSON-ready value: Decimals as exact strings, datetimes and dates in ISO 8601.

    Example:
        >>> jsonable({"cost_usd": Decimal("0.00015"), "day": date(2026, 11, 1)})
        {'cost_usd': '0.00015', 'day': '2026-11-01'}
    """
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "cost_usd" and isinstance(value, Decimal):
        return f"{value:,.6f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        text = f"{value:,.6f}".rstrip("0").rstrip(".")
        return f"{value:.3g}" if text in ("0", "-0") and value else text
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _numeric(rows: Sequence[Mapping[str, Any]], name: str) -> bool:
    values = [r.get(name) for r in rows if r.get(name) is not None]
    return bool(values) and all(
        isinstance(v, (int, float, Decimal)) and not isinstance(v, bool) for v in values
    )


# -- tables ---------------------------------------------------------------------------------


@dataclass
class Table:
    """A titled table of rows (dicts) with an optional totals row, printed with rich or plain.

    Example:
        >>> t = Table("Usage", ["model", "calls"], [{"model": "m", "calls": 3}])
        >>> print(t.plain())
        Usage
        model  calls
        -----  -----
        m          3
    """

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    total: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def _header(self, name: str) -> str:
        return self.headers.get(name, _HEADERS.get(name, name))

    def _cells(self) -> tuple[list[str], list[list[str]], list[str] | None, list[bool]]:
        rows = self.rows + ([self.total] if self.total else [])
        right = [_numeric(rows, c) for c in self.columns]
        body = [[_cell(c, r.get(c)) for c in self.columns] for r in self.rows]
        total = (
            [_cell(c, self.total.get(c)) if c in self.total else "" for c in self.columns]
            if self.total
            else None
        )
        if total is not None:
            total[0] = total[0] or "total"
        return [self._header(c) for c in self.columns], body, total, right

    def plain(self) -> str:
        """The table as plain text."""
        head, body, total, right = self._cells()
        every = [head, *body, *([total] if total else [])]
        widths = [max(len(row[i]) for row in every) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            parts = [
                cell.rjust(w) if r else cell.ljust(w)
                for cell, w, r in zip(cells, widths, right, strict=True)
            ]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [self.title, line(head), rule, *(line(r) for r in body)]
        if total:
            lines += [rule, line(total)]
        return "\n".join(lines)

    def print(self, out: IO[str]) -> None:
        """Print with rich if installed, else as plain text."""
        try:
            from rich.console import Console
            from rich.table import Table as RichTable
        except ImportError:
            out.write(self.plain() + "\n")
            return
        head, body, total, right = self._cells()
        table = RichTable(title=self.title, show_footer=total is not None)
        for i, name in enumerate(head):
            table.add_column(
                name,
                footer=total[i] if total else "",
                justify="right" if right[i] else "left",
            )
        for cells in body:
            table.add_row(*cells)
        console = Console(file=out, width=None if out.isatty() else 400)
        console.print(table)


def _emit_json(value: Any, out: IO[str]) -> None:
    out.write(json.dumps(jsonable(value), indent=2) + "\n")


# -- opening the ledger ---------------------------------------------------------------------


def open_ledger_engine(url: str | None) -> sa.Engine:
    """An engine on an existing ledger (never creates one); :class:`Failure` if there is none.

    Example:
        >>> open_ledger_engine("sqlite:///no/such/ledger.db")
        Traceback (most recent call last):
        ...
        langchain_tokenledger.cli.Failure: no ledger at no/such/ledger.db: nothing recorded \
there yet (try `tokenledger demo`)
    """
    try:
        parsed = resolve_url(url)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None
    shown = parsed.render_as_string(hide_password=True)
    database = parsed.database or ""
    is_file_db = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if is_file_db and not Path(database).expanduser().is_file():
        raise Failure(
            f"no ledger at {database}: nothing recorded there yet (try `tokenledger demo`)"
        )
    try:
        engine = _create_engine(parsed, {})
    except LedgerError as exc:
        raise Failure(str(exc)) from None
    try:
        version = schema_version(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise Failure(f"cannot read {shown}: {_reason(exc)}") from None
    if version is None:
        engine.dispose()
        raise Failure(f"no ledger in {shown}: it has no tokenledger tables")
    return engine


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- commands -------------------------------------------------------------------------------


def _window(args: argparse.Namespace) -> str:
    parts = []
    if args.since is not None:
        parts.append(f"since {_cell('', args.since)}")
    if args.until is not None:
        parts.append(f"until {_cell('', args.until)}")
    return f" ({', '.join(parts)})" if parts else ""


def report_table(
    rows: Sequence[SummaryRow], total: SummaryRow, keys: Sequence[str], title: str
) -> Table:
    """The ``report`` table: one line per group, then the totals.

    Example:
        >>> total = summarize(engine, ())[0]  # doctest: +SKIP
        >>> report_table([], total, ["model"], "Usage").columns[:2]  # doctest: +SKIP
        ['model', 'calls']
    """
    return Table(
        title=title,
        columns=[*keys, *MEASURES],
        rows=[r.as_dict() for r in rows],
        total={keys[0]: "total", **total.measures()} if keys else None,
    )


def cmd_report(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """Totals grouped by ``--by``, with a totals row."""
    filters: dict[str, Any] = {
        "since": args.since,
        "until": args.until,
        "tags": args.tag,
        "metadata": args.meta,
    }
    rows = summarize(engine, args.by, **filters)
    total = summarize(engine, (), **filters)[0]
    if args.json:
        _emit_json(
            {
                "by": args.by,
                "since": args.since,
                "until": args.until,
                "rows": [r.as_dict() for r in rows],
                "total": total.measures(),
            },
            out,
        )
        return
    title = f"LLM usage by {', '.join(args.by) or 'everything'}{_window(args)}"
    report_table(rows, total, args.by, title).print(out)


_RUN_COLUMNS = [
    "root_run_id",
    "root_name",
    "started_at",
    "user_id",
    "models",
    "calls",
    "errors",
    "total_tokens",
    "cost_usd",
]


def cmd_runs(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """The most expensive root runs."""
    runs = top_runs(engine, args.top, since=args.since, until=args.until)
    if args.json:
        _emit_json([r.as_dict() for r in runs], out)
        return
    title = f"Top {args.top} runs by cost{_window(args)}"
    Table(title, _RUN_COLUMNS, [r.as_dict() for r in runs]).print(out)


def _path(record: UsageRecord) -> list[str]:
    path = [p for p in record.ancestry.split("/") if p]
    root = record.root_run_id
    if root and root != record.run_id and (not path or path[0] != root):
        path.insert(0, root)
    return [*path, record.run_id]


def _call_line(r: UsageRecord) -> str:
    parts = [r.run_name or "llm", r.model or "unknown model", r.status]
    if r.cache_hit:
        parts.append("cache hit")
    parts.append(f"in {_cell('', r.input_tokens)} / out {_cell('', r.output_tokens)} tokens")
    parts.append(f"${_cell('cost_usd', r.cost_usd)}" if r.cost_usd is not None else "unpriced")
    if r.latency_ms is not None:
        parts.append(f"{r.latency_ms:,.0f} ms")
    if r.streamed and r.ttft_ms is not None:
        parts.append(f"first token {r.ttft_ms:,.0f} ms")
    if r.error_type:
        parts.append(r.error_type)
    return "  ".join(parts)


def run_tree(run_id: str, records: Sequence[UsageRecord]) -> list[str]:
    """The lines of the tree of calls under ``run_id``: inner runs, then each call.

    Example:
        >>> r = UsageRecord(run_id="c1", root_run_id="root", root_name="chain", ancestry="root",
        ...                 model="m", input_tokens=3, output_tokens=2, total_tokens=5)
        >>> print("\\n".join(run_tree("root", [r])))
        chain root
        └── llm  m  ok  in 3 / out 2 tokens  unpriced
    """
    children: dict[str, list[str]] = {}
    by_id = {r.run_id: r for r in records}
    for r in records:
        path = _path(r)
        path = path[path.index(run_id) :] if run_id in path else [run_id, *path]
        for parent, child in itertools.pairwise(path):
            siblings = children.setdefault(parent, [])
            if child not in siblings:
                siblings.append(child)
    first = records[0] if records else None
    if run_id in by_id:
        head = _call_line(by_id[run_id])
    elif first is not None and first.root_run_id == run_id:
        head = f"{first.root_name or 'run'} {run_id}"
    else:
        head = f"run {run_id}"
    lines = [head]

    def walk(node: str, prefix: str) -> None:
        kids = children.get(node, [])
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            label = _call_line(by_id[kid]) if kid in by_id else f"run {kid}"
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
            walk(kid, prefix + ("    " if last else "│   "))

    walk(run_id, "")
    return lines


def cmd_show(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """The tree of calls under one run."""
    records = calls_under(engine, args.run_id)
    if not records:
        raise Failure(f"no calls recorded under run {args.run_id}")
    cost = sum((r.cost_usd for r in records if r.cost_usd is not None), Decimal(0))
    total: dict[str, Any] = {
        "calls": len(records),
        "errors": sum(r.status == "error" for r in records),
        "input_tokens": sum(r.input_tokens or 0 for r in records),
        "output_tokens": sum(r.output_tokens or 0 for r in records),
        "total_tokens": sum(r.total_tokens or 0 for r in records),
        "cost_usd": cost,
    }
    if args.json:
        calls = [{name: getattr(r, name) for name in RECORD_FIELDS} for r in records]
        _emit_json({"run_id": args.run_id, "total": total, "calls": calls}, out)
        return
    lines = run_tree(args.run_id, records)
    starts = [r.started_at for r in records if r.started_at is not None]
    ends = [r.ended_at for r in records if r.ended_at is not None]
    span = ""
    if starts and ends:
        span = f" over {(max(ends) - min(starts)).total_seconds():,.2f} s"
    lines.append(
        f"{_plural(total['calls'], 'call')}, {_plural(total['errors'], 'error')}, "
        f"{total['total_tokens']:,} tokens "
        f"(in {total['input_tokens']:,} / out {total['output_tokens']:,}), "
        f"${_cell('cost_usd', cost)}{span}"
    )
    out.write("\n".join(lines) + "\n")


# -- export ---------------------------------------------------------------------------------

_JSON_COLUMNS = ("usage_details", "tags", "metadata", "notes")


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return jsonable(value)


def _write_csv(records: Iterable[UsageRecord], f: IO[str]) -> int:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    n = 0
    for r in records:
        writer.writerow([_csv_value(getattr(r, name)) for name in RECORD_FIELDS])
        n += 1
    return n


def _write_jsonl(records: Iterable[UsageRecord], f: IO[str]) -> int:
    n = 0
    for r in records:
        row = {name: jsonable(getattr(r, name)) for name in RECORD_FIELDS}
        f.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
        n += 1
    return n


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise Failure(
            "export --format parquet needs pyarrow: pip install 'langchain-tokenledger[parquet]'"
        ) from None
    return pyarrow


def parquet_schema(pa: Any) -> Any:
    """The Parquet schema of an export: typed columns, ``tags``/``notes`` as string lists,
    ``usage_details``/``metadata`` as JSON text."""
    types: dict[str, Any] = {name: pa.string() for name in RECORD_FIELDS}
    for name in TOKEN_FIELDS:
        types[name] = pa.int64()
    types["cost_usd"] = pa.decimal128(24, 12)
    types["cache_hit"] = types["streamed"] = pa.bool_()
    types["started_at"] = types["ended_at"] = pa.timestamp("us", tz="UTC")
    types["latency_ms"] = types["ttft_ms"] = pa.float64()
    types["tags"] = types["notes"] = pa.list_(pa.string())
    return pa.schema([(name, types[name]) for name in RECORD_FIELDS])


def _write_parquet(records: Iterable[UsageRecord], path: Path, chunk: int = 10_000) -> int:
    pa = _pyarrow()
    schema = parquet_schema(pa)
    n = 0
    with pa.parquet.ParquetWriter(str(path), schema) as writer:
        batch: list[dict[str, Any]] = []
        for r in records:
            row = {name: getattr(r, name) for name in RECORD_FIELDS}
            for name in ("usage_details", "metadata"):
                row[name] = json.dumps(row[name], separators=(",", ":"), ensure_ascii=False)
            batch.append(row)
            if len(batch) >= chunk:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n += len(batch)
                batch = []
        if batch or n == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


def export_calls(
    engine: sa.Engine,
    fmt: str,
    output: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Write every call in the window to ``output`` (``-``: stdout); returns the row count.

    Rows are streamed from a server-side cursor and written as they come, so memory stays
    constant; the file appears complete or not at all (written aside, then renamed).

    Example:
        >>> export_calls(engine, "csv", "calls.csv", since=parse_when("7d"))  # doctest: +SKIP
        1234
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose from {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet":
        _pyarrow()
    records = iter_calls(engine, since=since, until=until)
    if output == "-":
        if fmt == "parquet":
            raise UsageError("parquet is binary: give -o FILE, not stdout")
        out = stdout or sys.stdout
        return _write_csv(records, out) if fmt == "csv" else _write_jsonl(records, out)
    path = Path(output).expanduser()
    if not path.parent.is_dir():
        raise Failure(f"cannot write {output}: no directory {path.parent}")
    partial = path.with_name(path.name + ".partial")
    try:
        if fmt == "parquet":
            n = _write_parquet(records, partial)
        else:
            with partial.open("w", encoding="utf-8", newline="") as f:
                n = _write_csv(records, f) if fmt == "csv" else _write_jsonl(records, f)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return n


def cmd_export(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """Every call to a file."""
    n = export_calls(
        engine, args.format, args.output, since=args.since, until=args.until, stdout=out
    )
    if args.output == "-":
        return
    if args.json:
        _emit_json({"rows": n, "format": args.format, "file": args.output}, out)
    else:
        out.write(f"wrote {n:,} calls to {args.output} ({args.format})\n")


# -- sql --------------------------------------------------------------------------------------


def _param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return name.strip(), value


def cmd_sql(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """One read-only statement."""
    columns, rows = run_query_columns(engine, args.statement, dict(args.param or ()))
    if args.json:
        _emit_json(rows, out)
        return
    Table(f"{len(rows)} rows", columns, rows, headers={c: c for c in columns}).print(out)


# -- reprice ---------------------------------------------------------------------------------


def cmd_reprice(engine: sa.Engine, args: argparse.Namespace, out: IO[str]) -> None:
    """Recompute ``cost_usd`` of the matching rows (``engine`` proved the ledger exists).

    The write goes through a :class:`Ledger` opened only after :func:`open_ledger_engine` found
    a ledger, so a mistyped ``--db`` reports "no ledger at ..." instead of creating one.
    """
    try:
        ledger = Ledger(args.db, prices=args.prices)
    except ValueError as exc:  # the price table changed since the arguments were read
        raise UsageError(str(exc)) from None
    try:
        result = ledger.reprice(
            since=args.since,
            until=args.until,
            model=args.model,
            provider=args.provider,
            dry_run=args.dry_run,
        )
    finally:
        ledger.close()
    if args.json:
        fields = ("examined", "changed", "updated", "unpriced", "old_total", "new_total")
        _emit_json(
            {
                **{name: getattr(result, name) for name in fields},
                "delta": result.delta,
                "dry_run": result.dry_run,
            },
            out,
        )
        return
    out.write(f"{result}\n")


# -- demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, out: IO[str]) -> None:
    """Run the offline demo, then report what it recorded."""
    from .demo import run_demo

    result = run_demo(args.db)
    engine = open_ledger_engine(result.url)
    try:
        rows = summarize(engine, ("model",), metadata={"demo_id": result.demo_id})
        total = summarize(engine, (), metadata={"demo_id": result.demo_id})[0]
        runs = top_runs(engine, 5, since=result.started_at)
    finally:
        engine.dispose()
    if args.json:
        _emit_json(
            {
                "db": result.url,
                "calls": result.calls,
                "rows": [r.as_dict() for r in rows],
                "total": total.measures(),
                "runs": [r.as_dict() for r in runs],
            },
            out,
        )
        return
    out.write(f"Recorded {result.calls} LLM calls in {result.url}\n\n")
    report_table(rows, total, ["model"], "LLM usage by model").print(out)
    out.write("\n")
    Table("Most expensive runs", _RUN_COLUMNS, [r.as_dict() for r in runs]).print(out)
    db = f" --db {args.db or result.url}"
    out.write(
        "\nNext:\n"
        f"  tokenledger report{db} --by day,model\n"
        f"  tokenledger show{db} {runs[0].root_run_id if runs else 'RUN_ID'}\n"
        f'  tokenledger sql{db} "SELECT * FROM usage_by_model"\n'
    )


# -- the parser -------------------------------------------------------------------------------


def _since(text: str) -> datetime:
    try:
        return parse_when(text)
    except QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _by(text: str) -> list[str]:
    try:
        return group_keys(text)
    except QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _prices(text: str) -> str:
    try:
        load_price_table(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _meta(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenledger`` argument parser.

    Example:
        >>> build_parser().parse_args(["report", "--by", "day,model"]).by
        ['day', 'model']
    """
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    common = _Parser(add_help=False, parents=[as_json])
    common.add_argument(
        "--db",
        metavar="URL",
        help="ledger URL (default: $TOKENLEDGER_URL, then sqlite:///tokenledger.db)",
    )
    window = _Parser(add_help=False)
    window.add_argument("--since", type=_since, metavar="WHEN", help="7d, 24h, 2026-11-01, ...")
    window.add_argument("--until", type=_since, metavar="WHEN", help="exclusive end, same forms")

    parser = _Parser(prog=PROG, description="Answers from the LLM token ledger.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("report", parents=[common, window], help="totals grouped by a key")
    p.add_argument(
        "--by",
        type=_by,
        default=["model"],
        metavar="KEYS",
        help="comma-separated: model, provider, day, hour, root_name, status, user_id, "
        "session_id, tag, metadata.<key> (default: model)",
    )
    p.add_argument("--tag", action="append", metavar="TAG", help="only calls with this tag")
    p.add_argument(
        "--meta",
        action="append",
        type=_meta,
        metavar="KEY=VALUE",
        help="only calls whose metadata KEY is VALUE",
    )

    p = sub.add_parser("runs", parents=[common, window], help="the most expensive root runs")
    p.add_argument("--top", type=_top, default=10, metavar="N", help="how many (default: 10)")

    p = sub.add_parser("show", parents=[common], help="a run's tree of calls")
    p.add_argument("run_id", metavar="RUN_ID", help="a root run, an inner run, or a call")

    p = sub.add_parser("export", parents=[common, window], help="every call to a file")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file, or - for stdout")

    p = sub.add_parser("sql", parents=[common], help="one read-only SQL statement")
    p.add_argument("statement", metavar="SQL")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        type=_param,
        metavar="NAME=VALUE",
        help="bind :NAME (VALUE read as JSON if it parses: 5, true, null; else text)",
    )

    p = sub.add_parser(
        "reprice", parents=[common, window], help="recompute stored costs with current prices"
    )
    p.add_argument("--model", metavar="NAME", help="only calls of this model (exact name)")
    p.add_argument("--provider", metavar="NAME", help="only calls of this provider")
    p.add_argument(
        "--prices",
        type=_prices,
        metavar="FILE",
        help="a .toml or .json price table overriding genai-prices (USD per 1M tokens)",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would change; write nothing")

    p = sub.add_parser("demo", parents=[as_json], help="record an offline demo, then report")
    p.add_argument(
        "--db",
        metavar="URL",
        help="where to record (default: sqlite:///tokenledger-demo.db, recreated each time)",
    )
    return parser


_COMMANDS = {
    "report": cmd_report,
    "runs": cmd_runs,
    "show": cmd_show,
    "export": cmd_export,
    "sql": cmd_sql,
    "reprice": cmd_reprice,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tokenledger`` with ``argv`` (default: the command line); returns the exit status.

    Example:
        >>> main(["report", "--db", "sqlite:///usage.db", "--since", "7d"])  # doctest: +SKIP
        0
    """
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"choose a command: {', '.join([*_COMMANDS, 'demo'])}")
        if getattr(args, "meta", None):
            args.meta = dict(args.meta)
        if args.command == "demo":
            cmd_demo(args, out)
            return 0
        engine = open_ledger_engine(args.db)
        try:
            _COMMANDS[args.command](engine, args, out)
        finally:
            engine.dispose()
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, QueryError) as exc:
        err.write(f"{getattr(exc, 'prog', PROG)}: error: {_one_line(exc)}\n")
        return 2
    except SQLAlchemyError as exc:
        err.write(f"{PROG}: error: {_reason(exc)}\n")
        return 1
    except BrokenPipeError:  # `tokenledger export ... -o - | head`
        return 1
    except (Failure, LedgerError, OSError, ImportError) as exc:
        err.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:  # a bug: still one line, unless the test suite wants to see it
        if strict_mode():
            raise
        err.write(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)}\n")
        return 1
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
