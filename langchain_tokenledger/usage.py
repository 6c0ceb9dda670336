"""How we count: pure functions from LangChain outputs to the billed usage of one LLM call.

Every counting rule lives here, each stated in its function's docstring, each proven by a test in
``tests/test_usage.py`` (unit) and ``tests/test_accounting.py`` (end to end against the local
OpenAI-compatible server).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from .records import UsageSource

logger = logging.getLogger("langchain_tokenledger")

TIER_PREFIXES = ("priority_", "flex_")
"""Service-tier prefixes langchain-openai puts on token-detail keys (``priority_cache_read``)."""


@dataclass(slots=True)
class Usage:
    """The billed usage of one call, normalized.

    ``input_tokens`` includes cache reads and writes and ``output_tokens`` includes reasoning, as in
    LangChain's ``UsageMetadata``; ``None`` means unknown (never a silent 0).
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


def _as_count(value: Any, name: str, notes: list[str]) -> int | None:
    """A token count as a non-negative int; anything else is flagged in ``notes``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            notes.append(f"invalid_count:{name}")
            return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            notes.append(f"invalid_count:{name}")
            return None
        if not value.is_integer():
            notes.append(f"non_integer_count:{name}")
        value = round(value)
    if value < 0:
        notes.append(f"negative_count:{name}")
        return None
    return int(value)


def _detail_sum(details: Mapping[str, Any] | None, key: str, notes: list[str]) -> int | None:
    """Sum ``key`` and its service-tier variants (``priority_<key>``, ``flex_<key>``)."""
    if not details:
        return None
    total: int | None = None
    for name in (key, *(p + key for p in TIER_PREFIXES)):
        if name in details:
            count = _as_count(details[name], name, notes)
            if count is not None:
                total = (total or 0) + count
    return total


def from_usage_metadata(usage: Mapping[str, Any], *, source: UsageSource = "provider") -> Usage:
    """Normalize a LangChain ``UsageMetadata`` dict.

    Rules: cache reads are ``input_token_details.cache_read`` plus its tier-prefixed variants,
    cache writes likewise ``cache_creation``, reasoning ``output_token_details.reasoning``;
    negative or non-numeric counts become NULL with a note; a ``total_tokens`` that disagrees with
    input + output is kept as reported and flagged ``total_mismatch``.
    """
    notes: list[str] = []
    inp = _as_count(usage.get("input_tokens"), "input_tokens", notes)
    out = _as_count(usage.get("output_tokens"), "output_tokens", notes)
    total = _as_count(usage.get("total_tokens"), "total_tokens", notes)
    if total is None and inp is not None and out is not None:
        total = inp + out
    elif total is not None and inp is not None and out is not None and total != inp + out:
        notes.append("total_mismatch")
    in_details = usage.get("input_token_details")
    out_details = usage.get("output_token_details")
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        total_tokens=total,
        cache_read_tokens=_detail_sum(in_details, "cache_read", notes),
        cache_creation_tokens=_detail_sum(in_details, "cache_creation", notes),
        reasoning_tokens=_detail_sum(out_details, "reasoning", notes),
        details=_plain(usage),
        source=source,
        notes=notes,
    )


def from_token_usage(token_usage: Mapping[str, Any]) -> Usage:
    """Normalize an OpenAI-style ``llm_output["token_usage"]`` (completion-style LLMs).

    ``prompt_tokens``/``completion_tokens``/``total_tokens``, with
    ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``.
    """
    prompt_details = token_usage.get("prompt_tokens_details") or {}
    completion_details = token_usage.get("completion_tokens_details") or {}
    as_metadata: dict[str, Any] = {
        "input_tokens": token_usage.get("prompt_tokens"),
        "output_tokens": token_usage.get("completion_tokens"),
        "total_tokens": token_usage.get("total_tokens"),
    }
    if isinstance(prompt_details, Mapping) and prompt_details.get("cached_tokens") is not None:
        as_metadata["input_token_details"] = {"cache_read": prompt_details["cached_tokens"]}
    if (
        isinstance(completion_details, Mapping)
        and completion_details.get("reasoning_tokens") is not None
    ):
        as_metadata["output_token_details"] = {
            "reasoning": completion_details["reasoning_tokens"]
        }
    usage = from_usage_metadata(as_metadata)
    usage.details = _plain(token_usage)
    return usage


def is_cache_hit(usage: Mapping[str, Any] | None) -> bool:
    """An LLM-cache replay: langchain-core adds ``total_cost: 0`` to the replayed message's usage.

    No provider sends ``total_cost`` inside ``usage_metadata``; langchain-core's
    ``_convert_cached_generations`` is the only writer of that key.
    """
    return bool(usage) and "total_cost" in usage and not usage["total_cost"]  # type: ignore[operator]


def cache_hit_usage(replayed: Mapping[str, Any], model: str | None) -> Usage:
    """A cache hit bills nothing: token columns 0, the replayed usage kept in ``details``."""
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


def stream_usage(chunk_usages: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """The usage of a stream from the usages its chunks carried: ``(usage, corrected)``.

    Providers send usage once (the final chunk) or as deltas that add up. Some OpenAI-compatible
    servers repeat the *cumulative* usage on every chunk; summing those inflates the total. We
    treat a sequence as cumulative when every chunk reports the same input tokens (> 0) and the
    output counts never decrease, and then take the last report (``corrected`` is True).
    """
    if not chunk_usages:
        return None, False
    if len(chunk_usages) == 1:
        return dict(chunk_usages[0]), False
    inputs = {u.get("input_tokens") for u in chunk_usages}
    outputs = [u.get("output_tokens") or 0 for u in chunk_usages]
    cumulative = (
        len(inputs) == 1
        and (next(iter(inputs)) or 0) > 0
        and all(a <= b for a, b in zip(outputs, outputs[1:]))
    )
    if cumulative:
        return dict(chunk_usages[-1]), True
    from langchain_core.messages.ai import add_usage

    total: Any = None
    for u in chunk_usages:
        total = add_usage(total, u)  # type: ignore[arg-type]
    return dict(total), False


def _message_usage(result: LLMResult) -> tuple[list[Mapping[str, Any]], str | None]:
    """The usage_metadata of each choice of the call, and the model name the response gave."""
    usages: list[Mapping[str, Any]] = []
    model: str | None = None
    for generations in result.generations[:1]:
        for gen in generations:
            if isinstance(gen, ChatGeneration):
                message = gen.message
                usage = getattr(message, "usage_metadata", None)
                if usage:
                    usages.append(usage)
                if model is None:
                    meta = message.response_metadata
                    model = meta.get("model_name") or meta.get("model")
    return usages, model


def from_llm_result(
    result: LLMResult | None, *, chunk_usages: Sequence[Mapping[str, Any]] = ()
) -> Usage:
    """The billed usage of one LLM run from what ``on_llm_end`` / ``on_llm_error`` received.

    Rules, in order:

    1. **LLM-cache hit** (replayed message, ``total_cost: 0``): billed zero, see
       :func:`cache_hit_usage`.
    2. **Streamed chunks carried usage**: :func:`stream_usage` (cumulative reports corrected).
    3. **Chat message ``usage_metadata``**: with n>1 choices langchain-openai copies the response's
       usage onto every choice; equal copies count once. Choices with different usages (a provider
       billing per choice) are added and flagged ``summed_choice_usage``.
    4. **``llm_output["token_usage"]``** (completion-style LLMs, legacy chat models). In a
       multi-prompt ``generate`` LangChain keeps the batch's usage on the first prompt's run only.
    5. Otherwise unknown: ``source = "none"``, NULL tokens (the caller may estimate).
    """
    usages: list[Mapping[str, Any]] = []
    model: str | None = None
    llm_output: Mapping[str, Any] = {}
    if result is not None:
        usages, model = _message_usage(result)
        llm_output = result.llm_output or {}
        model = model or llm_output.get("model_name") or llm_output.get("model")
    if usages and is_cache_hit(usages[0]):
        return cache_hit_usage(usages[0], model)
    if chunk_usages:
        merged, corrected = stream_usage(chunk_usages)
        usage = from_usage_metadata(merged or {})
        if corrected:
            usage.notes.append("cumulative_stream_usage_corrected")
    elif usages:
        first = usages[0]
        if all(u == first for u in usages[1:]):
            usage = from_usage_metadata(first)
            if len(usages) > 1:
                usage.notes.append(f"n={len(usages)}_choices_counted_once")
        else:
            from langchain_core.messages.ai import add_usage

            total: Any = None
            for u in usages:
                total = add_usage(total, u)  # type: ignore[arg-type]
            usage = from_usage_metadata(total)
            usage.notes.append("summed_choice_usage")
    elif llm_output.get("token_usage"):
        usage = from_token_usage(llm_output["token_usage"])
    else:
        usage = Usage()
    usage.model = model
    return usage


def output_text(result: LLMResult | None) -> str:
    """The text of the call's choices (for estimating when no usage was reported)."""
    if result is None:
        return ""
    parts: list[str] = []
    for generations in result.generations[:1]:
        for gen in generations:
            parts.append(gen.text or "")
    return "".join(parts)


def prompt_text(prompts: Sequence[str] | None, messages: Sequence[BaseMessage] | None) -> str:
    """The text of the call's input (for estimating when no usage was reported)."""
    if messages:
        return "\n".join(
            m.content if isinstance(m.content, str) else str(m.content) for m in messages
        )
    return "\n".join(prompts or ())


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a usage mapping (TypedDicts and nested details become plain dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
