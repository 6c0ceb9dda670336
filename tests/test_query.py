"""Reading the ledger from Python: read-only SQL, usage of a run, summaries, runs, streaming.

Most tests write a small hand-computed ledger (:func:`calls`) on every backend; one goes end to
end through the real handler, ``ChatOpenAI`` and the local OpenAI-compatible server; the last
one runs the Python session of the README as a doctest.
"""

from __future__ import annotations

import doctest
import re
import sys
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa
from helpers import README, readme_queries
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from langchain_tokenledger import Ledger, TokenLedgerHandler, UsageRecord
from langchain_tokenledger.query import (
    QueryError,
    SummaryRow,
    as_utc,
    cache_savings,
    calls_under,
    check_read_only,
    group_keys,
    iter_calls,
    money,
    parse_when,
    read_only,
    summarize,
    top_runs,
)
from langchain_tokenledger.schema import tokenledger_meta
from langchain_tokenledger.testing import FakeOpenAIServer
from langchain_tokenledger.views import MEASURES, dialect_of

UTC = timezone.utc
T = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def call(run_id: str, root: str, root_name: str, at: datetime, **kw: Any) -> UsageRecord:
    """One LLM call of root run ``root``, directly under it unless ``ancestry`` says otherwise."""
    values: dict[str, Any] = {
        "root_run_id": root,
        "parent_run_id": root,
        "root_name": root_name,
        "run_name": "ChatModel",
        "started_at": at,
        "ended_at": at + timedelta(milliseconds=500),
        "latency_ms": 500.0,
        "ancestry": root,
    }
    return UsageRecord(run_id=run_id, **{**values, **kw})


def calls() -> list[UsageRecord]:
    """Six calls in four root runs over two UTC days, two providers and three models."""
    return [
        # R1 "chat": q1 two levels down, q2 three levels down (R1 > P1 > P2 > q2)
        call("q1", "R1", "chat", T, provider="openai", model="gpt-4o-mini",
             input_tokens=100, output_tokens=20, total_tokens=120, cost_usd=Decimal("0.000027"),
             user_id="u1", session_id="s1", tags=["prod", "web"], parent_run_id="P1",
             ancestry="R1/P1", metadata={"feature": "chat", "tier": 1, "beta": True}),
        call("q2", "R1", "chat", T + timedelta(seconds=2), provider="openai", model="gpt-4o",
             input_tokens=200, output_tokens=100, total_tokens=300, reasoning_tokens=30,
             cost_usd=Decimal("0.0015"), user_id="u1", session_id="s1", tags=["prod", "web"],
             parent_run_id="P2", ancestry="R1/P1/P2", metadata={"feature": "chat"}),
        # R2 "batch": one ok call and one failure, at 10:00
        call("q3", "R2", "batch", T + timedelta(hours=1), provider="anthropic",
             model="claude-3-5-haiku", input_tokens=1000, output_tokens=100,
             total_tokens=1100, cache_read_tokens=600, cost_usd=Decimal("0.0012"),
             user_id="u2", tags=["prod"],
             metadata={"feature": "summarize", "tier": 2, "beta": False}),
        call("q4", "R2", "batch", T + timedelta(hours=1, seconds=1), provider="anthropic",
             model="claude-3-5-haiku", status="error", error_type="APIError",
             usage_source="none", user_id="u2", tags=["prod"], metadata={"feature": "summarize"}),
        # the next day: an LLM-cache hit, and a cancelled call
        call("q5", "R3", "chat", T + timedelta(days=1, hours=3), provider="openai",
             model="gpt-4o-mini", input_tokens=0, output_tokens=0, total_tokens=0,
             cost_usd=Decimal(0), cache_hit=True, usage_source="cache",
             usage_details={"input_tokens": 100, "output_tokens": 20, "total_tokens": 120},
             user_id="u1", session_id="s2", metadata={"feature": "chat"}),
        call("q6", "R4", "chat", T + timedelta(days=1, hours=3, minutes=30), provider="openai",
             model="gpt-4o-mini", status="cancelled", usage_source="none", user_id="u3",
             tags=["web"]),
    ]  # fmt: skip


@pytest.fixture
def filled(ledger: Ledger) -> Ledger:
    """The ledger of every backend, holding :func:`calls`."""
    ledger.record_many(calls())
    ledger.flush()
    return ledger


def m(**kw: Any) -> dict[str, Any]:
    """Measures: zeros except those given."""
    out: dict[str, Any] = dict.fromkeys(MEASURES, 0)
    out.update(kw)
    return out


def table(rows: list[SummaryRow]) -> list[dict[str, Any]]:
    return [row.as_dict() for row in rows]


def count(ledger: Ledger) -> int:
    return int(ledger.query("SELECT COUNT(*) AS n FROM llm_calls")[0]["n"])


GPT4O = m(calls=1, input_tokens=200, output_tokens=100, total_tokens=300, reasoning_tokens=30,
          cost_usd=Decimal("0.0015"))  # fmt: skip
HAIKU = m(calls=2, errors=1, input_tokens=1000, output_tokens=100, total_tokens=1100,
          cache_read_tokens=600, cost_usd=Decimal("0.0012"))  # fmt: skip
MINI = m(calls=3, cache_hits=1, input_tokens=100, output_tokens=20, total_tokens=120,
         cost_usd=Decimal("0.000027"))  # fmt: skip
TOTAL = m(calls=6, errors=1, cache_hits=1, input_tokens=1300, output_tokens=220,
          total_tokens=1520, cache_read_tokens=600, reasoning_tokens=30,
          cost_usd=Decimal("0.002727"))  # fmt: skip


# -- read-only SQL -----------------------------------------------------------------------------


def test_query_returns_rows_as_dicts_with_bound_parameters(filled: Ledger) -> None:
    sql = "SELECT run_id, total_tokens FROM llm_calls WHERE user_id = :u ORDER BY run_id"
    assert filled.query(sql, u="u1") == [
        {"run_id": "q1", "total_tokens": 120},
        {"run_id": "q2", "total_tokens": 300},
        {"run_id": "q5", "total_tokens": 0},
    ]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO llm_calls (run_id, status, cache_hit, usage_source, streamed) "
         "VALUES ('x', 'ok', false, 'none', false)", "refused INSERT"),
        ("UPDATE llm_calls SET cost_usd = 0", "refused UPDATE"),
        ("DELETE FROM llm_calls", "refused DELETE"),
        ("DROP TABLE llm_calls", "refused DROP"),
        ("  /* a comment */ truncate llm_calls", "refused TRUNCATE"),
        ("SELECT 1; DELETE FROM llm_calls", "one statement at a time"),
        ("SELECT 1 -- fine\n; DROP VIEW usage_by_day;", "one statement at a time"),
        ("SELECT * INTO copy FROM llm_calls", "SELECT ... INTO writes"),
        ("SELECT run_id FROM llm_calls INTO OUTFILE '/tmp/x'", "SELECT ... INTO writes"),
        ("", "empty statement"),
        ("-- nothing but a comment", "empty statement"),
    ],
)  # fmt: skip
def test_statements_that_are_not_one_read_are_refused(
    filled: Ledger, sql: str, message: str
) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        filled.query(sql)
    assert count(filled) == 6


def test_a_write_that_passes_the_checks_is_refused_by_the_database(filled: Ledger) -> None:
    with pytest.raises(sa.exc.DBAPIError), read_only(filled.engine) as conn:
        conn.execute(sa.text("DELETE FROM llm_calls"))
    assert count(filled) == 6


def test_query_connections_are_writable_again_afterwards(filled: Ledger) -> None:
    assert filled.query("SELECT COUNT(*) AS n FROM usage_by_model") == [{"n": 3}]
    with filled.engine.begin() as conn:
        conn.execute(tokenledger_meta.insert().values(name="note", value="written"))
        conn.execute(sa.delete(tokenledger_meta).where(tokenledger_meta.c.name == "note"))
    filled.record(call("q7", "R5", "late", T, model="gpt-4o-mini", usage_source="none"))
    filled.flush()
    assert count(filled) == 7


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("SELECT ';' AS semicolon", None),
        ("SELECT 1 AS one;  ", None),
        ("SELECT 1 AS one -- ; DROP TABLE llm_calls", None),
        ("SELECT 1 AS one /* ; */", None),
        ('SELECT 1 AS "a;b"', None),
        ("WITH t AS (SELECT 1 AS x) SELECT x FROM t", None),
        ("SELECT 'it''s; fine' AS s", None),
        ("SELECT 'it\\'s; fine' AS s", "mysql"),
        ("SELECT `a;b` FROM t", "mysql"),
        ("SELECT $$a;b$$ AS s", "postgresql"),
        ("EXPLAIN SELECT 1", None),
    ],
)
def test_reads_with_semicolons_in_strings_and_comments_pass(sql: str, dialect: Any) -> None:
    assert check_read_only(sql, dialect) == sql


def test_mysql_arithmetic_double_dash_does_not_hide_a_second_statement() -> None:
    with pytest.raises(QueryError, match="one statement at a time"):
        check_read_only("SELECT 1--1; DELETE FROM llm_calls", "mysql")


def test_parameters_must_match_the_statement(filled: Ledger) -> None:
    with pytest.raises(QueryError, match="missing parameter\\(s\\) :u"):
        filled.query("SELECT run_id FROM llm_calls WHERE user_id = :u")
    with pytest.raises(
        QueryError, match="unknown parameter\\(s\\) user \\(the statement uses :u\\)"
    ):
        filled.query("SELECT run_id FROM llm_calls WHERE user_id = :u", user="u1")


# -- usage of a run ----------------------------------------------------------------------------


def usage(model: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_name": model, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
        "cached_tokens": 0, "reasoning_tokens": 0, "successful_requests": 0,
        "failed_requests": 0, "total_cost": Decimal(0),
    }  # fmt: skip
    out.update(kw)
    return out


def test_usage_of_a_root_run_sums_every_call_under_it_per_model(filled: Ledger) -> None:
    assert filled.usage("R1") == {
        "gpt-4o": usage("gpt-4o", prompt_tokens=200, completion_tokens=100, total_tokens=300,
                        reasoning_tokens=30, successful_requests=1, total_cost=Decimal("0.0015")),
        "gpt-4o-mini": usage("gpt-4o-mini", prompt_tokens=100, completion_tokens=20,
                             total_tokens=120, successful_requests=1,
                             total_cost=Decimal("0.000027")),
    }  # fmt: skip
    assert filled.usage("R2") == {
        "claude-3-5-haiku": usage("claude-3-5-haiku", prompt_tokens=1000, completion_tokens=100,
                                  total_tokens=1100, cached_tokens=600, successful_requests=1,
                                  failed_requests=1, total_cost=Decimal("0.0012")),
    }  # fmt: skip


def test_usage_of_an_inner_run_a_grandchild_or_a_call(filled: Ledger) -> None:
    both = filled.usage("R1")
    assert filled.usage("P1") == both  # q1 directly under P1, q2 under P1 > P2
    assert filled.usage("P2") == {"gpt-4o": both["gpt-4o"]}
    assert filled.usage("q1") == {"gpt-4o-mini": both["gpt-4o-mini"]}
    assert filled.usage("R9") == {}
    assert filled.usage("P") == {}  # whole run ids only, never a substring


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_usage_needs_a_run_id(ledger: Ledger, bad: Any) -> None:
    with pytest.raises(QueryError, match="run_id must be a non-empty run id"):
        ledger.usage(bad)


def priced(model: str, prompt: int, completion: int) -> Decimal:
    """Cost at genai-prices' list prices (USD per million tokens)."""
    rates = {"gpt-4o-mini": ("0.15", "0.6"), "gpt-4o": ("2.5", "10")}[model]
    return (prompt * Decimal(rates[0]) + completion * Decimal(rates[1])) / 1_000_000


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_usage_through_the_real_handler_and_chat_openai(
    openai_server: FakeOpenAIServer, ledger: Ledger, mode: str
) -> None:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    summarize = (prompt | openai_server.chat_model("gpt-4o-mini") | StrOutputParser()).with_config(
        run_name="summarize"
    )
    title = prompt | openai_server.chat_model("gpt-4o") | StrOutputParser()
    pipeline = (
        RunnablePassthrough.assign(summary=summarize)
        | RunnableLambda(lambda x: {"question": f"title for {x['summary']}"})
        | title
    )
    root = uuid4()
    config: Any = {"callbacks": [TokenLedgerHandler(ledger)], "run_id": root}
    question = {"question": "why keep a ledger of tokens"}
    if mode == "sync":
        pipeline.invoke(question, config)
    else:
        await pipeline.ainvoke(question, config)
    ledger.flush()

    billed = {r.model: r for r in openai_server.reported}
    mini, big = billed["gpt-4o-mini"], billed["gpt-4o"]
    expected = {
        "gpt-4o": usage("gpt-4o", prompt_tokens=big.prompt_tokens,
                        completion_tokens=big.completion_tokens, total_tokens=big.total_tokens,
                        successful_requests=1,
                        total_cost=priced("gpt-4o", big.prompt_tokens, big.completion_tokens)),
        "gpt-4o-mini": usage("gpt-4o-mini", prompt_tokens=mini.prompt_tokens,
                             completion_tokens=mini.completion_tokens,
                             total_tokens=mini.total_tokens, successful_requests=1,
                             total_cost=priced("gpt-4o-mini", mini.prompt_tokens,
                                               mini.completion_tokens)),
    }  # fmt: skip
    assert (mini.prompt_tokens, mini.completion_tokens) == (13, 7)
    assert ledger.usage(root) == expected

    (inner,) = [r for r in calls_under(ledger.engine, str(root)) if r.model == "gpt-4o-mini"]
    path = inner.ancestry.split("/")
    assert path[0] == str(root)
    assert len(path) >= 3  # root > assign step > ... > the summarize chain
    for run_id in (path[1], path[-1], inner.run_id, UUID(inner.run_id)):
        assert ledger.usage(run_id) == {"gpt-4o-mini": expected["gpt-4o-mini"]}


# -- summaries ---------------------------------------------------------------------------------


def test_summary_by_model_is_most_expensive_first(filled: Ledger) -> None:
    assert table(filled.summary()) == [
        {"model": "gpt-4o", **GPT4O},
        {"model": "claude-3-5-haiku", **HAIKU},
        {"model": "gpt-4o-mini", **MINI},
    ]


def test_summary_without_keys_is_the_grand_total(filled: Ledger, ledger: Ledger) -> None:
    assert table(filled.summary(by=())) == [TOTAL]
    assert table(summarize(filled.engine, "")) == [TOTAL]


def test_summary_of_an_empty_ledger(ledger: Ledger) -> None:
    assert table(ledger.summary(by=())) == [m()]
    assert ledger.summary() == []


def test_summary_by_utc_day_and_model_is_chronological(filled: Ledger) -> None:
    assert table(filled.summary(by=("day", "model"))) == [
        {"day": date(2026, 11, 2), "model": "gpt-4o", **GPT4O},
        {"day": date(2026, 11, 2), "model": "claude-3-5-haiku", **HAIKU},
        {"day": date(2026, 11, 2), "model": "gpt-4o-mini",
         **m(calls=1, input_tokens=100, output_tokens=20, total_tokens=120,
             cost_usd=Decimal("0.000027"))},
        {"day": date(2026, 11, 3), "model": "gpt-4o-mini", **m(calls=2, cache_hits=1)},
    ]  # fmt: skip


def test_summary_by_hour(filled: Ledger) -> None:
    rows = filled.summary(by="hour")
    assert [(r["hour"], r.calls) for r in rows] == [
        (datetime(2026, 11, 2, 9, tzinfo=UTC), 2),
        (datetime(2026, 11, 2, 10, tzinfo=UTC), 2),
        (datetime(2026, 11, 3, 12, tzinfo=UTC), 2),
    ]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("provider", [("openai", 4, "0.001527"), ("anthropic", 2, "0.0012")]),
        ("root_name", [("chat", 4, "0.001527"), ("batch", 2, "0.0012")]),
        ("status", [("ok", 4, "0.002727"), ("cancelled", 1, "0"), ("error", 1, "0")]),
        ("user_id", [("u1", 3, "0.001527"), ("u2", 2, "0.0012"), ("u3", 1, "0")]),
        ("session_id", [("s1", 2, "0.001527"), (None, 3, "0.0012"), ("s2", 1, "0")]),
        ("tag", [("prod", 4, "0.002727"), ("web", 3, "0.001527"), (None, 1, "0")]),
        ("metadata.feature", [("chat", 3, "0.001527"), ("summarize", 2, "0.0012"), (None, 1, "0")]),
        ("metadata.tier", [(None, 4, "0.0015"), ("2", 1, "0.0012"), ("1", 1, "0.000027")]),
        ("metadata.beta", [(None, 4, "0.0015"), ("false", 1, "0.0012"), ("true", 1, "0.000027")]),
    ],
)  # fmt: skip
def test_summary_by_each_key(filled: Ledger, key: str, expected: list[tuple[Any, ...]]) -> None:
    rows = filled.summary(by=key)
    assert [(r[key], r.calls, r.cost_usd) for r in rows] == [
        (value, calls, Decimal(cost)) for value, calls, cost in expected
    ]


def test_summary_filters(filled: Ledger) -> None:
    def totals(**filters: Any) -> tuple[int, Decimal]:
        (row,) = filled.summary(by=(), **filters)
        return row.calls, row.cost_usd

    assert totals(since="2026-11-03") == (2, Decimal(0))
    assert totals(until=date(2026, 11, 3)) == (4, Decimal("0.002727"))
    assert totals(since=T + timedelta(hours=1), until=T + timedelta(hours=1, seconds=1)) == (
        1,
        Decimal("0.0012"),
    )
    assert totals(since=datetime(2026, 11, 2, 10)) == (4, Decimal("0.0012"))  # naive is UTC
    assert totals(tags=["prod"]) == (4, Decimal("0.002727"))
    assert totals(tags=["prod", "web"]) == (2, Decimal("0.001527"))
    assert totals(tags="web") == (3, Decimal("0.001527"))
    assert totals(metadata={"feature": "chat"}) == (3, Decimal("0.001527"))
    assert totals(metadata={"feature": "chat", "beta": True}) == (1, Decimal("0.000027"))
    assert totals(metadata={"tier": 2}) == (1, Decimal("0.0012"))
    assert totals(metadata={"feature": None}) == (1, Decimal(0))


@pytest.mark.parametrize(
    ("by", "message"),
    [
        ("vendor", "unknown group key 'vendor': choose from model, provider, day, hour, "
                   "root_name, status, user_id, session_id, tag or metadata.<key>"),
        ("model,model", "group key 'model' given twice"),
        ("metadata.user-id", "invalid metadata key 'user-id'"),
        (["day", ""], "invalid group key ''"),
    ],
)  # fmt: skip
def test_bad_group_keys_are_refused_before_any_sql(ledger: Ledger, by: Any, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        ledger.summary(by=by)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"since": "yesterday"}, "invalid time 'yesterday'"),
        ({"tags": [""]}, "invalid tag ''"),
        ({"metadata": {"a b": "x"}}, "invalid metadata key 'a b'"),
        ({"metadata": {"feature": ["chat"]}}, "compare with a string, number, bool or None"),
    ],
)
def test_bad_filters_are_refused(ledger: Ledger, filters: Any, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        ledger.summary(**filters)


def test_group_keys_accept_a_comma_separated_string() -> None:
    assert group_keys(" day , metadata.feature ") == ["day", "metadata.feature"]
    assert group_keys(()) == []


def test_summary_rows_read_like_dicts() -> None:
    row = SummaryRow(keys={"model": "m"}, **m(calls=2))
    assert (row["model"], row["calls"], row.calls) == ("m", 2, 2)
    assert row.as_dict() == {"model": "m", **m(calls=2)}
    with pytest.raises(KeyError):
        row["day"]


# -- runs, calls, streaming, cache savings ---------------------------------------------------------


def test_top_runs_are_the_most_expensive_roots(filled: Ledger) -> None:
    runs = top_runs(filled.engine, top=3)
    assert [(r.root_run_id, r.root_name, r.models, r.calls, r.cost_usd) for r in runs] == [
        ("R1", "chat", 2, 2, Decimal("0.001527")),
        ("R2", "batch", 1, 2, Decimal("0.0012")),
        ("R3", "chat", 1, 1, Decimal(0)),
    ]
    r1 = runs[0]
    assert (r1.started_at, r1.ended_at, r1.user_id, r1.session_id) == (
        T,
        T + timedelta(seconds=2, milliseconds=500),
        "u1",
        "s1",
    )
    later = top_runs(filled.engine, since="2026-11-03")
    assert [r.root_run_id for r in later] == ["R3", "R4"]
    with pytest.raises(QueryError, match="top must be a positive integer, got 0"):
        top_runs(filled.engine, top=0)


def test_calls_under_a_run_are_typed_records_oldest_first(filled: Ledger) -> None:
    records = calls_under(filled.engine, "P1")
    assert records == [r for r in calls() if r.run_id in ("q1", "q2")]


def test_iter_calls_streams_every_call_in_order(filled: Ledger) -> None:
    assert [r.run_id for r in iter_calls(filled.engine, batch_size=2)] == [
        "q1", "q2", "q3", "q4", "q5", "q6",
    ]  # fmt: skip
    window = iter_calls(filled.engine, since="2026-11-02T10:00:00Z", until="2026-11-03")
    assert [r.run_id for r in window] == ["q3", "q4"]


def test_iter_calls_uses_a_server_side_cursor(filled: Ledger) -> None:
    cursors: list[str] = []

    def listen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM llm_calls" in statement:
            cursors.append(type(cursor).__name__)

    sa.event.listen(filled.engine, "before_cursor_execute", listen)
    try:
        assert len(list(iter_calls(filled.engine))) == 6
    finally:
        sa.event.remove(filled.engine, "before_cursor_execute", listen)
    # SQLite's own cursor already steps through rows one at a time
    expected = {"sqlite": "Cursor", "postgresql": "ServerCursor", "mysql": "SSCursor"}
    assert cursors == [expected[dialect_of(filled.engine)]]


def test_cache_savings_prices_the_replayed_usage(filled: Ledger) -> None:
    (saved,) = cache_savings(filled.engine, filled.pricer)
    assert saved.model == "gpt-4o-mini"
    assert (saved.hits, saved.input_tokens, saved.output_tokens) == (1, 100, 20)
    assert saved.cost_usd == priced("gpt-4o-mini", 100, 20) == Decimal("0.000027")
    assert cache_savings(filled.engine, filled.pricer, until="2026-11-03") == []


# -- pandas ------------------------------------------------------------------------------------


def test_to_pandas_gives_every_call_typed(filled: Ledger) -> None:
    df = filled.to_pandas()
    assert list(df["run_id"]) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df["started_at"].iloc[2] == T + timedelta(hours=1)
    assert str(df["total_tokens"].dtype) == "Int64"
    assert int(df["total_tokens"].sum()) == 1520
    assert round(float(df["cost_usd"].sum()), 9) == 0.002727
    assert df["tags"].iloc[0] == ["prod", "web"]
    assert df.groupby("model")["run_id"].count().to_dict() == {
        "claude-3-5-haiku": 2,
        "gpt-4o": 1,
        "gpt-4o-mini": 3,
    }


def test_to_pandas_of_a_query(filled: Ledger) -> None:
    df = filled.to_pandas("SELECT run_id, user_id FROM llm_calls WHERE user_id = :u", u="u2")
    assert df.to_dict("records") == [
        {"run_id": "q3", "user_id": "u2"},
        {"run_id": "q4", "user_id": "u2"},
    ]
    empty = filled.to_pandas("SELECT run_id FROM llm_calls WHERE user_id = 'nobody'")
    assert (list(empty.columns), len(empty)) == (["run_id"], 0)


def test_to_pandas_without_pandas_names_the_extra(
    sqlite_ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'langchain-tokenledger[pandas]'")):
        sqlite_ledger.to_pandas()


# -- values ------------------------------------------------------------------------------------

NOW = datetime(2026, 11, 8, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7d", datetime(2026, 11, 1, 12, 0, tzinfo=UTC)),
        ("24h", datetime(2026, 11, 7, 12, 0, tzinfo=UTC)),
        ("30m", datetime(2026, 11, 8, 11, 30, tzinfo=UTC)),
        ("2w", datetime(2026, 10, 25, 12, 0, tzinfo=UTC)),
        ("90s", datetime(2026, 11, 8, 11, 58, 30, tzinfo=UTC)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T12:30:00Z", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)),
        ("2026-11-01T12:30:00+02:00", datetime(2026, 11, 1, 10, 30, tzinfo=UTC)),
        (date(2026, 11, 1), datetime(2026, 11, 1, tzinfo=UTC)),
        (datetime(2026, 11, 1, 8), datetime(2026, 11, 1, 8, tzinfo=UTC)),
        (timedelta(hours=2), datetime(2026, 11, 8, 10, 0, tzinfo=UTC)),
    ],
)
def test_parse_when(value: Any, expected: datetime) -> None:
    assert parse_when(value, now=NOW) == expected


@pytest.mark.parametrize("value", ["", "7 days", "-1d", "2026-13-01", "soon", 7])
def test_parse_when_refuses_anything_else(value: Any) -> None:
    with pytest.raises(QueryError, match="invalid time"):
        parse_when(value, now=NOW)


def test_money_is_exact_and_the_same_on_every_database() -> None:
    assert money(0.000027 + 0.000625) == Decimal("0.000652")  # a SQLite float sum
    assert money(Decimal("0.000652000000")) == Decimal("0.000652")  # NUMERIC(24, 12)
    assert str(money(Decimal("100.000000000000"))) == "100"
    assert str(money(None)) == "0"


def test_as_utc_reads_every_stored_form() -> None:
    expected = datetime(2026, 11, 2, 9, 0, 0, 500, tzinfo=UTC)
    assert as_utc("2026-11-02 09:00:00.000500") == expected
    assert as_utc(datetime(2026, 11, 2, 9, 0, 0, 500)) == expected
    assert as_utc(expected.astimezone(timezone(timedelta(hours=-5)))) == expected


# -- the documentation -------------------------------------------------------------------------


def test_the_python_session_in_the_docs_runs_as_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = readme_queries()
    blocks = re.findall(r"```pycon\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 5
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, "README.md", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(test)
    assert (runner.failures, runner.tries) == (0, len(test.examples))
