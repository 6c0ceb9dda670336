"""Local token estimates (tiktoken) for calls whose provider reported no usage.

tiktoken downloads its encodings on first use. Where it cannot (offline, as in CI), no estimate is
made and the row keeps NULL tokens with ``usage_source = 'none'``: never a guess dressed as a count.
An encoding can be supplied with :func:`register_encoding` (for example one loaded from a local
file), and ``TIKTOKEN_CACHE_DIR`` works as tiktoken documents it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("langchain_tokenledger")

_lock = threading.Lock()
_encodings: dict[str, Any] = {}
_failed: set[str] = set()

_OPENAI_FAMILY = ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-davinci", "davinci", "babbage", "ft:")


def is_openai_family(model: str | None, provider: str | None) -> bool:
    """Whether tiktoken's encodings describe ``model`` (OpenAI models and Azure deployments)."""
    if provider in ("openai", "azure"):
        return True
    return bool(model) and model.startswith(_OPENAI_FAMILY)  # type: ignore[union-attr]


def register_encoding(model_prefix: str, encoding: Any) -> None:
    """Use ``encoding`` (a ``tiktoken.Encoding``) for models whose name starts with ``model_prefix``.

    Example:
        >>> import tiktoken  # doctest: +SKIP
        >>> register_encoding("gpt-4o", tiktoken.get_encoding("o200k_base"))  # doctest: +SKIP
    """
    with _lock:
        _encodings[model_prefix] = encoding
        _failed.discard(model_prefix)


def clear_encodings() -> None:
    """Forget registered and loaded encodings (and past load failures)."""
    with _lock:
        _encodings.clear()
        _failed.clear()


def _encoding_for(model: str) -> Any | None:
    with _lock:
        for prefix, enc in _encodings.items():
            if model.startswith(prefix):
                return enc
        if model in _failed:
            return None
    try:
        import tiktoken

        try:
            enc = tiktoken.encoding_for_model(model)
        except KeyError:
            enc = tiktoken.get_encoding("o200k_base")
    except Exception as exc:  # offline, tiktoken missing, or unknown encoding
        with _lock:
            first = model not in _failed
            _failed.add(model)
        if first:
            logger.warning("no tiktoken encoding for %r, tokens left unknown: %r", model, exc)
        return None
    with _lock:
        _encodings[model] = enc
    return enc


def estimate_tokens(model: str | None, provider: str | None, text: str) -> int | None:
    """Count ``text``'s tokens with tiktoken, or ``None`` when no encoding can be had.

    Example:
        >>> estimate_tokens("claude-3", "anthropic", "hi") is None
        True
    """
    if not model or not is_openai_family(model, provider):
        return None
    enc = _encoding_for(model)
    if enc is None:
        return None
    return len(enc.encode(text, disallowed_special=()))
