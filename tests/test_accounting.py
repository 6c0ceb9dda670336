"""Every accounting trap of issue #4, end to end: the real ``ChatOpenAI`` against the local
OpenAI-compatible server, the real callback manager, a real ledger.

Each test compares the rows with what the server says it billed (``openai_server.reported``),
and costs with genai-prices' own ``calc_price`` (an oracle independent of our pricing code).
The rules themselves are unit-tested in ``test_usage.py``; ``docs/how_we_count.md`` states them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import genai_prices
import openai
import pytest
import tenacity
from genai_prices.types import Usage as PriceUsage
from helpers import rows
from langchain_core.caches import RETURN_VAL_TYPE, BaseCache, InMemoryCache
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumps, loads
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from langchain_tokenledger import Ledger, TokenLedgerHandler, track_usage
from langchain_tokenledger.testing import (
    FakeOpenAIServer,
    FakeUsageLLM,
    ReportedUsage,
    fake_prompt_tokens,
)

MODEL = "gpt-4o-mini"
GENAI = f"genai-prices {genai_prices.__version__}"
MODES = ["sync", "async"]


def oracle_cost(billed: ReportedUsage) -> Decimal:
    """What genai-prices charges for one response as the server billed it."""
    usage = PriceUsage(
        input_tokens=billed.prompt_tokens,
        cache_read_tokens=billed.cached_tokens,
        output_tokens=billed.completion_tokens,
    )
    tier = billed.service_tier if billed.service_tier in ("priority", "flex") else None
    context = {"service_tier": tier} if tier else None
    price = genai_prices.calc_price(
        usage, billed.model, provider_id="openai", price_context=context
    )
    return price.total_price


def assert_row_is(row: dict[str, Any], billed: ReportedUsage) -> None:
    """``row`` carries exactly what the server billed for one response."""
    assert row["model"] == billed.model
    assert row["input_tokens"] == billed.prompt_tokens
    assert row["output_tokens"] == billed.completion_tokens
    assert row["total_tokens"] == billed.total_tokens
    assert row["cache_read_tokens"] == billed.cached_tokens
    assert row["reasoning_tokens"] == billed.reasoning_tokens
    assert row["usage_source"] == "provider"
    assert row["cache_hit"] is False


async def call(mode: str, runnable: Runnable[Any, Any], value: Any, config: RunnableConfig) -> Any:
    """``invoke`` in a worker thread, or ``ainvoke``, so one test body covers both."""
    if mode == "sync":
        return await asyncio.to_thread(runnable.invoke, value, config)
    return await runnable.ainvoke(value, config)


async def consume(
    mode: str, runnable: Runnable[Any, Any], value: Any, config: RunnableConfig
) -> str:
    """``stream`` (in a worker thread) or ``astream`` to the end; the streamed text."""
    if mode == "sync":
        return await asyncio.to_thread(
            lambda: "".join(str(c.content) for c in runnable.stream(value, config))
        )
    return "".join([str(c.content) async for c in runnable.astream(value, config)])


@pytest.fixture
def handler(sqlite_ledger: Ledger) -> TokenLedgerHandler:
    return TokenLedgerHandler(sqlite_ledger)


@pytest.fixture
def config(handler: TokenLedgerHandler) -> RunnableConfig:
    return {"callbacks": [handler]}


# -- cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "cached", "reasoning", "tier"),
    [
        ("gpt-4o-mini", 0, 0, None),
        ("gpt-4o-mini", 4, 0, None),
        ("o3-mini", 4, 3, None),
        ("gpt-4o-mini", 0, 0, "priority"),
        ("gpt-4o", 4, 0, "priority"),
        ("o4-mini", 4, 5, "flex"),
    ],
)
async def test_each_row_costs_what_genai_prices_charges_for_the_billed_usage(
    ledger: Ledger,
    openai_server: FakeOpenAIServer,
    model: str,
    cached: int,
    reasoning: int,
    tier: str | None,
) -> None:
    openai_server.cached_tokens = cached
    openai_server.reasoning_tokens = reasoning
    chat = openai_server.chat_model(model, **({"service_tier": tier} if tier else {}))

    await call("async", chat, "what does this cost", {"callbacks": [TokenLedgerHandler(ledger)]})

    [row] = rows(ledger)
    [billed] = openai_server.reported
    assert_row_is(row, billed)
    assert row["cost_usd"] == oracle_cost(billed)
    assert row["price_source"] == GENAI
    assert row["notes"] == []


async def test_the_priority_tier_is_billed_at_its_own_rates(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    await call("sync", openai_server.chat_model(MODEL), "same words", config)
    await call(
        "sync", openai_server.chat_model(MODEL, service_tier="priority"), "same words", config
    )

    standard, priority = rows(handler.ledger)
    assert standard["input_tokens"] == priority["input_tokens"] == 9
    assert standard["cost_usd"] == Decimal("0.00000315")
    assert priority["cost_usd"] == Decimal("0.00000525")


async def test_a_tier_without_its_own_price_is_billed_at_the_standard_rate_and_noted(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    await call("sync", openai_server.chat_model(MODEL, service_tier="flex"), "hi", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert billed.service_tier == "flex"
    assert row["cost_usd"] == oracle_cost(billed)
    assert row["notes"] == ["service_tier_price_unavailable:flex"]


async def test_an_unknown_model_is_kept_unpriced_with_one_warning(
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="langchain_tokenledger")
    name = f"house-model-{uuid4().hex[:8]}"
    openai_server.response_model = name

    for _ in range(3):
        await call("sync", openai_server.chat_model(MODEL), "hi", config)

    got = rows(handler.ledger)
    assert [r["model"] for r in got] == [name] * 3
    assert [r["cost_usd"] for r in got] == [None] * 3
    assert [r["notes"] for r in got] == [["unknown_model"]] * 3
    assert [r["total_tokens"] for r in got] == [b.total_tokens for b in openai_server.reported]
    assert len([r for r in caplog.records if name in r.getMessage()]) == 1


async def test_a_price_table_prices_self_hosted_models(
    tmp_path: Path, openai_server: FakeOpenAIServer
) -> None:
    table = tmp_path / "prices.toml"
    table.write_text('[models."house-*"]\ninput = "2"\noutput = "8"\ncache_read = "1"\n')
    ledger = Ledger(f"sqlite:///{tmp_path / 'priced.db'}", prices=table)
    openai_server.response_model = "house-llama-70b"
    openai_server.cached_tokens = 4
    try:
        await call(
            "sync",
            openai_server.chat_model(MODEL),
            "hi",
            {"callbacks": [TokenLedgerHandler(ledger)]},
        )
        [row] = rows(ledger)
    finally:
        ledger.close()

    [billed] = openai_server.reported
    assert (billed.prompt_tokens, billed.cached_tokens, billed.completion_tokens) == (8, 4, 2)
    # (8 - 4) x $2 + 4 x $1 + 2 x $8, per million tokens
    assert row["cost_usd"] == Decimal("0.000028")
    assert row["price_source"] == "override"


async def test_a_fine_tuned_model_gets_its_fine_tune_rate(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.response_model = "ft:gpt-4o-mini-2024-07-18:acme::abc123"

    await call("sync", openai_server.chat_model(MODEL), "hi there", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert row["model"] == "ft:gpt-4o-mini-2024-07-18:acme::abc123"
    assert row["cost_usd"] == oracle_cost(billed)
    assert row["cost_usd"] == Decimal("0.0000063")  # twice the base model's rates


# -- LLM-cache hits ------------------------------------------------------------------------------


class SQLiteLLMCache(BaseCache):
    """An LLM cache in a SQLite file, storing generations serialized like langchain's SQLiteCache.

    Replayed generations go through ``dumps``/``loads``: the hit must still be recognised after
    a round trip through storage.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS cache (prompt, llm, idx, value)")
        self._lock = threading.Lock()

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        with self._lock:
            found = self._db.execute(
                "SELECT value FROM cache WHERE prompt = ? AND llm = ? ORDER BY idx",
                (prompt, llm_string),
            ).fetchall()
        if not found:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loads() is beta
            return [loads(v, allowed_objects=[ChatGeneration, AIMessage]) for (v,) in found]

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO cache VALUES (?, ?, ?, ?)",
                [(prompt, llm_string, i, dumps(g)) for i, g in enumerate(return_val)],
            )
            self._db.commit()

    def clear(self, **kwargs: Any) -> None:
        with self._lock:
            self._db.execute("DELETE FROM cache")


@pytest.fixture(params=["global", "model", "sqlite"])
def cached_model(
    request: pytest.FixtureRequest, openai_server: FakeOpenAIServer, tmp_path: Path
) -> Iterator[Runnable[Any, Any]]:
    """A ChatOpenAI whose answers come from an LLM cache after the first call."""
    if request.param == "global":
        set_llm_cache(InMemoryCache())
        try:
            yield openai_server.chat_model(MODEL)
        finally:
            set_llm_cache(None)
    elif request.param == "model":
        yield openai_server.chat_model(MODEL, cache=InMemoryCache())
    else:
        yield openai_server.chat_model(MODEL, cache=SQLiteLLMCache(tmp_path / "llm-cache.db"))


@pytest.mark.parametrize("mode", MODES)
async def test_a_cache_hit_is_a_row_that_bills_nothing(
    mode: str,
    cached_model: Runnable[Any, Any],
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    openai_server.cached_tokens = 4
    first = await call(mode, cached_model, "what is the capital of france", config)
    again = await call(mode, cached_model, "what is the capital of france", config)

    billed_call, hit = rows(handler.ledger)
    [billed] = openai_server.reported
    assert again.content == first.content
    assert_row_is(billed_call, billed)
    assert billed_call["cost_usd"] == oracle_cost(billed)
    assert hit["cache_hit"] is True
    assert hit["usage_source"] == "cache"
    assert [hit[k] for k in ("input_tokens", "output_tokens", "total_tokens")] == [0, 0, 0]
    assert [hit[k] for k in ("cache_read_tokens", "reasoning_tokens")] == [0, 0]
    assert hit["cost_usd"] == 0
    assert hit["notes"] == ["llm_cache_hit"]
    # The replayed usage is kept, so the savings can be reported.
    assert hit["usage_details"] == {**billed_call["usage_details"], "total_cost": 0}
    assert hit["usage_details"]["input_tokens"] == billed.prompt_tokens


# -- n > 1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [2, 3])
async def test_n_choices_are_one_call_billed_once(
    mode: str,
    n: int,
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    chat = openai_server.chat_model(MODEL, n=n)
    prompt = [[HumanMessage("pick a colour")]]

    if mode == "sync":
        result = await asyncio.to_thread(chat.generate, prompt, None, [handler])
    else:
        result = await chat.agenerate(prompt, callbacks=[handler])

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert len(result.generations[0]) == n
    assert billed.n == n
    assert_row_is(row, billed)
    assert row["notes"] == [f"n={n}_choices_counted_once"]


# -- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_with_usage_uses_the_providers_count(
    mode: str, handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.cached_tokens = 3
    chat = openai_server.chat_model(MODEL, stream_usage=True)

    text = await consume(mode, chat, "stream these five words please", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert text == "echo: stream these five words please"
    assert billed.usage_sent is True
    assert_row_is(row, billed)
    assert row["streamed"] is True
    assert row["cost_usd"] == oracle_cost(billed)


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_without_usage_is_estimated_with_tiktoken(
    mode: str,
    byte_encoding: Any,
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    text = await consume(mode, openai_server.chat_model(MODEL), "count me", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert billed.usage_sent is False
    # one token per byte: 3 priming + 3 per message + "user" 4 + "count me" 8; the reply's bytes
    assert (row["input_tokens"], row["output_tokens"]) == (18, len(text.encode()))
    assert row["total_tokens"] == 18 + len(text.encode())
    assert row["usage_source"] == "estimated"
    assert row["notes"] == ["estimated_tiktoken"]
    assert row["price_source"] == GENAI
    estimated = PriceUsage(input_tokens=18, output_tokens=len(text.encode()))
    assert row["cost_usd"] == genai_prices.calc_price(estimated, MODEL).total_price


@pytest.mark.parametrize("mode", MODES)
async def test_offline_a_stream_without_usage_keeps_unknown_tokens(
    mode: str,
    offline_tiktoken: Any,
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    await consume(mode, openai_server.chat_model(MODEL), "count me", config)
    await consume(mode, openai_server.chat_model(MODEL), "and me", config)

    got = rows(handler.ledger)
    assert [r["usage_source"] for r in got] == ["none", "none"]
    assert [r["total_tokens"] for r in got] == [None, None]
    assert [r["cost_usd"] for r in got] == [None, None]
    assert [r["notes"] for r in got] == [["estimate_unavailable", "usage_unknown"]] * 2
    assert offline_tiktoken.connections == 1  # the second call did not try again


@pytest.mark.parametrize("stream_usage", [True, False])
@pytest.mark.parametrize("mode", MODES)
async def test_cumulative_usage_on_every_chunk_is_not_summed(
    mode: str,
    stream_usage: bool,
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    openai_server.cumulative_stream_usage = True
    openai_server.reasoning_tokens = 2
    chat = openai_server.chat_model(MODEL, stream_usage=stream_usage)

    await consume(mode, chat, "a stream of several words", config)

    [row] = rows(handler.ledger)
    [billed] = openai_server.reported
    assert_row_is(row, billed)
    assert row["notes"] == ["cumulative_stream_usage_corrected"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_cut_midway_is_one_error_row(
    mode: str, handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.cut_next_stream(after_chunks=2)

    with pytest.raises(openai.APIConnectionError):
        await consume(
            mode, openai_server.chat_model(MODEL, stream_usage=True), "one two three", config
        )

    [row] = rows(handler.ledger)
    assert openai_server.reported == []
    assert row["status"] == "error"
    assert row["error_type"] == "OpenAIConnectionError"
    assert row["streamed"] is True
    assert (row["input_tokens"], row["total_tokens"], row["cost_usd"]) == (None, None, None)
    assert row["notes"] == ["usage_unknown"]
    assert handler.in_flight == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_cut_stream_keeps_the_usage_it_had_received(
    mode: str, handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    # A server reporting cumulative usage has told us 2 output tokens when the line drops.
    openai_server.cumulative_stream_usage = True
    openai_server.cut_next_stream(after_chunks=2)

    with pytest.raises(openai.APIConnectionError):
        await consume(mode, openai_server.chat_model(MODEL), "one two three four", config)

    [row] = rows(handler.ledger)
    prompt = fake_prompt_tokens("one two three four")
    assert row["status"] == "error"
    assert (row["input_tokens"], row["output_tokens"]) == (prompt, 2)
    assert row["usage_source"] == "provider"
    assert (
        row["cost_usd"]
        == genai_prices.calc_price(
            PriceUsage(input_tokens=prompt, output_tokens=2), MODEL
        ).total_price
    )
    assert row["notes"] == ["cumulative_stream_usage_corrected"]


def test_breaking_out_of_a_stream_leaves_a_cancelled_row(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.reply = "one two three four five six seven eight"
    chat = openai_server.chat_model(MODEL, stream_usage=True)

    for i, _ in enumerate(chat.stream("go", config)):
        if i == 2:
            break

    [row] = rows(handler.ledger)
    assert row["status"] == "cancelled"
    assert row["error_type"] == "GeneratorExit"
    assert row["usage_source"] == "none"
    assert handler.in_flight == 0


async def test_an_async_stream_closed_early_leaves_a_cancelled_row(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.reply = "one two three four five six seven eight"
    chat = openai_server.chat_model(MODEL, stream_usage=True)

    async with aclosing(chat.astream("go", config)) as stream:
        async for _ in stream:
            break

    [row] = rows(handler.ledger)
    assert (row["status"], row["error_type"]) == ("cancelled", "GeneratorExit")
    assert handler.in_flight == 0


async def test_an_async_stream_abandoned_without_aclose_ends_when_collected(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    # Breaking out of `async for` does not close an async generator; asyncio closes it once it
    # is garbage-collected. Until then the call is in flight (use aclosing() to end it at once).
    openai_server.reply = "one two three four five six seven eight"
    chat = openai_server.chat_model(MODEL, stream_usage=True)

    stream: AsyncIterator[Any] = chat.astream("go", config)
    async for _ in stream:
        break
    assert handler.in_flight == 1

    del stream
    gc.collect()
    for _ in range(100):  # the loop runs the finalizer's aclose() task
        if handler.in_flight == 0:
            break
        await asyncio.sleep(0)

    [row] = rows(handler.ledger)
    assert (row["status"], row["error_type"]) == ("cancelled", "GeneratorExit")


async def test_a_cancelled_streaming_task_leaves_a_cancelled_row(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.reply = "one two three four five six seven eight"
    openai_server.chunk_delay = 0.05
    chat = openai_server.chat_model(MODEL, stream_usage=True)
    first_chunk = asyncio.Event()

    async def read_all() -> None:
        async for _ in chat.astream("go", config):
            first_chunk.set()

    task = asyncio.create_task(read_all())
    await first_chunk.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    [row] = rows(handler.ledger)
    assert (row["status"], row["error_type"]) == ("cancelled", "CancelledError")
    assert row["usage_source"] == "none"


async def test_a_cancelled_ainvoke_gets_no_end_event_and_is_evicted_with_a_row(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    # langchain-core's agenerate awaits its gather() outside any try: a cancelled task skips
    # on_llm_error entirely. The call stays in flight until eviction writes it.
    openai_server.delay = 0.5
    task = asyncio.create_task(openai_server.chat_model(MODEL).ainvoke("slow", config))
    while openai_server.requests == 0:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.in_flight == 1

    handler.stale_after = 1e-9
    assert handler.evict_stale() == 1

    [row] = rows(handler.ledger)
    assert row["status"] == "cancelled"
    assert row["notes"] == ["evicted_without_end", "usage_unknown"]
    assert handler.in_flight == 0


# -- errors and retries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"), [(429, "OpenAIRateLimitError"), (500, "OpenAIAPIError")]
)
@pytest.mark.parametrize("mode", MODES)
async def test_an_http_error_is_one_error_row(
    mode: str,
    status: int,
    error_type: str,
    handler: TokenLedgerHandler,
    config: RunnableConfig,
    openai_server: FakeOpenAIServer,
) -> None:
    openai_server.fail_next(status)

    with pytest.raises(openai.APIStatusError):
        await call(mode, openai_server.chat_model(MODEL), "hi", config)

    [row] = rows(handler.ledger)
    assert (row["status"], row["error_type"], row["model"]) == ("error", error_type, MODEL)
    assert (row["input_tokens"], row["cost_usd"]) == (None, None)
    assert row["notes"] == [f"http_status:{status}", "usage_unknown"]


@pytest.mark.parametrize("mode", MODES)
async def test_with_retry_records_every_attempt_under_one_root(
    mode: str, handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    openai_server.fail_next(429, times=2)
    chat = openai_server.chat_model(MODEL).with_retry(
        stop_after_attempt=3, wait_exponential_jitter=False
    )

    await call(mode, chat, "third time lucky", config)

    got = rows(handler.ledger)
    [billed] = openai_server.reported
    assert [r["status"] for r in got] == ["error", "error", "ok"]
    # The retry wrapper is the root (its run takes the model's name); each attempt is a child.
    [root] = {r["root_run_id"] for r in got}
    assert [r["parent_run_id"] for r in got] == [root] * 3
    assert root not in {r["run_id"] for r in got}
    assert_row_is(got[2], billed)
    assert sum(r["total_tokens"] or 0 for r in got) == billed.total_tokens


async def test_tenacity_retries_are_one_row_per_attempt(
    handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    chat = openai_server.chat_model(MODEL)

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        retry=tenacity.retry_if_exception_type(openai.RateLimitError),
        wait=tenacity.wait_none(),
    )
    def ask() -> Any:
        return chat.invoke("hi", config)

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        retry=tenacity.retry_if_exception_type(openai.RateLimitError),
        wait=tenacity.wait_none(),
    )
    async def aask() -> Any:
        return await chat.ainvoke("hi", config)

    openai_server.fail_next(429, times=2)
    await asyncio.to_thread(ask)
    openai_server.fail_next(429, times=1)
    await aask()

    got = rows(handler.ledger)
    assert [r["status"] for r in got] == ["error", "error", "ok", "error", "ok"]
    assert len({r["root_run_id"] for r in got}) == 5  # each attempt is its own top-level call
    assert [r["total_tokens"] for r in got if r["status"] == "ok"] == [
        b.total_tokens for b in openai_server.reported
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_fallbacks_record_the_failing_primary_and_the_answering_fallback(
    mode: str, handler: TokenLedgerHandler, config: RunnableConfig, openai_server: FakeOpenAIServer
) -> None:
    chat = openai_server.chat_model(MODEL).with_fallbacks([openai_server.chat_model("gpt-4o")])
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | chat

    openai_server.fail_next(500)
    await call(mode, chain, {"q": "hi"}, config)
    openai_server.fail_next(500)
    await call(mode, chat, "hi", config)

    primary, fallback, top_primary, top_fallback = rows(handler.ledger)
    billed, top_billed = openai_server.reported
    assert (primary["model"], primary["status"], primary["total_tokens"]) == (MODEL, "error", None)
    assert (fallback["model"], fallback["status"]) == ("gpt-4o", "ok")
    assert_row_is(fallback, billed)
    assert primary["root_run_id"] == fallback["root_run_id"]
    assert fallback["root_name"] == "RunnableSequence"
    # At top level, langchain-core 1.x starts both attempts outside the fallbacks run (it passes
    # the caller's config, not the child config): two rows all the same, each its own root.
    assert [top_primary["status"], top_fallback["status"]] == ["error", "ok"]
    assert [top_primary["parent_run_id"], top_fallback["parent_run_id"]] == [None, None]
    assert_row_is(top_fallback, top_billed)


# -- batches ---------------------------------------------------------------------------------------


QUESTIONS = ["one", "one two", "one two three", "one two three four", "one two three four five"]


@pytest.mark.parametrize("mode", MODES)
async def test_batch_with_max_concurrency_is_one_row_per_input_each_under_its_own_root(
    mode: str, handler: TokenLedgerHandler, openai_server: FakeOpenAIServer
) -> None:
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | openai_server.chat_model(MODEL)
    config: RunnableConfig = {"callbacks": [handler], "max_concurrency": 2}
    inputs = [{"q": q} for q in QUESTIONS]

    if mode == "sync":
        await asyncio.to_thread(chain.batch, inputs, config)
    else:
        await chain.abatch(inputs, config)

    got = rows(handler.ledger)
    assert len(got) == 5
    assert len({r["root_run_id"] for r in got}) == 5
    assert {r["root_name"] for r in got} == {"RunnableSequence"}
    assert all(r["parent_run_id"] == r["root_run_id"] for r in got)
    billed = sorted(openai_server.reported, key=lambda b: b.prompt_tokens)
    assert sorted(r["input_tokens"] for r in got) == [b.prompt_tokens for b in billed]
    assert sorted(r["input_tokens"] for r in got) == [fake_prompt_tokens(q) for q in QUESTIONS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.filterwarnings("ignore:Unexpected type for token usage")  # langchain-openai's merge
async def test_generate_with_several_prompts_is_one_row_per_prompt(
    mode: str, handler: TokenLedgerHandler, openai_server: FakeOpenAIServer
) -> None:
    chat = openai_server.chat_model(MODEL)
    prompts = [[HumanMessage(q)] for q in QUESTIONS[:3]]

    def in_a_chain(_: Any, config: RunnableConfig) -> None:
        chat.generate(prompts, callbacks=config["callbacks"])

    async def ain_a_chain(_: Any, config: RunnableConfig) -> None:
        await chat.agenerate(prompts, callbacks=config["callbacks"])

    chain = RunnableLambda(in_a_chain, afunc=ain_a_chain, name="asker")
    if mode == "sync":
        await asyncio.to_thread(chat.generate, prompts, None, [handler])
        await asyncio.to_thread(chain.invoke, None, {"callbacks": [handler]})
    else:
        await chat.agenerate(prompts, callbacks=[handler])
        await chain.ainvoke(None, {"callbacks": [handler]})

    got = rows(handler.ledger)
    top, nested = got[:3], got[3:]
    assert [r["root_run_id"] for r in top] == [r["run_id"] for r in top]
    assert len({r["root_run_id"] for r in nested}) == 1
    assert {r["root_name"] for r in nested} == {"asker"}
    billed = sorted(b.prompt_tokens for b in openai_server.reported)
    assert sorted(r["input_tokens"] for r in got) == billed


# -- completion-style LLMs -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_completion_llms_are_recorded_from_llm_output(
    mode: str, handler: TokenLedgerHandler
) -> None:
    llm = FakeUsageLLM(input_tokens=4, output_tokens=2)
    config: RunnableConfig = {"callbacks": [handler]}

    await call(mode, llm, "hi", config)

    [row] = rows(handler.ledger)
    assert (row["model"], row["input_tokens"], row["output_tokens"]) == (
        "gpt-3.5-turbo-instruct",
        4,
        2,
    )
    assert row["usage_source"] == "provider"
    assert (
        row["cost_usd"]
        == genai_prices.calc_price(
            PriceUsage(input_tokens=4, output_tokens=2), "gpt-3.5-turbo-instruct"
        ).total_price
    )


@pytest.mark.parametrize("mode", MODES)
async def test_a_multi_prompt_completion_request_is_billed_on_its_first_prompt(
    mode: str, handler: TokenLedgerHandler
) -> None:
    llm = FakeUsageLLM(input_tokens=4, output_tokens=2)
    prompts = ["a", "b", "c", "d", "e"]
    config: RunnableConfig = {"callbacks": [handler], "max_concurrency": 2}

    # BaseLLM.batch sends max_concurrency prompts per request: requests of 2, 2 and 1 prompts.
    if mode == "sync":
        await asyncio.to_thread(llm.batch, prompts, config)
    else:
        await llm.abatch(prompts, config)

    got = rows(handler.ledger)
    assert len(got) == 5
    assert sorted((r["input_tokens"] or 0, r["output_tokens"] or 0) for r in got) == [
        (0, 0),
        (0, 0),
        (4, 2),
        (8, 4),
        (8, 4),
    ]
    followers = [r for r in got if r["input_tokens"] is None]
    assert [r["notes"] for r in followers] == [
        ["usage_billed_on_first_prompt_of_batch", "usage_unknown"]
    ] * 2
    assert (
        sorted(r["notes"] for r in got if r["input_tokens"] == 8)
        == [["usage_covers_batch_of_2"]] * 2
    )
    assert sum(r["input_tokens"] or 0 for r in got) == 5 * 4
    assert sum(r["total_tokens"] or 0 for r in got) == 5 * 6


# -- odd payloads --------------------------------------------------------------------------------


class OddChatModel(BaseChatModel):
    """A chat model whose provider reports whatever the test says."""

    usage_metadata: dict[str, Any] | None = None
    token_usage: dict[str, Any] | None = None
    model_name: str | None = None

    @property
    def _llm_type(self) -> str:
        return "odd-chat"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        meta = {"model_name": self.model_name} if self.model_name else {}
        message = AIMessage("ok", usage_metadata=self.usage_metadata, response_metadata=meta)
        llm_output = {"token_usage": self.token_usage} if self.token_usage is not None else None
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output=llm_output)


ODD_PAYLOADS = {
    "negative": (
        OddChatModel(
            model_name=MODEL,
            usage_metadata={"input_tokens": -5, "output_tokens": 3, "total_tokens": -2},
        ),
        (None, 3, None),
        None,
        ["negative_count:input_tokens", "negative_count:total_tokens"],
    ),
    "fractional": (
        OddChatModel(model_name=MODEL, token_usage={"prompt_tokens": 4.5, "completion_tokens": 2}),
        (None, 2, None),
        None,
        ["non_integer_count:input_tokens"],
    ),
    "total-mismatch": (  # priced from input and output, the parts that have rates
        OddChatModel(
            model_name=MODEL,
            usage_metadata={"input_tokens": 9, "output_tokens": 3, "total_tokens": 15},
        ),
        (9, 3, 15),
        Decimal("0.00000315"),
        ["total_mismatch"],
    ),
    "no-model": (
        OddChatModel(usage_metadata={"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}),
        (9, 3, 12),
        None,
        ["no_model"],
    ),
    "no-usage": (
        OddChatModel(model_name="house-model"),
        (None, None, None),
        None,
        ["estimate_unavailable", "usage_unknown"],
    ),
}


@pytest.mark.parametrize(
    ("model", "tokens", "cost", "notes"), ODD_PAYLOADS.values(), ids=ODD_PAYLOADS.keys()
)
def test_odd_payloads_keep_the_row_and_record_the_anomaly(
    model: OddChatModel,
    tokens: tuple[int | None, int | None, int | None],
    cost: Decimal | None,
    notes: list[str],
    handler: TokenLedgerHandler,
    config: RunnableConfig,
) -> None:
    assert model.invoke("hi", config).content == "ok"

    [row] = rows(handler.ledger)
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == tokens
    assert row["status"] == "ok"
    assert row["cost_usd"] == cost
    assert row["notes"] == notes


# -- double attachment ---------------------------------------------------------------------------


async def test_the_same_ledger_reached_twice_for_one_call_writes_one_row(
    sqlite_ledger: Ledger, openai_server: FakeOpenAIServer
) -> None:
    outer, inner = TokenLedgerHandler(sqlite_ledger), TokenLedgerHandler(sqlite_ledger)
    chat = openai_server.chat_model(MODEL).with_config(callbacks=[inner])

    await call("sync", chat, "hi", {"callbacks": [outer, outer]})
    with track_usage(sqlite_ledger):
        await call("async", openai_server.chat_model(MODEL), "hi", {"callbacks": [outer]})

    got = rows(sqlite_ledger)
    assert len(got) == 2
    assert [r["total_tokens"] for r in got] == [b.total_tokens for b in openai_server.reported]
