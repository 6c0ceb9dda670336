"""Local token estimates (tiktoken) for completed calls whose provider reported no usage.

Which models: those tiktoken maps to an encoding (OpenAI's: ``gpt-4o-mini``, ``o3-mini``,
``ft:gpt-4o...``, ...), and any model name starting with a prefix given to
:func:`register_encoding`.

Offline: tiktoken downloads an encoding's data on first use (or reads it from
``TIKTOKEN_CACHE_DIR``). Where that fails, no estimate is made and the row keeps NULL tokens with
``usage_source = 'none'``: never a guess dressed as a count. The failure is remembered per
encoding for the life of the process (one warning, and every later check is a set lookup), until
:func:`clear_encodings`. An encoding built or loaded locally can be supplied with
:func:`register_encoding`. The first estimate for an encoding loads it on the calling thread (the
callback's); call :func:`encoding_for` once at startup to load it ahead of time.

How a prompt is counted: chat messages follow OpenAI's published rule (3 tokens per message,
plus its role and content, plus 1 for a ``name``, plus 3 priming the reply); a completion prompt
is its text. Output is the text of each choice.

Example:
    >>> can_estimate("claude-3-5-sonnet"), can_estimate("gpt-4o-mini")
    (False, True)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

logger = logging.getLogger("langchain_tokenledger")

TOKENS_PER_MESSAGE = 3
"""OpenAI's per-message overhead for current chat models."""
TOKENS_PER_NAME = 1
"""Extra tokens when a message has a ``name``."""
REPLY_PRIMING_TOKENS = 3
"""Every reply is primed with ``<|start|>assistant<|message|>``."""

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)

_registered: dict[str, Any] = {}  # model prefix -> Encoding, from register_encoding
_loaded: dict[str, Any] = {}  # encoding name -> Encoding, loaded through tiktoken
_failed: set[str] = set()  # encoding names that could not be loaded


def register_encoding(model_prefix: str, encoding: Any) -> None:
    """Count models whose name starts with ``model_prefix`` with ``encoding``.

    ``encoding`` is a ``tiktoken.Encoding`` (or any object whose
    ``encode(text, disallowed_special=())`` returns a sequence of tokens). The longest matching
    prefix wins; ``""`` matches every model.

    Example:
        >>> import tiktoken
        >>> ranks = {bytes([i]): i for i in range(256)}
        >>> one_per_byte = tiktoken.Encoding(name="bytes", pat_str=r"[\\s\\S]",
        ...                                  mergeable_ranks=ranks, special_tokens={})
        >>> register_encoding("my-llama", one_per_byte)
        >>> estimate_tokens("my-llama-3", "hello")
        5
        >>> clear_encodings()
    """
    if not isinstance(model_prefix, str):
        raise TypeError(f"model_prefix must be a str, got {type(model_prefix).__name__}")
    if not callable(getattr(encoding, "encode", None)):
        raise TypeError(f"encoding must have an encode() method, got {type(encoding).__name__}")
    with _lock:
        _registered[model_prefix] = encoding


def clear_encodings() -> None:
    """Forget registered and loaded encodings, and past load failures.

    Example:
        >>> clear_encodings()
    """
    with _lock:
        _registered.clear()
        _loaded.clear()
        _failed.clear()


def _registered_for(model: str) -> Any | None:
    best: str | None = None
    for prefix in _registered:
        if model.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else _registered[best]


def _encoding_name(model: str) -> str | None:
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        return encoding_name_for_model(model)
    except KeyError:
        return None


def can_estimate(model: str | None) -> bool:
    """Whether ``model`` has an encoding that could count it (registered, or known to tiktoken).

    Cheap (no loading); ``False`` once its encoding failed to load.

    Example:
        >>> can_estimate(None), can_estimate("o3-mini"), can_estimate("llama3")
        (False, True, False)
    """
    if not model:
        return False
    with _lock:
        if _registered_for(model) is not None:
            return True
    name = _encoding_name(model)
    return name is not None and name not in _failed


def encoding_for(model: str | None) -> Any | None:
    """The encoding that counts ``model``, loading tiktoken's on first use; ``None`` if none.

    A failed load (offline, no cached file) is logged once and remembered: later calls for any
    model using that encoding return ``None`` at once.

    Example:
        >>> encoding_for("claude-3-5-sonnet") is None
        True
    """
    if not model:
        return None
    with _lock:
        enc = _registered_for(model)
        if enc is not None:
            return enc
    name = _encoding_name(model)
    if name is None:
        return None
    with _lock:
        if name in _failed:
            return None
        enc = _loaded.get(name)
        if enc is not None:
            return enc
    try:
        import tiktoken

        enc = tiktoken.get_encoding(name)
    except Exception as exc:  # offline, or tiktoken cannot build the encoding
        with _lock:
            first = name not in _failed
            _failed.add(name)
        if first:
            logger.warning(
                "langchain-tokenledger: tiktoken encoding %r unavailable (%s); calls without "
                "reported usage keep NULL tokens. Set TIKTOKEN_CACHE_DIR or use "
                "estimate.register_encoding() to estimate offline.",
                name,
                exc,
            )
        return None
    with _lock:
        _loaded[name] = enc
    return enc


def _count(enc: Any, text: str) -> int:
    return len(enc.encode(text, disallowed_special=()))


def estimate_tokens(model: str | None, text: str) -> int | None:
    """Count ``text``'s tokens for ``model``, or ``None`` when no encoding can be had.

    Example:
        >>> estimate_tokens("claude-3", "hi") is None
        True
    """
    enc = encoding_for(model)
    return None if enc is None else _count(enc, text)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return str(content)


def estimate_message_tokens(model: str | None, messages: Sequence[BaseMessage]) -> int | None:
    """Prompt tokens of a chat call, by OpenAI's rule for chat models.

    ``3 + sum(3 + tokens(role) + tokens(content) [+ 1 + tokens(name)] [+ tokens(tool calls)])``.

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> estimate_message_tokens("claude-3", [HumanMessage("hi")]) is None
        True
    """
    enc = encoding_for(model)
    if enc is None:
        return None
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += _count(enc, _ROLES.get(message.type, message.type))
        total += _count(enc, _text(message.content))
        if message.name:
            total += TOKENS_PER_NAME + _count(enc, message.name)
        if isinstance(message, AIMessage) and message.tool_calls:
            calls = [{"name": c["name"], "arguments": c["args"]} for c in message.tool_calls]
            total += _count(enc, json.dumps(calls, separators=(",", ":")))
    return total


def estimate_output_tokens(model: str | None, texts: Iterable[str]) -> int | None:
    """Output tokens of a call: the tokens of each choice's text, added up.

    Example:
        >>> estimate_output_tokens("claude-3", ["a", "b"]) is None
        True
    """
    enc = encoding_for(model)
    if enc is None:
        return None
    return sum(_count(enc, text) for text in texts)
