"""langchain-tokenledger: a SQL ledger of every LangChain LLM call.

Example:
    >>> from langchain_tokenledger import Ledger, TokenLedgerHandler
    >>> ledger = Ledger("sqlite://")
    >>> handler = TokenLedgerHandler(ledger)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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
