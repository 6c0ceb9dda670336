"""``track_usage``: every LLM call made inside a block is recorded, and nothing outside it.

The calls go through the real ``ChatOpenAI`` to the local server, whose billing rule makes a
single user message of ``w`` words cost ``w + 7`` prompt tokens and ``w + 1`` completion tokens
(the reply is ``"echo: " + message``): "hello there" is 9 + 3 = 12 tokens, "how many tokens is
this" 12 + 6 = 18. gpt-4o-mini costs $0.15 / $0.60 per million input / output tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import openai
import pytest
from helpers import committed_rows, rows
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.tools import tool
from langchain_core.tracers.context import _configure_hooks

from langchain_tokenledger import (
    Ledger,
    TokenLedgerHandler,
    UsageSummary,
    UsageTracker,
    track_usage,
)
from langchain_tokenledger.context import _current
from langchain_tokenledger.testing import (
    FakeOpenAIServer,
    fake_completion_tokens,
    fake_prompt_tokens,
)

MODEL = "gpt-4o-mini"
PROMPT = ChatPromptTemplate.from_messages([("user", "{q}")])
FORMS = ["with", "async with"]


def billed(text: str) -> int:
    """Total tokens the local server bills for one user message ``text``."""
    return fake_prompt_tokens(text) + fake_completion_tokens(f"echo: {text}")


@contextlib.asynccontextmanager
async def block(form: str, tracker: UsageTracker) -> AsyncIterator[UsageSummary]:
    """Enter ``tracker`` as ``with`` or as ``async with``, so one test body covers both."""
    if form == "with":
        with tracker as usage:
            yield usage
    else:
        async with tracker as usage:
            yield usage


@pytest.fixture
def model(openai_server: FakeOpenAIServer) -> Runnable[Any, Any]:
    return openai_server.chat_model(MODEL)


# -- the issue's example ---------------------------------------------------------------------


async def test_the_example_from_the_issue_on_every_backend(
    ledger: Ledger, openai_server: FakeOpenAIServer
) -> None:
    model = openai_server.chat_model(MODEL)
    chain = PROMPT | model | StrOutputParser()
    other_chain = PROMPT | model | StrOutputParser()
    root_run_id = uuid4()

    with track_usage(ledger, tags=["nightly"], metadata={"user_id": "u1"}) as usage:
        chain.invoke({"q": "hello there"}, {"run_id": root_run_id})
        await other_chain.ainvoke({"q": "how many tokens is this"})

    got = committed_rows(ledger)  # durable on exit: no flush needed
    assert len(got) == 2
    assert [r["total_tokens"] for r in got] == [12, 18]
    assert [r["tags"] for r in got] == [["nightly"], ["nightly"]]
    assert [r["user_id"] for r in got] == ["u1", "u1"]
    assert got[0]["root_run_id"] == str(root_run_id)

    assert (usage.total_tokens, usage.prompt_tokens, usage.completion_tokens) == (30, 21, 9)
    assert (usage.successful_requests, usage.failed_requests) == (2, 0)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (0, 0)
    assert usage.by_model[MODEL].total_tokens == 30
    assert usage.by_run[root_run_id][MODEL].total_tokens == 12
    assert usage.by_run[str(root_run_id)][MODEL].prompt_tokens == 9
    # 21 * 0.15 + 9 * 0.60 = 8.55 dollars per million tokens
    assert usage.total_cost == Decimal("0.00000855")
    assert usage.total_cost == sum(r["cost_usd"] for r in got)
    assert str(usage) == (
        "Tokens Used: 30\n"
        "\tPrompt Tokens: 21\n"
        "\t\tPrompt Tokens Cached: 0\n"
        "\tCompletion Tokens: 9\n"
        "\t\tReasoning Tokens: 0\n"
        "Successful Requests: 2\n"
        "Failed Requests: 0\n"
        "LLM Cache Hits: 0\n"
        "Total Cost (USD): $0.00000855"
    )


@pytest.mark.parametrize("form", FORMS)
async def test_rows_are_committed_when_the_block_exits(
    form: str, sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    async with block(form, track_usage(sqlite_ledger)) as usage:
        await model.ainvoke("hello there")
        model.invoke("how many tokens is this")

    assert sqlite_ledger.pending == 0
    assert [r["total_tokens"] for r in committed_rows(sqlite_ledger)] == [12, 18]
    assert usage.total_tokens == 30


# -- what is inside a block ------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_calls_made_anywhere_inside_the_block_are_recorded_and_none_outside(
    form: str, sqlite_ledger: Ledger, openai_server: FakeOpenAIServer, model: Runnable[Any, Any]
) -> None:
    @tool
    def ask(question: str) -> str:
        """Ask the model."""
        return str(model.invoke(question).content)

    # The lambda calls the model without passing a config: LangChain's context carries it.
    sub_chain = PROMPT | RunnableLambda(lambda prompt: model.invoke(prompt.to_messages()))

    model.invoke("before the block")
    async with block(form, track_usage(sqlite_ledger)) as usage:
        sub_chain.invoke({"q": "one"})  # 8 + 2 = 10
        ask.invoke({"question": "one two"})  # 9 + 3 = 12
        model.batch(["a b c", "a b c d"])  # worker threads: 14 + 16
        tasks = [asyncio.create_task(model.ainvoke(q)) for q in ("x " * 5, "x " * 6)]
        await asyncio.gather(*tasks)  # asyncio tasks: 18 + 20
    model.invoke("after the block")

    assert openai_server.totals()["calls"] == 8
    assert usage.successful_requests == 6
    assert usage.total_tokens == 10 + 12 + 14 + 16 + 18 + 20
    assert sorted(r["total_tokens"] for r in rows(sqlite_ledger)) == [10, 12, 14, 16, 18, 20]


async def test_a_task_started_inside_a_block_is_recorded_even_if_it_ends_after_it(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    with track_usage(sqlite_ledger) as usage:
        task = asyncio.create_task(model.ainvoke("hello there"))
    await task

    assert usage.total_tokens == 12
    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12]


def test_a_plain_thread_does_not_inherit_the_block_unless_given_its_context(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    with track_usage(sqlite_ledger) as usage:
        bare = threading.Thread(target=model.invoke, args=("not tracked",))
        bare.start()
        bare.join()
        context = contextvars.copy_context()
        carried = threading.Thread(target=context.run, args=(model.invoke, "hello there"))
        carried.start()
        carried.join()

    assert usage.successful_requests == 1
    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12]


# -- nesting ---------------------------------------------------------------------------------


def test_an_inner_call_counts_in_every_enclosing_block_and_is_written_once(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    with track_usage(sqlite_ledger, tags=["outer"], metadata={"user_id": "u1"}) as outer:
        model.invoke("hello there")
        with track_usage(sqlite_ledger, tags=["inner"], metadata={"feature": "qa"}) as inner:
            model.invoke("how many tokens is this")

    got = rows(sqlite_ledger)
    assert [r["total_tokens"] for r in got] == [12, 18]
    assert [r["tags"] for r in got] == [["outer"], ["outer", "inner"]]
    assert [r["metadata"] for r in got] == [{"user_id": "u1"}, {"user_id": "u1", "feature": "qa"}]
    assert (outer.total_tokens, outer.successful_requests) == (30, 2)
    assert (inner.total_tokens, inner.successful_requests) == (18, 1)


def test_nested_blocks_on_different_ledgers_give_each_ledger_the_row_once(
    sqlite_ledger: Ledger, tmp_path: Path, model: Runnable[Any, Any]
) -> None:
    with Ledger(f"sqlite:///{tmp_path / 'team.db'}") as team_ledger:
        with track_usage(sqlite_ledger) as outer:
            model.invoke("hello there")
            with track_usage(team_ledger) as inner:
                model.invoke("how many tokens is this")
            # durable in both ledgers when the inner block exits
            assert [r["total_tokens"] for r in committed_rows(team_ledger)] == [18]
            assert [r["total_tokens"] for r in committed_rows(sqlite_ledger)] == [12, 18]

        assert [r["total_tokens"] for r in rows(team_ledger)] == [18]
    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12, 18]
    assert (outer.total_tokens, inner.total_tokens) == (30, 18)
    assert outer.total_cost == Decimal("0.00000855")
    assert inner.total_cost == Decimal("0.00000540")


@pytest.mark.parametrize("inner_ledger", ["same ledger", "its own ledger"])
def test_a_block_entered_inside_a_running_chain_keeps_the_chains_root(
    inner_ledger: str, sqlite_ledger: Ledger, tmp_path: Path, model: Runnable[Any, Any]
) -> None:
    team_ledger = Ledger(f"sqlite:///{tmp_path / 'team.db'}")
    ledger_for_inner = sqlite_ledger if inner_ledger == "same ledger" else team_ledger
    inner_totals: list[int] = []

    def answer(question: str) -> str:
        with track_usage(ledger_for_inner, tags=["inner"]) as inner:
            reply = str(model.invoke(question).content)
        inner_totals.append(inner.total_tokens)
        return reply

    root_run_id = uuid4()
    with track_usage(sqlite_ledger, tags=["outer"]) as outer:
        RunnableLambda(answer).invoke("hello there", {"run_id": root_run_id})

    # The outer handler (inherited through the chain) and the inner one both saw the call:
    # the inner one wrote it, once per ledger, with both blocks' tags and the chain's run tree.
    [row] = rows(sqlite_ledger)
    assert rows(ledger_for_inner) == [row]
    assert row["tags"] == ["outer", "inner"]
    assert (row["root_run_id"], row["parent_run_id"]) == (str(root_run_id), str(root_run_id))
    assert (row["root_name"], row["ancestry"]) == ("answer", str(root_run_id))
    assert inner_totals == [12]
    assert outer.total_tokens == 12
    assert list(outer.by_run) == [str(root_run_id)]
    team_ledger.close()


def test_a_handler_passed_in_callbacks_and_a_block_write_one_row(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    handler = TokenLedgerHandler(sqlite_ledger)
    with track_usage(sqlite_ledger) as usage:
        model.invoke("hello there", {"callbacks": [handler]})

    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12]
    assert (usage.successful_requests, usage.total_tokens) == (1, 12)


# -- isolation -------------------------------------------------------------------------------


async def test_100_concurrent_tasks_each_see_exactly_their_own_calls(
    sqlite_ledger: Ledger, openai_server: FakeOpenAIServer
) -> None:
    model = openai_server.chat_model(MODEL)

    async def worker(i: int) -> tuple[UsageSummary, str]:
        question = "w " * (i + 1)  # a different size per task, so totals tell them apart
        async with track_usage(sqlite_ledger, metadata={"worker": i}) as usage:
            await model.ainvoke(question)
            await asyncio.sleep(0)  # let the others interleave inside their blocks
            await model.ainvoke(question)
        return usage, question

    results = await asyncio.gather(*(worker(i) for i in range(100)))

    for usage, question in results:
        assert usage.successful_requests == 2
        assert usage.total_tokens == 2 * billed(question)
    run_ids = [r.run_id for usage, _ in results for r in usage.records]
    assert len(set(run_ids)) == 200
    got = rows(sqlite_ledger)
    assert len(got) == 200
    assert {r["run_id"] for r in got} == set(run_ids)
    for i, (usage, _) in enumerate(results):
        assert {r.metadata["worker"] for r in usage.records} == {i}


def test_blocks_in_a_thread_pool_each_see_exactly_their_own_calls(
    sqlite_ledger: Ledger, openai_server: FakeOpenAIServer
) -> None:
    model = openai_server.chat_model(MODEL)

    def worker(i: int) -> tuple[UsageSummary, str]:
        question = "w " * (i + 1)
        with track_usage(sqlite_ledger) as usage:
            model.invoke(question)
            model.invoke(question)
        return usage, question

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(worker, range(100)))

    for usage, question in results:
        assert usage.successful_requests == 2
        assert usage.total_tokens == 2 * billed(question)
    assert len({r.run_id for usage, _ in results for r in usage.records}) == 200
    assert len(rows(sqlite_ledger)) == 200


def test_entering_a_block_registers_nothing(sqlite_ledger: Ledger) -> None:
    hooks_before = len(_configure_hooks)
    for _ in range(10_000):
        with track_usage(sqlite_ledger):
            pass

    assert len(_configure_hooks) == hooks_before
    assert sum(1 for hook in _configure_hooks if hook[0] is _current) == 1
    assert _current.get() is None


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_a_failed_call_is_recorded_and_its_error_raised_unchanged(
    form: str, sqlite_ledger: Ledger, openai_server: FakeOpenAIServer, model: Runnable[Any, Any]
) -> None:
    openai_server.fail_next(500)
    tracker = track_usage(sqlite_ledger)
    with pytest.raises(openai.InternalServerError) as raised:
        async with block(form, tracker):
            await model.ainvoke("hello there")

    assert raised.value.status_code == 500
    [row] = committed_rows(sqlite_ledger)
    # langchain-openai raises its own InternalServerError subclass; the row names that class.
    assert (row["status"], row["error_type"]) == ("error", type(raised.value).__name__)
    assert row["error_type"] == "OpenAIAPIError"
    assert (tracker.usage.failed_requests, tracker.usage.successful_requests) == (1, 0)


def test_the_blocks_own_exception_passes_through_after_its_rows_are_committed(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    error = ValueError("the user's own bug")
    with pytest.raises(ValueError) as raised, track_usage(sqlite_ledger) as usage:
        model.invoke("hello there")
        raise error

    assert raised.value is error
    assert [r["total_tokens"] for r in committed_rows(sqlite_ledger)] == [12]
    assert usage.total_tokens == 12


# -- the tracker object ----------------------------------------------------------------------


def test_usage_stays_readable_and_a_tracker_can_be_entered_again(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    tracker = track_usage(sqlite_ledger)
    with tracker as first:
        model.invoke("hello there")
    model.invoke("between the blocks")
    with tracker as second:
        model.invoke("how many tokens is this")

    assert first is second is tracker.usage
    assert (tracker.usage.successful_requests, tracker.usage.total_tokens) == (2, 30)


def test_an_active_tracker_cannot_be_entered_again(sqlite_ledger: Ledger) -> None:
    tracker = track_usage(sqlite_ledger)
    with tracker, pytest.raises(RuntimeError, match="already active"), tracker:
        pass


def test_without_a_ledger_the_default_ledger_is_used(
    default_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    with track_usage() as usage:
        model.invoke("hello there")

    assert [r["total_tokens"] for r in committed_rows(default_ledger)] == [12]
    assert usage.total_tokens == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tags": "nightly"}, r"tags must be a list of strings, not a string: use tags=\['n"),
        ({"tags": ["ok", 3]}, "tags must be strings; got 3"),
        ({"metadata": [("user_id", "u1")]}, "metadata must be a mapping, not list"),
        ({"metadata": {1: "x"}}, "metadata keys must be strings; got 1"),
        ({"ledger": "sqlite:///x.db"}, r"ledger must be a Ledger or None, not str \(create"),
    ],
)
def test_bad_arguments_fail_when_the_block_is_made(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        track_usage(**kwargs)
