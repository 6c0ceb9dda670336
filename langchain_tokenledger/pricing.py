"""Token usage -> exact ``Decimal`` USD cost, fast enough for a 30k rows/s background writer.

Prices come from the bundled `genai-prices <https://github.com/pydantic/genai-prices>`_ data
(or its auto-updated snapshot, when ``genai_prices.UpdatePrices`` is running), optionally
overridden per model by a user price table.

Example::

    from langchain_tokenledger.pricing import Pricer

    pricer = Pricer()  # or Pricer(prices="prices.toml")
    res = pricer.price(
        model="gpt-4o-mini",
        provider="openai",
        usage={"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500,
               "input_token_details": {"cache_read": 1024}},
    )
    res.cost_usd      # Decimal('0.000283200') == (176*0.15 + 1024*0.075 + 300*0.6) / 1e6
    res.price_source  # 'genai-prices 0.2.3'
    res.notes         # ()

How usage is priced
-------------------
``usage`` is a LangChain ``UsageMetadata`` dict. ``input_tokens`` *includes* cache reads and
cache writes, ``output_tokens`` *includes* reasoning tokens. The input is split into uncached,
cache-read (``cache_read``) and cache-write (``cache_creation``, or Anthropic's
``ephemeral_5m_input_tokens`` + ``ephemeral_1h_input_tokens``) tokens, plus ``audio``; the output
into visible, ``reasoning`` and ``audio`` tokens. Each part is billed at its own rate when the
price data has one, otherwise at the rate of the enclosing part (e.g. reasoning at the output
rate, which is how OpenAI bills it). This is the same "leaf" decomposition genai-prices uses.

Service tiers: LangChain prefixes detail keys with the tier (``priority_cache_read``,
``flex_reasoning``, plus ``priority``/``flex`` keys). Such usage is priced with the genai-prices
price variant for ``{"service_tier": tier}`` when the model has an active one, else at the
standard price with the note ``service_tier_price_unavailable:<tier>``. ``price(...,
service_tier=...)`` sets the tier explicitly (``"default"``/``"auto"``/``"standard"`` mean none).

The OpenAI ``llm_output["token_usage"]`` shape (``prompt_tokens``, ``completion_tokens``,
``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``), the
OpenAI Responses ``usage`` shape and Anthropic's raw ``usage`` shape are accepted too; see
:func:`normalize_usage`.

Notes (``PriceResult.notes``)
-----------------------------
``no_model``, ``no_usage``, ``unknown_model`` (cost ``None``; one warning per model name per
process on the ``langchain_tokenledger`` logger), ``invalid_usage`` (e.g. cache reads larger
than the input, cost ``None``), ``fine_tune_base_price`` (an ``ft:<base>:...`` model priced at
its base model's rate), ``service_tier_price_unavailable:<tier>``, ``model_only_match`` (the
provider is known to genai-prices but does not list the model; matched on the name alone),
``price_data_error`` (genai-prices data for the model failed validation, cost ``None``).

Price table format (``Pricer(prices=...)``)
-------------------------------------------
A mapping, or a ``.json`` / ``.toml`` file holding the same structure, from a model name or
glob to prices in **USD per 1M tokens**, optionally nested under a top-level ``"models"`` key::

    {"models": {
        "gpt-4o-mini":  {"input": 0.15, "output": 0.60, "cache_read": 0.075},
        "my-llama-*":   {"input": "0.05", "output": "0.10", "provider": "ollama"},
        "ft:gpt-4o-mini-2024-07-18:acme::*": {"input": 0.3, "output": 1.2}
    }}

The same in TOML::

    [models."gpt-4o-mini"]
    input = 0.15
    output = 0.60
    cache_read = 0.075

    [models."my-llama-*"]
    provider = "ollama"
    input = "0.05"
    output = "0.10"

Fields: ``input`` and ``output`` (required), ``cache_read`` and ``cache_write`` (default:
``input``), ``reasoning`` (default: ``output``), all numbers or numeric strings >= 0, ``provider``
(optional: the rule then applies only when the LangChain ``ls_provider``, or its genai-prices
provider id, equals it). Matching is case-insensitive: an exact key first, then glob keys
(``fnmatch`` syntax: ``*``, ``?``, ``[...]``) in table order. An override beats genai-prices,
and an override matching a fine-tune's full ``ft:...`` name beats everything else. Rows priced
from an override have ``price_source == "override"``. Audio tokens are billed at the
input/output rate. Invalid tables raise ``ValueError`` when the :class:`Pricer` is created.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation, getcontext
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeAlias, Union, cast

import genai_prices
from genai_prices import data_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    PriceContext,
    Provider,
    TieredPrices,
    TimeOfDateConstraint,
)
from genai_prices.units import UnitDef, UnitRegistry
from genai_prices.validation import validate_priced_units

__all__ = [
    "PriceOverride",
    "PriceResult",
    "Pricer",
    "PricesSource",
    "load_price_table",
    "normalize_usage",
]

logger = logging.getLogger("langchain_tokenledger")

PricesSource: TypeAlias = Union[Mapping[str, Any], str, "os.PathLike[str]"]
"""What ``Pricer(prices=...)`` and :func:`load_price_table` accept."""

_UTC: Final = timezone.utc
_GENAI_VERSION: Final[str] = genai_prices.__version__
_NO_TIER_VALUES: Final = frozenset({"", "default", "auto", "standard"})
_FINE_TUNE_PREFIX: Final = "ft:"
_GLOB_CHARS: Final = frozenset("*?[")

# ---------------------------------------------------------------------------------------------
# Usage normalisation
# ---------------------------------------------------------------------------------------------

# Usage values handed to the rate cards, by genai-prices usage key; positions in the value tuple.
_VALUE_KEYS: Final[tuple[str, ...]] = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_tokens",
    "output_reasoning_tokens",
    "output_audio_tokens",
)
_VALUE_INDEX: Final[dict[str, int]] = {key: i for i, key in enumerate(_VALUE_KEYS)}
_INPUT_INDEX: Final = _VALUE_INDEX["input_tokens"]
# Rate cards index ``values + _CONSTS``: a unit LangChain never reports reads 0, "requests"
# reads 1 (genai-prices bills one request per priced call).
_CONSTS: Final = (0, 1)
_CONST_ZERO: Final = len(_VALUE_KEYS)
_CONST_ONE: Final = len(_VALUE_KEYS) + 1

_PRIORITY_KEYS: Final = frozenset(
    {"priority", "priority_cache_read", "priority_cache_creation", "priority_reasoning"}
)
_FLEX_KEYS: Final = frozenset({"flex", "flex_cache_read", "flex_cache_creation", "flex_reasoning"})
_TIER_KEYS: Final = _PRIORITY_KEYS | _FLEX_KEYS
_EMPTY: Final[Mapping[str, Any]] = {}


def _details(value: object) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else _EMPTY


def _as_usage_metadata(usage: object) -> Mapping[str, Any] | None:
    """Return ``usage`` in LangChain ``UsageMetadata`` shape (the same object when it already is).

    Returns ``None`` for ``None`` or an unrecognised shape.
    """
    if type(usage) is dict:  # fast path; UsageMetadata is a plain dict at runtime
        u = cast(Mapping[str, Any], usage)
    elif usage is None:
        return None
    elif isinstance(usage, Mapping):
        u = cast(Mapping[str, Any], usage)
    else:
        dump = getattr(usage, "model_dump", None)  # e.g. an openai CompletionUsage object
        if not callable(dump):
            return None
        dumped = dump()
        if not isinstance(dumped, Mapping):
            return None
        u = cast(Mapping[str, Any], dumped)
    if ("input_tokens" in u or "output_tokens" in u) and not (
        "input_tokens_details" in u
        or "output_tokens_details" in u
        or "cache_read_input_tokens" in u
        or "cache_creation_input_tokens" in u
    ):
        return u
    if "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI chat / llm_output token_usage
        prompt = _details(u.get("prompt_tokens_details"))
        completion = _details(u.get("completion_tokens_details"))
        return _usage_metadata(
            u.get("prompt_tokens") or 0,
            u.get("completion_tokens") or 0,
            u.get("total_tokens"),
            {
                "cache_read": prompt.get("cached_tokens"),
                "cache_creation": prompt.get("cache_write_tokens"),
                "audio": prompt.get("audio_tokens"),
            },
            {
                "reasoning": completion.get("reasoning_tokens"),
                "audio": completion.get("audio_tokens"),
            },
        )
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:  # raw Anthropic
        read = u.get("cache_read_input_tokens") or 0
        creation = u.get("cache_creation_input_tokens") or 0
        ttl = _details(u.get("cache_creation"))
        return _usage_metadata(
            (u.get("input_tokens") or 0) + read + creation,
            u.get("output_tokens") or 0,
            None,
            {
                "cache_read": read,
                "cache_creation": creation,
                "ephemeral_5m_input_tokens": ttl.get("ephemeral_5m_input_tokens"),
                "ephemeral_1h_input_tokens": ttl.get("ephemeral_1h_input_tokens"),
            },
            {},
        )
    if "input_tokens_details" in u or "output_tokens_details" in u:  # raw OpenAI Responses
        inp = _details(u.get("input_tokens_details"))
        out = _details(u.get("output_tokens_details"))
        return _usage_metadata(
            u.get("input_tokens") or 0,
            u.get("output_tokens") or 0,
            u.get("total_tokens"),
            {
                "cache_read": inp.get("cached_tokens"),
                "cache_creation": inp.get("cache_write_tokens"),
            },
            {"reasoning": out.get("reasoning_tokens")},
        )
    token_usage = u.get("token_usage")  # a whole llm_output dict
    if isinstance(token_usage, Mapping):
        return _as_usage_metadata(token_usage)
    return None


def _usage_metadata(
    input_tokens: Any,
    output_tokens: Any,
    total_tokens: Any,
    input_details: Mapping[str, Any],
    output_details: Mapping[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": total_tokens if total_tokens is not None else input_tokens + output_tokens,
    }
    idet = {k: v for k, v in input_details.items() if v is not None}
    odet = {k: v for k, v in output_details.items() if v is not None}
    if idet:
        out["input_token_details"] = idet
    if odet:
        out["output_token_details"] = odet
    return out


def normalize_usage(usage: object) -> dict[str, Any] | None:
    """Convert a usage record to LangChain ``UsageMetadata`` shape, or ``None`` if unrecognised.

    Accepts ``UsageMetadata`` itself, the OpenAI chat ``usage`` / ``llm_output["token_usage"]``
    shape (or the whole ``llm_output`` dict), the OpenAI Responses ``usage`` shape and Anthropic's
    raw ``usage`` shape (whose ``input_tokens`` excludes cache tokens). :meth:`Pricer.price`
    applies this itself; it is public for callers that want to store normalised usage.

    Example::

        >>> normalize_usage({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
        ...                  "prompt_tokens_details": {"cached_tokens": 64}})
        {'input_tokens': 100, 'output_tokens': 20, 'total_tokens': 120, 'input_token_details': {'cache_read': 64}}
    """  # noqa: E501
    u = _as_usage_metadata(usage)
    return None if u is None else dict(u)


_Values = tuple[int, ...]


# The usage shape almost every call has: UsageMetadata with only these (detail) keys.
_PLAIN_USAGE_KEYS: Final = frozenset(
    {"input_tokens", "output_tokens", "total_tokens", "input_token_details", "output_token_details"}
)
_PLAIN_INPUT_DETAILS: Final = frozenset({"cache_read", "cache_creation", "audio"})
_PLAIN_OUTPUT_DETAILS: Final = frozenset({"reasoning", "audio"})
_NO_DETAILS: Final[dict[str, Any]] = {}


def _extract(usage: object, service_tier: str | None) -> tuple[str | None, _Values] | None:
    """UsageMetadata-shaped usage -> (tier, values in ``_VALUE_KEYS`` order); None if no usage.

    Values are returned as found (not validated); raises TypeError on non-numeric values.
    """
    if service_tier is None and type(usage) is dict and usage.keys() <= _PLAIN_USAGE_KEYS:
        # Fast path (two thirds of the general one's time): a plain dict without tier, TTL or
        # raw provider keys and no explicit tier, so none of the general path's checks apply.
        idet = usage.get("input_token_details") or _NO_DETAILS
        odet = usage.get("output_token_details") or _NO_DETAILS
        if (
            type(idet) is dict
            and type(odet) is dict
            and idet.keys() <= _PLAIN_INPUT_DETAILS
            and odet.keys() <= _PLAIN_OUTPUT_DETAILS
            and ("input_tokens" in usage or "output_tokens" in usage)
        ):
            return None, (
                usage.get("input_tokens") or 0,
                idet.get("cache_read") or 0,
                idet.get("cache_creation") or 0,
                0,
                0,
                idet.get("audio") or 0,
                usage.get("output_tokens") or 0,
                odet.get("reasoning") or 0,
                odet.get("audio") or 0,
            )
    return _extract_general(usage, service_tier)


def _extract_general(usage: object, service_tier: str | None) -> tuple[str | None, _Values] | None:
    """:func:`_extract` for any usage shape."""
    u = _as_usage_metadata(usage)
    if u is None:
        return None
    tier: str | None = None
    cache_read = cache_write = e5m = e1h = in_audio = reasoning = out_audio = 0
    idet = u.get("input_token_details")
    if idet:
        get = idet.get
        cache_read = get("cache_read") or 0
        cache_write = get("cache_creation") or 0
        in_audio = get("audio") or 0
        if not _TIER_KEYS.isdisjoint(idet):
            tier = "priority" if not _PRIORITY_KEYS.isdisjoint(idet) else "flex"
            cache_read += get(f"{tier}_cache_read") or 0
            cache_write += get(f"{tier}_cache_creation") or 0
        if "ephemeral_1h_input_tokens" in idet or "ephemeral_5m_input_tokens" in idet:
            e5m = get("ephemeral_5m_input_tokens") or 0
            e1h = get("ephemeral_1h_input_tokens") or 0
            # langchain-anthropic reports cache_creation=0 when the TTL split is present.
            if e5m + e1h > cache_write:
                cache_write = e5m + e1h
    odet = u.get("output_token_details")
    if odet:
        get = odet.get
        reasoning = get("reasoning") or 0
        out_audio = get("audio") or 0
        if not _TIER_KEYS.isdisjoint(odet):
            out_tier = "priority" if not _PRIORITY_KEYS.isdisjoint(odet) else "flex"
            reasoning += get(f"{out_tier}_reasoning") or 0
            tier = tier or out_tier
    if service_tier is not None:
        tier = None if service_tier.lower() in _NO_TIER_VALUES else service_tier.lower()
    values = (
        u.get("input_tokens") or 0,
        cache_read,
        cache_write,
        e5m,
        e1h,
        in_audio,
        u.get("output_tokens") or 0,
        reasoning,
        out_audio,
    )
    return tier, values


def _clean_values(values: tuple[Any, ...]) -> _Values | None:
    """Coerce integral floats/Decimals to int; None when any value is not a count >= 0."""
    try:
        if type(sum(values)) is int and min(values) >= 0:
            return values  # all plain ints (or bools) >= 0: the usual case
    except TypeError:
        pass
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, Decimal)):
            return None
        if isinstance(v, int):
            iv = v
        else:
            fv = float(v)
            if not math.isfinite(fv) or fv != int(fv):
                return None
            iv = int(fv)
        if iv < 0:
            return None
        out.append(iv)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Compiled rate cards (the arithmetic; ModelPrice.calc_price costs ~110 us per call)
# ---------------------------------------------------------------------------------------------

_REGISTRY: Final = UnitRegistry(unit_data)
_Price: TypeAlias = Decimal | TieredPrices


# (value index, indices of earlier terms nested inside this one, USD per unit,
#  ((tier start, USD per unit), ...) highest start first, or () when flat)
_Term: TypeAlias = tuple[int, tuple[int, ...], Decimal, tuple[tuple[int, Decimal], ...]]
_ZERO: Final = Decimal(0)


_CostFunction: TypeAlias = Callable[[_Values], "Decimal | None"]
# A sum of non-negative integer terms below 10**28 is what the Decimal loop of _Card computes
# without rounding in any context of at least 28 digits (Python's default): every product and
# partial sum there has a coefficient no larger than the total's.
_EXACT_PREC: Final = 28
_EXACT_LIMIT: Final = 10**_EXACT_PREC


def _exact_cost_function(terms: Sequence[_Term], fallback: _CostFunction) -> _CostFunction | None:
    """The card's cost in integer arithmetic (see :func:`_flat_cost_function`), or None.

    A card with tiers gets one flat function per range of total input tokens between two tier
    starts, picked on each call. ``None`` when a rate is negative (the ``Decimal`` path then).
    """
    starts = sorted({start for *_, tiers in terms for start, _ in tiers}, reverse=True)
    if not all(type(start) is int for start in starts):
        return None
    base = _flat_cost_function([(vi, desc, rate) for vi, desc, rate, _ in terms], fallback)
    if not starts or base is None:
        return base
    ranges: list[tuple[int, _CostFunction]] = []
    for above in starts:  # total input > above: the rate of each term's first tier below
        flat = _flat_cost_function(
            [
                (vi, desc, next((r for start, r in tiers if above + 1 > start), rate))
                for vi, desc, rate, tiers in terms
            ],
            fallback,
        )
        if flat is None:
            return None
        ranges.append((above, flat))

    def cost(values: _Values) -> Decimal | None:
        total_input = values[_INPUT_INDEX]
        for above, flat in ranges:
            if total_input > above:
                return flat(values)
        return base(values)

    return cost


def _flat_cost_function(
    rates: Sequence[tuple[int, tuple[int, ...], Decimal]], fallback: _CostFunction
) -> _CostFunction | None:
    """Integer arithmetic for a card without tiers, compiled once: half the time of ``Decimal``.

    Every rate is written as ``numerator * 10**-scale`` USD per unit, so the cost is the integer
    ``sum(leaf * numerator)`` scaled by ``10**-scale``. The result is the very ``Decimal`` the
    loop in :meth:`_Card._decimal_cost` returns, exponent included (the smallest exponent of the
    rates billed, or 0), so its text is the same too. A sum too large to be exact there goes to
    ``fallback``. ``None`` when a rate is negative or not finite.

    Example (gpt-4o-mini: cache reads, the rest of the input, output)::

        def cost(v):
            l0 = v[1]
            l1 = v[0] - l0
            if l1 < 0:
                return None
            l2 = v[6]
            units = l0 * 75 + l1 * 150 + l2 * 600
            ...
            if l0:
                return _Decimal(units) * _scale_9   # 10**-9
            ...
    """
    parts: list[tuple[int, tuple[int, ...], int, int]] = []
    for vi, desc, rate in rates:
        if not rate.is_finite() or rate < 0:
            return None
        _, digits, exponent = rate.as_tuple()
        assert isinstance(exponent, int)  # finite
        parts.append((vi, desc, int("".join(map(str, digits))), exponent))
    scale = max(0, -min((e for *_, e in parts), default=0))
    namespace: dict[str, Any] = {
        "_Decimal": Decimal,
        "_fallback": fallback,
        "_getcontext": getcontext,
    }
    lines = ["def cost(v):"]
    products: list[str] = []
    for t, (vi, desc, numerator, exponent) in enumerate(parts):
        leaf = f"v[{vi}]" if vi < _CONST_ZERO else str(_CONSTS[vi - _CONST_ZERO])
        lines.append(f"    l{t} = {leaf}" + "".join(f" - l{d}" for d in desc))
        if desc:
            lines.append(f"    if l{t} < 0:\n        return None")
        products.append(f"l{t} * {numerator * 10 ** (exponent + scale)}")
    lines.append(f"    units = {' + '.join(products) or '0'}")
    lines.append(
        f"    if units >= {_EXACT_LIMIT} or _getcontext().prec < {_EXACT_PREC}:\n"
        "        return _fallback(v)"
    )
    # The Decimal loop's exponent is the smallest one among the rates of non-zero leaves, or 0.
    for t in sorted(range(len(parts)), key=lambda i: parts[i][3]):
        exponent = parts[t][3]
        if exponent >= 0:
            break
        namespace[f"_scale_{-exponent}"] = Decimal(f"1E{exponent}")
        divisor = f" // {10 ** (exponent + scale)}" if exponent + scale else ""
        lines.append(f"    if l{t}:\n        return _Decimal(units{divisor}) * _scale_{-exponent}")
    lines.append(f"    return _Decimal(units{f' // {10**scale}' if scale else ''})")
    exec("\n".join(lines) + "\n", namespace)
    return cast(_CostFunction, namespace["cost"])


class _Card:
    """A ModelPrice compiled for the usage keys LangChain reports.

    Same semantics as ``genai_prices.types.ModelPrice.calc_price``: every priced unit is billed
    for its "leaf" count (its usage minus that of more specific priced units inside it, e.g.
    input minus cache reads), tiered prices switch on the total input tokens. ~30x faster.
    """

    __slots__ = ("_terms", "cost")

    def __init__(self, priced: Iterable[tuple[UnitDef, _Price]]) -> None:
        pairs = list(priced)
        validate_priced_units(tuple(unit for unit, _ in pairs), _REGISTRY)  # ValueError if bad
        # Most specific first, like genai_prices.decompose.compute_leaf_values.
        pairs.sort(key=lambda p: (-len(p[0].dimensions), p[0].usage_key))
        terms: list[_Term] = []
        kept: list[tuple[UnitDef, int]] = []  # (unit, terms index) of kept terms
        for unit, price in pairs:
            if unit.usage_key == "requests":
                value_index = _CONST_ONE
            else:
                value_index = _VALUE_INDEX.get(unit.usage_key, _CONST_ZERO)
            desc = tuple(
                i for other, i in kept if other.dimensions.items() >= unit.dimensions.items()
            )
            if value_index == _CONST_ZERO and not desc:
                continue  # usage LangChain never reports: its leaf is always 0
            per = Decimal(unit.per)
            if isinstance(price, TieredPrices):
                rate = price.base / per
                tiers = tuple(
                    (tier.start, tier.price / per)
                    for tier in sorted(price.tiers, key=lambda t: t.start, reverse=True)
                )
            else:
                rate, tiers = price / per, ()
            kept.append((unit, len(terms)))
            terms.append((value_index, desc, rate, tiers))
        self._terms: tuple[_Term, ...] = tuple(terms)
        exact = _exact_cost_function(self._terms, self._decimal_cost)
        # cost(values): exact USD cost of validated (int >= 0) values; None when a part exceeds
        # its whole.
        self.cost: _CostFunction = self._decimal_cost if exact is None else exact

    @classmethod
    def from_model_price(cls, model_price: ModelPrice) -> _Card:
        priced: list[tuple[UnitDef, _Price]] = []
        for unit in _REGISTRY.units.values():
            price = getattr(model_price, unit.price_key, None)
            if isinstance(price, (Decimal, TieredPrices)):
                priced.append((unit, price))
        return cls(priced)

    def _decimal_cost(self, values: _Values) -> Decimal | None:
        vals = values + _CONSTS
        leaves: list[int] = []
        total = _ZERO
        for vi, desc, rate, tiers in self._terms:
            leaf = vals[vi]
            if desc:
                for d in desc:
                    leaf -= leaves[d]
                if leaf < 0:
                    return None
            leaves.append(leaf)
            if leaf:
                if tiers:  # threshold ("cliff") pricing on the total input tokens
                    total_input = vals[_INPUT_INDEX]
                    for start, tier_rate in tiers:
                        if total_input > start:
                            rate = tier_rate
                            break
                total += rate * leaf
        return total


def _override_card(rule: PriceOverride) -> _Card:
    # Override prices are per 1M tokens, like the genai-prices token units (per == 1_000_000).
    units = _REGISTRY.units
    return _Card(
        [
            (units["input_tokens"], rule.input),
            (units["cache_read_tokens"], rule.cache_read),
            (units["cache_write_tokens"], rule.cache_write),
            (units["output_tokens"], rule.output),
            (units["output_reasoning_tokens"], rule.reasoning),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Override price tables
# ---------------------------------------------------------------------------------------------

_RATE_FIELDS: Final = ("input", "output", "cache_read", "cache_write", "reasoning")
_ALLOWED_FIELDS: Final = frozenset((*_RATE_FIELDS, "provider"))


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """One validated price-table rule, in USD per 1M tokens.

    Example::

        >>> PriceOverride(input=Decimal("0.2"), output=Decimal("0.8"),
        ...               cache_read=Decimal("0.2"), cache_write=Decimal("0.2"),
        ...               reasoning=Decimal("0.8")).provider is None
        True
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    reasoning: Decimal
    provider: str | None = None


def _to_price(model: str, fld: str, value: object) -> Decimal:
    where = f"price table: model {model!r}: field {fld!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{where} must be a number or numeric string, got {value!r}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError):
        raise ValueError(f"{where} must be a number or numeric string, got {value!r}") from None
    if not dec.is_finite():
        raise ValueError(f"{where} must be finite, got {value!r}")
    if dec < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return dec


def _parse_rule(model: object, raw: object) -> PriceOverride:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"price table: model names must be non-empty strings, got {model!r}")
    if isinstance(raw, PriceOverride):
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"price table: model {model!r}: expected a table of prices, got {type(raw).__name__}"
        )
    rule = cast(Mapping[str, object], raw)
    unknown = sorted(str(k) for k in rule if k not in _ALLOWED_FIELDS)
    if unknown:
        raise ValueError(
            f"price table: model {model!r}: unknown field(s) {', '.join(map(repr, unknown))} "
            f"(allowed: {', '.join(sorted(_ALLOWED_FIELDS))})"
        )
    for required in ("input", "output"):
        if rule.get(required) is None:
            raise ValueError(f"price table: model {model!r}: field {required!r} is required")
    rates = {f: _to_price(model, f, rule[f]) for f in _RATE_FIELDS if rule.get(f) is not None}
    provider = rule.get("provider")
    if provider is not None and (not isinstance(provider, str) or not provider.strip()):
        raise ValueError(
            f"price table: model {model!r}: field 'provider' must be a non-empty string, "
            f"got {provider!r}"
        )
    return PriceOverride(
        input=rates["input"],
        output=rates["output"],
        cache_read=rates.get("cache_read", rates["input"]),
        cache_write=rates.get("cache_write", rates["input"]),
        reasoning=rates.get("reasoning", rates["output"]),
        provider=provider.strip().lower() if isinstance(provider, str) else None,
    )


def _read_table_file(path: Path) -> object:
    if not path.is_file():
        raise ValueError(f"price table file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read price table {str(path)!r}: {exc}") from exc
    if suffix == ".json":
        try:
            return json.loads(raw.decode("utf-8"), parse_float=Decimal)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid JSON in price table {str(path)!r}: {exc}") from exc
    if suffix == ".toml":
        loads = _toml_loads()
        try:
            return loads(raw.decode("utf-8"), parse_float=Decimal)
        except UnicodeDecodeError as exc:
            raise ValueError(f"invalid TOML in price table {str(path)!r}: {exc}") from exc
        except ValueError as exc:  # tomllib.TOMLDecodeError subclasses ValueError
            raise ValueError(f"invalid TOML in price table {str(path)!r}: {exc}") from exc
    raise ValueError(
        f"unsupported price table format {suffix or '(no suffix)'!r} for {str(path)!r}: "
        "use a .json or .toml file"
    )


def _toml_loads() -> Callable[..., dict[str, Any]]:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads
    try:  # pragma: no cover - Python 3.10 only
        import importlib

        return cast(Callable[..., dict[str, Any]], importlib.import_module("tomli").loads)
    except ImportError:  # pragma: no cover
        raise ValueError(
            "TOML price tables need Python 3.11+ (tomllib) or the 'tomli' package; "
            "use a .json price table instead"
        ) from None


def load_price_table(source: PricesSource) -> dict[str, PriceOverride]:
    """Load and validate a price table from a mapping or a ``.json``/``.toml`` file path.

    Returns ``{model name or glob: PriceOverride}`` in table order. Raises ``ValueError`` naming
    the file, model and field on any problem. See the module docstring for the format.

    Example::

        >>> load_price_table({"models": {"my-llama-*": {"input": 0, "output": "0.1"}}})
        {'my-llama-*': PriceOverride(input=Decimal('0'), output=Decimal('0.1'), cache_read=Decimal('0'), cache_write=Decimal('0'), reasoning=Decimal('0.1'), provider=None)}
    """  # noqa: E501
    if isinstance(source, (str, os.PathLike)):
        table: object = _read_table_file(Path(source))
    else:
        table = source
    if not isinstance(table, Mapping):
        raise ValueError(f"price table must be a mapping of model -> prices, got {type(table)}")
    top = cast(Mapping[object, object], table)
    if "models" in top and isinstance(top["models"], Mapping):
        extra = sorted(str(k) for k in top if k != "models")
        if extra:
            raise ValueError(
                f"price table: unexpected top-level key(s) {', '.join(map(repr, extra))} "
                "next to 'models'"
            )
        top = cast(Mapping[object, object], top["models"])
    rules: dict[str, PriceOverride] = {}
    for model, raw in top.items():
        rules[cast(str, model)] = _parse_rule(model, raw)
    return rules


class _Overrides:
    __slots__ = ("_exact", "_globs")

    def __init__(self, rules: Mapping[str, PriceOverride]) -> None:
        self._exact: dict[str, tuple[PriceOverride, _Card]] = {}
        self._globs: list[tuple[str, PriceOverride, _Card]] = []
        for pattern, rule in rules.items():
            key = pattern.strip().lower()
            card = _override_card(rule)
            if _GLOB_CHARS.isdisjoint(key):
                self._exact[key] = (rule, card)
            else:
                self._globs.append((key, rule, card))

    def match(self, model: str, providers: tuple[str, ...]) -> _Card | None:
        name = model.lower()
        hit = self._exact.get(name)
        if hit is not None and (hit[0].provider is None or hit[0].provider in providers):
            return hit[1]
        for pattern, rule, card in self._globs:
            if (rule.provider is None or rule.provider in providers) and fnmatchcase(name, pattern):
                return card
        return None


# ---------------------------------------------------------------------------------------------
# Provider mapping and model resolution
# ---------------------------------------------------------------------------------------------

# LangChain ls_provider -> genai-prices provider id (None: not a priced API, match on model).
# Anything else goes through genai-prices' own provider matching, then model-only matching.
_LS_PROVIDERS: Final[dict[str, str | None]] = {
    "openai": "openai",
    "azure": "azure",
    "azure_openai": "azure",
    "azure_ai": "azure",
    "anthropic": "anthropic",
    "google_genai": "google",
    "google_vertexai": "google",
    "google_anthropic_vertex": "google",
    "vertexai": "google",
    "bedrock": "aws",
    "amazon_bedrock": "aws",
    "bedrock_converse": "aws",
    "groq": "groq",
    "mistralai": "mistral",
    "mistral": "mistral",
    "xai": "x-ai",
    "fireworks": "fireworks",
    "together": "together",
    "deepseek": "deepseek",
    "perplexity": "perplexity",
    "cohere": "cohere",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "moonshot": "moonshotai",
    "ollama": None,
    "huggingface": None,
    "litellm": "litellm",  # genai-prices splits "<provider>/<model>" refs itself
}


def _genai_provider_id(snapshot: data_snapshot.DataSnapshot, provider: str | None) -> str | None:
    if not provider:
        return None
    key = provider.strip().lower()
    if key in _LS_PROVIDERS:
        return _LS_PROVIDERS[key]
    found = data_snapshot.find_provider_by_id(snapshot.providers, key)
    return found.id if found is not None else None


def _find(
    snapshot: data_snapshot.DataSnapshot, model: str, provider_id: str | None
) -> tuple[Provider, ModelInfo] | None:
    try:
        return snapshot.find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None


def _fine_tune_base(model: str) -> str | None:
    """``ft:<base>:<org>::<id>`` / ``ft:<base>:<org>:<suffix>:<id>`` -> ``<base>``."""
    if model[:3].lower() != _FINE_TUNE_PREFIX:
        return None
    base = model.split(":", 2)[1]
    return base or None


def _is_time_varying(model: ModelInfo) -> bool:
    conditional = model.prices if isinstance(model.prices, list) else ()
    return any(isinstance(c.constraint, TimeOfDateConstraint) for c in conditional) or any(
        isinstance(v.constraint, TimeOfDateConstraint) for v in model.price_variants or ()
    )


@dataclass(slots=True, eq=False)
class _Resolution:
    """Cached outcome of matching (model, provider, tier) to a price."""

    source: str | None  # None: unknown model
    notes: tuple[str, ...]
    card: _Card | None = None  # fixed card (overrides)
    model_info: ModelInfo | None = None  # genai-prices model, priced per UTC day
    tier: str | None = None
    tier_allowed: bool = False  # genai-prices applies price variants only to own models
    time_varying: bool = False  # has time-of-day prices: results are not memoized
    # UTC day -> (card, notes) for models whose prices only change at UTC midnight
    day_cards: dict[int, tuple[_Card | None, tuple[str, ...]]] = field(default_factory=dict)
    # id(ModelPrice) -> (that ModelPrice, its card, notes); ModelPrice objects live in the data
    by_price: dict[int, tuple[ModelPrice, _Card | None, tuple[str, ...]]] = field(
        default_factory=dict
    )


def _tier_context(res: _Resolution, at: datetime) -> tuple[PriceContext | None, tuple[str, ...]]:
    tier = res.tier
    if tier is None:
        return None, ()
    model = res.model_info
    if res.tier_allowed and model is not None:
        context = {"service_tier": tier}
        for variant in model.price_variants or ():
            if (
                variant.when.get("service_tier") == tier
                and all(context.get(k) == v for k, v in variant.when.items())
                and (variant.constraint is None or variant.constraint.active(at))
            ):
                return context, ()
    return None, (f"service_tier_price_unavailable:{tier}",)


_UNKNOWN_RESOLUTION: Final = _Resolution(source=None, notes=("unknown_model",))


def _compile(model_price: ModelPrice) -> tuple[_Card | None, tuple[str, ...]]:
    try:
        return _Card.from_model_price(model_price), ()
    except ValueError:
        return None, ("price_data_error",)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class PriceResult(NamedTuple):
    """Outcome of :meth:`Pricer.price` (an immutable named tuple; results are shared).

    ``cost_usd`` is the exact cost (``None`` when unpriced), ``price_source`` is
    ``"genai-prices X.Y.Z"`` or ``"override"`` (``None`` when unpriced), and ``notes`` holds short
    flags such as ``"unknown_model"`` or ``"fine_tune_base_price"``.

    Example::

        >>> PriceResult(None, None, ("no_usage",)).notes
        ('no_usage',)
    """

    cost_usd: Decimal | None
    price_source: str | None
    notes: tuple[str, ...] = ()


_warned_models: set[str] = set()
_warned_lock = threading.Lock()


_pricers: weakref.WeakSet[Pricer] = weakref.WeakSet()
"""Every live :class:`Pricer`: a forked child gives each a new lock."""


def _new_lock_after_fork() -> None:
    global _warned_lock
    _warned_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    for pricer in list(_pricers):
        pricer._reset_lock = threading.Lock()  # as _warned_lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def _warn_unknown_model(model: str, provider: str | None) -> None:
    with _warned_lock:
        if model in _warned_models:
            return
        _warned_models.add(model)
    logger.warning(
        "langchain-tokenledger: no price for model %r (provider %r) in genai-prices %s; its "
        "cost is recorded as NULL. Add it to the ledger's price table (prices=...) to price it.",
        model,
        provider,
        _GENAI_VERSION,
    )


# PriceResult(*fields) without the Python-level __new__ of named tuples (~0.15 us per result)
_new_result: Final = cast(
    Callable[[tuple[Any, ...]], PriceResult], functools.partial(tuple.__new__, PriceResult)
)
_NO_MODEL: Final = PriceResult(None, None, ("no_model",))
_NO_MODEL_NO_USAGE: Final = PriceResult(None, None, ("no_model", "no_usage"))
_NO_USAGE: Final = PriceResult(None, None, ("no_usage",))
_UNKNOWN: Final = PriceResult(None, None, ("unknown_model",))
_INVALID_USAGE: Final = PriceResult(None, None, ("invalid_usage",))
_PRICING_ERROR: Final = PriceResult(None, None, ("pricing_error",))
_TIME_VARYING: Final = PriceResult(None, None, ("time_varying",))  # memo sentinel, never returned
_SECONDS_PER_DAY: Final = 86400
_EPOCH_ORDINAL: Final = datetime(1970, 1, 1).toordinal()  # UTC day = toordinal() - this
_MAX_DAYS_PER_MODEL: Final = 64


def _timestamp(when: datetime) -> float:
    """POSIX time of ``when`` (naive datetimes are UTC)."""
    return (when if when.tzinfo is not None else when.replace(tzinfo=_UTC)).timestamp()


class Pricer:
    """Price LLM calls from LangChain usage, with per-process caches; thread-safe.

    ``prices`` is an optional override table: a mapping, or a path to a ``.json``/``.toml``
    file (see the module docstring); it is validated here and a bad table raises
    ``ValueError``. ``cache_size`` bounds the LRU memo of whole results keyed by (model,
    provider, tier, UTC day, usage numbers); ``resolution_cache_size`` bounds the LRU of
    (model, provider, tier) -> matched price.

    Example::

        >>> pricer = Pricer(prices={"my-llama-*": {"input": 0, "output": 0}})
        >>> pricer.price(model="my-llama-3", provider="ollama",
        ...              usage={"input_tokens": 5, "output_tokens": 5, "total_tokens": 10})
        PriceResult(cost_usd=Decimal('0'), price_source='override', notes=())
    """

    def __init__(
        self,
        prices: PricesSource | None = None,
        *,
        cache_size: int = 65536,
        resolution_cache_size: int = 4096,
    ) -> None:
        rules = load_price_table(prices) if prices is not None else {}
        self._overrides = _Overrides(rules) if rules else None
        self._snapshot = data_snapshot.get_snapshot()
        self._source = self._source_for(self._snapshot)
        self._reset_lock = threading.Lock()
        _pricers.add(self)
        # functools.lru_cache is implemented in C and thread-safe: ~0.1 us per hit.
        self._memo = functools.lru_cache(maxsize=cache_size)(self._memo_miss)
        self._resolve = functools.lru_cache(maxsize=resolution_cache_size)(self._build_resolution)

    @property
    def version(self) -> str:
        """The genai-prices version string, e.g. ``"genai-prices 0.2.3"``.

        Example::

            >>> Pricer().version.startswith("genai-prices ")
            True
        """
        return f"genai-prices {_GENAI_VERSION}"

    @staticmethod
    def _source_for(snapshot: data_snapshot.DataSnapshot) -> str:
        base = f"genai-prices {_GENAI_VERSION}"
        return f"{base}+auto-update" if snapshot.from_auto_update else base

    def clear_cache(self) -> None:
        """Drop all cached resolutions and results (e.g. after changing genai-prices data)."""
        self._memo.cache_clear()
        self._resolve.cache_clear()

    def price(
        self,
        model: str | None,
        provider: str | None = None,
        usage: Mapping[str, Any] | None = None,
        *,
        service_tier: str | None = None,
        when: datetime | None = None,
    ) -> PriceResult:
        """Price one LLM call. Never raises for bad or unknown input; see ``notes`` instead.

        ``model``: the model name as reported (``ls_model_name`` / response ``model_name``).
        ``provider``: LangChain ``ls_provider`` (``"openai"``, ``"anthropic"``, ...); unknown
        values fall back to matching on the model name alone. ``usage``: ``UsageMetadata`` or
        another shape accepted by :func:`normalize_usage`. ``service_tier``: overrides the tier
        detected from ``priority_``/``flex_`` usage keys. ``when``: time of the call for
        date-dependent prices (default: now; naive datetimes are UTC).

        Example::

            >>> r = Pricer().price(model="gpt-4o-mini", provider="openai",
            ...                    usage={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})
            >>> r.cost_usd, r.price_source.startswith("genai-prices "), r.notes
            (Decimal('0'), True, ())
        """
        try:
            extracted = _extract(usage, service_tier)
            if not model:
                return _NO_MODEL if extracted is not None else _NO_MODEL_NO_USAGE
            if extracted is None:
                return _NO_USAGE
            snapshot = data_snapshot.get_snapshot()
            if snapshot is not self._snapshot:
                self._switch_snapshot(snapshot)
            if when is None:
                day = int(time.time() // _SECONDS_PER_DAY)
            elif when.tzinfo is _UTC or when.tzinfo is None:  # a tenth of timestamp()'s cost
                day = when.toordinal() - _EPOCH_ORDINAL
            else:
                day = int(when.timestamp() // _SECONDS_PER_DAY)
            tier, values = extracted
            result = self._memo(model, provider, tier, day, values)
            if result is _TIME_VARYING:
                now = time.time() if when is None else _timestamp(when)
                return self._compute(self._resolve(model, provider, tier), values, now, None)
            return result
        except (TypeError, ValueError, ArithmeticError):  # non-numeric / unhashable usage values
            return _INVALID_USAGE
        except Exception:  # pragma: no cover - defensive: pricing must never break the ledger
            logger.exception("langchain-tokenledger: pricing failed for model %r", model)
            return _PRICING_ERROR

    def _memo_miss(
        self, model: str, provider: str | None, tier: str | None, day: int, values: _Values
    ) -> PriceResult:
        res = self._resolve(model, provider, tier)
        if res.time_varying:
            return _TIME_VARYING
        return self._compute(res, values, day * _SECONDS_PER_DAY, day)

    def _compute(
        self, res: _Resolution, values: _Values, now: float, day: int | None
    ) -> PriceResult:
        """Price validated-or-not values; ``day`` set when prices are constant for that day."""
        clean = _clean_values(values)
        if clean is None:
            return _INVALID_USAGE
        if res.source is None:
            return _UNKNOWN
        cached = res.day_cards.get(day) if day is not None else None  # the usual case
        card, extra = cached if cached is not None else self._card(res, now, day)
        cost = card.cost(clean) if card is not None else None
        if card is not None and cost is None:
            extra = (*extra, "invalid_usage")
        notes = res.notes + extra if extra else res.notes
        return _new_result((cost, res.source if cost is not None else None, notes))

    def _switch_snapshot(self, snapshot: data_snapshot.DataSnapshot) -> None:
        with self._reset_lock:
            if snapshot is not self._snapshot:
                self._snapshot = snapshot
                self._source = self._source_for(snapshot)
                self.clear_cache()

    def _card(
        self, res: _Resolution, now: float, day: int | None
    ) -> tuple[_Card | None, tuple[str, ...]]:
        if res.model_info is None:  # override
            return res.card, ()
        if day is not None:  # prices constant for the UTC day (no time-of-day constraints)
            cached = res.day_cards.get(day)
            if cached is None:
                if len(res.day_cards) >= _MAX_DAYS_PER_MODEL:  # e.g. repricing old rows
                    res.day_cards.clear()
                cached = res.day_cards[day] = self._card(res, now, None)  # races only recompute
            return cached
        at = datetime.fromtimestamp(now, _UTC)
        context, notes = _tier_context(res, at)
        model_price = res.model_info.get_prices(at, context)
        if context is None:
            # get_prices returned one of the model's own ModelPrice objects: compile each once.
            known = res.by_price.get(id(model_price))
            if known is not None and known[0] is model_price:
                return known[1], known[2] + notes
            card, errs = _compile(model_price)
            res.by_price[id(model_price)] = (model_price, card, errs)
            return card, errs + notes
        card, errs = _compile(model_price)  # a fresh variant copy; results are memoized above
        return card, errs + notes

    def _override(self, model: str, provider: str | None, provider_id: str | None) -> _Card | None:
        if self._overrides is None:
            return None
        names = tuple(p for p in {(provider or "").strip().lower(), provider_id} if p)
        return self._overrides.match(model, names)

    def _lookup(
        self, snapshot: data_snapshot.DataSnapshot, model: str, provider_id: str | None
    ) -> tuple[Provider, ModelInfo, tuple[str, ...]] | None:
        if provider_id is not None:
            hit = _find(snapshot, model, provider_id)
            if hit is not None:
                return hit[0], hit[1], ()
            hit = _find(snapshot, model, None)
            notes: tuple[str, ...] = ("model_only_match",)
        else:
            hit = _find(snapshot, model, None)
            notes = ()
        if hit is None and provider_id is None and _fine_tune_base(model) is not None:
            hit = _find(snapshot, model, "openai")  # "ft:" names are OpenAI's convention
            notes = ()
        return None if hit is None else (hit[0], hit[1], notes)

    def _build_resolution(self, model: str, provider: str | None, tier: str | None) -> _Resolution:
        snapshot = self._snapshot
        provider_id = _genai_provider_id(snapshot, provider)
        card = self._override(model, provider, provider_id)
        if card is not None:
            return _Resolution(source="override", notes=(), card=card)
        notes: tuple[str, ...] = ()
        found = self._lookup(snapshot, model, provider_id)
        base = _fine_tune_base(model)
        if found is None and base is not None:
            notes = ("fine_tune_base_price",)
            card = self._override(base, provider, provider_id)
            if card is not None:
                return _Resolution(source="override", notes=notes, card=card)
            found = self._lookup(snapshot, base, provider_id)
        if found is None:
            _warn_unknown_model(model, provider)
            return _UNKNOWN_RESOLUTION
        found_provider, model_info, lookup_notes = found
        return _Resolution(
            source=self._source,
            notes=notes + lookup_notes,
            model_info=model_info,
            tier=tier,
            tier_allowed=any(model_info is m for m in found_provider.models),
            time_varying=_is_time_varying(model_info),
        )
