"""langchain-tokenledger: a SQL ledger of every LangChain LLM call.

Example:
    >>> from langchain_tokenledger import Ledger, TokenLedgerHandler
    >>> ledger = Ledger("sqlite://")
    >>> handler = TokenLedgerHandler(ledger)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import UsageTracker, track_usage
    from .decorators import TrackedRunnable, tracked
    from .handler import TokenLedgerHandler
    from .records import ModelUsage, UsageRecord, UsageSummary
    from .schema import SCHEMA_VERSION
    from .store import Ledger, LedgerError, default_ledger

try:
    __version__ = version("langchain-tokenledger")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

# Imported on first use: the writer process and the CLI need the store, not LangChain's tracers.
_HOMES = {
    "SCHEMA_VERSION": "schema",
    "Ledger": "store",
    "LedgerError": "store",
    "ModelUsage": "records",
    "TokenLedgerHandler": "handler",
    "TrackedRunnable": "decorators",
    "UsageRecord": "records",
    "UsageSummary": "records",
    "UsageTracker": "context",
    "default_ledger": "store",
    "track_usage": "context",
    "tracked": "decorators",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "ModelUsage",
    "TokenLedgerHandler",
    "TrackedRunnable",
    "UsageRecord",
    "UsageSummary",
    "UsageTracker",
    "__version__",
    "default_ledger",
    "track_usage",
    "tracked",
]
