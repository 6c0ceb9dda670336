"""Packed records: what the handler hands the ledger is exactly the record it would build.

The handler packs a finished call's field values itself (it never builds the record in the
application); the writer unpacks them. Both must give the row the record path gives.
"""

from __future__ import annotations

import logging
import marshal
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from langchain_core.runnables import RunnableConfig, RunnableLambda

from langchain_tokenledger import TokenLedgerHandler, UsageRecord
from langchain_tokenledger.packing import (
    PARTS,
    pack_parts,
    pack_record,
    pack_values,
    unpack_record,
)
from langchain_tokenledger.records import RECORD_FIELDS, record_values
from langchain_tokenledger.testing import FakeUsageChatModel

TIMINGS = ("started_at", "ended_at", "latency_ms", "ttft_ms")
"""Taken by each handler from its own clock: equal in kind, not to the microsecond."""


class Packed:
    """A ledger stand-in that takes calls packed, as ``Ledger`` does."""

    def __init__(self) -> None:
        self.packed: list[bytes] = []

    def record(self, record: UsageRecord) -> None:
        self.packed.append(pack_record(record))

    def record_packed(self, packed: bytes) -> None:
        self.packed.append(packed)


class Built:
    """A ledger stand-in with ``record`` only: the handler builds each record for it."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


class Unprintable:
    """A metadata value ``marshal`` cannot pack (the row stores its ``str``)."""

    def __str__(self) -> str:
        return "unprintable!"


class FailingModel(FakeUsageChatModel):
    """A chat model whose provider answers with an error."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("provider down")


def without_timings(record: UsageRecord) -> UsageRecord:
    return record.replace(**{name: None for name in TIMINGS})


@pytest.mark.parametrize("call", ["invoke", "stream", "error"])
@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"user_id": "u1", "thread_id": "t-9", "feature": "qa"},
        {"user_id": 42, "session_id": "s-1", "who": Unprintable()},
    ],
)
def test_a_packed_call_unpacks_to_the_record_the_handler_would_build(
    call: str, metadata: dict[str, Any]
) -> None:
    packed_sink, built_sink = Packed(), Built()
    packing = TokenLedgerHandler(packed_sink, tags=["team-a"], metadata={"env": "test"})
    building = TokenLedgerHandler(built_sink, tags=["team-a"], metadata={"env": "test"})
    model = FakeUsageChatModel(cached_tokens=4, reasoning_tokens=3)

    def chain(text: str) -> Any:
        if call == "error":
            return FailingModel().invoke(text)
        if call == "stream":
            return "".join(str(c.content) for c in model.stream(text))
        return [model.invoke(text)]

    config: RunnableConfig = {
        "callbacks": [packing, building],
        "tags": ["nightly"],
        "metadata": metadata,
    }
    try:
        (RunnableLambda(chain) | model).invoke("hi", config)
    except RuntimeError:
        assert call == "error"

    unpacked = [unpack_record(p) for p in packed_sink.packed]
    # (as the built records travel: a value marshal refuses becomes the JSON its row holds)
    assert [without_timings(r) for r in unpacked] == [
        without_timings(unpack_record(pack_record(r))) for r in built_sink.records
    ]
    assert len(unpacked) == {"invoke": 2, "stream": 2, "error": 1}[call]
    assert [r.status for r in unpacked] == (["error"] if call == "error" else ["ok", "ok"])
    for record in unpacked:
        assert record.started_at is not None and record.started_at.tzinfo is timezone.utc
        assert record.ended_at is not None and record.ended_at >= record.started_at
        assert record.tags == ["team-a", "nightly"]
        if "who" in metadata:
            assert record.metadata == {
                "env": "test",
                "user_id": 42,
                "session_id": "s-1",
                "who": "unprintable!",
            }


def test_packing_keeps_every_kind_of_value() -> None:
    t0 = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    record = UsageRecord(
        run_id="r1",
        cost_usd=Decimal("0.000123456789"),
        started_at=t0,
        ended_at=t0 + timedelta(microseconds=1),
        latency_ms=0.001,
        usage_details={"input_tokens": 10, "input_token_details": {"cache_read": 4}},
        tags=["a"],
        metadata={"nested": {"k": [1, 2.5, None, True]}},
        notes=["x"],
    )
    assert unpack_record(pack_record(record)) == record


def test_timestamps_in_another_zone_or_naive_keep_their_zone() -> None:
    plus_one = datetime(2026, 11, 1, 13, 30, tzinfo=timezone(timedelta(hours=1)))
    naive = datetime(2026, 11, 1, 12, 0, 0, 999999)
    record = UsageRecord(run_id="r1", started_at=plus_one, ended_at=naive)
    back = unpack_record(pack_record(record))
    assert (back.started_at, back.ended_at) == (plus_one, naive)
    assert back.started_at is not None and back.started_at.utcoffset() == timedelta(hours=1)


@pytest.mark.parametrize("year", [1, 1833, 1970, 2026, 2106, 2107, 3000, 9999])
def test_utc_timestamps_keep_every_microsecond_in_any_year(year: int) -> None:
    """Within 2**32 s of 1970 a UTC time travels as a float (exact there); beyond, as text."""
    when = datetime(year, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
    record = UsageRecord(run_id="r1", started_at=when, ended_at=when.replace(microsecond=1))
    back = unpack_record(pack_record(record))
    assert (back.started_at, back.ended_at) == (record.started_at, record.ended_at)


def test_values_marshal_refuses_are_packed_as_the_json_their_row_holds() -> None:
    values = list(record_values(UsageRecord(run_id="r1", metadata={"who": Unprintable()})))
    values[RECORD_FIELDS.index("tags")] = ("a", Unprintable())
    back = unpack_record(pack_values(values))
    assert back.metadata == {"who": "unprintable!"}
    assert back.tags == ["a", "unprintable!"]


def test_the_usual_call_travels_as_reported_and_the_writer_normalizes_it() -> None:
    sink = Packed()
    handler = TokenLedgerHandler(sink)
    model = FakeUsageChatModel(cached_tokens=4, reasoning_tokens=3)

    model.invoke("hi", {"callbacks": [handler], "metadata": {"user_id": "u1"}})
    with pytest.raises(RuntimeError, match="provider down"):
        FailingModel().invoke("hi", {"callbacks": [handler]})

    ok, failed = (marshal.loads(p) for p in sink.packed)
    # The call that succeeded travels as its parts: the usage as the model reported it, the
    # run id as an int; the failed one as its values.
    assert type(ok) is tuple and type(failed) is list
    part = dict(zip(PARTS, ok, strict=True))
    assert part["reported_usage"] == {
        "input_tokens": 10,
        "output_tokens": 20,
        "total_tokens": 30,
        "input_token_details": {"cache_read": 4},
        "output_token_details": {"reasoning": 3},
    }
    assert type(part["run_id"]) is int and part["root_run_id"] is None
    row = unpack_record(sink.packed[0])
    assert row.run_id == row.root_run_id == str(UUID(int=part["run_id"]))
    assert (row.input_tokens, row.cache_read_tokens, row.reasoning_tokens) == (10, 4, 3)
    assert (row.user_id, row.metadata, row.notes) == ("u1", {"user_id": "u1"}, [])


def test_parts_the_writer_cannot_complete_still_give_their_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_id = UUID("01a2492b-346c-72f6-8d10-e506e9029a85")
    reported = {"input_tokens": 9, "output_tokens": 6}
    broken = (run_id.int, None, None, None, "chat", "openai", "gpt-4o-mini", "ok", None,
              reported, (), 1.5, 0.25, None, (), None, {}, "not a mapping", "")  # fmt: skip
    packed = pack_parts(broken)
    assert packed is not None

    with caplog.at_level(logging.ERROR, logger="langchain_tokenledger"):
        row = unpack_record(packed)

    assert (row.run_id, row.root_run_id) == (str(run_id), str(run_id))
    assert (row.model, row.status, row.usage_source, row.total_tokens) == (
        "gpt-4o-mini",
        "ok",
        "none",
        None,
    )
    assert row.usage_details == reported and row.notes == ["record_build_failed"]
    assert f"completing call {run_id.int} failed" in caplog.text
