"""Tests for langchain_tokenledger.pricing.

Expected costs are computed by hand from the rates looked up in the installed genai-prices data,
so the tests follow price updates without hard-coding dollar amounts.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import (
    ClauseEquals,
    ModelInfo,
    ModelPrice,
    PriceContext,
    Provider,
    StartDateConstraint,
)
from helpers import lock_is_free_in_forked_child

from langchain_tokenledger import pricing
from langchain_tokenledger.pricing import (
    PriceOverride,
    Pricer,
    PriceResult,
    load_price_table,
    normalize_usage,
)

UTC = timezone.utc
M = Decimal(1_000_000)
SOURCE = f"genai-prices {genai_prices.__version__}"


def rates(model: str, provider: str | None, context: PriceContext | None = None) -> ModelPrice:
    """The genai-prices ModelPrice in force now for ``model``."""
    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    return info.get_prices(datetime.now(UTC), context)


def rate(prices: ModelPrice, key: str) -> Decimal:
    value = getattr(prices, key)
    assert isinstance(value, Decimal), f"{key} is {value!r}"
    return value


def lc_usage(
    inp: int,
    out: int,
    input_details: dict[str, int] | None = None,
    output_details: dict[str, int] | None = None,
) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}
    if input_details is not None:
        usage["input_token_details"] = input_details
    if output_details is not None:
        usage["output_token_details"] = output_details
    return usage


@pytest.fixture
def pricer() -> Pricer:
    return Pricer()


# --------------------------------------------------------------------------- genai-prices path


def test_plain_gpt_4o_mini(pricer: Pricer) -> None:
    p = rates("gpt-4o-mini", "openai")
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(1000, 200))
    assert (
        res.cost_usd
        == Decimal(1000) * rate(p, "input_mtok") / M + Decimal(200) * rate(p, "output_mtok") / M
    )
    assert res.price_source == SOURCE
    assert res.notes == ()
    assert isinstance(res, PriceResult)


def test_version(pricer: Pricer) -> None:
    assert pricer.version == f"genai-prices {genai_prices.__version__}"


def test_cache_reads_priced_at_cache_rate(pricer: Pricer) -> None:
    p = rates("gpt-4o-mini", "openai")
    in_rate, cache_rate, out_rate = (
        rate(p, "input_mtok"),
        rate(p, "cache_read_mtok"),
        rate(p, "output_mtok"),
    )
    assert cache_rate < in_rate
    # input_tokens INCLUDES the 1024 cache reads
    usage = lc_usage(1200, 300, {"cache_read": 1024, "audio": 0}, {"reasoning": 0, "audio": 0})
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=usage)
    assert res.cost_usd == (176 * in_rate + 1024 * cache_rate + 300 * out_rate) / M


def test_reasoning_stays_inside_output(pricer: Pricer) -> None:
    p = rates("o4-mini", "openai")
    assert p.output_reasoning_mtok is None  # OpenAI bills reasoning as output
    with_reasoning = lc_usage(1000, 500, {}, {"reasoning": 400})
    res = pricer.price(model="o4-mini", provider="openai", usage=with_reasoning)
    expected = (1000 * rate(p, "input_mtok") + 500 * rate(p, "output_mtok")) / M
    assert res.cost_usd == expected
    plain = pricer.price(model="o4-mini", provider="openai", usage=lc_usage(1000, 500))
    assert plain.cost_usd == expected


def test_reasoning_priced_separately_when_data_has_a_rate(pricer: Pricer) -> None:
    p = rates("sonar-deep-research", "perplexity")
    usage = lc_usage(10, 100, None, {"reasoning": 60})
    res = pricer.price(model="sonar-deep-research", provider="perplexity", usage=usage)
    expected = (
        10 * rate(p, "input_mtok")
        + 40 * rate(p, "output_mtok")
        + 60 * rate(p, "output_reasoning_mtok")
    ) / M
    assert res.cost_usd == expected


def test_anthropic_cache_writes_with_ttl_split(pricer: Pricer) -> None:
    p = rates("claude-3-5-haiku-latest", "anthropic")
    # langchain-anthropic: cache_creation is zeroed when the 5m/1h split is reported
    usage = lc_usage(
        4000,
        100,
        {
            "cache_read": 1000,
            "cache_creation": 0,
            "ephemeral_5m_input_tokens": 500,
            "ephemeral_1h_input_tokens": 2000,
        },
    )
    res = pricer.price(model="claude-3-5-haiku-latest", provider="anthropic", usage=usage)
    expected = (
        500 * rate(p, "input_mtok")
        + 1000 * rate(p, "cache_read_mtok")
        + 500 * rate(p, "cache_write_mtok")
        + 2000 * rate(p, "cache_write_1h_mtok")
        + 100 * rate(p, "output_mtok")
    ) / M
    assert res.cost_usd == expected


# --------------------------------------------------------------------------- service tiers


def _openai_usage(raw: dict[str, Any], service_tier: str | None) -> dict[str, Any]:
    base = pytest.importorskip("langchain_openai.chat_models.base")
    return dict(base._create_usage_metadata(raw, service_tier=service_tier))


RAW_OPENAI = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 100},
}


def test_priority_tier_uses_price_variant(pricer: Pricer) -> None:
    usage = _openai_usage(RAW_OPENAI, "priority")
    assert "priority_cache_read" in usage["input_token_details"]
    std = rates("gpt-4o-mini", "openai")
    pri = rates("gpt-4o-mini", "openai", {"service_tier": "priority"})
    assert rate(pri, "input_mtok") != rate(std, "input_mtok")
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=usage)
    expected = (
        176 * rate(pri, "input_mtok")
        + 1024 * rate(pri, "cache_read_mtok")
        + 300 * rate(pri, "output_mtok")
    ) / M
    assert res.cost_usd == expected
    assert res.notes == ()
    assert res.price_source == SOURCE


def test_flex_tier_uses_price_variant(pricer: Pricer) -> None:
    usage = _openai_usage(RAW_OPENAI, "flex")
    flex = rates("gpt-5-mini", "openai", {"service_tier": "flex"})
    res = pricer.price(model="gpt-5-mini", provider="openai", usage=usage)
    expected = (
        176 * rate(flex, "input_mtok")
        + 1024 * rate(flex, "cache_read_mtok")
        + 300 * rate(flex, "output_mtok")
    ) / M
    assert res.cost_usd == expected


def test_tier_without_variant_falls_back_to_standard_with_note(pricer: Pricer) -> None:
    std = rates("gpt-4o-mini", "openai")
    expected = (
        176 * rate(std, "input_mtok")
        + 1024 * rate(std, "cache_read_mtok")
        + 300 * rate(std, "output_mtok")
    ) / M
    flex = pricer.price(
        model="gpt-4o-mini", provider="openai", usage=_openai_usage(RAW_OPENAI, "flex")
    )
    assert flex.cost_usd == expected  # gpt-4o-mini has no flex variant
    assert flex.notes == ("service_tier_price_unavailable:flex",)
    # Azure serves OpenAI's models via fallback; genai-prices does not apply OpenAI tier prices
    azure = pricer.price(
        model="gpt-4o-mini", provider="azure", usage=_openai_usage(RAW_OPENAI, "priority")
    )
    assert azure.cost_usd == expected
    assert azure.notes == ("service_tier_price_unavailable:priority",)


def test_explicit_service_tier_argument(pricer: Pricer) -> None:
    pri = rates("gpt-4o-mini", "openai", {"service_tier": "priority"})
    res = pricer.price(
        model="gpt-4o-mini", provider="openai", usage=lc_usage(100, 10), service_tier="priority"
    )
    assert res.cost_usd == (100 * rate(pri, "input_mtok") + 10 * rate(pri, "output_mtok")) / M
    std = pricer.price(
        model="gpt-4o-mini", provider="openai", usage=lc_usage(100, 10), service_tier="default"
    )
    assert std == pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(100, 10))


def test_tier_variants_respect_their_start_date(pricer: Pricer) -> None:
    # gpt-4o-mini's priority variant has a StartDateConstraint; before it, standard price + note
    _, info = data_snapshot.get_snapshot().find_provider_model("gpt-4o-mini", None, "openai", None)
    (variant,) = [v for v in info.price_variants or () if v.when == {"service_tier": "priority"}]
    assert isinstance(variant.constraint, StartDateConstraint)
    start = variant.constraint.start_date
    before = datetime(start.year, start.month, start.day, tzinfo=UTC) - timedelta(days=1)
    after = before + timedelta(days=2)
    usage = lc_usage(1000, 100, {"priority": 1000}, {"priority": 100})
    for _ in range(2):  # alternate days: per-day caches must not mix them up
        for when, context, notes in (
            (before, None, ("service_tier_price_unavailable:priority",)),
            (after, {"service_tier": "priority"}, ()),
        ):
            p = info.get_prices(when, context)
            res = pricer.price(model="gpt-4o-mini", provider="openai", usage=usage, when=when)
            assert res.cost_usd == (1000 * rate(p, "input_mtok") + 100 * rate(p, "output_mtok")) / M
            assert res.notes == notes


# --------------------------------------------------------------------------- edge cases


def test_unknown_model_warns_once(pricer: Pricer, caplog: pytest.LogCaptureFixture) -> None:
    model = f"no-such-model-{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING, logger="langchain_tokenledger"):
        first = pricer.price(model=model, provider="openai", usage=lc_usage(10, 10))
        second = Pricer().price(model=model, provider=None, usage=lc_usage(20, 20))
    for res in (first, second):
        assert res == PriceResult(None, None, ("unknown_model",))
    warnings = [
        r for r in caplog.records if r.name == "langchain_tokenledger" and model in r.message
    ]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_no_model_and_no_usage(pricer: Pricer) -> None:
    assert pricer.price(model=None, provider="openai", usage=lc_usage(1, 1)).notes == ("no_model",)
    none = pricer.price(model="gpt-4o-mini", provider="openai", usage=None)
    assert none == PriceResult(None, None, ("no_usage",))
    assert pricer.price(model="gpt-4o-mini", provider="openai", usage={}).notes == ("no_usage",)
    assert pricer.price(model=None, usage=None).notes == ("no_model", "no_usage")


def test_all_zero_usage_costs_zero(pricer: Pricer) -> None:
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(0, 0))
    assert res.cost_usd == Decimal(0)
    assert isinstance(res.cost_usd, Decimal)
    assert res.price_source == SOURCE


def test_inconsistent_or_bad_usage_is_flagged_not_raised(pricer: Pricer) -> None:
    bad = lc_usage(10, 5, {"cache_read": 20})  # more cache reads than input
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=bad)
    assert res == PriceResult(None, None, ("invalid_usage",))
    for usage in ({"input_tokens": "many", "output_tokens": 1}, lc_usage(-5, 1)):
        assert pricer.price(model="gpt-4o-mini", provider="openai", usage=usage).notes == (
            "invalid_usage",
        )
    # integral floats (e.g. from JSON) are accepted
    p = rates("gpt-4o-mini", "openai")
    res = pricer.price(
        model="gpt-4o-mini", provider="openai", usage={"input_tokens": 10.0, "output_tokens": 0}
    )
    assert res.cost_usd == 10 * rate(p, "input_mtok") / M


def test_unknown_provider_falls_back_to_model_only(pricer: Pricer) -> None:
    p = rates("gpt-4o-mini", "openai")
    expected = (100 * rate(p, "input_mtok") + 10 * rate(p, "output_mtok")) / M
    for provider in ("fakelistchatmodel", "ollama", None):
        res = pricer.price(model="gpt-4o-mini", provider=provider, usage=lc_usage(100, 10))
        assert res.cost_usd == expected
        assert res.notes == ()


def test_known_provider_without_the_model_matches_on_model(pricer: Pricer) -> None:
    # e.g. ChatOpenAI pointed at DeepSeek's OpenAI-compatible API
    when = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
    res = pricer.price(model="deepseek-chat", provider="openai", usage=lc_usage(100, 0), when=when)
    expected = calc_price(
        Usage(input_tokens=100),
        "deepseek-chat",
        provider_id="deepseek",
        genai_request_timestamp=when,
    ).total_price
    assert res.cost_usd == expected
    assert res.notes == ("model_only_match",)


@pytest.mark.parametrize(
    ("ls_provider", "model"),
    [
        ("anthropic", "claude-3-5-haiku-latest"),
        ("google_genai", "gemini-2.5-flash"),
        ("mistralai", "mistral-large-latest"),
        ("groq", "llama-3.3-70b-versatile"),
        ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("xai", "grok-3"),
    ],
)
def test_langchain_provider_names_map_to_genai_prices(
    pricer: Pricer, ls_provider: str, model: str
) -> None:
    res = pricer.price(model=model, provider=ls_provider, usage=lc_usage(1000, 100))
    assert res.cost_usd is not None and res.cost_usd > 0
    assert res.notes == ()


def test_time_of_day_prices_use_call_time(pricer: Pricer) -> None:
    usage = lc_usage(1000, 500, {"cache_read": 100})
    costs = set()
    for hour in (1, 18):
        when = datetime(2026, 11, 20, hour, 0, tzinfo=UTC)
        expected = calc_price(
            Usage(input_tokens=1000, cache_read_tokens=100, output_tokens=500),
            "deepseek-chat",
            provider_id="deepseek",
            genai_request_timestamp=when,
        ).total_price
        res = pricer.price(model="deepseek-chat", provider="deepseek", usage=usage, when=when)
        assert res.cost_usd == expected
        costs.add(res.cost_usd)
    assert len(costs) == 2  # off-peak vs peak


# --------------------------------------------------------------------------- fine-tunes


def test_fine_tune_uses_genai_prices_fine_tune_price(pricer: Pricer) -> None:
    ft = rates("ft:gpt-4o-mini-2024-07-18:acme::abc", "openai")
    base = rates("gpt-4o-mini", "openai")
    assert rate(ft, "input_mtok") != rate(base, "input_mtok")
    for name in ("ft:gpt-4o-mini-2024-07-18:acme::abc", "ft:gpt-4o-mini-2024-07-18:acme:sfx:abc"):
        for provider in ("openai", None):
            res = pricer.price(model=name, provider=provider, usage=lc_usage(1000, 100))
            assert (
                res.cost_usd == (1000 * rate(ft, "input_mtok") + 100 * rate(ft, "output_mtok")) / M
            )
            assert res.notes == ()


def test_fine_tune_falls_back_to_base_price(pricer: Pricer) -> None:
    base = rates("gpt-4.1-mini-2025-04-14", "openai")
    usage = lc_usage(1000, 100, {"cache_read": 500})
    for name in ("ft:gpt-4.1-mini-2025-04-14:acme::x1", "ft:gpt-4.1-mini-2025-04-14:acme:sfx:x1"):
        res = pricer.price(model=name, provider="openai", usage=usage)
        assert (
            res.cost_usd
            == (
                500 * rate(base, "input_mtok")
                + 500 * rate(base, "cache_read_mtok")
                + 100 * rate(base, "output_mtok")
            )
            / M
        )
        assert res.notes == ("fine_tune_base_price",)
        assert res.price_source == SOURCE


def test_override_on_full_fine_tune_name_wins() -> None:
    name = "ft:gpt-4o-mini-2024-07-18:acme::abc"
    pricer = Pricer(prices={name: {"input": 1, "output": 2}})
    res = pricer.price(model=name, provider="openai", usage=lc_usage(1000, 100))
    assert res == PriceResult((1000 * Decimal(1) + 100 * Decimal(2)) / M, "override", ())
    # an override of the base name is used for unknown fine-tunes of it
    pricer = Pricer(prices={"gpt-4.1-mini-2025-04-14": {"input": 1, "output": 2}})
    res = pricer.price(
        model="ft:gpt-4.1-mini-2025-04-14:acme::x", provider="openai", usage=lc_usage(1000, 100)
    )
    assert res == PriceResult(Decimal("0.0012"), "override", ("fine_tune_base_price",))


# --------------------------------------------------------------------------- overrides


TABLE = {
    "my-model": {"input": "2", "output": 8, "cache_read": 0.5, "reasoning": "4"},
    "my-llama-*": {"input": 0.1, "output": "0.2", "provider": "ollama"},
    "gpt-4o-mini": {"input": 1, "output": 3, "provider": "azure"},
}


def _check_table_pricer(pricer: Pricer) -> None:
    usage = lc_usage(1000, 500, {"cache_read": 400, "cache_creation": 100}, {"reasoning": 200})
    res = pricer.price(model="my-model", provider="whatever", usage=usage)
    # cache_write defaults to input; reasoning has its own rate
    expected = (500 * Decimal(2) + 400 * Decimal("0.5") + 100 * Decimal(2) + 300 * 8 + 200 * 4) / M
    assert res == PriceResult(expected, "override", ())
    # exact matching is case-insensitive
    assert pricer.price(model="MY-MODEL", provider=None, usage=usage).cost_usd == expected

    glob = pricer.price(model="my-llama-3.1-8b", provider="ollama", usage=lc_usage(1000, 500))
    assert glob == PriceResult((1000 * Decimal("0.1") + 500 * Decimal("0.2")) / M, "override", ())
    # provider restriction: the glob rule does not apply to another provider -> unknown model
    other = pricer.price(model="my-llama-3.1-8b", provider="groq", usage=lc_usage(1000, 500))
    assert other.notes == ("unknown_model",)

    # provider-restricted override of a genai-prices model: azure only ("azure_openai" maps too)
    for provider in ("azure", "azure_openai"):
        azure = pricer.price(model="gpt-4o-mini", provider=provider, usage=lc_usage(1000, 0))
        assert azure == PriceResult(Decimal(1000) / M, "override", ())
    openai = pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(1000, 0))
    assert openai.price_source == SOURCE
    assert openai.cost_usd == 1000 * rate(rates("gpt-4o-mini", "openai"), "input_mtok") / M


def test_overrides_from_mapping() -> None:
    _check_table_pricer(Pricer(prices=TABLE))
    _check_table_pricer(Pricer(prices={"models": TABLE}))
    _check_table_pricer(Pricer(prices=load_price_table(TABLE)))


def test_overrides_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": TABLE}), encoding="utf-8")
    _check_table_pricer(Pricer(prices=path))
    _check_table_pricer(Pricer(prices=str(path)))


def test_overrides_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        """
[models.my-model]
input = "2"
output = 8
cache_read = 0.5
reasoning = 4

[models."my-llama-*"]
provider = "ollama"
input = 0.1
output = "0.2"

[models."gpt-4o-mini"]
provider = "azure"
input = 1
output = 3
""",
        encoding="utf-8",
    )
    _check_table_pricer(Pricer(prices=path))


def test_load_price_table_defaults_and_exact_decimals(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"m": {"input": 0.1, "output": 0.3}}', encoding="utf-8")
    table = load_price_table(path)
    assert table == {
        "m": PriceOverride(
            input=Decimal("0.1"),
            output=Decimal("0.3"),
            cache_read=Decimal("0.1"),
            cache_write=Decimal("0.1"),
            reasoning=Decimal("0.3"),
        )
    }
    # Python floats are converted via repr, not their binary expansion
    assert load_price_table({"m": {"input": 0.1, "output": 1}})["m"].input == Decimal("0.1")


def test_exact_key_beats_glob_and_globs_go_in_order() -> None:
    pricer = Pricer(
        prices={
            "acme-*": {"input": 1, "output": 1},
            "acme-large": {"input": 5, "output": 5},
            "acme-l*": {"input": 9, "output": 9},
        }
    )
    usage = lc_usage(1_000_000, 0)
    assert pricer.price(model="acme-large", usage=usage).cost_usd == 5
    assert pricer.price(model="acme-lite", usage=usage).cost_usd == 1


@pytest.mark.parametrize(
    ("table", "fragments"),
    [
        ({"m": {"input": -1, "output": 1}}, ["'m'", "'input'", ">= 0"]),
        ({"m": {"input": 1, "output": "abc"}}, ["'m'", "'output'", "number"]),
        ({"m": {"input": 1, "output": True}}, ["'m'", "'output'"]),
        ({"m": {"input": 1, "output": "NaN"}}, ["'m'", "'output'", "finite"]),
        ({"m": {"input": 1, "output": 1, "cache_read": [1]}}, ["'m'", "'cache_read'"]),
        ({"m": {"input": 1}}, ["'m'", "'output'", "required"]),
        ({"m": {"input": 1, "output": 1, "inptu": 1}}, ["'m'", "'inptu'", "unknown"]),
        ({"m": {"input": 1, "output": 1, "provider": 3}}, ["'m'", "'provider'"]),
        ({"m": 0.5}, ["'m'"]),
        ({"models": {"m": {"input": 1, "output": 1}}, "extra": {}}, ["'extra'"]),
    ],
)
def test_bad_override_tables_raise_value_error(table: Any, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        Pricer(prices=table)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_override_files_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        Pricer(prices=tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"m": {"input": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON"):
        Pricer(prices=bad_json)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[models.m\ninput = 1", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid TOML"):
        Pricer(prices=bad_toml)
    negative = tmp_path / "neg.toml"
    negative.write_text('[models."x-*"]\ninput = -0.5\noutput = 1\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"'x-\*'.*'input'.*>= 0"):
        Pricer(prices=negative)
    yaml = tmp_path / "prices.yaml"
    yaml.write_text("m: {}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        Pricer(prices=yaml)
    not_mapping = tmp_path / "list.json"
    not_mapping.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        Pricer(prices=not_mapping)


# --------------------------------------------------------------------------- other usage shapes


def test_llm_output_token_usage_shape(pricer: Pricer) -> None:
    p = rates("gpt-4o-mini", "openai")
    expected = (
        176 * rate(p, "input_mtok")
        + 1024 * rate(p, "cache_read_mtok")
        + 300 * rate(p, "output_mtok")
    ) / M
    res = pricer.price(model="gpt-4o-mini", provider="openai", usage=RAW_OPENAI)
    assert res.cost_usd == expected
    llm_output = {"token_usage": RAW_OPENAI, "model_name": "gpt-4o-mini-2024-07-18"}
    assert pricer.price(model="gpt-4o-mini", usage=llm_output).cost_usd == expected
    # a completion LLM's token_usage: no details at all
    plain = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert (
        pricer.price(model="gpt-4o-mini", provider="openai", usage=plain).cost_usd
        == (10 * rate(p, "input_mtok") + 5 * rate(p, "output_mtok")) / M
    )


def test_normalize_usage() -> None:
    assert normalize_usage(RAW_OPENAI) == {
        "input_tokens": 1200,
        "output_tokens": 300,
        "total_tokens": 1500,
        "input_token_details": {"cache_read": 1024},
        "output_token_details": {"reasoning": 100},
    }
    lc = lc_usage(1, 2, {"cache_read": 1})
    assert normalize_usage(lc) == lc
    # raw Anthropic usage: input_tokens excludes cache tokens
    raw_anthropic = {
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
    }
    norm = normalize_usage(raw_anthropic)
    assert norm is not None
    assert norm["input_tokens"] == 130
    assert norm["input_token_details"] == {"cache_read": 100, "cache_creation": 20}
    assert normalize_usage(None) is None
    assert normalize_usage({"total_tokens": 3}) is None


def test_openai_responses_shape(pricer: Pricer) -> None:
    base = pytest.importorskip("langchain_openai.chat_models.base")
    raw = {
        "input_tokens": 1200,
        "output_tokens": 300,
        "total_tokens": 1500,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens_details": {"reasoning_tokens": 100},
    }
    via_langchain = dict(base._create_usage_metadata_responses(raw))
    direct = pricer.price(model="gpt-4o-mini", provider="openai", usage=raw)
    assert direct == pricer.price(model="gpt-4o-mini", provider="openai", usage=via_langchain)
    assert direct.cost_usd is not None


# --------------------------------------------------------------------------- parity, caching


PARITY_CASES: list[tuple[str, str, dict[str, Any], dict[str, int]]] = [
    (
        "gpt-4o-mini",
        "openai",
        lc_usage(5000, 700, {"cache_read": 4096}, {"reasoning": 300}),
        {"input_tokens": 5000, "cache_read_tokens": 4096, "output_tokens": 700},
    ),
    (
        "gpt-5",
        "openai",
        lc_usage(20000, 9000, {"cache_read": 1000}, {"reasoning": 8000}),
        {"input_tokens": 20000, "cache_read_tokens": 1000, "output_tokens": 9000},
    ),
    (
        "claude-sonnet-4-5",
        "google_vertexai",  # tiered prices above 200k input tokens
        lc_usage(250_000, 1000, {"cache_read": 100_000, "cache_creation": 50_000}),
        {
            "input_tokens": 250_000,
            "cache_read_tokens": 100_000,
            "cache_write_tokens": 50_000,
            "output_tokens": 1000,
        },
    ),
    (
        "claude-sonnet-4-5",
        "anthropic",
        lc_usage(150_000, 1000, {"cache_read": 100_000, "ephemeral_1h_input_tokens": 10_000}),
        {
            "input_tokens": 150_000,
            "cache_read_tokens": 100_000,
            "cache_write_tokens": 10_000,
            "cache_write_1h_tokens": 10_000,
            "output_tokens": 1000,
        },
    ),
    (
        "gemini-2.5-flash",
        "google_genai",
        lc_usage(3000, 400, {"audio": 1000}, {"reasoning": 200}),
        {"input_tokens": 3000, "input_audio_tokens": 1000, "output_tokens": 400},
    ),
    (
        "sonar",
        "perplexity",  # per-request price
        lc_usage(0, 0),
        {"input_tokens": 0, "output_tokens": 0},
    ),
]


@pytest.mark.parametrize(("model", "provider", "usage", "genai_usage"), PARITY_CASES)
def test_parity_with_genai_prices_calc_price(
    pricer: Pricer, model: str, provider: str, usage: dict[str, Any], genai_usage: dict[str, int]
) -> None:
    res = pricer.price(model=model, provider=provider, usage=usage)
    genai_provider = {"google_vertexai": "google", "google_genai": "google"}.get(provider, provider)
    expected = calc_price(Usage(**genai_usage), model, provider_id=genai_provider).total_price
    assert res.cost_usd == expected
    assert res.price_source == SOURCE


def test_results_are_memoized_and_bounded() -> None:
    pricer = Pricer(cache_size=4)
    usage = lc_usage(100, 10)
    first = pricer.price(model="gpt-4o-mini", provider="openai", usage=usage)
    assert pricer.price(model="gpt-4o-mini", provider="openai", usage=dict(usage)) is first
    for i in range(20):
        pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(i, i))
    assert pricer._memo.cache_info().currsize <= 4
    pricer.clear_cache()
    assert pricer._memo.cache_info().currsize == 0


def test_picks_up_a_new_genai_prices_snapshot(pricer: Pricer) -> None:
    before = pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(1000, 0))
    custom = data_snapshot.DataSnapshot(
        providers=[
            Provider(
                id="openai",
                name="OpenAI",
                api_pattern="https://api.openai.com",
                models=[
                    ModelInfo(
                        id="gpt-4o-mini",
                        match=ClauseEquals(equals="gpt-4o-mini"),
                        prices=ModelPrice(input_mtok=Decimal(7), output_mtok=Decimal(9)),
                    )
                ],
            )
        ],
        from_auto_update=True,
    )
    data_snapshot.set_custom_snapshot(custom)
    try:
        res = pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(1000, 0))
        assert res == PriceResult(Decimal(7000) / M, f"{SOURCE}+auto-update", ())
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert pricer.price(model="gpt-4o-mini", provider="openai", usage=lc_usage(1000, 0)) == before


def test_thread_safety_smoke() -> None:
    models = [
        ("gpt-4o-mini", "openai"),
        ("claude-3-5-haiku-latest", "anthropic"),
        ("my-model", None),
        ("deepseek-chat", "deepseek"),
    ]
    jobs = [
        (models[i % 4], lc_usage(1000 + i % 97, 10 + i % 13, {"cache_read": i % 50}, {}))
        for i in range(1000)
    ]
    when = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    serial = Pricer(prices={"my-model": {"input": 1, "output": 2}})
    expected = sum(
        (serial.price(model=m, provider=p, usage=u, when=when).cost_usd or Decimal(0))
        for (m, p), u in jobs
    )
    shared = Pricer(prices={"my-model": {"input": 1, "output": 2}}, cache_size=64)
    sums: list[Decimal] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(offset: int) -> None:
        try:
            start.wait()
            total = Decimal(0)
            for k in range(len(jobs)):
                (m, p), u = jobs[(k + offset * 125) % len(jobs)]
                res = shared.price(model=m, provider=p, usage=u, when=when)
                assert res.cost_usd is not None
                total += res.cost_usd
            sums.append(total)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sums == [expected] * 8


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # pytest's threads
def test_a_forked_child_gets_a_free_warning_lock_even_if_the_parent_held_it() -> None:
    """A thread of the parent holding the lock at the fork would deadlock the child's pricing."""
    with pricing._warned_lock:
        assert lock_is_free_in_forked_child(lambda: pricing._warned_lock)


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # pytest's threads
def test_a_forked_child_gets_a_free_snapshot_lock_even_if_the_parent_held_it() -> None:
    """A parent's thread switching the price snapshot at the fork would deadlock the child's
    next switch."""
    pricer = Pricer()
    with pricer._reset_lock:
        assert lock_is_free_in_forked_child(lambda: pricer._reset_lock)
