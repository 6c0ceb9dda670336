"""The ``tokenledger`` command: every command on every backend, its output, and its errors.

Commands run in-process through ``main([...])`` (exit status returned, output captured), plus
one run of the installed console script in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from langchain_tokenledger import Ledger, UsageRecord
from langchain_tokenledger.cli import main
from langchain_tokenledger.demo import WORKLOAD_CALLS
from langchain_tokenledger.records import RECORD_FIELDS
from langchain_tokenledger.schema import llm_calls

UTC = timezone.utc
T = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def call(run_id: str, root: str, root_name: str, at: datetime, **kw: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "root_run_id": root,
        "parent_run_id": root,
        "root_name": root_name,
        "run_name": "ChatModel",
        "provider": "openai",
        "started_at": at,
        "ended_at": at + timedelta(milliseconds=500),
        "latency_ms": 500.0,
        "ancestry": root,
    }
    return UsageRecord(run_id=run_id, **{**values, **kw})


def calls() -> list[UsageRecord]:
    """Two root runs on two days: R1 (two calls, one inside the inner run S1), R2 (one fails)."""
    return [
        call("c1", "R1", "chat", T, model="gpt-4o-mini", input_tokens=100, output_tokens=20,
             total_tokens=120, cost_usd=Decimal("0.000027"), user_id="alice", tags=["prod"],
             metadata={"feature": "chat"}, streamed=True, ttft_ms=120.0),
        call("c2", "R1", "chat", T + timedelta(seconds=1), model="gpt-4o", input_tokens=200,
             output_tokens=100, total_tokens=300, cost_usd=Decimal("0.0015"), user_id="alice",
             parent_run_id="S1", ancestry="R1/S1", tags=["prod"], metadata={"feature": "chat"}),
        call("c3", "R2", "batch", T + timedelta(days=1), provider="anthropic",
             model="claude-3-5-haiku", input_tokens=1000, output_tokens=100, total_tokens=1100,
             cost_usd=Decimal("0.0012"), user_id="bob", tags=["prod", "batch"],
             metadata={"feature": "summarize"}),
        call("c4", "R2", "batch", T + timedelta(days=1, seconds=1), provider="anthropic",
             model="claude-3-5-haiku", status="error", error_type="RateLimitError",
             usage_source="none", user_id="bob", tags=["prod", "batch"],
             metadata={"feature": "summarize"}),
    ]  # fmt: skip


@pytest.fixture
def db(backend_url: str) -> list[str]:
    """``--db URL`` of a ledger holding :func:`calls`, on every backend."""
    with Ledger(backend_url) as ledger:
        ledger.record_many(calls())
    return ["--db", backend_url]


@pytest.fixture
def no_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend rich is not installed: tables come out as plain text."""
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    status, out, err = run([*args, "--json"], capsys)
    assert (status, err) == (0, "")
    return json.loads(out)


# -- report --------------------------------------------------------------------------------------

REPORT_BY_MODEL = """\
LLM usage by model
model             calls  errors  cache hits  input  output  total tokens  cached  reasoning  cost (USD)
----------------  -----  ------  ----------  -----  ------  ------------  ------  ---------  ----------
gpt-4o                1       0           0    200     100           300       0          0    0.001500
claude-3-5-haiku      2       1           0  1,000     100         1,100       0          0    0.001200
gpt-4o-mini           1       0           0    100      20           120       0          0    0.000027
----------------  -----  ------  ----------  -----  ------  ------------  ------  ---------  ----------
total                 4       1           0  1,300     220         1,520       0          0    0.002727
"""  # noqa: E501


def test_report_by_model_is_a_table_with_totals(
    db: list[str], no_rich: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["report", *db], capsys) == (0, REPORT_BY_MODEL, "")


def rich_cells(text: str) -> list[list[str]]:
    """The cells of each row of a rich table (header, rows, footer)."""
    return [
        [cell.strip() for cell in line.strip("│┃").split("│" if "│" in line else "┃")]
        for line in text.splitlines()
        if line.startswith(("│", "┃"))
    ]


def test_report_uses_rich_when_installed(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", *db, "--by", "day,model"], capsys)
    assert (status, err) == (0, "")
    assert out.splitlines()[0].strip() == "LLM usage by day, model"
    assert rich_cells(out) == [
        ["day", "model", "calls", "errors", "cache hits", "input", "output", "total tokens",
         "cached", "reasoning", "cost (USD)"],
        ["2026-11-02", "gpt-4o", "1", "0", "0", "200", "100", "300", "0", "0", "0.001500"],
        ["2026-11-02", "gpt-4o-mini", "1", "0", "0", "100", "20", "120", "0", "0", "0.000027"],
        ["2026-11-03", "claude-3-5-haiku", "2", "1", "0", "1,000", "100", "1,100", "0", "0",
         "0.001200"],
        ["total", "", "4", "1", "0", "1,300", "220", "1,520", "0", "0", "0.002727"],
    ]  # fmt: skip


def test_report_json_with_filters(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["report", *db, "--by", "metadata.feature", "--since", "2026-11-02", "--until",
            "2026-11-04", "--tag", "prod", "--meta", "feature=summarize"]  # fmt: skip
    measures = {"calls": 2, "errors": 1, "cache_hits": 0, "input_tokens": 1000,
                "output_tokens": 100, "total_tokens": 1100, "cache_read_tokens": 0,
                "reasoning_tokens": 0, "cost_usd": "0.0012"}  # fmt: skip
    assert run_json(args, capsys) == {
        "by": ["metadata.feature"],
        "since": "2026-11-02T00:00:00+00:00",
        "until": "2026-11-04T00:00:00+00:00",
        "rows": [{"metadata.feature": "summarize", **measures}],
        "total": measures,
    }


# -- runs, show ----------------------------------------------------------------------------------


def test_runs_lists_the_most_expensive_roots(
    db: list[str], no_rich: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["runs", *db, "--top", "1"], capsys) == (
        0,
        "Top 1 runs by cost\n"
        "run  name  started (UTC)        user   models  calls  errors  total tokens  cost (USD)\n"
        "---  ----  -------------------  -----  ------  -----  ------  ------------  ----------\n"
        "R1   chat  2026-11-02 09:00:00  alice       2      2       0           420    0.001527\n",
        "",
    )


def test_runs_json_since(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    (row,) = run_json(["runs", *db, "--since", "2026-11-03"], capsys)
    assert row == {
        "root_run_id": "R2", "root_name": "batch", "started_at": "2026-11-03T09:00:00+00:00",
        "ended_at": "2026-11-03T09:00:01.500000+00:00", "user_id": "bob", "session_id": None,
        "models": 1, "calls": 2, "errors": 1, "cache_hits": 0, "input_tokens": 1000,
        "output_tokens": 100, "total_tokens": 1100, "cache_read_tokens": 0,
        "reasoning_tokens": 0, "cost_usd": "0.0012",
    }  # fmt: skip


def test_show_draws_the_tree_of_calls(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["show", *db, "R1"], capsys) == (
        0,
        "chat R1\n"
        "├── ChatModel  gpt-4o-mini  ok  in 100 / out 20 tokens  $0.000027  500 ms  "
        "first token 120 ms\n"
        "└── run S1\n"
        "    └── ChatModel  gpt-4o  ok  in 200 / out 100 tokens  $0.001500  500 ms\n"
        "2 calls, 0 errors, 420 tokens (in 300 / out 120), $0.001527 over 1.50 s\n",
        "",
    )
    assert run(["show", *db, "S1"], capsys)[1] == (
        "run S1\n"
        "└── ChatModel  gpt-4o  ok  in 200 / out 100 tokens  $0.001500  500 ms\n"
        "1 call, 0 errors, 300 tokens (in 200 / out 100), $0.001500 over 0.50 s\n"
    )
    assert run(["show", *db, "R2"], capsys)[1].splitlines()[1:3] == [
        "├── ChatModel  claude-3-5-haiku  ok  in 1,000 / out 100 tokens  $0.001200  500 ms",
        "└── ChatModel  claude-3-5-haiku  error  in - / out - tokens  unpriced  500 ms  "
        "RateLimitError",
    ]


def test_show_json_and_unknown_runs(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    shown = run_json(["show", *db, "S1"], capsys)
    assert shown["total"] == {
        "calls": 1, "errors": 0, "input_tokens": 200, "output_tokens": 100, "total_tokens": 300,
        "cost_usd": "0.0015",
    }  # fmt: skip
    (c2,) = shown["calls"]
    assert list(c2) == list(RECORD_FIELDS)
    assert (c2["run_id"], c2["ancestry"], c2["started_at"]) == (
        "c2",
        "R1/S1",
        "2026-11-02T09:00:01+00:00",
    )
    assert run(["show", *db, "nope"], capsys) == (
        1,
        "",
        "tokenledger: error: no calls recorded under run nope\n",
    )


# -- export --------------------------------------------------------------------------------------


def test_export_csv(db: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "calls.csv"
    assert run(["export", *db, "--format", "csv", "-o", str(target)], capsys) == (
        0,
        f"wrote 4 calls to {target} (csv)\n",
        "",
    )
    with target.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == ["c1", "c2", "c3", "c4"]
    assert list(rows[0]) == list(RECORD_FIELDS)
    c1, c4 = rows[0], rows[3]
    assert (c1["cost_usd"], c1["started_at"], c1["tags"], c1["streamed"], c1["cache_hit"]) == (
        "0.000027",
        "2026-11-02T09:00:00+00:00",
        '["prod"]',
        "true",
        "false",
    )
    assert (c4["total_tokens"], c4["cost_usd"], c4["error_type"]) == ("", "", "RateLimitError")
    assert not (tmp_path / "calls.csv.partial").exists()


def test_export_jsonl_to_stdout_since(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["export", *db, "--format", "jsonl", "-o", "-", "--since", "1d"], capsys)
    assert (status, out, err) == (0, "", "")  # every call is older than a day
    status, out, err = run(["export", *db, "--format", "jsonl", "-o", "-", "--until",
                            "2026-11-03"], capsys)  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    assert (status, err, [r["run_id"] for r in rows]) == (0, "", ["c1", "c2"])
    assert (rows[0]["cost_usd"], rows[0]["tags"], rows[0]["metadata"], rows[0]["ttft_ms"]) == (
        "0.000027",
        ["prod"],
        {"feature": "chat"},
        120.0,
    )


def test_export_parquet(db: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    target = tmp_path / "calls.parquet"
    assert run_json(["export", *db, "--format", "parquet", "-o", str(target)], capsys) == {
        "rows": 4,
        "format": "parquet",
        "file": str(target),
    }
    data = pq.read_table(target)
    assert data.schema.names == list(RECORD_FIELDS)
    assert [str(data.schema.field(n).type) for n in ("cost_usd", "started_at", "tags")] == [
        "decimal128(24, 12)",
        "timestamp[us, tz=UTC]",
        "list<element: string>",
    ]
    c1, *_, c4 = data.to_pylist()
    assert (c1["cost_usd"], c1["started_at"], c1["tags"], c1["metadata"]) == (
        Decimal("0.000027"),
        T,
        ["prod"],
        '{"feature":"chat"}',
    )
    assert (c4["total_tokens"], c4["cost_usd"], c4["status"]) == (None, None, "error")


def test_export_parquet_without_pyarrow_names_the_extra(
    db: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    target = tmp_path / "calls.parquet"
    assert run(["export", *db, "--format", "parquet", "-o", str(target)], capsys) == (
        1,
        "",
        "tokenledger: error: export --format parquet needs pyarrow: "
        "pip install 'langchain-tokenledger[parquet]'\n",
    )
    assert list(tmp_path.iterdir()) == ([] if "sqlite" not in db[1] else [tmp_path / "ledger.db"])


# -- sql -----------------------------------------------------------------------------------------


def test_sql_prints_rows(db: list[str], no_rich: None, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT run_id, total_tokens FROM llm_calls WHERE user_id = :u ORDER BY run_id"
    assert run(["sql", *db, sql, "-p", "u=bob"], capsys) == (
        0,
        "2 rows\n"
        "run_id  total_tokens\n"
        "------  ------------\n"
        "c3             1,100\n"
        "c4                 -\n",
        "",
    )
    rows = run_json(["sql", *db, "SELECT COUNT(*) AS n FROM llm_calls WHERE total_tokens > :t",
                     "-p", "t=150"], capsys)  # fmt: skip
    assert rows == [{"n": 2}]


@pytest.mark.parametrize(
    ("statement", "refused"),
    [
        ("INSERT INTO llm_calls (run_id, status, cache_hit, usage_source, streamed) "
         "VALUES ('x', 'ok', false, 'none', false)", "INSERT"),
        ("DELETE FROM llm_calls", "DELETE"),
        ("DROP TABLE llm_calls", "DROP"),
    ],
)  # fmt: skip
def test_sql_refuses_writes(
    db: list[str], statement: str, refused: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["sql", *db, statement], capsys) == (
        2,
        "",
        "tokenledger: error: only read statements are allowed (SELECT, WITH, VALUES, TABLE, "
        f"EXPLAIN, SHOW, DESCRIBE); refused {refused}\n",
    )
    assert run_json(["sql", *db, "SELECT COUNT(*) AS n FROM llm_calls"], capsys) == [{"n": 4}]


# -- errors: one line on stderr, never a traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ([], 2, "tokenledger: error: choose a command: report, runs, show, export, sql, reprice, "
         "demo"),
        (["audit"], 2, "tokenledger: error: argument COMMAND: invalid choice: 'audit' "
                       "(choose from 'report', 'runs', 'show', 'export', 'sql', 'reprice', "
                       "'demo')"),
        (["report", "--by", "vendor"], 2, "tokenledger report: error: argument --by: unknown "
         "group key 'vendor': choose from model, provider, day, hour, root_name, status, "
         "user_id, session_id, tag or metadata.<key>"),
        (["report", "--since", "soon"], 2, "tokenledger report: error: argument --since: invalid "
         "time 'soon': use e.g. 7d, 24h, 30m, 2026-11-01 or 2026-11-01T12:00:00Z"),
        (["runs", "--top", "0"], 2, "tokenledger runs: error: argument --top: expected a "
                                    "positive integer, got '0'"),
        (["export", "--format", "xml", "-o", "x"], 2, "tokenledger export: error: argument "
         "--format: invalid choice: 'xml' (choose from 'csv', 'jsonl', 'parquet')"),
        (["report", "--meta", "feature"], 2, "tokenledger report: error: argument --meta: "
                                             "expected KEY=VALUE, got 'feature'"),
        (["report", "--db", "::::"], 2, "tokenledger: error: invalid ledger URL "
         "'::::': expected e.g. sqlite:///usage.db or postgresql://user@host/db"),
        (["report", "--db", "nonsense://"], 1, "tokenledger: error: no database driver for "
         "'nonsense'"),
        (["report", "--db", "sqlite:///missing.db"], 1, "tokenledger: error: no ledger at "
         "missing.db: nothing recorded there yet (try `tokenledger demo`)"),
        (["report", "--db", "postgresql://nobody@127.0.0.1:1/x"], 1, "tokenledger: error: "
         "cannot read postgresql+psycopg://nobody@127.0.0.1:1/x: "),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_on_stderr(
    args: list[str],
    status: int,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    got, out, err = run(args, capsys)
    assert (got, out) == (status, "")
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_a_database_without_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert run(["runs", "--db", f"sqlite:///{empty}"], capsys) == (
        1,
        "",
        f"tokenledger: error: no ledger in sqlite:///{empty}: it has no tokenledger tables\n",
    )


def test_db_defaults_to_the_environment_then_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENLEDGER_URL", raising=False)
    assert run(["report"], capsys)[2] == (
        "tokenledger: error: no ledger at tokenledger.db: nothing recorded there yet "
        "(try `tokenledger demo`)\n"
    )
    with Ledger(f"sqlite:///{tmp_path / 'env.db'}") as ledger:
        ledger.record_many(calls())
    monkeypatch.setenv("TOKENLEDGER_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert run_json(["report", "--by", ""], capsys)["total"]["calls"] == 4


# -- demo ----------------------------------------------------------------------------------------

DEMO_TOTAL = {
    "calls": 13, "errors": 1, "cache_hits": 1, "input_tokens": 258, "output_tokens": 137,
    "total_tokens": 395, "cache_read_tokens": 0, "reasoning_tokens": 48, "cost_usd": "0.00072155",
}  # fmt: skip


def test_demo_records_its_workload_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    first = run_json(["demo"], capsys)
    assert (first["db"], first["calls"], first["total"]) == (
        "sqlite:///tokenledger-demo.db",
        WORKLOAD_CALLS,
        DEMO_TOTAL,
    )
    assert [(r["model"], r["calls"]) for r in first["rows"]] == [
        ("gpt-4o", 2),
        ("o4-mini", 1),
        ("gpt-4o-mini", 10),
    ]
    run_json(["demo"], capsys)  # the default demo database starts afresh every time
    rows = run_json(["sql", "--db", "sqlite:///tokenledger-demo.db",
                     "SELECT COUNT(*) AS n FROM llm_calls"], capsys)  # fmt: skip
    assert rows == [{"n": WORKLOAD_CALLS}]


def test_demo_on_every_backend(
    backend_url: str, no_rich: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(["demo", "--db", backend_url], capsys)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"Recorded {WORKLOAD_CALLS} LLM calls in {backend_url}"
    assert "total           13       1           1    258     137           395" in out
    assert lines[-3].startswith(f"  tokenledger report --db {backend_url} --by day,model")


# -- the installed console script ----------------------------------------------------------------


def test_the_console_script(db: list[str], tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tokenledger"
    env = {**os.environ, "TOKENLEDGER_URL": db[1]}
    done = subprocess.run(
        [str(script), "report", "--json", "--by", "user_id"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    report = json.loads(done.stdout)
    assert [(r["user_id"], r["calls"], r["cost_usd"]) for r in report["rows"]] == [
        ("alice", 2, "0.001527"),
        ("bob", 2, "0.0012"),
    ]
    bad = subprocess.run(
        [str(script), "report", "--by", "vendor"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert (bad.returncode, bad.stdout, bad.stderr.count("\n")) == (2, "", 1)
    assert "Traceback" not in bad.stderr


# -- reprice -------------------------------------------------------------------------------------

PRICES_TOML = """\
[models."gpt-4o-mini"]
input = 1
output = 2
"""
"""The corrected gpt-4o-mini rates, USD per 1M tokens (genai-prices: $0.15 in, $0.60 out)."""


def used(run_id: str, model: str, tokens_in: int, tokens_out: int, day: int) -> UsageRecord:
    """A call with provider-reported usage and no cost: the ledger prices it with genai-prices."""
    usage = {"input_tokens": tokens_in, "output_tokens": tokens_out,
             "total_tokens": tokens_in + tokens_out}  # fmt: skip
    return call(run_id, "R", "chat", datetime(2026, 11, day, 12, 0, tzinfo=UTC), model=model,
                usage_details=usage, **usage)  # fmt: skip


GENAI_COSTS = {  # run_id: (cost_usd, price source)
    "p1": (Decimal("0.00045"), "genai-prices"),
    "p2": (Decimal("0.0003"), "genai-prices"),
    "p3": (Decimal("0.0075"), "genai-prices"),
    "p4": (Decimal("0.00015"), "genai-prices"),
}


@pytest.fixture
def priced(backend_url: str, ledger: Ledger, tmp_path: Path) -> tuple[list[str], Path]:
    """``--db URL`` of a ledger whose calls genai-prices priced, and the corrected price table.

    gpt-4o-mini at $0.15 / $0.60 per 1M: p1 (1,000 in, 500 out) $0.00045, p2 (2,000 in)
    $0.0003, p4 (1,000 in, two days later) $0.00015; gpt-4o at $2.50 / $10: p3 $0.0075.
    """
    ledger.record_many([used("p1", "gpt-4o-mini", 1000, 500, 1),
                        used("p2", "gpt-4o-mini", 2000, 0, 1),
                        used("p3", "gpt-4o", 1000, 500, 1),
                        used("p4", "gpt-4o-mini", 1000, 0, 3)])  # fmt: skip
    ledger.flush()
    assert costs(ledger) == GENAI_COSTS
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    return ["--db", backend_url], prices


def costs(ledger: Ledger) -> dict[str, tuple[Decimal, str]]:
    """``cost_usd`` and the price source's name of every row, read with SQL."""
    c = llm_calls.c
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(c.run_id, c.cost_usd, c.price_source).order_by(c.run_id))
        return {r.run_id: (r.cost_usd, r.price_source.split()[0]) for r in rows}


def test_reprice_applies_a_price_table_to_the_matching_rows(
    priced: tuple[list[str], Path], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    db, prices = priced
    # At $1 / $2 per 1M: p1 $0.002, p2 $0.002, p4 $0.001; p3 is another model, left alone.
    assert run(["reprice", *db, "--prices", str(prices), "--model", "gpt-4o-mini"], capsys) == (
        0,
        "3 rows examined, 3 with a new cost: $0.0009 -> $0.005 (+0.0041)\n",
        "",
    )
    assert costs(ledger) == {
        "p1": (Decimal("0.002"), "override"),
        "p2": (Decimal("0.002"), "override"),
        "p3": (Decimal("0.0075"), "genai-prices"),
        "p4": (Decimal("0.001"), "override"),
    }


def test_reprice_dry_run_writes_nothing(
    priced: tuple[list[str], Path], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    db, prices = priced
    args = ["reprice", *db, "--prices", str(prices), "--model", "gpt-4o-mini", "--dry-run"]
    assert run(args, capsys) == (
        0,
        "3 rows examined, 3 with a new cost: $0.0009 -> $0.005 (+0.0041); "
        "dry run, nothing written\n",
        "",
    )
    assert costs(ledger) == GENAI_COSTS


def test_reprice_json_with_a_window_and_a_provider(
    priced: tuple[list[str], Path], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    db, prices = priced
    args = ["reprice", *db, "--prices", str(prices), "--since", "2026-11-02", "--until",
            "2026-11-04", "--provider", "openai"]  # fmt: skip
    assert run_json(args, capsys) == {
        "examined": 1, "changed": 1, "updated": 1, "unpriced": 0, "old_total": "0.00015",
        "new_total": "0.001", "delta": "0.00085", "dry_run": False,
    }  # fmt: skip
    assert costs(ledger) == {**GENAI_COSTS, "p4": (Decimal("0.001"), "override")}
    assert run(["reprice", *db, "--prices", str(prices), "--provider", "anthropic"], capsys) == (
        0,
        "0 rows examined, 0 with a new cost: $0 -> $0 (+0)\n",
        "",
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[models.gpt-4o-mini\ninput = 1\n", "invalid TOML in price table {path!r}: Expected ']' "
         "at the end of a table declaration (at line 1, column 20)"),
        ('[models."gpt-4o-mini"]\ninput = -1\noutput = 2\n', "price table: model "
         "'gpt-4o-mini': field 'input' must be >= 0, got -1"),
        (None, "price table file not found: {path!r}"),
    ],
    ids=["invalid-toml", "negative-price", "missing-file"],
)  # fmt: skip
def test_reprice_refuses_a_bad_price_file(
    content: str | None,
    reason: str,
    priced: tuple[list[str], Path],
    ledger: Ledger,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db, _ = priced
    bad = tmp_path / "bad.toml"
    if content is not None:
        bad.write_text(content)
    assert run(["reprice", *db, "--prices", str(bad)], capsys) == (
        2,
        "",
        f"tokenledger reprice: error: argument --prices: {reason.format(path=str(bad))}\n",
    )
    assert costs(ledger) == GENAI_COSTS


def test_reprice_never_creates_a_ledger(
    backend_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like the read commands, ``reprice`` on a database without a ledger says so, exit 1."""
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    status, out, err = run(["reprice", "--db", backend_url, "--prices", str(prices)], capsys)
    if backend_url.startswith("sqlite"):
        where = f"no ledger at {tmp_path / 'ledger.db'}: nothing recorded there yet"
        assert not (tmp_path / "ledger.db").exists()
    else:
        where = f"no ledger in {backend_url}: it has no tokenledger tables"
        engine = sa.create_engine(backend_url)
        try:
            assert "llm_calls" not in sa.inspect(engine).get_table_names()
        finally:
            engine.dispose()
    assert (status, out) == (1, "")
    assert err.startswith(f"tokenledger: error: {where}")
    assert err.count("\n") == 1
