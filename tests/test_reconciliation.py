"""The ledger reconciles with the bill: a mixed, concurrent workload of 725 LLM calls.

Sync calls (in a thread pool) and async calls (``asyncio.gather``) run at the same time through
one handler into one ledger, on every backend: invoke/ainvoke, stream/astream with usage,
batch/abatch with ``max_concurrency``, ``generate`` with several prompts, ``n=2``, cached and
reasoning token details, the priority tier, cumulative stream usage, rate limits absorbed by
``with_retry``, fallbacks, tenacity retries, plain 429s, streams cut midway, LLM-cache hits, a
second handler on the same ledger, and a completion-style LLM. Then, for every model, the
ledger's sums of billed input, output, cached and reasoning tokens and of cost equal what the
local server billed (cost per genai-prices' own ``calc_price``), and there is one row per call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import genai_prices
import openai
import pytest
import sqlalchemy as sa
import tenacity
from genai_prices.types import Usage as PriceUsage
from langchain_core.caches import InMemoryCache
from langchain_core.messages import HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig

from langchain_tokenledger import Ledger, TokenLedgerHandler
from langchain_tokenledger.query import money
from langchain_tokenledger.schema import llm_calls
from langchain_tokenledger.testing import FakeOpenAIServer, FakeUsageLLM, ReportedUsage

MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini")
COMPLETION_MODEL = "gpt-3.5-turbo-instruct"
PROMPT = ChatPromptTemplate.from_messages([("user", "{q}")])

EXPECTED_CALLS = 725
EXPECTED_ERRORS = 40  # 15 absorbed by with_retry, 10 fallback primaries, 5 + 5 + 5 more below
CACHE_HITS = 30
COMPLETION_PROMPTS = 40

REASONS = ("usage_unknown", "unknown_model", "no_model", "invalid_usage", "negative_count")
"""Notes that explain a NULL cost."""


def question(i: int) -> str:
    """Prompts of varying length, so that every call bills differently."""
    return " ".join(["word"] * (1 + i % 7)) + f" number {i}"


class Workload:
    """The calls of the test, grouped into phases; every call goes through one ``config``."""

    def __init__(self, server: FakeOpenAIServer, config: RunnableConfig) -> None:
        self.server = server
        self.config = config
        self.chat = {m: server.chat_model(m) for m in MODELS}
        self.streaming = {m: server.chat_model(m, stream_usage=True) for m in MODELS}
        self.pool = ThreadPoolExecutor(max_workers=8)

    def model(self, i: int) -> str:
        return MODELS[i % len(MODELS)]

    async def in_threads(self, jobs: Sequence[Callable[[], Any]]) -> None:
        """Run ``jobs`` in the thread pool, 8 at a time, while the event loop keeps going."""
        futures = [self.pool.submit(job) for job in jobs]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    # -- phase 1: everyday traffic, sync and async at once (430 calls) --------------------------

    def everyday_sync(self) -> list[Callable[[], Any]]:
        c = self.config
        jobs: list[Callable[[], Any]] = []
        for i in range(100):
            jobs.append(lambda i=i: self.chat[self.model(i)].invoke(question(i), c))
        for i in range(50):
            jobs.append(lambda i=i: list(self.streaming[self.model(i)].stream(question(i), c)))
        for i in range(10):
            n2 = self.server.chat_model(self.model(i), n=2)
            jobs.append(lambda n2=n2, i=i: n2.invoke(question(i), c))
        for i in range(10):
            prompts = [[HumanMessage(question(i + k))] for k in range(3)]
            chat = self.chat[self.model(i)]
            jobs.append(lambda p=prompts, m=chat: m.generate(p, callbacks=c["callbacks"]))
        chain = PROMPT | self.chat["gpt-4o-mini"]
        batch = [{"q": question(i)} for i in range(40)]
        jobs.append(lambda: chain.batch(batch, {**c, "max_concurrency": 8}))
        return jobs

    def everyday_async(self) -> list[Awaitable[Any]]:
        c = self.config
        calls: list[Awaitable[Any]] = []
        for i in range(100):
            calls.append(self.chat[self.model(i)].ainvoke(question(i), c))
        for i in range(50):
            calls.append(drain(self.streaming[self.model(i)], question(i), c))
        for i in range(10):
            calls.append(self.server.chat_model(self.model(i), n=2).ainvoke(question(i), c))
        chain = PROMPT | self.chat["gpt-4o"]
        batch = [{"q": question(i)} for i in range(40)]
        calls.append(chain.abatch(batch, {**c, "max_concurrency": 8}))
        return calls

    # -- phase 2: cumulative stream usage and the priority tier (120 calls) ---------------------

    def tiered_sync(self) -> list[Callable[[], Any]]:
        c = self.config
        priority = {m: self.server.chat_model(m, service_tier="priority") for m in MODELS}
        jobs: list[Callable[[], Any]] = []
        for i in range(30):
            jobs.append(lambda i=i: list(self.streaming[self.model(i)].stream(question(i), c)))
            jobs.append(lambda i=i: priority[self.model(i)].invoke(question(i), c))
        return jobs

    def tiered_async(self) -> list[Awaitable[Any]]:
        c = self.config
        priority = {m: self.server.chat_model(m, service_tier="priority") for m in MODELS}
        calls: list[Awaitable[Any]] = []
        for i in range(30):
            calls.append(drain(self.chat[self.model(i)], question(i), c))  # usage every chunk
            calls.append(priority[self.model(i)].ainvoke(question(i), c))
        return calls

    # -- phase 3: failures (95 calls, 40 of them errors) ----------------------------------------

    async def failures(self) -> None:
        c = self.config
        server = self.server
        patient = self.chat["gpt-4o-mini"].with_retry(
            stop_after_attempt=20, wait_exponential_jitter=False
        )
        server.fail_next(429, times=15)  # spread over 40 concurrent callers, all retried
        await asyncio.gather(
            self.in_threads([lambda i=i: patient.invoke(question(i), c) for i in range(20)]),
            *(patient.ainvoke(question(i), c) for i in range(20)),
        )

        with_fallback = PROMPT | self.chat["gpt-4o"].with_fallbacks([self.chat["o3-mini"]])
        for i in range(5):
            server.fail_next(500)
            await asyncio.to_thread(with_fallback.invoke, {"q": question(i)}, c)
            server.fail_next(500)
            await with_fallback.ainvoke({"q": question(i)}, c)

        for i in range(5):
            server.fail_next(429)
            with pytest.raises(openai.RateLimitError):
                await self.chat["o3-mini"].ainvoke(question(i), c)

        @tenacity.retry(
            stop=tenacity.stop_after_attempt(2),
            retry=tenacity.retry_if_exception_type(openai.RateLimitError),
            wait=tenacity.wait_none(),
        )
        def ask(i: int) -> Any:
            return self.chat["gpt-4o"].invoke(question(i), c)

        for i in range(5):
            server.fail_next(429)
            await asyncio.to_thread(ask, i)

        for i in range(5):
            server.cut_next_stream(after_chunks=1)
            with pytest.raises(openai.APIConnectionError):
                await drain(self.streaming["gpt-4o-mini"], question(i), c)

    # -- phase 4: LLM-cache hits (40 calls, 30 of them free) -------------------------------------

    async def cached(self) -> None:
        c = self.config
        chat = self.server.chat_model("gpt-4o", cache=InMemoryCache())
        for i in range(10):
            await chat.ainvoke(question(i), c)  # billed once, then cached
        await asyncio.gather(
            self.in_threads([lambda i=i: chat.invoke(question(i % 10), c) for i in range(15)]),
            *(chat.ainvoke(question(i % 10), c) for i in range(15)),
        )

    # -- phase 5: a completion-style LLM, not on the server (40 calls) ---------------------------

    async def completions(self) -> FakeUsageLLM:
        llm = FakeUsageLLM(model_name=COMPLETION_MODEL, input_tokens=11, output_tokens=5)
        prompts = [question(i) for i in range(20)]
        await asyncio.gather(
            asyncio.to_thread(llm.batch, prompts, {**self.config, "max_concurrency": 4}),
            llm.abatch(prompts, {**self.config, "max_concurrency": 3}),
        )
        return llm


async def drain(runnable: Runnable[Any, Any], value: Any, config: RunnableConfig) -> None:
    async for _ in runnable.astream(value, config):
        pass


def oracle_cost(billed: ReportedUsage) -> Decimal:
    """genai-prices' price of one billed response, at the column's 12 places."""
    usage = PriceUsage(
        input_tokens=billed.prompt_tokens,
        cache_read_tokens=billed.cached_tokens,
        output_tokens=billed.completion_tokens,
    )
    context = {"service_tier": billed.service_tier} if billed.service_tier == "priority" else None
    price = genai_prices.calc_price(
        usage, billed.model, provider_id="openai", price_context=context
    )
    return money(price.total_price)


def billed_sums(ledger: Ledger) -> dict[str, dict[str, int]]:
    """Per model: provider-reported rows and the sums of their billed token columns (SQL)."""
    c = llm_calls.c
    stmt = (
        sa.select(
            c.model,
            sa.func.count().label("calls"),
            sa.func.sum(c.input_tokens).label("prompt_tokens"),
            sa.func.sum(c.output_tokens).label("completion_tokens"),
            sa.func.sum(c.total_tokens).label("total_tokens"),
            sa.func.sum(c.cache_read_tokens).label("cached_tokens"),
            sa.func.sum(c.reasoning_tokens).label("reasoning_tokens"),
        )
        .where(c.cache_hit.is_(False), c.usage_source == "provider")
        .group_by(c.model)
    )
    with ledger.engine.connect() as conn:
        return {
            row.model: {k: int(v or 0) for k, v in row._mapping.items() if k != "model"}
            for row in conn.execute(stmt)
        }


def all_rows(ledger: Ledger) -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(llm_calls)).mappings()]


@pytest.mark.filterwarnings("ignore:Unexpected type for token usage")  # langchain-openai's merge
async def test_a_mixed_concurrent_workload_reconciles_with_the_bill_per_model(
    ledger: Ledger, openai_server: FakeOpenAIServer
) -> None:
    handler = TokenLedgerHandler(ledger)
    also_attached = TokenLedgerHandler(ledger)  # the same ledger reached twice: still one row
    work = Workload(openai_server, {"callbacks": [handler, also_attached]})

    openai_server.cached_tokens = 3
    openai_server.reasoning_tokens = 2
    await asyncio.gather(work.in_threads(work.everyday_sync()), *work.everyday_async())

    openai_server.cached_tokens = 0
    openai_server.cumulative_stream_usage = True
    await asyncio.gather(work.in_threads(work.tiered_sync()), *work.tiered_async())
    openai_server.cumulative_stream_usage = False

    openai_server.reasoning_tokens = 0
    await work.failures()
    await work.cached()
    llm = await work.completions()
    work.pool.shutdown()
    ledger.flush()

    rows = all_rows(ledger)
    reported = openai_server.reported

    # One row per call: every request the server got, every cache hit, every completion prompt.
    assert len(rows) == EXPECTED_CALLS
    assert len(rows) == openai_server.requests + CACHE_HITS + COMPLETION_PROMPTS
    assert Counter(r["status"] for r in rows) == {
        "ok": EXPECTED_CALLS - EXPECTED_ERRORS,
        "error": EXPECTED_ERRORS,
    }
    assert openai_server.failures == EXPECTED_ERRORS
    assert handler.in_flight == also_attached.in_flight == 0

    # Per model, the billed sums are the server's, exactly.
    sums = billed_sums(ledger)
    assert set(sums) == {*MODELS, COMPLETION_MODEL}
    for model in MODELS:
        assert sums[model] == openai_server.totals(model=model), model

    # ... and so is the cost (SQLite stores floats: compare at the column's 12 places).
    for model in MODELS:
        ledger_cost = sum(money(r["cost_usd"]) for r in rows if r["model"] == model)
        bill = sum(oracle_cost(b) for b in reported if b.model == model)
        assert ledger_cost == bill, model

    # Cache hits are rows that bill nothing.
    hits = [r for r in rows if r["cache_hit"]]
    assert len(hits) == CACHE_HITS
    assert {(r["total_tokens"], money(r["cost_usd"])) for r in hits} == {(0, Decimal(0))}

    # The completion-style LLM sent its prompts 4 (sync) and 3 (async) per request, each request
    # billed on its first prompt: the sums are still 40 prompts' worth.
    assert sums[COMPLETION_MODEL]["prompt_tokens"] == COMPLETION_PROMPTS * llm.input_tokens
    assert sums[COMPLETION_MODEL]["completion_tokens"] == COMPLETION_PROMPTS * llm.output_tokens

    # Every row has a cost or says why not.
    for row in rows:
        assert row["cost_usd"] is not None or any(
            n.startswith(REASONS) or n == "usage_billed_on_first_prompt_of_batch"
            for n in row["notes"]
        ), row
