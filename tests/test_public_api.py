"""The public API: what ``from langchain_tokenledger import *`` gives, typed and documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import langchain_tokenledger

PUBLIC = [
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


def test_all_lists_exactly_the_public_names() -> None:
    assert sorted(langchain_tokenledger.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(langchain_tokenledger, name) is not None


def test_every_public_callable_has_a_docstring_with_an_example() -> None:
    for name in PUBLIC:
        obj = getattr(langchain_tokenledger, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert doc, f"{name} has no docstring"
            if name != "LedgerError":
                assert ">>>" in doc or "Example" in doc, f"{name}'s docstring has no example"


def test_the_package_ships_type_information() -> None:
    package = Path(langchain_tokenledger.__file__).parent
    assert (package / "py.typed").exists()


def test_the_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert langchain_tokenledger.__version__ == version("langchain-tokenledger") == "0.1.0"
