"""UsageRecord construction: the fast ``__init__`` and ``make_record`` behave as the dataclass."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from helpers import lock_is_free_in_forked_child

from langchain_tokenledger.records import RECORD_FIELDS, UsageRecord, make_record

VALUES: dict[str, Any] = {
    "run_id": "r1",
    "parent_run_id": "p1",
    "root_run_id": "p0",
    "root_name": "Root",
    "run_name": "ChatOpenAI",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "status": "error",
    "error_type": "RateLimitError",
    "input_tokens": 10,
    "output_tokens": 5,
    "total_tokens": 15,
    "cache_read_tokens": 2,
    "cache_creation_tokens": 1,
    "reasoning_tokens": 3,
    "cost_usd": Decimal("0.5"),
    "price_source": "builtin",
    "cache_hit": True,
    "usage_source": "estimated",
    "usage_details": {"input_tokens": 10},
    "streamed": True,
    "started_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
    "ended_at": datetime(2025, 1, 1, 0, 0, 1, tzinfo=timezone.utc),
    "latency_ms": 1000.0,
    "ttft_ms": 20.0,
    "user_id": "u1",
    "session_id": "s1",
    "tags": ["a"],
    "metadata": {"k": "v"},
    "notes": ["n"],
    "ancestry": "p0/p1",
}


def test_every_field_is_covered() -> None:
    assert tuple(VALUES) == RECORD_FIELDS


@pytest.mark.parametrize("build", [UsageRecord, make_record], ids=["class", "make_record"])
def test_keyword_and_positional_construction_set_every_field(build: Any) -> None:
    for record in (build(**VALUES), build(*VALUES.values())):
        assert type(record) is UsageRecord
        assert {name: getattr(record, name) for name in RECORD_FIELDS} == VALUES


@pytest.mark.parametrize("build", [UsageRecord, make_record], ids=["class", "make_record"])
def test_defaults_are_the_dataclass_defaults_and_factories_are_fresh(build: Any) -> None:
    first, second = build(run_id="a"), build(run_id="b")
    for f in dataclasses.fields(UsageRecord):
        if f.name == "run_id":
            continue
        expected = f.default_factory() if callable(f.default_factory) else f.default
        assert getattr(first, f.name) == expected, f.name
    assert first.tags is not second.tags and first.metadata is not second.metadata
    assert build(run_id="c", tags=None).tags is None  # an explicit None is kept


@pytest.mark.parametrize("build", [UsageRecord, make_record], ids=["class", "make_record"])
def test_a_built_record_is_frozen_and_behaves_as_a_dataclass(build: Any) -> None:
    record = build(**VALUES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.model = "other"
    assert record == UsageRecord(**VALUES)
    assert dataclasses.replace(record, model="b") == record.replace(model="b")
    assert pickle.loads(pickle.dumps(record)) == record
    assert copy.deepcopy(record) == record
    assert repr(record) == repr(UsageRecord(**VALUES))


def test_bad_arguments_fail_as_for_the_dataclass() -> None:
    with pytest.raises(TypeError, match="run_id"):
        UsageRecord()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="bogus"):
        make_record(run_id="r", bogus=1)  # type: ignore[call-arg]


def test_subclasses_still_construct() -> None:
    class Plain(UsageRecord):
        pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class Extended(UsageRecord):
        extra: int = 0

    plain = Plain(run_id="a", model="m")
    assert type(plain) is Plain and plain.model == "m" and plain.tags == []
    extended = Extended(run_id="b", extra=3)
    assert (type(extended), extended.extra, extended.notes) == (Extended, 3, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.model = "x"


def test_a_summary_counts_a_packed_call_as_its_record_and_keeps_the_first_per_run() -> None:
    from langchain_tokenledger.packing import pack_record
    from langchain_tokenledger.records import UsageSummary

    def call(run_id: str, tokens: int, model: str = "m") -> UsageRecord:
        return UsageRecord(
            run_id=run_id,
            root_run_id="root",
            model=model,
            input_tokens=tokens,
            output_tokens=1,
            total_tokens=tokens + 1,
        )

    priced: list[str] = []

    def price(record: UsageRecord) -> UsageRecord:
        priced.append(record.run_id)
        return record.replace(cost_usd=Decimal("0.5"))

    summary = UsageSummary(price=price)
    assert summary.add_packed("r1", pack_record(call("r1", 10)))
    assert not summary.add(call("r1", 99))  # the first record of a run is kept
    assert summary.add(call("r2", 20, model="n"))
    assert not summary.add_packed("r2", pack_record(call("r2", 99)))

    assert (summary.total_tokens, summary.prompt_tokens, len(summary)) == (32, 30, 2)
    assert summary.by_model["m"].total_tokens == 11
    assert summary.total_cost == Decimal("1.0")
    assert sorted(priced) == ["r1", "r2"]  # each priced once, when the totals were first read
    assert summary.records == [
        call("r1", 10).replace(cost_usd=Decimal("0.5")),
        call("r2", 20, model="n").replace(cost_usd=Decimal("0.5")),
    ]


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # pytest's threads
def test_a_forked_child_gets_a_free_summary_lock_even_if_the_parent_held_it() -> None:
    """A parent's thread holding a summary's lock at the fork would deadlock the child's totals
    (a ``track_usage`` block open across a ``multiprocessing`` fork, say)."""
    from langchain_tokenledger.records import UsageSummary

    summary = UsageSummary()
    with summary._lock:
        assert lock_is_free_in_forked_child(lambda: summary._lock)
