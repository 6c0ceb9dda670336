"""Re-pricing stored rows when prices change, on every backend, with exact decimals.

Rows are written priced by genai-prices, then a ledger opened on the same database with a
``prices=`` override re-prices them. Expected costs are worked out by hand from the token counts
and the per-million rates.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import uuid4

import pytest
import sqlalchemy as sa

from langchain_tokenledger import Ledger, UsageRecord
from langchain_tokenledger.query import QueryError
from langchain_tokenledger.reprice import RepriceResult
from langchain_tokenledger.schema import llm_calls

DAY = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
OVERRIDE = {"gpt-4o-mini": {"input": 1, "output": 2}, "house-*": {"input": 3, "output": 4}}
"""USD per million tokens."""


def call(
    model: str = "gpt-4o-mini",
    *,
    input_tokens: int = 1000,
    output_tokens: int = 500,
    started_at: datetime = DAY,
    provider: str = "openai",
    **fields: Any,
) -> UsageRecord:
    """One provider-reported call of ``model``, as the handler would record it."""
    return UsageRecord(
        run_id=str(uuid4()),
        model=model,
        provider=provider,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        usage_details={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=1),
        **fields,
    )


def write(ledger: Ledger, *records: UsageRecord) -> None:
    """Record ``records`` and wait until they are committed (priced by the writer)."""
    ledger.record_many(records)
    ledger.flush()


def stored(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """Every row by run id."""
    ledger.flush()
    with ledger.engine.connect() as conn:
        return {r["run_id"]: dict(r) for r in conn.execute(sa.select(llm_calls)).mappings()}


@pytest.fixture
def repricer(ledger: Ledger) -> Iterator[Ledger]:
    """A second ledger on the same database, with the corrected price table."""
    with Ledger(ledger.url, prices=OVERRIDE) as other:
        yield other


def test_an_override_reprices_the_rows_it_covers(ledger: Ledger, repricer: Ledger) -> None:
    calls = [call(), call(input_tokens=2000, output_tokens=0), call("gpt-4o")]
    write(ledger, *calls)
    before = stored(ledger)

    result = repricer.reprice(model="gpt-4o-mini")

    after = stored(ledger)
    # genai-prices: $0.15 / $0.60 per M in/out; the override: $1 / $2.
    assert [before[c.run_id]["cost_usd"] for c in calls] == [
        Decimal("0.00045"),
        Decimal("0.0003"),
        Decimal("0.0075"),
    ]
    assert [after[c.run_id]["cost_usd"] for c in calls] == [
        Decimal("0.002"),
        Decimal("0.002"),
        Decimal("0.0075"),
    ]
    assert [after[c.run_id]["price_source"] for c in calls] == [
        "override",
        "override",
        before[calls[2].run_id]["price_source"],
    ]
    assert result == RepriceResult(
        examined=2,
        changed=2,
        updated=2,
        unpriced=0,
        old_total=Decimal("0.00075"),
        new_total=Decimal("0.004"),
        dry_run=False,
    )
    assert result.delta == Decimal("0.00325")


def test_an_unknown_model_is_priced_once_the_table_knows_it(
    ledger: Ledger, repricer: Ledger
) -> None:
    house = call("house-llama-70b", provider="ollama", input_tokens=10_000, output_tokens=2_000)
    write(ledger, house)

    first = stored(ledger)[house.run_id]
    result = repricer.reprice()
    after = stored(ledger)[house.run_id]

    assert (first["cost_usd"], first["notes"]) == (None, ["unknown_model"])
    assert after["cost_usd"] == Decimal("0.038")  # 10k x $3 + 2k x $4 per M
    assert after["price_source"] == "override"
    assert after["notes"] == []
    assert (result.changed, result.new_total) == (1, Decimal("0.038"))


def test_a_second_run_with_the_same_prices_changes_nothing(
    ledger: Ledger, repricer: Ledger
) -> None:
    write(ledger, call(), call("house-x", provider="ollama"))

    first = repricer.reprice()
    second = repricer.reprice()

    assert (first.changed, first.updated) == (2, 2)
    assert (second.examined, second.changed, second.updated) == (2, 0, 0)
    assert second.old_total == second.new_total == Decimal("0.007")


def test_filters_select_by_time_model_and_provider(ledger: Ledger, repricer: Ledger) -> None:
    early = call(started_at=DAY - timedelta(days=10))
    inside = call(started_at=DAY)
    late = call(started_at=DAY + timedelta(days=10))
    azure = call(started_at=DAY, provider="azure")
    write(ledger, early, inside, late, azure)

    by_time = repricer.reprice(since=DAY - timedelta(days=1), until="2026-11-05")
    rows = stored(ledger)

    assert by_time.examined == 2
    assert {run_id for run_id, r in rows.items() if r["price_source"] == "override"} == {
        inside.run_id,
        azure.run_id,
    }

    by_provider = repricer.reprice(provider="openai")

    assert (by_provider.examined, by_provider.changed) == (3, 2)


def test_a_dry_run_reports_without_writing(ledger: Ledger, repricer: Ledger) -> None:
    row = call()
    write(ledger, row)

    result = repricer.reprice(dry_run=True)

    assert (result.changed, result.updated, result.dry_run) == (1, 1, True)
    assert result.new_total == Decimal("0.002")
    assert stored(ledger)[row.run_id]["cost_usd"] == Decimal("0.00045")


def test_cache_hits_stay_free_and_unknown_usage_stays_unpriced(
    ledger: Ledger, repricer: Ledger
) -> None:
    hit = call(
        input_tokens=0,
        output_tokens=0,
        cache_hit=True,
        usage_source="cache",
        notes=["llm_cache_hit"],
    )
    unknown = UsageRecord(
        run_id=str(uuid4()),
        model="gpt-4o-mini",
        status="error",
        usage_source="none",
        started_at=DAY,
        notes=["usage_unknown"],
    )
    write(ledger, hit, unknown)

    result = repricer.reprice()
    rows = stored(ledger)

    assert rows[hit.run_id]["cost_usd"] == 0
    assert rows[unknown.run_id]["cost_usd"] is None
    assert rows[unknown.run_id]["notes"] == ["usage_unknown"]
    assert (result.examined, result.changed, result.unpriced) == (2, 0, 1)


def test_service_tier_details_are_repriced_at_the_tiers_rates(
    ledger: Ledger, repricer: Ledger
) -> None:
    priority = call("gpt-4o", input_tokens=1000, output_tokens=100)
    details = {
        **priority.usage_details,
        "input_token_details": {"priority_cache_read": 0, "priority": 1000},
        "output_token_details": {"priority_reasoning": 0, "priority": 100},
    }
    write(ledger, priority.replace(usage_details=details))
    before = stored(ledger)[priority.run_id]["cost_usd"]

    with Ledger(ledger.url, prices={"gpt-4o": {"input": "2.5", "output": 10}}) as flat:
        flat.reprice()

    # genai-prices' priority rates for gpt-4o: $4.25 / $17 per M; the flat table: $2.50 / $10.
    assert before == Decimal("0.00595")
    assert stored(ledger)[priority.run_id]["cost_usd"] == Decimal("0.0035")


def test_each_row_is_priced_at_the_prices_of_its_own_day(ledger: Ledger) -> None:
    # genai-prices has gpt-4o priority rates from 2026-10-12 on; a call before that date was
    # billed at the standard rate.
    details = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "total_tokens": 1100,
        "input_token_details": {"priority_cache_read": 0, "priority": 1000},
        "output_token_details": {"priority_reasoning": 0, "priority": 100},
    }
    before = call("gpt-4o", started_at=datetime(2026, 10, 1, tzinfo=timezone.utc))
    after = call("gpt-4o", started_at=datetime(2026, 10, 20, tzinfo=timezone.utc))
    write(ledger, before.replace(usage_details=details), after.replace(usage_details=details))

    result = ledger.reprice()
    rows = stored(ledger)

    assert rows[before.run_id]["cost_usd"] == Decimal("0.0035")
    assert rows[before.run_id]["notes"] == ["service_tier_price_unavailable:priority"]
    assert rows[after.run_id]["cost_usd"] == Decimal("0.00595")
    assert rows[after.run_id]["notes"] == []
    assert (result.examined, result.changed, result.updated) == (2, 0, 0)


def test_rows_are_read_in_chunks(ledger: Ledger, repricer: Ledger) -> None:
    write(ledger, *[call() for _ in range(7)])

    result = repricer.reprice(batch_size=2)

    assert (result.examined, result.changed) == (7, 7)
    assert result.new_total == Decimal("0.014")
    assert {r["cost_usd"] for r in stored(ledger).values()} == {Decimal("0.002")}


def test_bad_arguments_fail_before_any_work(sqlite_ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        sqlite_ledger.reprice(batch_size=0)
    with pytest.raises(TypeError, match="model must be a string"):
        sqlite_ledger.reprice(model=4)
    with pytest.raises(QueryError, match="invalid time"):
        sqlite_ledger.reprice(since="last tuesday")
    with pytest.raises(TypeError, match="unexpected keyword"):
        sqlite_ledger.reprice(modle="gpt-4o-mini")


def test_the_result_reads_as_one_line(ledger: Ledger, repricer: Ledger) -> None:
    unknown = UsageRecord(run_id=str(uuid4()), model="gpt-4o-mini", usage_source="none")
    write(ledger, call(), unknown)

    result = repricer.reprice(dry_run=True)

    assert str(result) == (
        "2 rows examined, 1 with a new cost: $0.00045 -> $0.002 (+0.00155); "
        "1 still unpriced (see their notes); dry run, nothing written"
    )


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ("0.004", "0.004000", "$0.004 -> $0.004 (+0)"),
        ("0.00000002", "0.00000001", "$0.00000002 -> $0.00000001 (-0.00000001)"),
        ("100", "0", "$100 -> $0 (-100)"),
    ],
)
def test_the_summary_line_prints_plain_decimals(old: str, new: str, line: str) -> None:
    result = RepriceResult(
        examined=3, changed=1, updated=1, unpriced=0,
        old_total=Decimal(old), new_total=Decimal(new), dry_run=False,
    )  # fmt: skip
    assert str(result) == f"3 rows examined, 1 with a new cost: {line}"
