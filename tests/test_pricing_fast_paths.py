"""The pricer's fast paths give the answers of its general paths.

``_extract`` reads the usual usage shape without the general checks, and ``Pricer.price`` finds
the UTC day of a UTC or naive ``when`` from its ordinal instead of its POSIX timestamp.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import data_snapshot
from genai_prices.types import (
    ClauseEquals,
    ConditionalPrice,
    ModelInfo,
    ModelPrice,
    Provider,
    StartDateConstraint,
)

from langchain_tokenledger.pricing import Pricer, _extract, _extract_general

UTC = timezone.utc
M = Decimal(1_000_000)

USAGES: list[Any] = [
    {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    {"input_tokens": 10},
    {"output_tokens": 5},
    {"total_tokens": 15},  # not usage: neither count
    {},
    {
        "input_tokens": 1200,
        "output_tokens": 300,
        "total_tokens": 1500,
        "input_token_details": {"cache_read": 1024, "audio": 0},
        "output_token_details": {"reasoning": 100, "audio": 0},
    },
    {"input_tokens": 100, "output_tokens": 10, "input_token_details": {"cache_creation": 20}},
    {"input_tokens": 100, "output_tokens": 10, "input_token_details": {}},
    {"input_tokens": 100, "output_tokens": 10, "input_token_details": None},
    {"input_tokens": None, "output_tokens": 10, "input_token_details": {"cache_read": None}},
    {"input_tokens": 100.0, "output_tokens": "10", "output_token_details": {"reasoning": 2.5}},
    {"input_tokens": 100, "output_tokens": 10, "input_token_details": {"priority": 100}},
    {"input_tokens": 100, "output_tokens": 10, "output_token_details": {"flex_reasoning": 4}},
    {
        "input_tokens": 100,
        "output_tokens": 10,
        "input_token_details": {"cache_creation": 0, "ephemeral_1h_input_tokens": 30},
    },
    {"input_tokens": 100, "output_tokens": 10, "input_token_details": [("cache_read", 5)]},
    {"input_tokens": 100, "output_tokens": 10, "model_name": "x"},  # an extra top-level key
    {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
    {"input_tokens": 100, "cache_read_input_tokens": 5, "output_tokens": 1},  # raw Anthropic
    {"input_tokens": 100, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 5}},
]


def outcome(extract: Any, usage: Any, tier: str | None) -> Any:
    try:
        return extract(usage, tier)
    except Exception as exc:  # the same failure is part of the same answer
        return type(exc)


@pytest.mark.parametrize("usage", USAGES)
@pytest.mark.parametrize("tier", [None, "priority", "default"])
def test_the_usual_usage_shape_is_read_like_any_other(usage: Any, tier: str | None) -> None:
    assert outcome(_extract, usage, tier) == outcome(_extract_general, usage, tier)


def test_random_usage_shapes_are_read_like_any_other() -> None:
    rng = random.Random(11)
    top = ["input_tokens", "output_tokens", "total_tokens", "input_token_details"]
    top += ["output_token_details", "prompt_tokens", "token_usage", "extra"]
    inner = ["cache_read", "cache_creation", "audio", "reasoning", "priority", "flex_cache_read"]
    inner += ["priority_reasoning", "ephemeral_5m_input_tokens", "other"]
    values: list[Any] = [None, 0, 7, 1000, 2.0, 2.5, -3, True, "9", Decimal(4)]
    for _ in range(3000):
        usage: dict[str, Any] = {}
        for key in rng.sample(top, rng.randint(0, len(top))):
            if key.endswith("_details"):
                usage[key] = {k: rng.choice(values) for k in rng.sample(inner, rng.randint(0, 4))}
            else:
                usage[key] = rng.choice(values)
        assert outcome(_extract, usage, None) == outcome(_extract_general, usage, None), usage


@pytest.fixture
def price_rise() -> Iterator[str]:
    """A model whose prices double from 2026-03-02 (UTC): the only model of the snapshot."""
    model = ModelInfo(
        id="tz-model",
        match=ClauseEquals(equals="tz-model"),
        prices=[
            ConditionalPrice(prices=ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(3))),
            ConditionalPrice(
                constraint=StartDateConstraint(start_date=date(2026, 3, 2)),
                prices=ModelPrice(input_mtok=Decimal(2), output_mtok=Decimal(6)),
            ),
        ],
    )
    provider = Provider(id="openai", name="OpenAI", api_pattern="x", models=[model])
    snapshot = data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False)
    data_snapshot.set_custom_snapshot(snapshot)
    try:
        yield "tz-model"
    finally:
        data_snapshot.set_custom_snapshot(None)


def test_when_is_priced_on_its_utc_day_whatever_its_time_zone(price_rise: str) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100}
    old, new = (1000 * 1 + 100 * 3) / M, (1000 * 2 + 100 * 6) / M
    last_old = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    first_new = datetime(2026, 3, 2, tzinfo=UTC)
    india, california = timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))
    cases = [
        (last_old, old),
        (last_old.replace(tzinfo=None), old),  # naive: UTC
        (last_old.astimezone(india), old),  # already 2 March there
        (first_new, new),
        (first_new.replace(tzinfo=None), new),
        (first_new.astimezone(california), new),  # still 1 March there
        (datetime(1969, 12, 31, 23, 0, tzinfo=UTC), old),  # before the epoch
    ]
    pricer = Pricer()
    for _ in range(2):  # the second time from the result memo
        for when, expected in cases:
            res = pricer.price(model=price_rise, provider="openai", usage=usage, when=when)
            assert res.cost_usd == expected, when
