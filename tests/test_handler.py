"""TokenLedgerHandler with the real ChatOpenAI against the local server: rows, sums, run tree.

Every test reconciles the ledger with what the server billed (``openai_server.reported``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, cast
from uuid import NAMESPACE_DNS, UUID, uuid1, uuid4, uuid5

import pytest
from helpers import rows
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from langchain_tokenledger import Ledger, TokenLedgerHandler
from langchain_tokenledger.handler import _uuid_text
from langchain_tokenledger.records import UsageRecord
from langchain_tokenledger.testing import FakeOpenAIServer
from langchain_tokenledger.usage import from_usage_metadata

MODEL = "gpt-4o-mini"


def assert_reconciles(ledger: Ledger, server: FakeOpenAIServer) -> None:
    """The ledger's billed sums equal what the server reported, call for call."""
    got = rows(ledger)
    billed = server.totals()
    assert len(got) == billed["calls"]
    assert sum(r["input_tokens"] for r in got) == billed["prompt_tokens"]
    assert sum(r["output_tokens"] for r in got) == billed["completion_tokens"]
    assert sum(r["total_tokens"] for r in got) == billed["total_tokens"]
    assert sum(r["cache_read_tokens"] or 0 for r in got) == billed["cached_tokens"]
    assert sum(r["reasoning_tokens"] or 0 for r in got) == billed["reasoning_tokens"]


@pytest.fixture
def handler(sqlite_ledger: Ledger) -> TokenLedgerHandler:
    return TokenLedgerHandler(sqlite_ledger, tags=["team-a"], metadata={"user_id": "u1"})


Mode = str
MODES = ["sync", "async"]


async def run(mode: Mode, runnable: Runnable[Any, Any], value: Any, config: RunnableConfig) -> Any:
    """``invoke`` or ``ainvoke``, so one test body covers both."""
    if mode == "sync":
        return await asyncio.to_thread(runnable.invoke, value, config)
    return await runnable.ainvoke(value, config)


# -- one call --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_one_call_is_one_row_with_the_billed_usage(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)
    config: RunnableConfig = {
        "callbacks": [handler],
        "tags": ["nightly"],
        "metadata": {"thread_id": "t-9", "feature": "qa"},
    }
    message = await run(mode, model, "how many tokens is this", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert message.usage_metadata["total_tokens"] == billed.total_tokens
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (
        billed.prompt_tokens,
        billed.completion_tokens,
        billed.total_tokens,
    )
    assert (billed.prompt_tokens, billed.completion_tokens) == (12, 6)
    assert row["model"] == MODEL
    assert row["provider"] == "openai"
    assert (row["status"], row["error_type"], row["usage_source"]) == ("ok", None, "provider")
    assert row["run_name"] == row["root_name"] == "ChatOpenAI"
    assert row["root_run_id"] == row["run_id"]
    assert row["parent_run_id"] is None
    assert row["ancestry"] == ""
    assert row["streamed"] is False
    assert row["ttft_ms"] is None
    assert row["latency_ms"] > 0
    assert row["started_at"] <= row["ended_at"]
    assert row["tags"] == ["team-a", "nightly"]
    assert row["metadata"] == {"user_id": "u1", "thread_id": "t-9", "feature": "qa"}
    assert (row["user_id"], row["session_id"]) == ("u1", "t-9")
    assert row["usage_details"]["input_tokens"] == 12
    assert handler.in_flight == 0


async def test_the_runs_own_user_id_wins_over_the_handlers_default(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)
    await model.ainvoke("hi", {"callbacks": [handler], "metadata": {"user_id": "u2"}})

    [row] = rows(handler.ledger)
    assert row["user_id"] == "u2"


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_is_one_row_with_time_to_first_token(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL, stream_usage=True)
    config: RunnableConfig = {"callbacks": [handler]}
    prompt = "stream me five words please"
    if mode == "sync":
        chunks = await asyncio.to_thread(lambda: list(model.stream(prompt, config)))
    else:
        chunks = [c async for c in model.astream(prompt, config)]

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert len(chunks) > 5
    assert (row["input_tokens"], row["output_tokens"]) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    assert billed.usage_sent is True
    assert row["streamed"] is True
    assert 0 < row["ttft_ms"] <= row["latency_ms"]
    assert_reconciles(handler.ledger, openai_server)


@pytest.mark.parametrize("mode", MODES)
async def test_batch_gives_one_row_per_input(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)
    inputs = ["one", "two words", "three words here", "and four words here"]
    config: RunnableConfig = {"callbacks": [handler], "max_concurrency": 2}
    if mode == "sync":
        await asyncio.to_thread(model.batch, inputs, config)
    else:
        await model.abatch(inputs, config)

    got = rows(handler.ledger)
    assert len(got) == 4
    assert sorted(r["input_tokens"] for r in got) == [8, 9, 10, 11]
    assert all(r["root_run_id"] == r["run_id"] for r in got)
    assert_reconciles(handler.ledger, openai_server)


# -- the run tree ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_prompt_model_parser_chain_attributes_the_call_to_its_root(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("user", "{q}")])
    chain = prompt | openai_server.chat_model(MODEL) | StrOutputParser()
    answer = await run(mode, chain, {"q": "what is a ledger"}, {"callbacks": [handler]})

    [row] = rows(handler.ledger)
    assert answer == "echo: what is a ledger"
    assert row["root_name"] == "RunnableSequence"
    assert row["parent_run_id"] == row["root_run_id"] != row["run_id"]
    assert row["ancestry"] == row["root_run_id"]
    assert row["tags"] == ["team-a"]  # LangChain's internal "seq:step:N" tags are left out
    assert_reconciles(handler.ledger, openai_server)


@pytest.mark.parametrize("mode", MODES)
async def test_nested_chains_keep_the_outermost_root_and_the_full_ancestry(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    inner = (
        ChatPromptTemplate.from_messages([("user", "{q}")])
        | openai_server.chat_model(MODEL)
        | StrOutputParser()
    ).with_config(run_name="inner")
    outer = (RunnableLambda(lambda q: {"q": q}) | inner).with_config(run_name="outer")

    await run(mode, outer, "nested question", {"callbacks": [handler]})

    [row] = rows(handler.ledger)
    ancestry = row["ancestry"].split("/")
    assert row["root_name"] == "outer"
    assert ancestry[0] == row["root_run_id"]
    assert ancestry[-1] == row["parent_run_id"]
    assert len(ancestry) == 2  # outer -> inner -> ChatOpenAI
    assert_reconciles(handler.ledger, openai_server)


@pytest.mark.parametrize("mode", MODES)
async def test_a_lambda_calling_the_model_twice_gives_two_rows_under_one_root(
    mode: Mode, openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)

    def twice(q: str) -> str:
        first = model.invoke(q)
        return str(model.invoke(f"again {first.content}").content)

    async def atwice(q: str) -> str:
        first = await model.ainvoke(q)
        return str((await model.ainvoke(f"again {first.content}")).content)

    lam = RunnableLambda(twice, afunc=atwice, name="twice")
    await run(mode, lam, "double", {"callbacks": [handler]})

    got = rows(handler.ledger)
    assert len(got) == 2
    assert {r["root_run_id"] for r in got} == {got[0]["parent_run_id"]}
    assert {r["root_name"] for r in got} == {"twice"}
    assert [r["input_tokens"] for r in got] == [8, 10]  # "double", then "again echo: double"
    assert_reconciles(handler.ledger, openai_server)


async def test_astream_events_over_a_chain_is_counted_once(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    chain = (
        ChatPromptTemplate.from_messages([("user", "{q}")])
        | openai_server.chat_model(MODEL, stream_usage=True)
        | StrOutputParser()
    )
    kinds = [
        e["event"]
        async for e in chain.astream_events({"q": "events please"}, {"callbacks": [handler]})
    ]

    [row] = rows(handler.ledger)
    assert kinds.count("on_chat_model_end") == 1
    assert row["streamed"] is True
    assert row["root_name"] == "RunnableSequence"
    assert_reconciles(handler.ledger, openai_server)


# -- concurrency -----------------------------------------------------------------------------


async def test_200_concurrent_ainvokes_reconcile_exactly(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)
    prompts = [" ".join(["w"] * (i % 17 + 1)) for i in range(200)]

    await asyncio.gather(*(model.ainvoke(p, {"callbacks": [handler]}) for p in prompts))

    got = rows(handler.ledger)
    assert len({r["run_id"] for r in got}) == 200
    assert sum(r["input_tokens"] for r in got) == sum(i % 17 + 1 + 7 for i in range(200))
    assert all(r["root_run_id"] == r["run_id"] for r in got)
    assert handler.in_flight == 0
    assert_reconciles(handler.ledger, openai_server)


async def test_one_handler_serves_threads_and_tasks_at_once(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    model = openai_server.chat_model(MODEL)
    config: RunnableConfig = {"callbacks": [handler]}

    def in_threads() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: model.invoke(f"thread {i}", config), range(40)))

    await asyncio.gather(
        asyncio.to_thread(in_threads),
        *(model.ainvoke(f"task {i}", config) for i in range(40)),
    )

    got = rows(handler.ledger)
    assert len(got) == 80
    assert handler.in_flight == 0
    assert_reconciles(handler.ledger, openai_server)


def test_the_handler_runs_inline() -> None:
    assert TokenLedgerHandler.run_inline is True


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("status", "error_type"), [(429, "OpenAIRateLimitError"), (500, "OpenAIAPIError")]
)
async def test_a_failed_call_is_one_error_row_with_unknown_usage(
    mode: Mode,
    status: int,
    error_type: str,
    openai_server: FakeOpenAIServer,
    handler: TokenLedgerHandler,
) -> None:
    openai_server.fail_next(status=status)
    model = openai_server.chat_model(MODEL)

    with pytest.raises(Exception, match=str(status)):
        await run(mode, model, "fail", {"callbacks": [handler]})

    [row] = rows(handler.ledger)
    assert (row["status"], row["error_type"]) == ("error", error_type)
    assert (row["input_tokens"], row["total_tokens"], row["usage_source"]) == (None, None, "none")
    assert row["notes"] == [f"http_status:{status}", "usage_unknown"]
    assert row["model"] == MODEL  # from the invocation parameters
    assert handler.in_flight == 0


def test_a_handler_fault_never_breaks_the_chain(
    openai_server: FakeOpenAIServer,
    sqlite_ledger: Ledger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = TokenLedgerHandler(sqlite_ledger)
    handler.raise_error = False  # what users get (the test suite runs strict)
    sqlite_ledger.close()  # every record() now raises LedgerError inside the callback

    with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
        message = openai_server.chat_model(MODEL).invoke("still works", {"callbacks": [handler]})

    assert message.content == "echo: still works"
    assert any("on_llm_end failed" in r.getMessage() for r in caplog.records)


def test_in_strict_mode_a_handler_fault_is_raised(
    openai_server: FakeOpenAIServer, sqlite_ledger: Ledger
) -> None:
    handler = TokenLedgerHandler(sqlite_ledger)
    sqlite_ledger.close()

    with pytest.raises(Exception, match="closed"):
        openai_server.chat_model(MODEL).invoke("strict", {"callbacks": [handler]})


class _BrokenValuesHandler(TokenLedgerHandler):
    """A handler with a bug in building a finished call's record."""

    def _parts(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        raise RuntimeError("boom")


@pytest.mark.parametrize("strict", [False, True])
def test_a_call_whose_record_cannot_be_built_is_still_written_and_the_fault_logged(
    strict: bool,
    openai_server: FakeOpenAIServer,
    sqlite_ledger: Ledger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = _BrokenValuesHandler(sqlite_ledger)
    handler.raise_error = strict
    model = openai_server.chat_model(MODEL)

    with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
        if strict:
            with pytest.raises(RuntimeError, match="boom"):
                model.invoke("a bug", {"callbacks": [handler], "run_name": "buggy"})
        else:
            model.invoke("a bug", {"callbacks": [handler], "run_name": "buggy"})
    handler.flush()

    [row] = rows(sqlite_ledger)
    assert (row["run_name"], row["model"], row["status"]) == ("buggy", MODEL, "ok")
    assert (row["total_tokens"], row["usage_source"]) == (None, "none")
    assert row["notes"] == ["record_build_failed"]
    assert any("packing a call failed" in r.getMessage() for r in caplog.records)


# -- memory ----------------------------------------------------------------------------------


async def test_per_run_state_is_dropped_when_runs_end(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | openai_server.chat_model(MODEL)
    for i in range(20):
        await chain.ainvoke({"q": f"q{i}"}, {"callbacks": [handler]})

    assert handler.in_flight == 0
    assert handler._nodes == {}
    assert len(rows(handler.ledger)) == 20


def test_runs_that_never_end_are_evicted_and_written_as_cancelled(
    sqlite_ledger: Ledger,
) -> None:
    handler = TokenLedgerHandler(sqlite_ledger, stale_after=0.001)
    lost = uuid4()
    handler.on_chat_model_start(
        {"name": "ChatOpenAI"},
        [[]],
        run_id=lost,
        metadata={"ls_provider": "openai", "ls_model_name": MODEL},
    )
    assert handler.in_flight == 1
    time.sleep(0.01)
    assert handler.evict_stale() == 1

    [row] = rows(sqlite_ledger)
    assert handler.in_flight == 0
    assert (row["run_id"], row["status"], row["model"]) == (str(lost), "cancelled", MODEL)
    assert row["notes"] == ["evicted_without_end", "usage_unknown"]


def test_stale_after_must_be_positive(sqlite_ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="stale_after"):
        TokenLedgerHandler(sqlite_ledger, stale_after=0)


async def _wait_in_flight(handler: TokenLedgerHandler, count: int) -> None:
    for _ in range(500):
        if handler.in_flight == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{handler.in_flight} calls in flight, expected {count}")


async def test_a_cancelled_chain_ends_its_llm_call_as_cancelled(
    openai_server: FakeOpenAIServer, handler: TokenLedgerHandler
) -> None:
    openai_server.delay = 2.0
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | openai_server.chat_model(MODEL)
    task = asyncio.ensure_future(chain.ainvoke({"q": "slow"}, {"callbacks": [handler]}))
    await _wait_in_flight(handler, 1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    [row] = rows(handler.ledger)
    assert (row["status"], row["usage_source"], row["input_tokens"]) == ("cancelled", "none", None)
    assert row["notes"] == ["cancelled_with_parent", "usage_unknown"]
    assert row["root_name"] == "RunnableSequence"
    assert handler.in_flight == 0


async def test_a_call_that_never_ends_is_written_when_the_ledger_closes(
    openai_server: FakeOpenAIServer, tmp_path: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'closing.db'}"
    ledger = Ledger(url)
    handler = TokenLedgerHandler(ledger)
    openai_server.delay = 2.0
    task = asyncio.ensure_future(
        openai_server.chat_model(MODEL).ainvoke("slow", {"callbacks": [handler]})
    )
    await _wait_in_flight(handler, 1)
    task.cancel()  # langchain-core reports no end event for a bare cancelled ainvoke
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.in_flight == 1

    await asyncio.to_thread(ledger.close)

    reader = Ledger(url)
    [row] = rows(reader)
    reader.close()
    assert (row["status"], row["model"]) == ("cancelled", MODEL)
    assert row["notes"] == ["unfinished_at_close", "usage_unknown"]
    assert handler.in_flight == 0


# -- fast paths give the same rows -----------------------------------------------------------


@pytest.mark.parametrize(
    "run_id",
    [uuid1(), uuid4(), uuid5(NAMESPACE_DNS, "x"), UUID(int=0), UUID(int=2**128 - 1), UUID(int=1)],
)
def test_run_ids_are_written_as_their_canonical_text(run_id: UUID) -> None:
    assert _uuid_text(run_id) == str(run_id)


class _Records:
    """A stand-in ledger that keeps what it is given."""

    _handlers = None

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


def _chat_result(usage: dict[str, Any], model: str | None = "m1") -> LLMResult:
    message = AIMessage("ok", response_metadata={"model_name": model} if model else {})
    message.usage_metadata = usage  # type: ignore[assignment]  # any shape, unvalidated
    return LLMResult(generations=[[ChatGeneration(message=message)]])


def test_metadata_with_only_langchains_keys_gives_a_copy_of_the_handlers_defaults() -> None:
    sink = _Records()
    handler = TokenLedgerHandler(cast(Ledger, sink), metadata={"user_id": "u1"})
    run_id = uuid4()
    meta = {"ls_provider": "openai", "ls_model_name": MODEL, "lc_versions": {"x": "1"}}
    handler.on_chat_model_start({"name": "Chat"}, [[]], run_id=run_id, metadata=meta)
    handler.on_llm_end(_chat_result({"input_tokens": 1, "output_tokens": 2}), run_id=run_id)

    [record] = sink.records
    assert record.metadata == {"user_id": "u1"}
    assert record.metadata is not handler.metadata
    assert (record.user_id, record.provider, record.run_id) == ("u1", "openai", str(run_id))


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 9, "output_tokens": 3}, (9, 3, 12, None, None, None, [])),
        (
            {
                "input_tokens": 9,
                "output_tokens": 3,
                "total_tokens": 13,
                "input_token_details": {"audio": 0, "cache_read": 10, "cache_creation": 1},
                "output_token_details": {"reasoning": 4},
            },
            (
                9,
                3,
                13,
                10,
                1,
                4,
                ["total_mismatch", "cache_exceeds_input", "reasoning_exceeds_output"],
            ),
        ),
        (
            {
                "input_tokens": 9,
                "output_tokens": 3,
                "input_token_details": {"priority_cache_read": 2, "cache_read": 1, "priority": 6},
                "output_token_details": {"flex_reasoning": 1, "reasoning": 1},
            },
            (9, 3, 12, 3, None, 2, []),
        ),
    ],
)
def test_plain_integer_usage_counts_as_the_general_rules_do(
    usage: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    sink = _Records()
    handler = TokenLedgerHandler(cast(Ledger, sink))
    run_id = uuid4()
    handler.on_chat_model_start({"name": "Chat"}, [[]], run_id=run_id)
    handler.on_llm_end(_chat_result(usage), run_id=run_id)

    [r] = sink.records
    got = (r.input_tokens, r.output_tokens, r.total_tokens, r.cache_read_tokens)
    got += (r.cache_creation_tokens, r.reasoning_tokens, r.notes)
    assert got == expected
    general = from_usage_metadata(MappingProxyType(usage))  # not a dict: the general path
    assert got == (
        general.input_tokens,
        general.output_tokens,
        general.total_tokens,
        general.cache_read_tokens,
        general.cache_creation_tokens,
        general.reasoning_tokens,
        general.notes,
    )
    assert r.usage_details == general.details == usage and r.usage_details is not usage
