"""What `langchain_tokenledger.testing` gives you, and how real `ChatOpenAI` reports usage.

Every test talks to a real `langchain_openai.ChatOpenAI` pointed at `FakeOpenAIServer`, so the
numbers below are exactly what LangChain hands to callbacks. The fake server's billing rule:

* prompt_tokens     = 3 + sum over messages of (4 + words in the message)
* reply             = "echo: " + <last user message>  (or `server.reply`)
* completion_tokens = n * words(reply) + server.reasoning_tokens

so a single user message "hello there" costs 3 + 4 + 2 = 9 prompt tokens and is answered
"echo: hello there" (3 completion tokens).
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration

from langchain_tokenledger.testing import (
    FakeOpenAIServer,
    FakeUsageChatModel,
    FakeUsageLLM,
    ReportedUsage,
    fake_completion_tokens,
    fake_prompt_tokens,
)

# OpenAI always sends the detail objects, zeros included; LangChain keeps them.
ZERO_IN = {"audio": 0, "cache_read": 0}
ZERO_OUT = {"audio": 0, "reasoning": 0}


@pytest.fixture
def server(openai_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The shared session server, reset around each test (see conftest.py)."""
    return openai_server


def reported(
    prompt: int, completion: int, *, model: str = "gpt-4o-mini", **kwargs: Any
) -> ReportedUsage:
    """A `ReportedUsage` with the defaults of a plain, non-streamed, single-choice call."""
    fields: dict[str, Any] = {
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "n": 1,
        "streamed": False,
        "usage_sent": True,
        "requested_model": model,
        "service_tier": None,
    }
    fields.update(kwargs)
    return ReportedUsage(**fields)


# ---------------------------------------------------------------------------------------------
# The billing rule
# ---------------------------------------------------------------------------------------------


def test_the_billing_rule_is_a_word_count() -> None:
    assert fake_prompt_tokens("hello there") == 3 + 4 + 2
    assert fake_prompt_tokens(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ) == 3 + (4 + 2) + (4 + 1)
    # list-of-parts content counts the text parts
    assert fake_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "a b"}]}]) == 9
    assert fake_completion_tokens("echo: hello there") == 3


# ---------------------------------------------------------------------------------------------
# invoke
# ---------------------------------------------------------------------------------------------


def test_invoke_reports_usage_and_the_server_bills_the_same(server: FakeOpenAIServer) -> None:
    reply = server.chat_model().invoke("hello there")

    assert reply.content == "echo: hello there"
    assert reply.usage_metadata == {
        "input_tokens": 9,
        "output_tokens": 3,
        "total_tokens": 12,
        "input_token_details": ZERO_IN,
        "output_token_details": ZERO_OUT,
    }
    assert reply.response_metadata["model_name"] == "gpt-4o-mini"
    assert reply.response_metadata["token_usage"]["total_tokens"] == 12
    assert server.reported == [reported(9, 3)]
    assert server.totals() == {
        "calls": 1,
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert (server.requests, server.failures) == (1, 0)


def test_prompt_tokens_count_every_message(server: FakeOpenAIServer) -> None:
    messages = [SystemMessage("you are terse"), HumanMessage("say something nice")]
    reply = server.chat_model().invoke(messages)

    assert reply.content == "echo: say something nice"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == 3 + (4 + 3) + (4 + 3) == 17
    assert reply.usage_metadata["output_tokens"] == 4
    assert server.received[0]["messages"] == [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": "say something nice"},
    ]


def test_a_fixed_reply(server: FakeOpenAIServer) -> None:
    server.reply = "forty two"
    reply = server.chat_model().invoke("what is the answer")
    assert reply.content == "forty two"
    assert server.reported == [reported(11, 2)]


def test_keep_alive_reuses_one_connection(server: FakeOpenAIServer) -> None:
    model = server.chat_model()
    for _ in range(5):
        model.invoke("hi")
    assert server.requests == 5
    assert server.connections <= 1  # 0 if a connection from an earlier test was reused


def test_max_tokens_truncates_the_reply(server: FakeOpenAIServer) -> None:
    reply = server.chat_model(max_tokens=2).invoke("one two three")

    assert reply.content == "echo: one"
    assert reply.response_metadata["finish_reason"] == "length"
    assert server.reported == [reported(10, 2)]


def test_the_answered_model_can_differ_from_the_requested_one(server: FakeOpenAIServer) -> None:
    server.model_suffix = "-2024-07-18"
    reply = server.chat_model(model="gpt-4o-mini").invoke("hi")

    assert reply.response_metadata["model_name"] == "gpt-4o-mini-2024-07-18"
    assert server.reported[0].model == "gpt-4o-mini-2024-07-18"
    assert server.reported[0].requested_model == "gpt-4o-mini"
    assert server.totals(model="gpt-4o-mini-2024-07-18")["calls"] == 1
    assert server.totals(model="gpt-4o-mini")["calls"] == 0

    server.response_model = "gpt-4o-2024-08-06"
    assert server.chat_model().invoke("hi").response_metadata["model_name"] == "gpt-4o-2024-08-06"


# ---------------------------------------------------------------------------------------------
# n > 1: one bill, copied onto every generation by LangChain
# ---------------------------------------------------------------------------------------------


def test_n_choices_are_billed_once_but_langchain_copies_usage_onto_each(
    server: FakeOpenAIServer,
) -> None:
    result = server.chat_model(n=2).generate([[HumanMessage("hello there")]])

    assert server.reported == [reported(9, 2 * 3, n=2)]
    generations = result.generations[0]
    assert len(generations) == 2
    usages = []
    for generation in generations:
        assert isinstance(generation, ChatGeneration)
        assert generation.message.content == "echo: hello there"
        usages.append(generation.message.usage_metadata)  # type: ignore[attr-defined]
    # the SAME response-level usage on both messages: summing them would double count
    expected = {
        "input_tokens": 9,
        "output_tokens": 6,
        "total_tokens": 15,
        "input_token_details": ZERO_IN,
        "output_token_details": ZERO_OUT,
    }
    assert usages == [expected, expected]
    assert result.llm_output is not None
    assert result.llm_output["token_usage"]["total_tokens"] == 15


# ---------------------------------------------------------------------------------------------
# Token details and service tiers
# ---------------------------------------------------------------------------------------------


def test_cached_and_reasoning_tokens_show_up_as_details(server: FakeOpenAIServer) -> None:
    server.cached_tokens = 5
    server.reasoning_tokens = 7
    reply = server.chat_model().invoke("hello there")

    assert reply.usage_metadata == {
        "input_tokens": 9,
        "output_tokens": 3 + 7,  # reasoning is counted inside completion_tokens
        "total_tokens": 19,
        "input_token_details": {"audio": 0, "cache_read": 5},
        "output_token_details": {"audio": 0, "reasoning": 7},
    }
    assert server.reported == [reported(9, 10, cached_tokens=5, reasoning_tokens=7)]


def test_cached_tokens_are_clipped_to_the_prompt(server: FakeOpenAIServer) -> None:
    server.cached_tokens = 1000
    reply = server.chat_model().invoke("hello there")
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 9


def test_priority_tier_prefixes_the_detail_keys(server: FakeOpenAIServer) -> None:
    server.service_tier = "priority"
    server.cached_tokens = 5
    server.reasoning_tokens = 7
    reply = server.chat_model().invoke("hello there")

    # langchain-openai splits priority usage: `priority_*` details, plus `priority` holding
    # the tokens that are neither cached nor reasoning
    assert reply.usage_metadata == {
        "input_tokens": 9,
        "output_tokens": 10,
        "total_tokens": 19,
        "input_token_details": {"audio": 0, "priority_cache_read": 5, "priority": 4},
        "output_token_details": {"audio": 0, "priority_reasoning": 7, "priority": 3},
    }
    assert reply.response_metadata["service_tier"] == "priority"
    assert server.reported[0].service_tier == "priority"


def test_the_requested_service_tier_is_echoed(server: FakeOpenAIServer) -> None:
    reply = server.chat_model(service_tier="flex").invoke("hello there")
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {
        "audio": 0,
        "flex_cache_read": 0,
        "flex": 9,
    }
    # "default" is not a prefix langchain-openai knows: plain keys
    reply = server.chat_model(service_tier="auto").invoke("hello there")
    assert reply.response_metadata["service_tier"] == "default"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == ZERO_IN


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def test_stream_with_stream_usage(server: FakeOpenAIServer) -> None:
    chunks = list(server.chat_model(stream_usage=True).stream("one two three"))

    # role chunk, one chunk per word, finish chunk, usage chunk, LangChain's empty "last" chunk
    assert [c.content for c in chunks] == ["", "echo:", " one", " two", " three", "", "", ""]
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    merged = sum(chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk)
    assert merged.content == "echo: one two three"
    assert merged.usage_metadata == {
        "input_tokens": 10,
        "output_tokens": 4,
        "total_tokens": 14,
        "input_token_details": ZERO_IN,
        "output_token_details": ZERO_OUT,
    }
    assert merged.response_metadata["model_name"] == "gpt-4o-mini"
    assert server.reported == [reported(10, 4, streamed=True)]
    assert server.received[0]["stream_options"] == {"include_usage": True}


def test_stream_without_stream_usage_is_billed_but_unseen(server: FakeOpenAIServer) -> None:
    # With a custom base_url, ChatOpenAI does NOT ask for usage when streaming by default.
    chunks = list(server.chat_model().stream("one two three"))

    assert "".join(str(c.content) for c in chunks) == "echo: one two three"
    assert all(c.usage_metadata is None for c in chunks)
    assert "stream_options" not in server.received[0]
    assert server.reported == [reported(10, 4, streamed=True, usage_sent=False)]


async def test_astream_with_stream_usage(server: FakeOpenAIServer) -> None:
    model = server.chat_model(stream_usage=True)
    merged: AIMessageChunk | None = None
    async for chunk in model.astream("one two three"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    assert merged.content == "echo: one two three"
    assert merged.usage_metadata is not None
    assert merged.usage_metadata["total_tokens"] == 14
    assert server.reported == [reported(10, 4, streamed=True)]


def test_invoke_with_streaming_true_streams_under_the_hood(server: FakeOpenAIServer) -> None:
    reply = server.chat_model(streaming=True, stream_usage=True).invoke("hello there")
    assert reply.content == "echo: hello there"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["total_tokens"] == 12
    assert server.reported == [reported(9, 3, streamed=True)]


def test_cumulative_stream_usage_is_overcounted_by_langchain(server: FakeOpenAIServer) -> None:
    """Some OpenAI-compatible servers put the running total on every chunk."""
    server.cumulative_stream_usage = True
    chunks = list(server.chat_model(stream_usage=True).stream("one two three"))

    outputs = [c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata]
    # role chunk, 4 word chunks, finish chunk, usage chunk
    assert outputs == [0, 1, 2, 3, 4, 4, 4]
    assert chunks[-2].usage_metadata is not None
    assert chunks[-2].usage_metadata["total_tokens"] == 14  # the last usage is the truth...
    merged = sum(chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk)
    assert merged.usage_metadata is not None
    # ...but LangChain adds chunk usages up: 7 x 10 prompt tokens, 0+1+2+3+4+4+4 completion
    assert (merged.usage_metadata["input_tokens"], merged.usage_metadata["output_tokens"]) == (
        70,
        18,
    )
    assert server.reported == [reported(10, 4, streamed=True)]


def test_cumulative_usage_is_sent_even_without_include_usage(server: FakeOpenAIServer) -> None:
    server.cumulative_stream_usage = True
    chunks = list(server.chat_model().stream("one two three"))
    assert [c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata] == [
        0,
        1,
        2,
        3,
        4,
        4,
    ]
    assert server.reported == [reported(10, 4, streamed=True, usage_sent=True)]


# ---------------------------------------------------------------------------------------------
# Scripted failures
# ---------------------------------------------------------------------------------------------


def test_fail_next_429_raises_rate_limit_error(server: FakeOpenAIServer) -> None:
    server.fail_next(429)
    with pytest.raises(openai.RateLimitError) as caught:
        server.chat_model().invoke("hi")

    assert caught.value.status_code == 429
    assert caught.value.body == {
        "message": "rate limited",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert server.reported == []
    assert (server.requests, server.failures) == (1, 1)


def test_fail_next_500_raises_internal_server_error(server: FakeOpenAIServer) -> None:
    server.fail_next(500, message="boom")
    with pytest.raises(openai.InternalServerError, match="boom"):
        server.chat_model().invoke("hi")
    assert server.reported == []


def test_failures_are_consumed_in_order(server: FakeOpenAIServer) -> None:
    server.fail_next(429, times=2)
    server.fail_next(503)
    model = server.chat_model()
    for error in (openai.RateLimitError, openai.RateLimitError, openai.InternalServerError):
        with pytest.raises(error):
            model.invoke("hi")
    assert model.invoke("hi").content == "echo: hi"
    assert (server.requests, server.failures, len(server.reported)) == (4, 3, 1)


def test_a_failed_stream_fails_before_the_first_chunk(server: FakeOpenAIServer) -> None:
    server.fail_next(429)
    with pytest.raises(openai.RateLimitError):
        list(server.chat_model(stream_usage=True).stream("hi"))
    assert server.reported == []


def test_retries_are_separate_requests_but_one_bill(server: FakeOpenAIServer) -> None:
    server.fail_next(429, retry_after=0.01)
    reply = server.chat_model(max_retries=1).invoke("hi")
    assert reply.content == "echo: hi"
    assert (server.requests, server.failures, len(server.reported)) == (2, 1, 1)


def test_cut_stream_raises_after_the_chunks_it_sent(server: FakeOpenAIServer) -> None:
    server.cut_next_stream(after_chunks=2)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in server.chat_model(stream_usage=True).stream("one two three"):
            received.append(str(chunk.content))

    assert received == ["", "echo:", " one"]  # the role chunk, then 2 content chunks
    assert server.reported == []
    assert (server.requests, server.failures) == (1, 1)
    # the next request is served normally
    assert server.chat_model().invoke("hi").content == "echo: hi"


def test_cut_non_streamed_response_is_a_connection_error(server: FakeOpenAIServer) -> None:
    server.cut_next_stream()
    with pytest.raises(openai.APIConnectionError):
        server.chat_model().invoke("hi")
    assert server.reported == []
    assert server.failures == 1


async def test_a_timed_out_call_is_still_billed(server: FakeOpenAIServer) -> None:
    server.delay = 0.5
    with pytest.raises(openai.APITimeoutError):
        await server.chat_model(timeout=0.1).ainvoke("hello there")
    # the server finishes generating after the client gave up, and bills it (as OpenAI does)
    assert server.wait_for_reported(1) == [reported(9, 3)]


async def test_cancelling_a_slow_stream(server: FakeOpenAIServer) -> None:
    server.chunk_delay = 0.05
    model = server.chat_model(stream_usage=True)
    received: list[str] = []

    async def consume() -> None:
        async for chunk in model.astream("a b c d e f g h i j k l m n o p"):
            received.append(str(chunk.content))

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(consume(), timeout=0.12)
    assert 1 <= len(received) < 10
    # cancelling closes the connection; the server notices at its next write and gives up
    server.wait_idle()
    assert server.requests == 1
    assert server.reported == []


# ---------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------


async def test_200_concurrent_ainvokes(server: FakeOpenAIServer) -> None:
    model = server.chat_model()
    prompts = [" ".join(["word"] * (i % 7 + 1)) for i in range(200)]
    replies = await asyncio.gather(*(model.ainvoke(p) for p in prompts))

    for prompt, reply in zip(prompts, replies, strict=True):
        words = len(prompt.split())
        assert reply.content == "echo: " + prompt
        assert reply.usage_metadata is not None
        assert reply.usage_metadata["input_tokens"] == 3 + 4 + words
        assert reply.usage_metadata["output_tokens"] == 1 + words
    expected_prompt = sum(3 + 4 + len(p.split()) for p in prompts)
    expected_completion = sum(1 + len(p.split()) for p in prompts)
    totals = server.totals()
    assert totals["calls"] == server.requests == 200
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (
        expected_prompt,
        expected_completion,
    )


async def test_50_concurrent_astreams(server: FakeOpenAIServer) -> None:
    model = server.chat_model(stream_usage=True)

    async def total_tokens(i: int) -> int:
        merged: AIMessageChunk | None = None
        async for chunk in model.astream(f"request {i}"):
            merged = chunk if merged is None else merged + chunk
        assert merged is not None and merged.usage_metadata is not None
        return merged.usage_metadata["total_tokens"]

    totals = await asyncio.gather(*(total_tokens(i) for i in range(50)))
    assert totals == [(3 + 4 + 2) + 3] * 50
    assert server.totals()["calls"] == 50


# ---------------------------------------------------------------------------------------------
# Server odds and ends
# ---------------------------------------------------------------------------------------------


def test_models_endpoint(server: FakeOpenAIServer) -> None:
    server.chat_model(model="my-model").invoke("hi")
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    try:
        ids = [m.id for m in client.models.list()]
    finally:
        client.close()
    assert ids == ["gpt-4o-mini", "gpt-4o", "my-model"]


def test_reset_forgets_everything(server: FakeOpenAIServer) -> None:
    server.cached_tokens = 3
    server.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        server.chat_model().invoke("hi")
    server.chat_model().invoke("hi")
    server.cut_next_stream()

    server.reset()

    assert (server.reported, server.requests, server.failures, server.received) == ([], 0, 0, [])
    assert server.cached_tokens == 0
    assert server.chat_model().invoke("hi").content == "echo: hi"  # the cut was forgotten


def test_start_and_stop() -> None:
    server = FakeOpenAIServer().start()
    try:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert server.chat_model().invoke("hi").content == "echo: hi"
    finally:
        server.stop()
    with pytest.raises(RuntimeError):
        server.base_url  # noqa: B018


# ---------------------------------------------------------------------------------------------
# In-process fakes
# ---------------------------------------------------------------------------------------------


def test_fake_usage_chat_model_invoke() -> None:
    model = FakeUsageChatModel(input_tokens=7, output_tokens=3)
    reply = model.invoke("hi")

    assert reply.content == "hello world"
    assert reply.usage_metadata == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    assert reply.response_metadata["model_name"] == "gpt-4o-mini"
    result = model.generate([[HumanMessage("hi")], [HumanMessage("ho")]])
    assert result.llm_output == {  # summed over the prompts, as ChatOpenAI does
        "model_name": "gpt-4o-mini",
        "token_usage": {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20},
    }


def test_fake_usage_chat_model_details() -> None:
    model = FakeUsageChatModel(cached_tokens=4, reasoning_tokens=5, model_name="o3-mini")
    reply = model.invoke("hi")
    assert reply.usage_metadata == {
        "input_tokens": 10,
        "output_tokens": 20,
        "total_tokens": 30,
        "input_token_details": {"cache_read": 4},
        "output_token_details": {"reasoning": 5},
    }
    assert reply.response_metadata["token_usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    assert model._get_ls_params() == {
        "ls_provider": "openai",
        "ls_model_name": "o3-mini",
        "ls_model_type": "chat",
    }


def test_fake_usage_chat_model_stream() -> None:
    chunks = list(FakeUsageChatModel(chunks=5).stream("hi"))

    assert len(chunks) == 5
    assert "".join(str(c.content) for c in chunks) == "hello world"
    assert [c.usage_metadata is not None for c in chunks] == [False] * 4 + [True]
    assert chunks[-1].usage_metadata == {
        "input_tokens": 10,
        "output_tokens": 20,
        "total_tokens": 30,
    }
    assert chunks[-1].response_metadata["model_name"] == "gpt-4o-mini"
    assert chunks[-1].chunk_position == "last"


async def test_fake_usage_chat_model_async() -> None:
    model = FakeUsageChatModel()
    reply = await model.ainvoke("hi")
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["total_tokens"] == 30

    chunks = [chunk async for chunk in model.astream("hi")]
    assert len(chunks) == 20
    merged = sum(chunks[1:], chunks[0])
    assert merged.content == "hello world"
    assert merged.usage_metadata == {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}


def test_fake_usage_llm() -> None:
    llm = FakeUsageLLM(input_tokens=4, output_tokens=2)
    assert llm.invoke("hi") == "hello world"

    result = llm.generate(["a", "b"])
    assert [[g.text for g in gens] for gens in result.generations] == [
        ["hello world"],
        ["hello world"],
    ]
    assert result.llm_output == {
        "token_usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12},
        "model_name": "gpt-3.5-turbo-instruct",
    }
    # what each prompt's run sees in on_llm_end: the whole sum goes to the first one
    assert [r.llm_output["token_usage"] for r in result.flatten() if r.llm_output] == [
        {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12},
        {},
    ]
    assert llm._get_ls_params()["ls_model_type"] == "llm"


async def test_fake_usage_llm_async() -> None:
    result = await FakeUsageLLM().agenerate(["a"])
    assert result.llm_output is not None
    assert result.llm_output["token_usage"]["total_tokens"] == 30
