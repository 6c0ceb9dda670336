"""How we count: pure functions from LangChain callback payloads to the billed usage of one call.

Every counting rule lives here, stated in the docstring of the function that applies it and proven
by a unit test in ``tests/test_usage.py`` and, end to end with the real ``ChatOpenAI`` against the
local OpenAI-compatible server, in ``tests/test_accounting.py``. The handler calls
:func:`usage_for_call` once per finished LLM call; nothing here does I/O except the one-time
tiktoken encoding load described in :mod:`langchain_tokenledger.estimate`.

Example:
    >>> u = from_usage_metadata({"input_tokens": 9, "output_tokens": 3, "total_tokens": 12})
    >>> u.input_tokens, u.output_tokens, u.total_tokens, u.source
    (9, 3, 12, 'provider')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from itertools import pairwise
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from . import estimate
from .records import RECORD_FIELDS, Status, UsageRecord, UsageSource, record_values

TIER_PREFIXES = ("priority_", "flex_")
"""Service-tier prefixes langchain-openai puts on token-detail keys (``priority_cache_read``)."""

BATCH_FOLLOWER_NOTE = "usage_billed_on_first_prompt_of_batch"
"""Note on the 2nd..nth prompt rows of a multi-prompt completion call (see
:func:`from_llm_result`, rule 4)."""


@dataclass(slots=True)
class Usage:
    """The billed usage of one call, normalized.

    ``input_tokens`` includes cache reads and writes and ``output_tokens`` includes reasoning, as in
    LangChain's ``UsageMetadata``; ``None`` means unknown (never a silent 0). ``details`` is the
    usage as received (JSON-ready), ``notes`` the anomalies and rules applied.

    Example:
        >>> Usage().source, Usage().input_tokens
        ('none', None)
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    source: UsageSource = "none"
    cache_hit: bool = False
    model: str | None = None
    notes: list[str] = field(default_factory=list)


# -- single counts -----------------------------------------------------------------------------


def as_count(value: Any, name: str, notes: list[str]) -> int | None:
    """A token count as a non-negative ``int``, or ``None`` with the anomaly added to ``notes``.

    Rule: ``int`` and integral ``float`` values are counts. A numeric string or ``Decimal`` is
    accepted and flagged ``coerced_count:<name>``. A fractional value (``non_integer_count``), a
    negative one (``negative_count``) or anything else (``invalid_count``) is not a count: it
    becomes ``None`` (unknown), never a rounded guess.

    Example:
        >>> notes: list[str] = []
        >>> as_count(12, "input_tokens", notes), as_count(12.5, "output_tokens", notes), notes
        (12, None, ['non_integer_count:output_tokens'])
    """
    if type(value) is int and value >= 0:  # the usual case, first
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        notes.append(f"invalid_count:{name}")
        return None
    if isinstance(value, int):
        number: float | int | Decimal = value
    elif isinstance(value, float):
        number = value
    elif isinstance(value, (str, Decimal)):
        try:
            number = Decimal(value.strip() if isinstance(value, str) else value)
        except ArithmeticError:
            notes.append(f"invalid_count:{name}")
            return None
        if not number.is_finite():
            notes.append(f"invalid_count:{name}")
            return None
    else:
        notes.append(f"invalid_count:{name}")
        return None
    if isinstance(number, float) and not math.isfinite(number):
        notes.append(f"invalid_count:{name}")
        return None
    if number != int(number):
        notes.append(f"non_integer_count:{name}")
        return None
    if number < 0:
        notes.append(f"negative_count:{name}")
        return None
    if isinstance(value, (str, Decimal)):
        notes.append(f"coerced_count:{name}")
    return int(number)


_TIER_KEYS = {
    key: (key, *(prefix + key for prefix in TIER_PREFIXES))
    for key in ("cache_read", "cache_creation", "reasoning")
}


def _detail_sum(details: Any, key: str, notes: list[str]) -> int | None:
    """``key`` plus its service-tier variants (``priority_<key>``, ``flex_<key>``), if present."""
    if details is None or not isinstance(details, Mapping):  # None first: an ABC check is slow
        return None
    total: int | None = None
    for name in _TIER_KEYS[key]:
        if name in details:
            count = as_count(details[name], name, notes)
            if count is not None:
                total = (total or 0) + count
    return total


# -- one usage report --------------------------------------------------------------------------


def from_usage_metadata(
    usage: Mapping[str, Any], *, source: UsageSource = "provider", owned: bool = False
) -> Usage:
    """Normalize a LangChain ``UsageMetadata`` dict (what chat models put on ``AIMessage``).

    Rules:

    * cache reads are ``input_token_details.cache_read`` plus its service-tier variants
      (``priority_cache_read``, ``flex_cache_read``, which langchain-openai uses instead of
      ``cache_read`` for priority/flex calls); cache writes likewise ``cache_creation``;
      reasoning ``output_token_details.reasoning`` (+ tier variants). The un-prefixed
      ``priority``/``flex`` keys are the tier's *uncached* tokens and are not added again;
    * a count that is not a non-negative integer becomes ``None`` with a note (:func:`as_count`);
    * a missing ``total_tokens`` is input + output; a reported one that disagrees with
      input + output is kept as the provider's figure and flagged ``total_mismatch``;
    * parts larger than their whole (cache reads + writes > input, reasoning > output) are kept
      and flagged ``cache_exceeds_input`` / ``reasoning_exceeds_output``.

    ``details`` is a copy of ``usage``, unless ``owned`` says nobody else holds it (the writer's
    freshly unpacked usage): then a plain one is kept as it is.

    Example:
        >>> u = from_usage_metadata({"input_tokens": 10, "output_tokens": 7, "total_tokens": 17,
        ...     "input_token_details": {"priority_cache_read": 4, "priority": 6},
        ...     "output_token_details": {"priority_reasoning": 3, "priority": 4}})
        >>> u.cache_read_tokens, u.reasoning_tokens, u.notes
        (4, 3, [])
    """
    if source == "provider" and type(usage) is dict:
        fast = _plain_int_usage(usage, copy=not owned)
        if fast is not None:
            return fast
    notes: list[str] = []
    inp = as_count(usage.get("input_tokens"), "input_tokens", notes)
    out = as_count(usage.get("output_tokens"), "output_tokens", notes)
    total = as_count(usage.get("total_tokens"), "total_tokens", notes)
    if total is None and "total_tokens" not in usage and inp is not None and out is not None:
        total = inp + out
    elif total is not None and inp is not None and out is not None and total != inp + out:
        notes.append("total_mismatch")
    in_details = usage.get("input_token_details")
    out_details = usage.get("output_token_details")
    cache_read = _detail_sum(in_details, "cache_read", notes)
    cache_creation = _detail_sum(in_details, "cache_creation", notes)
    reasoning = _detail_sum(out_details, "reasoning", notes)
    if inp is not None and (cache_read or 0) + (cache_creation or 0) > inp:
        notes.append("cache_exceeds_input")
    if out is not None and (reasoning or 0) > out:
        notes.append("reasoning_exceeds_output")
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        total_tokens=total,
        cache_read_tokens=cache_read,
        cache_creation_tokens=cache_creation,
        reasoning_tokens=reasoning,
        details=_plain(usage),
        source=source,
        notes=notes,
    )


def _plain_int_usage(usage: dict[str, Any], *, copy: bool = True) -> Usage | None:
    """:func:`from_usage_metadata` for the usual shape in 60% of the time; ``None`` for others.

    The usual shape: a dict with str keys whose values are ints >= 0 or dicts of them
    (``input_token_details``...), with input and output counts. No count is then coerced or
    dropped, so only the ``total_mismatch`` and ``*_exceeds_*`` notes can apply.
    """
    details = usage.copy() if copy else usage
    for key, value in usage.items():
        kind = type(value)
        if kind is int:
            if value < 0 or type(key) is not str:
                return None
        elif kind is dict:
            if type(key) is not str:
                return None
            for k, v in value.items():
                if type(v) is not int or v < 0 or type(k) is not str:
                    return None
            if copy:
                details[key] = value.copy()
        else:
            return None
    inp = usage.get("input_tokens")
    out = usage.get("output_tokens")
    if inp is None or out is None:
        return None
    notes: list[str] = []
    total = usage.get("total_tokens")
    if total is None:
        total = inp + out
    elif total != inp + out:
        notes.append("total_mismatch")
    cache_read = cache_creation = reasoning = None
    in_details = usage.get("input_token_details")
    if type(in_details) is dict:
        if in_details.keys().isdisjoint(_TIERED_KEYS):  # no service tier: the usual case
            cache_read = in_details.get("cache_read")
            cache_creation = in_details.get("cache_creation")
        else:
            cache_read = _int_detail_sum(in_details, _TIER_KEYS["cache_read"])
            cache_creation = _int_detail_sum(in_details, _TIER_KEYS["cache_creation"])
        if (cache_read or 0) + (cache_creation or 0) > inp:
            notes.append("cache_exceeds_input")
    out_details = usage.get("output_token_details")
    if type(out_details) is dict:
        if out_details.keys().isdisjoint(_TIERED_KEYS):
            reasoning = out_details.get("reasoning")
        else:
            reasoning = _int_detail_sum(out_details, _TIER_KEYS["reasoning"])
        if (reasoning or 0) > out:
            notes.append("reasoning_exceeds_output")
    # Filled in place: Usage(...) goes through type.__call__ and the generated __init__, which
    # costs a quarter of this function. Every field is set (_USAGE_FIELDS, checked below).
    result = _new_usage(Usage)
    result.input_tokens = inp
    result.output_tokens = out
    result.total_tokens = total
    result.cache_read_tokens = cache_read
    result.cache_creation_tokens = cache_creation
    result.reasoning_tokens = reasoning
    result.details = details
    result.source = "provider"
    result.cache_hit = False
    result.model = None
    result.notes = notes
    return result


_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "details",
    "source",
    "cache_hit",
    "model",
    "notes",
)
assert tuple(f.name for f in fields(Usage)) == _USAGE_FIELDS, "update _plain_int_usage"
_new_usage = object.__new__
_TIERED_KEYS = frozenset(name for names in _TIER_KEYS.values() for name in names[1:])


def _int_detail_sum(details: dict[str, int], names: tuple[str, ...]) -> int | None:
    """:func:`_detail_sum` of a dict of ints >= 0."""
    total: int | None = None
    for name in names:
        if name in details:
            total = (total or 0) + details[name]
    return total


def from_token_usage(token_usage: Mapping[str, Any]) -> Usage:
    """Normalize an OpenAI-style ``llm_output["token_usage"]`` (completion-style LLMs).

    ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` are the input / output / total,
    ``prompt_tokens_details.cached_tokens`` the cache reads (and ``cache_write_tokens`` the
    writes), ``completion_tokens_details.reasoning_tokens`` the reasoning; then the rules of
    :func:`from_usage_metadata` apply. ``details`` keeps the payload as received.

    Example:
        >>> u = from_token_usage({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12,
        ...                       "prompt_tokens_details": {"cached_tokens": 2}})
        >>> u.input_tokens, u.output_tokens, u.cache_read_tokens, u.details["prompt_tokens"]
        (8, 4, 2, 8)
    """
    prompt_details = token_usage.get("prompt_tokens_details")
    completion_details = token_usage.get("completion_tokens_details")
    as_metadata: dict[str, Any] = {
        "input_tokens": token_usage.get("prompt_tokens"),
        "output_tokens": token_usage.get("completion_tokens"),
    }
    if "total_tokens" in token_usage:
        as_metadata["total_tokens"] = token_usage["total_tokens"]
    if isinstance(prompt_details, Mapping):
        in_details = {
            "cache_read": prompt_details.get("cached_tokens"),
            "cache_creation": prompt_details.get("cache_write_tokens"),
        }
        as_metadata["input_token_details"] = {k: v for k, v in in_details.items() if v is not None}
    if isinstance(completion_details, Mapping) and "reasoning_tokens" in completion_details:
        as_metadata["output_token_details"] = {"reasoning": completion_details["reasoning_tokens"]}
    usage = from_usage_metadata(as_metadata)
    usage.details = _plain(token_usage)
    return usage


# -- LLM-cache hits ----------------------------------------------------------------------------


def is_cache_hit(usage: Mapping[str, Any] | None) -> bool:
    """Whether a message's usage marks an LLM-cache replay.

    Rule: langchain-core's ``BaseChatModel._convert_cached_generations`` adds ``total_cost: 0``
    to the ``usage_metadata`` of every message it replays from an LLM cache (``set_llm_cache``,
    ``model.cache=...``, any ``BaseCache``); no provider integration writes that key. So a
    ``total_cost`` of 0 in ``usage_metadata`` means "served from the cache, billed nothing".

    Example:
        >>> is_cache_hit({"input_tokens": 9, "total_cost": 0}), is_cache_hit({"input_tokens": 9})
        (True, False)
    """
    if not usage or "total_cost" not in usage:
        return False
    cost = usage["total_cost"]
    return isinstance(cost, (int, float, Decimal)) and not isinstance(cost, bool) and cost == 0


def cache_hit_usage(replayed: Mapping[str, Any], model: str | None) -> Usage:
    """An LLM-cache hit bills nothing: token columns 0, the replayed usage kept in ``details``.

    The replayed usage (the original call's) stays in ``details`` so that savings can be
    reported; ``source`` is ``"cache"`` and the note ``llm_cache_hit`` is set.

    Example:
        >>> u = cache_hit_usage({"input_tokens": 9, "output_tokens": 3, "total_cost": 0}, "m")
        >>> u.total_tokens, u.cache_hit, u.source, u.details["input_tokens"]
        (0, True, 'cache', 9)
    """
    return Usage(
        input_tokens=0,
        output_tokens=0,
        total_tokens=0,
        cache_read_tokens=0,
        cache_creation_tokens=0,
        reasoning_tokens=0,
        details=_plain(replayed),
        source="cache",
        cache_hit=True,
        model=model,
        notes=["llm_cache_hit"],
    )


# -- streams -----------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def add_usages(left: Mapping[str, Any], right: Mapping[str, Any]) -> dict[str, Any]:
    """Add two usage mappings key by key (nested detail dicts too).

    Numbers are added; where either side is not a number, the right-hand value wins (the anomaly
    is then caught by :func:`as_count` when the sum is normalized).

    Example:
        >>> add_usages({"input_tokens": 5, "output_tokens": 1},
        ...            {"input_tokens": 0, "output_tokens": 4, "output_token_details": {"x": 1}})
        {'input_tokens': 5, 'output_tokens': 5, 'output_token_details': {'x': 1}}
    """
    out: dict[str, Any] = dict(left)
    for key, value in right.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = add_usages(out[key], value)
        elif _is_number(out[key]) and _is_number(value):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def stream_usage(chunk_usages: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """The usage of a stream from the usages its chunks carried: ``(usage, was_cumulative)``.

    Providers send usage once (the final chunk, as OpenAI does with ``stream_usage=True``) or as
    deltas that add up (Anthropic: input on the first chunk, output on the last). Some
    OpenAI-compatible servers instead repeat the *cumulative* usage on every chunk; adding those
    up would inflate the total. Rule: the reports are cumulative when the same positive
    ``input_tokens`` appears on at least two of them (an input is paid once, so a delta stream
    never repeats it) and ``output_tokens`` never decreases; then the last report is the usage.
    Otherwise the reports are added (:func:`add_usages`).

    Example:
        >>> stream_usage([{"input_tokens": 9, "output_tokens": 1},
        ...               {"input_tokens": 9, "output_tokens": 3}])
        ({'input_tokens': 9, 'output_tokens': 3}, True)
        >>> stream_usage([{"input_tokens": 9, "output_tokens": 0},
        ...               {"input_tokens": 0, "output_tokens": 3}])
        ({'input_tokens': 9, 'output_tokens': 3}, False)
    """
    if not chunk_usages:
        return None, False
    if len(chunk_usages) == 1:
        return dict(chunk_usages[0]), False
    positive = [u["input_tokens"] for u in chunk_usages if _is_number(u.get("input_tokens"))]
    positive = [i for i in positive if i > 0]
    outputs: list[float] = [
        u["output_tokens"] for u in chunk_usages if _is_number(u.get("output_tokens"))
    ]
    outputs_rise = len(outputs) == len(chunk_usages) and all(a <= b for a, b in pairwise(outputs))
    if len(positive) >= 2 and len(set(positive)) == 1 and outputs_rise:
        return dict(chunk_usages[-1]), True
    total: dict[str, Any] = {}
    for u in chunk_usages:
        total = add_usages(total, u)
    return total, False


# -- one call ----------------------------------------------------------------------------------


def _message_usage(result: LLMResult) -> tuple[list[Mapping[str, Any]], str | None]:
    """The ``usage_metadata`` of each choice of the call, and the model name the response gave.

    Only ``generations[0]`` belongs to the call: a run's ``LLMResult`` holds one prompt, and on
    a failed stream langchain-core appends the error's metadata as a second entry.
    """
    usages: list[Mapping[str, Any]] = []
    model: str | None = None
    for gen in result.generations[0] if result.generations else ():
        if isinstance(gen, ChatGeneration):
            message = gen.message
            usage = getattr(message, "usage_metadata", None)
            if usage:
                usages.append(usage)
            if model is None:
                meta = message.response_metadata or {}
                name = meta.get("model_name") or meta.get("model")
                model = str(name) if name else None
    return usages, model


def from_llm_result(
    result: LLMResult | None,
    *,
    chunk_usages: Sequence[Mapping[str, Any]] = (),
    batch_size: int = 1,
) -> Usage:
    """The usage an LLM run reported, from what ``on_llm_end`` / ``on_llm_error`` received.

    Rules, first match wins:

    1. **LLM-cache hit** (a replayed message, see :func:`is_cache_hit`): billed zero
       (:func:`cache_hit_usage`).
    2. **Streamed chunks carried usage**: :func:`stream_usage` (cumulative reports are not
       summed; note ``cumulative_stream_usage_corrected``). This is also what a failed or
       cancelled stream keeps: whatever usage arrived before it stopped.
    3. **Chat message ``usage_metadata``**: with ``n>1`` choices langchain-openai copies the
       response's one usage onto every choice; equal copies count once (note
       ``n=<k>_choices_counted_once``). Choices with different usages (a provider billing per
       choice) are added and flagged ``summed_choice_usage``.
    4. **``llm_output["token_usage"]``** (completion-style ``BaseLLM`` and legacy chat models):
       :func:`from_token_usage`. A multi-prompt ``generate`` makes one provider request for all
       prompts, and LangChain (``LLMResult.flatten``) hands the request's usage to the first
       prompt's run and ``{}`` to the others: the first row carries the whole request (note
       ``usage_covers_batch_of_<k>``) and the others keep NULL tokens with the note
       :data:`BATCH_FOLLOWER_NOTE`. Splitting the sum evenly would invent per-prompt numbers; this
       way the totals stay exact and every row says where its tokens went.
    5. Otherwise nothing was reported: ``source = "none"``, NULL tokens.

    Example:
        >>> from langchain_core.messages import AIMessage
        >>> from langchain_core.outputs import ChatGeneration, LLMResult
        >>> usage = {"input_tokens": 9, "output_tokens": 6, "total_tokens": 15}
        >>> choice = ChatGeneration(message=AIMessage("hi", usage_metadata=usage))
        >>> u = from_llm_result(LLMResult(generations=[[choice, choice]]))
        >>> u.total_tokens, u.notes
        (15, ['n=2_choices_counted_once'])
    """
    usages: list[Mapping[str, Any]] = []
    model: str | None = None
    llm_output: Mapping[str, Any] = {}
    if result is not None:
        usages, model = _message_usage(result)
        llm_output = result.llm_output or {}
        if model is None:
            name = llm_output.get("model_name") or llm_output.get("model")
            model = str(name) if name else None
    if usages and is_cache_hit(usages[0]):
        return cache_hit_usage(usages[0], model)
    token_usage = llm_output.get("token_usage")
    if chunk_usages:
        merged, cumulative = stream_usage(chunk_usages)
        usage = from_usage_metadata(merged or {})
        if cumulative:
            usage.notes.append("cumulative_stream_usage_corrected")
    elif usages:
        first = usages[0]
        if all(u == first for u in usages[1:]):
            usage = from_usage_metadata(first)
            if len(usages) > 1:
                usage.notes.append(f"n={len(usages)}_choices_counted_once")
        else:
            total: dict[str, Any] = {}
            for u in usages:
                total = add_usages(total, u)
            usage = from_usage_metadata(total)
            usage.notes.append("summed_choice_usage")
    elif isinstance(token_usage, Mapping) and token_usage:
        usage = from_token_usage(token_usage)
        if batch_size > 1:
            usage.notes.append(f"usage_covers_batch_of_{batch_size}")
    elif isinstance(token_usage, Mapping) and batch_size > 1:
        usage = Usage(notes=[BATCH_FOLLOWER_NOTE])
    else:
        usage = Usage()
    usage.model = model
    return usage


def usual_call_usage(
    result: LLMResult | None, chunk_usages: Sequence[Mapping[str, Any]] = ()
) -> tuple[dict[str, Any], str | None] | None:
    """The usage as reported and the model the response named, for the usual call; else ``None``.

    The usual call: one chat choice, no LLM-cache replay (``total_cost`` absent from the
    message's usage), and one usage report, a non-empty ``dict``: the message's
    ``usage_metadata``, or the one usage a stream's chunks carried (which :func:`stream_usage`
    would take as it is). Its usage is then :func:`from_usage_metadata` of the report, as
    :func:`from_llm_result` would find it; the handler packs such a call's report as it is, and
    the ledger's writer normalizes it (:func:`~langchain_tokenledger.packing.unpack_values`).

    Example:
        >>> from langchain_core.messages import AIMessage
        >>> from langchain_core.outputs import ChatGeneration, LLMResult
        >>> message = AIMessage("hi", usage_metadata={"input_tokens": 9, "output_tokens": 6,
        ...     "total_tokens": 15}, response_metadata={"model_name": "gpt-4o-mini"})
        >>> usual_call_usage(LLMResult(generations=[[ChatGeneration(message=message)]]))
        ({'input_tokens': 9, 'output_tokens': 6, 'total_tokens': 15}, 'gpt-4o-mini')
    """
    if result is None or len(chunk_usages) > 1:
        return None
    generations = result.generations
    if not generations or len(generations[0]) != 1:
        return None
    choice = generations[0][0]
    if not isinstance(choice, ChatGeneration):
        return None
    message = choice.message
    message_usage = getattr(message, "usage_metadata", None)
    if message_usage is not None and (
        type(message_usage) is not dict or "total_cost" in message_usage
    ):
        return None
    reported = chunk_usages[0] if chunk_usages else message_usage
    if not reported or type(reported) is not dict:
        return None
    meta = message.response_metadata
    name = (meta.get("model_name") or meta.get("model")) if meta else None
    if not name:
        llm_output = result.llm_output
        if llm_output:
            name = llm_output.get("model_name") or llm_output.get("model")
    if not name:
        return reported, None
    return reported, name if type(name) is str else str(name)


def usage_for_call(
    result: LLMResult | None,
    *,
    status: Status = "ok",
    chunk_usages: Sequence[Mapping[str, Any]] = (),
    batch_size: int = 1,
    model_hint: str | None = None,
    prompts: Sequence[str] | None = None,
    messages: Sequence[BaseMessage] | None = None,
) -> Usage:
    """Everything the ledger records about one finished call's usage (the handler's one entry).

    Rules, on top of :func:`from_llm_result`:

    * **model**: the model the response named, else the requested one (``model_hint``); a call
      with neither is kept with the note ``no_model`` (never dropped);
    * **estimate**: a call that completed (status ``ok``) without any reported usage is counted
      locally with tiktoken (:mod:`~langchain_tokenledger.estimate`), ``source = "estimated"``,
      note ``estimated_tiktoken``. Failed and cancelled calls are not estimated: how much of
      them the provider billed cannot be known, so they keep what was reported. Where no
      encoding is available (offline, or a model tiktoken does not describe) the tokens stay
      NULL with the note ``estimate_unavailable``: never a guess dressed as a count;
    * a call that ends with no usage at all gets the note ``usage_unknown`` (which is also the
      reason its cost is NULL).

    Example:
        >>> u = usage_for_call(None, status="error", model_hint="gpt-4o-mini")
        >>> u.model, u.source, u.input_tokens, u.notes
        ('gpt-4o-mini', 'none', None, ['usage_unknown'])
    """
    usage = None
    usual = usual_call_usage(result, chunk_usages)
    if usual is not None:
        usage = _plain_int_usage(usual[0])
        if usage is not None:
            usage.model = usual[1]
    if usage is None:
        # Only completion-style calls (prompts, no messages) share one request across a batch.
        shared = batch_size if messages is None else 1
        usage = from_llm_result(result, chunk_usages=chunk_usages, batch_size=shared)
    if usage.model is None:
        usage.model = model_hint
    if usage.model is None:
        usage.notes.append("no_model")
    if usage.source == "none" and status == "ok" and BATCH_FOLLOWER_NOTE not in usage.notes:
        _estimate(usage, prompts, messages, result)
    if usage.source == "none":
        usage.notes.append("usage_unknown")
    return usage


def _estimate(
    usage: Usage,
    prompts: Sequence[str] | None,
    messages: Sequence[BaseMessage] | None,
    result: LLMResult | None,
) -> None:
    model = usage.model
    if not estimate.can_estimate(model):
        usage.notes.append("estimate_unavailable")
        return
    if messages is not None:
        inp = estimate.estimate_message_tokens(model, messages)
    else:
        inp = estimate.estimate_tokens(model, "".join(prompts or ()))
    out = estimate.estimate_output_tokens(model, output_texts(result))
    if inp is None or out is None:
        usage.notes.append("estimate_unavailable")
        return
    usage.input_tokens, usage.output_tokens, usage.total_tokens = inp, out, inp + out
    usage.source = "estimated"
    usage.notes.append("estimated_tiktoken")


_COUNT_ANOMALIES = ("coerced_count:", "invalid_count:", "negative_count:", "non_integer_count:")
_SOURCE, _INPUT, _OUTPUT, _NOTES, _DETAILS, _CACHE_READ, _CACHE_WRITE, _REASONING = (
    RECORD_FIELDS.index(name)
    for name in (
        "usage_source",
        "input_tokens",
        "output_tokens",
        "notes",
        "usage_details",
        "cache_read_tokens",
        "cache_creation_tokens",
        "reasoning_tokens",
    )
)


def priced_usage(record: UsageRecord) -> dict[str, Any] | None:
    """The usage a row's cost is computed from, or ``None`` when it cannot be priced.

    Rules (LLM-cache hits never get here: they cost 0):

    * unknown usage (``usage_source = 'none'``) or a NULL input or output count: no price (the
      row's notes already say why: ``usage_unknown``, ``negative_count:*``, ...);
    * a provider-reported row with clean counts: ``usage_details`` as received, so service
      tiers (``priority_*``/``flex_*`` keys), cache writes and audio tokens are priced at their
      own rates; this is also what :func:`~langchain_tokenledger.reprice.reprice` re-reads;
    * anything else (estimated rows, rows whose counts had to be coerced): the token columns.

    Example:
        >>> from langchain_tokenledger.records import UsageRecord
        >>> priced_usage(UsageRecord(run_id="r", input_tokens=5, output_tokens=2,
        ...                          total_tokens=7, usage_source="estimated"))
        {'input_tokens': 5, 'output_tokens': 2, 'total_tokens': 7}
    """
    usage = usage_to_price(record_values(record))
    return None if usage is None else dict(usage)


def usage_to_price(values: Sequence[Any]) -> Mapping[str, Any] | None:
    """:func:`priced_usage` without the copy, from a record's field values in column order
    (:func:`~langchain_tokenledger.records.record_values`, or a packed record's values, which
    the writer prices without building the record): the row's own ``usage_details`` when those
    are what is priced (the writer only reads it).
    """
    source, input_tokens, output_tokens = values[_SOURCE], values[_INPUT], values[_OUTPUT]
    if source == "none" or input_tokens is None or output_tokens is None:
        return None
    notes, details = values[_NOTES], values[_DETAILS]
    clean = not notes or not any(n.startswith(_COUNT_ANOMALIES) for n in notes)
    if source == "provider" and details and clean:
        return details  # type: ignore[no-any-return]
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    in_details = {
        k: v
        for k, v in (("cache_read", values[_CACHE_READ]), ("cache_creation", values[_CACHE_WRITE]))
        if v
    }
    if in_details:
        usage["input_token_details"] = in_details
    if values[_REASONING]:
        usage["output_token_details"] = {"reasoning": values[_REASONING]}
    return usage


def output_texts(result: LLMResult | None) -> list[str]:
    """The text of each choice of the call (what an estimate counts as output).

    Example:
        >>> from langchain_core.outputs import Generation, LLMResult
        >>> output_texts(LLMResult(generations=[[Generation(text="a"), Generation(text="b")]]))
        ['a', 'b']
    """
    if result is None or not result.generations:
        return []
    return [gen.text or "" for gen in result.generations[0]]


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a usage mapping (TypedDicts and nested details become plain dicts)."""
    if type(value) is int or value is None or type(value) is str:  # the usual leaves, first
        return value
    if type(value) is dict or isinstance(value, Mapping):  # dict first: an ABC check is slow
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
