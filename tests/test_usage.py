"""The counting rules of ``usage.py``, one by one, on the payloads LangChain actually produces.

Each test builds the real LangChain objects a callback receives (``LLMResult``, ``ChatGeneration``,
``AIMessage`` with ``usage_metadata``) and checks the exact counts and notes. The same rules are
checked end to end against the local OpenAI-compatible server in ``test_accounting.py``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, LLMResult

from langchain_tokenledger import packing, usage
from langchain_tokenledger.records import UsageRecord

OPENAI_USAGE = {
    "input_tokens": 10,
    "output_tokens": 7,
    "total_tokens": 17,
    "input_token_details": {"audio": 0, "cache_read": 4},
    "output_token_details": {"audio": 0, "reasoning": 3},
}
"""What langchain-openai puts on a message for 10 prompt tokens (4 cached), 7 completion (3
reasoning)."""


def chat_result(*usages: dict[str, Any] | None, model: str | None = "gpt-4o-mini") -> LLMResult:
    """The ``LLMResult`` ``on_llm_end`` gets for one chat call with one choice per usage."""
    meta = {"model_name": model} if model else {}
    choices = [
        ChatGeneration(message=AIMessage("hi", usage_metadata=u, response_metadata=meta))
        for u in usages
    ]
    return LLMResult(generations=[choices])


# -- single counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "count", "notes"),
    [
        (12, 12, []),
        (0, 0, []),
        (12.0, 12, []),
        ("12", 12, ["coerced_count:n"]),
        (Decimal("12"), 12, ["coerced_count:n"]),
        (12.5, None, ["non_integer_count:n"]),
        ("12.5", None, ["non_integer_count:n"]),
        (-3, None, ["negative_count:n"]),
        (True, None, ["invalid_count:n"]),
        ("twelve", None, ["invalid_count:n"]),
        (float("nan"), None, ["invalid_count:n"]),
        (float("inf"), None, ["invalid_count:n"]),
        ([12], None, ["invalid_count:n"]),
        (None, None, []),
    ],
)
def test_a_count_is_a_non_negative_integer_or_unknown(
    value: Any, count: int | None, notes: list[str]
) -> None:
    seen: list[str] = []

    assert usage.as_count(value, "n", seen) == count
    assert seen == notes


# -- one usage report --------------------------------------------------------------------------


def test_usage_metadata_is_read_with_its_cache_and_reasoning_details() -> None:
    u = usage.from_usage_metadata(OPENAI_USAGE)

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (10, 7, 17)
    assert (u.cache_read_tokens, u.cache_creation_tokens, u.reasoning_tokens) == (4, None, 3)
    assert u.source == "provider"
    assert u.notes == []
    assert u.details == OPENAI_USAGE


@pytest.mark.parametrize("tier", ["priority", "flex"])
def test_service_tier_detail_keys_count_as_cache_reads_and_reasoning(tier: str) -> None:
    # langchain-openai's shape for a priority/flex call: prefixed keys, plus the tier's
    # uncached input and non-reasoning output under the bare tier name.
    reported = {
        "input_tokens": 10,
        "output_tokens": 7,
        "total_tokens": 17,
        "input_token_details": {"audio": 0, f"{tier}_cache_read": 4, tier: 6},
        "output_token_details": {"audio": 0, f"{tier}_reasoning": 3, tier: 4},
    }

    u = usage.from_usage_metadata(reported)

    assert (u.cache_read_tokens, u.reasoning_tokens) == (4, 3)
    assert u.notes == []


def test_cache_writes_are_read_from_cache_creation() -> None:
    reported = {
        "input_tokens": 100,
        "output_tokens": 5,
        "total_tokens": 105,
        "input_token_details": {"cache_read": 20, "cache_creation": 70},
    }

    u = usage.from_usage_metadata(reported)

    assert (u.cache_read_tokens, u.cache_creation_tokens) == (20, 70)


def test_a_missing_total_is_input_plus_output() -> None:
    u = usage.from_usage_metadata({"input_tokens": 9, "output_tokens": 3})

    assert u.total_tokens == 12
    assert u.notes == []


def test_a_total_that_disagrees_is_kept_as_reported_and_flagged() -> None:
    u = usage.from_usage_metadata({"input_tokens": 9, "output_tokens": 3, "total_tokens": 20})

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (9, 3, 20)
    assert u.notes == ["total_mismatch"]


def test_a_negative_count_is_unknown_not_zero() -> None:
    u = usage.from_usage_metadata({"input_tokens": -9, "output_tokens": 3, "total_tokens": -6})

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (None, 3, None)
    assert u.notes == ["negative_count:input_tokens", "negative_count:total_tokens"]


def test_parts_larger_than_their_whole_are_flagged() -> None:
    reported = {
        "input_tokens": 5,
        "output_tokens": 2,
        "total_tokens": 7,
        "input_token_details": {"cache_read": 6},
        "output_token_details": {"reasoning": 3},
    }

    u = usage.from_usage_metadata(reported)

    assert (u.cache_read_tokens, u.reasoning_tokens) == (6, 3)
    assert u.notes == ["cache_exceeds_input", "reasoning_exceeds_output"]


def test_openai_token_usage_is_normalized_and_kept_as_received() -> None:
    token_usage = {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 0},
    }

    u = usage.from_token_usage(token_usage)

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (10, 7, 17)
    assert (u.cache_read_tokens, u.reasoning_tokens) == (4, 3)
    assert u.details == token_usage


def test_token_usage_with_a_fractional_count_keeps_the_rest() -> None:
    u = usage.from_token_usage({"prompt_tokens": 10.5, "completion_tokens": 7})

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (None, 7, None)
    assert u.notes == ["non_integer_count:input_tokens"]


# -- LLM-cache hits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reported", "hit"),
    [
        ({**OPENAI_USAGE, "total_cost": 0}, True),
        ({"total_cost": 0}, True),  # a cached message that had no usage
        ({**OPENAI_USAGE, "total_cost": 0.0}, True),
        (OPENAI_USAGE, False),
        ({**OPENAI_USAGE, "total_cost": 0.5}, False),
        ({**OPENAI_USAGE, "total_cost": False}, False),
        (None, False),
        ({}, False),
    ],
)
def test_a_cache_hit_is_recognised_by_langchains_total_cost_zero(
    reported: dict[str, Any] | None, hit: bool
) -> None:
    assert usage.is_cache_hit(reported) is hit


def test_a_cache_hit_bills_nothing_and_keeps_the_replayed_usage() -> None:
    replayed = {**OPENAI_USAGE, "total_cost": 0}

    u = usage.from_llm_result(chat_result(replayed))

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (0, 0, 0)
    assert (u.cache_read_tokens, u.cache_creation_tokens, u.reasoning_tokens) == (0, 0, 0)
    assert u.cache_hit is True
    assert u.source == "cache"
    assert u.details == replayed
    assert u.model == "gpt-4o-mini"
    assert u.notes == ["llm_cache_hit"]


# -- streams -----------------------------------------------------------------------------------


def test_a_stream_that_reports_usage_once_uses_that_report() -> None:
    assert usage.stream_usage([OPENAI_USAGE]) == (OPENAI_USAGE, False)


def test_delta_reports_are_added_up() -> None:
    # Anthropic's shape: input (with its cache details) first, output at the end.
    cached = {"cache_read": 4}
    first = {"input_tokens": 10, "output_tokens": 0, "input_token_details": cached}
    last = {"input_tokens": 0, "output_tokens": 7}

    merged, cumulative = usage.stream_usage([first, last])

    assert merged == {"input_tokens": 10, "output_tokens": 7, "input_token_details": cached}
    assert cumulative is False


def test_cumulative_reports_are_not_summed() -> None:
    running = [
        {"input_tokens": 9, "output_tokens": 0, "total_tokens": 9},
        {"input_tokens": 9, "output_tokens": 1, "total_tokens": 10},
        {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
        {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
    ]

    assert usage.stream_usage(running) == (running[-1], True)


def test_cumulative_reports_may_start_before_the_prompt_is_counted() -> None:
    running = [
        {"input_tokens": 0, "output_tokens": 1, "total_tokens": 1},
        {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11},
        {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
    ]

    assert usage.stream_usage(running) == (running[-1], True)


def test_a_repeated_input_with_shrinking_output_is_not_cumulative() -> None:
    reports = [
        {"input_tokens": 9, "output_tokens": 5},
        {"input_tokens": 9, "output_tokens": 2},
    ]

    assert usage.stream_usage(reports) == ({"input_tokens": 18, "output_tokens": 7}, False)


def test_a_stream_without_usage_has_none() -> None:
    assert usage.stream_usage([]) == (None, False)


def test_adding_usages_keeps_nested_details_and_prefers_the_later_odd_value() -> None:
    left = {"input_tokens": 2, "input_token_details": {"cache_read": 1}, "tag": "a"}
    right = {"input_tokens": 3, "input_token_details": {"cache_read": 2, "audio": 1}, "tag": "b"}

    assert usage.add_usages(left, right) == {
        "input_tokens": 5,
        "input_token_details": {"cache_read": 3, "audio": 1},
        "tag": "b",
    }


def test_streamed_chunk_usages_win_over_the_merged_message() -> None:
    # On a cumulative stream, the merged message's usage is the (inflated) sum of every chunk.
    reports = [
        {"input_tokens": 9, "output_tokens": 1, "total_tokens": 10},
        {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
    ]
    merged = AIMessageChunk("hi", usage_metadata=reports[0]) + AIMessageChunk(
        "", usage_metadata=reports[1]
    )
    result = LLMResult(generations=[[ChatGenerationChunk(message=merged)]])

    u = usage.from_llm_result(result, chunk_usages=reports)

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (9, 3, 12)
    assert u.notes == ["cumulative_stream_usage_corrected"]


STREAM_REPORTS: list[Any] = [
    OPENAI_USAGE,
    {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
    {"input_tokens": 9, "output_tokens": 3},  # no total
    {"input_tokens": 9, "output_tokens": 3, "total_tokens": 99},  # a total that disagrees
    {"input_tokens": 9, "output_tokens": 3, "input_token_details": {"priority_cache_read": 4}},
    {"input_tokens": 9, "output_tokens": 3, "output_token_details": {"reasoning": 5}},
    {"input_tokens": 9, "output_tokens": "3"},  # not the usual shape: the general path
    {"input_tokens": 9, "output_tokens": 3, "total_cost": 0},
]


def _parts(model: str | None, reported: dict[str, Any] | None) -> tuple[Any, ...]:
    """A finished call's parts (packing.PARTS), all but its model and usage fixed."""
    meta = {"ls_provider": "openai", "user_id": "u1"}
    return ("r1", None, "r1", None, "chat", "openai", model, "ok", None, reported, (), 0.5, 0.25,
            0.1, ("team-a",), ["x"], {}, meta, "")  # fmt: skip


@pytest.mark.parametrize("report", STREAM_REPORTS)
@pytest.mark.parametrize("merged_usage", ["same", "none", "cache_hit"])
@pytest.mark.parametrize("model_in", ["message", "llm_output", "nowhere"])
@pytest.mark.parametrize("via", ["stream", "message"])
def test_a_usual_call_packed_as_reported_gets_the_row_the_general_rules_give(
    report: dict[str, Any], merged_usage: str, model_in: str, via: str
) -> None:
    # The handler packs the usual call's usage as reported (one choice, one report: a message's
    # usage_metadata or a stream's one usage chunk, OpenAI's last) and the writer normalizes it.
    # The row must be exactly the one the general rules (usage_for_call) give, and the usual
    # path must stand aside where it cannot give it (an LLM-cache replay, nothing reported).
    message_usage = {
        "same": report,
        "none": None,
        "cache_hit": {**report, "total_cost": 0},
    }[merged_usage]
    meta = {"model_name": "gpt-4o-mini"} if model_in == "message" else {}
    merged = AIMessageChunk("hi", response_metadata=meta)
    merged.usage_metadata = message_usage  # type: ignore[assignment]  # as a stream merged it
    result = LLMResult(
        generations=[[ChatGenerationChunk(message=merged)]],
        llm_output={"model_name": "gpt-4o"} if model_in == "llm_output" else None,
    )
    chunk_usages = [report] if via == "stream" else []

    usual = usage.usual_call_usage(result, chunk_usages)
    general = usage.usage_for_call(result, chunk_usages=chunk_usages)

    replayed = message_usage is not None and "total_cost" in message_usage
    unreported = via == "message" and message_usage is None
    if replayed or unreported:
        assert usual is None
    else:
        assert usual is not None
        reported, model = usual
        assert (
            model == {"message": "gpt-4o-mini", "llm_output": "gpt-4o", "nowhere": None}[model_in]
        )
        packed = packing.pack_parts(_parts(model, reported))
        assert packed is not None
        assert packing.unpack_values(packed) == packing.call_values(
            _parts(general.model, None), general
        )
    assert usage.usage_for_call(result, chunk_usages=[report]) == usage.usage_for_call(
        result, chunk_usages=[report, {}]
    )


# -- one call ----------------------------------------------------------------------------------


def test_n_equal_choice_copies_count_once() -> None:
    u = usage.from_llm_result(chat_result(OPENAI_USAGE, OPENAI_USAGE, OPENAI_USAGE))

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (10, 7, 17)
    assert u.notes == ["n=3_choices_counted_once"]


def test_choices_billed_separately_are_added_and_flagged() -> None:
    one = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    two = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}

    u = usage.from_llm_result(chat_result(one, two))

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (20, 7, 27)
    assert u.notes == ["summed_choice_usage"]


def test_a_failed_streams_error_entry_is_not_part_of_the_call() -> None:
    # langchain-core's on_llm_error response for a failed stream: [[merged chunks], [error]].
    partial = ChatGeneration(message=AIMessage("he", usage_metadata=OPENAI_USAGE))
    error = ChatGeneration(message=AIMessage("", response_metadata={"status_code": 500}))

    u = usage.from_llm_result(LLMResult(generations=[[partial], [error]]))

    assert (u.input_tokens, u.output_tokens) == (10, 7)


def test_the_model_comes_from_the_response_then_from_llm_output() -> None:
    from_message = usage.from_llm_result(chat_result(OPENAI_USAGE, model="gpt-4o-2024-08-06"))
    result = chat_result(OPENAI_USAGE, model=None)
    result.llm_output = {"model_name": "gpt-4o-mini-2024-07-18"}
    from_output = usage.from_llm_result(result)

    assert from_message.model == "gpt-4o-2024-08-06"
    assert from_output.model == "gpt-4o-mini-2024-07-18"


def completion_result(token_usage: dict[str, Any] | None) -> LLMResult:
    """What ``on_llm_end`` gets for one prompt of a completion-style ``generate``."""
    llm_output = None if token_usage is None else {"token_usage": token_usage, "model_name": "m"}
    return LLMResult(generations=[[Generation(text="hi")]], llm_output=llm_output)


def test_completion_llms_report_through_llm_output() -> None:
    result = completion_result({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})

    u = usage.from_llm_result(result)

    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.model) == (4, 2, 6, "m")
    assert u.notes == []


def test_a_multi_prompt_batch_bills_the_first_prompt_for_the_whole_request() -> None:
    whole = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}

    first = usage.from_llm_result(completion_result(whole), batch_size=3)
    other = usage.from_llm_result(completion_result({}), batch_size=3)

    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (12, 6, 18)
    assert first.notes == ["usage_covers_batch_of_3"]
    assert (other.input_tokens, other.output_tokens, other.total_tokens) == (None, None, None)
    assert other.source == "none"
    assert other.notes == [usage.BATCH_FOLLOWER_NOTE]


def test_a_call_that_reported_nothing_has_unknown_usage() -> None:
    u = usage.from_llm_result(completion_result(None))

    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.source) == (None, None, None, "none")


# -- everything recorded about a call -----------------------------------------------------------


def test_the_requested_model_stands_in_when_the_response_names_none() -> None:
    u = usage.usage_for_call(chat_result(OPENAI_USAGE, model=None), model_hint="gpt-4o-mini")

    assert u.model == "gpt-4o-mini"
    assert u.notes == []


def test_a_call_without_any_model_name_is_kept_and_flagged() -> None:
    u = usage.usage_for_call(chat_result(OPENAI_USAGE, model=None))

    assert u.model is None
    assert (u.input_tokens, u.output_tokens) == (10, 7)
    assert u.notes == ["no_model"]


def test_a_completed_call_without_usage_is_estimated(byte_encoding: Any) -> None:
    u = usage.usage_for_call(
        chat_result(None),
        messages=[HumanMessage("hello")],
    )

    # prompt: 3 priming + 3 per message + "user" 4 + "hello" 5; output: "hi" 2
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (15, 2, 17)
    assert u.source == "estimated"
    assert u.notes == ["estimated_tiktoken"]


def test_a_completion_prompt_is_estimated_as_its_text(byte_encoding: Any) -> None:
    u = usage.usage_for_call(completion_result(None), prompts=["hello"], model_hint="gpt-4o")

    assert (u.input_tokens, u.output_tokens, u.source) == (5, 2, "estimated")


@pytest.mark.parametrize("status", ["error", "cancelled"])
def test_failed_calls_are_not_estimated(byte_encoding: Any, status: Any) -> None:
    u = usage.usage_for_call(chat_result(None), status=status, messages=[HumanMessage("hi")])

    assert (u.input_tokens, u.output_tokens, u.source) == (None, None, "none")
    assert u.notes == ["usage_unknown"]


def test_batch_followers_are_not_estimated(byte_encoding: Any) -> None:
    u = usage.usage_for_call(completion_result({}), batch_size=2, prompts=["hello"])

    assert (u.input_tokens, u.source) == (None, "none")
    assert u.notes == [usage.BATCH_FOLLOWER_NOTE, "usage_unknown"]


def test_chat_prompts_of_one_generate_are_separate_requests(byte_encoding: Any) -> None:
    # A chat model's generate() sends one request per prompt: no batch rule applies.
    result = chat_result(None, model=None)
    result.llm_output = {"token_usage": {"prompt_tokens": 4, "completion_tokens": 2}}

    u = usage.usage_for_call(result, batch_size=2, model_hint="m", messages=[HumanMessage("x")])

    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (4, 2, 6)
    assert u.notes == []


def test_a_model_tiktoken_cannot_count_keeps_unknown_usage(byte_encoding: Any) -> None:
    from langchain_tokenledger import estimate

    estimate.clear_encodings()

    u = usage.usage_for_call(chat_result(None, model="claude-3-5-sonnet"))

    assert (u.input_tokens, u.output_tokens, u.source) == (None, None, "none")
    assert u.notes == ["estimate_unavailable", "usage_unknown"]


def test_offline_the_estimate_is_unavailable_not_zero(offline_tiktoken: Any) -> None:
    u = usage.usage_for_call(chat_result(None), messages=[HumanMessage("hi")])

    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.source) == (
        None,
        None,
        None,
        "none",
    )
    assert u.notes == ["estimate_unavailable", "usage_unknown"]


# -- what a row is priced from -----------------------------------------------------------------


def test_a_clean_provider_row_is_priced_from_its_usage_as_received() -> None:
    tiered = {**OPENAI_USAGE, "input_token_details": {"priority_cache_read": 4, "priority": 6}}
    record = UsageRecord(run_id="r", input_tokens=10, output_tokens=7, usage_details=tiered)

    assert usage.priced_usage(record) == tiered


def test_estimated_and_coerced_rows_are_priced_from_their_columns() -> None:
    estimated = UsageRecord(run_id="r", input_tokens=15, output_tokens=2, usage_source="estimated")
    coerced = UsageRecord(
        run_id="r",
        input_tokens=10,
        output_tokens=7,
        cache_read_tokens=4,
        reasoning_tokens=3,
        usage_details={"input_tokens": "10", "output_tokens": 7},
        notes=["coerced_count:input_tokens"],
    )

    assert usage.priced_usage(estimated) == {
        "input_tokens": 15,
        "output_tokens": 2,
        "total_tokens": 17,
    }
    assert usage.priced_usage(coerced) == {
        "input_tokens": 10,
        "output_tokens": 7,
        "total_tokens": 17,
        "input_token_details": {"cache_read": 4},
        "output_token_details": {"reasoning": 3},
    }


@pytest.mark.parametrize(
    "record",
    [
        UsageRecord(run_id="r", usage_source="none"),
        UsageRecord(run_id="r", input_tokens=None, output_tokens=3),
        UsageRecord(run_id="r", input_tokens=3, output_tokens=None),
    ],
    ids=["unknown", "no-input", "no-output"],
)
def test_rows_missing_a_count_are_not_priced(record: UsageRecord) -> None:
    assert usage.priced_usage(record) is None
