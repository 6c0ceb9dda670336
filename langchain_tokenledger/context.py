"""``track_usage``: record every LLM call made inside a ``with`` / ``async with`` block.

How it works: one module-level ``ContextVar`` holds the handler of the innermost active block,
and it is registered once, at import, as an inheritable LangChain configure hook. LangChain adds
that handler to every callback manager configured while the variable is set, and copies the
context into ``batch`` worker threads and asyncio tasks, so a block sees exactly the calls
started inside it, and concurrent blocks never see each other's. Entering a block only sets the
variable: no registration, no engine work.

Nested blocks: the innermost block's handler writes the row (to its ledger and, once each, to
the other ledgers of the enclosing blocks) and counts it in every enclosing block's totals. When
an enclosing block's handler is attached to the same call too (it was inherited through a
running chain), it steps aside, so each ledger gets the row once.

Example:
    >>> from langchain_tokenledger import Ledger, track_usage
    >>> from langchain_tokenledger.testing import FakeUsageChatModel
    >>> ledger = Ledger("sqlite://")
    >>> with track_usage(ledger, tags=["nightly"]) as usage:
    ...     _ = FakeUsageChatModel().invoke("hi")
    >>> usage.total_tokens, ledger.query("SELECT tags FROM llm_calls")
    (30, [{'tags': '["nightly"]'}])
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any
from uuid import UUID

from langchain_core.tracers.context import register_configure_hook

from .handler import TokenLedgerHandler, _LLMRun, _Node, strict_mode
from .packing import pack_record
from .records import UsageRecord, UsageSummary
from .store import Ledger, LedgerError, default_ledger, price_record

__all__ = ["Scope", "TrackingOptions", "UsageTracker", "track_usage"]

logger = logging.getLogger("langchain_tokenledger")

FLUSH_TIMEOUT = 60.0
"""Seconds a block's exit waits for its rows to be committed before it logs an error."""

_current: ContextVar[_ScopeHandler | None] = ContextVar("tokenledger_scope", default=None)
# Registered exactly once: langchain-core keeps every registered hook for the process lifetime.
register_configure_hook(_current, inheritable=True)


class TrackingOptions:
    """Validated settings of a tracked block: the ledger and the tags/metadata of its rows.

    Bad input fails here, when ``track_usage(...)`` or ``tracked(...)`` is called, not inside a
    callback. ``ledger=None`` means :func:`~langchain_tokenledger.default_ledger`, resolved
    when a block is entered (so decorating at import time opens no database).

    Example:
        >>> TrackingOptions(tags=["nightly"], metadata={"user_id": "u1"}).tags
        ('nightly',)
        >>> TrackingOptions(tags="nightly")
        Traceback (most recent call last):
        ...
        TypeError: tags must be a list of strings, not a string: use tags=['nightly']
    """

    __slots__ = ("ledger", "metadata", "tags")

    def __init__(
        self,
        ledger: Ledger | None = None,
        *,
        tags: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if ledger is not None and not isinstance(ledger, Ledger):
            hint = " (create Ledger(url) once and pass it)" if isinstance(ledger, str) else ""
            raise TypeError(f"ledger must be a Ledger or None, not {type(ledger).__name__}{hint}")
        if isinstance(tags, (str, bytes)):
            raise TypeError(f"tags must be a list of strings, not a string: use tags=[{tags!r}]")
        tag_tuple = tuple(tags or ())
        bad = [t for t in tag_tuple if not isinstance(t, str)]
        if bad:
            raise TypeError(f"tags must be strings; got {bad[0]!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, not {type(metadata).__name__}")
        meta = dict(metadata or {})
        bad_keys = [k for k in meta if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"metadata keys must be strings; got {bad_keys[0]!r}")
        self.ledger = ledger
        self.tags: tuple[str, ...] = tag_tuple
        self.metadata: dict[str, Any] = meta

    def __repr__(self) -> str:
        return (
            f"TrackingOptions(ledger={self.ledger!r}, tags={list(self.tags)!r}, "
            f"metadata={self.metadata!r})"
        )


class Scope:
    """One activation target: a block's handler, totals and place among the enclosing blocks.

    The enclosing block is the one active where the scope is created. :meth:`active` makes the
    scope current (for a ``with`` body, one call, or one step of a generator); a scope can be
    activated any number of times, from any context. Internal to :func:`track_usage` and
    :func:`~langchain_tokenledger.tracked`.

    Example:
        >>> scope = Scope(TrackingOptions(Ledger("sqlite://")))
        >>> with scope.active():
        ...     pass
        >>> len(scope.summary)
        0
    """

    __slots__ = ("handler", "ledger", "others", "parent", "sink", "summary")

    def __init__(
        self,
        options: TrackingOptions,
        *,
        ledger: Ledger | None = None,
        summary: UsageSummary | None = None,
        sink: UsageSummary | None = None,
    ) -> None:
        outer = _current.get()
        self.parent: Scope | None = outer.scope if outer is not None else None
        if ledger is None:
            ledger = options.ledger if options.ledger is not None else default_ledger()
        self.ledger = ledger
        tags, metadata = options.tags, options.metadata
        if outer is not None:
            tags = outer.tags + tuple(t for t in tags if t not in outer.tags)
            metadata = {**outer.metadata, **metadata}
        self.summary = summary if summary is not None else summary_for(ledger)
        self.sink = sink
        # The ledgers of enclosing blocks that are not this block's own, each once.
        others: list[Ledger] = []
        scope = self.parent
        while scope is not None:
            if scope.ledger is not ledger and all(scope.ledger is not o for o in others):
                others.append(scope.ledger)
            scope = scope.parent
        self.others = tuple(others)
        self.handler = _ScopeHandler(self, ledger, tags, metadata)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this scope the current one for the body of the ``with``."""
        token = _current.set(self.handler)
        try:
            yield
        finally:
            _current.reset(token)

    def record(self, record: UsageRecord) -> None:
        """Deliver a finished call to the enclosing ledgers and every enclosing block's totals."""
        self.record_packed(record.run_id, pack_record(record))

    def record_packed(self, run_id: str, packed: bytes) -> None:
        """:meth:`record` for a call the handler packed (see :mod:`~.packing`)."""
        for ledger in self.others:
            ledger.record_packed(packed)
        scope: Scope | None = self
        while scope is not None:
            scope.summary.add_packed(run_id, packed)
            if scope.sink is not None:
                scope.sink.add_packed(run_id, packed)
            scope = scope.parent

    def outer_node(self, run_id: UUID) -> _Node | None:
        """The run-tree node of ``run_id`` as known to an enclosing block's handler."""
        key = run_id.int
        scope = self.parent
        while scope is not None:
            node = scope.handler._nodes.get(key)
            if node is not None:
                return node
            scope = scope.parent
        return None

    @property
    def ledgers(self) -> tuple[Ledger, ...]:
        """Every ledger this scope writes to (its own first)."""
        return (self.ledger, *self.others)

    def flush(self, *, raise_errors: bool) -> None:
        """Wait until this scope's rows are committed; a timeout is logged (raised if asked)."""
        for ledger in self.ledgers:
            try:
                ledger.flush(timeout=FLUSH_TIMEOUT)
            except LedgerError:
                logger.exception("langchain-tokenledger: rows of a tracked block not yet written")
                if raise_errors:
                    raise

    @property
    def pending(self) -> bool:
        """Whether any of this scope's ledgers has rows not yet committed."""
        return any(ledger.pending for ledger in self.ledgers)


def summary_for(ledger: Ledger) -> UsageSummary:
    """An empty :class:`UsageSummary` that prices its records with ``ledger``'s prices."""
    return UsageSummary(price=functools.partial(price_record, ledger.pricer))


class _ScopeHandler(TokenLedgerHandler):
    """The handler of one block: a :class:`TokenLedgerHandler` that knows its block.

    When an enclosing block's handler is attached to the same LLM call (inherited through a
    running chain), the innermost handler writes the row: start events reach the inherited
    handlers first, so the inner one marks the call as its own in each enclosing handler
    already tracking it, and those skip it when it ends.
    """

    def __init__(
        self, scope: Scope, ledger: Ledger, tags: tuple[str, ...], metadata: dict[str, Any]
    ) -> None:
        super().__init__(ledger, tags=tags, metadata=metadata, on_record=scope.record)
        self.scope = scope
        self._nested = scope.parent is not None
        self._packs = True  # calls that end normally reach the scope through _deliver

    def _deliver(self, run: _LLMRun, packed: bytes) -> None:
        super()._deliver(run, packed)
        self.scope.record_packed(run.text_id(), packed)

    def _outer_node(self, run_id: UUID) -> _Node | None:
        # A block entered inside a running chain has not seen the chain start: borrow the
        # parent's node from an enclosing block so the row keeps its real root and ancestry.
        return self.scope.outer_node(run_id)

    def _claim(self, key: int, run: _LLMRun) -> None:
        scope = self.scope.parent
        while scope is not None:
            outer = scope.handler
            if key in outer._llm_runs:
                with outer._lock:
                    outer._deferred.add(run.text_id())
            scope = scope.parent


class UsageTracker:
    """What :func:`track_usage` returns: a context manager for ``with`` and ``async with``.

    Entering yields the block's :class:`~langchain_tokenledger.UsageSummary` (also
    :attr:`usage`), which stays readable after the block. Exiting waits until the block's rows
    are committed (in ``async with`` without blocking the event loop). A tracker can be entered
    again once it has exited; its totals then keep adding up. It cannot be entered while active.

    Example:
        >>> tracker = track_usage(Ledger("sqlite://"))
        >>> with tracker as usage:
        ...     pass
        >>> usage is tracker.usage, usage.total_tokens
        (True, 0)
    """

    __slots__ = ("_ledger", "_options", "_scope", "_token", "usage")

    def __init__(self, options: TrackingOptions) -> None:
        self._options = options
        self._ledger = options.ledger if options.ledger is not None else default_ledger()
        self.usage: UsageSummary = summary_for(self._ledger)
        self._scope: Scope | None = None
        self._token: Token[_ScopeHandler | None] | None = None

    def __repr__(self) -> str:
        state = "active" if self._token is not None else "inactive"
        return f"<UsageTracker {state} {self.usage!r}>"

    def __enter__(self) -> UsageSummary:
        if self._token is not None:
            raise RuntimeError("this track_usage() block is already active; call track_usage()")
        scope = Scope(self._options, ledger=self._ledger, summary=self.usage)
        self._scope = scope
        self._token = _current.set(scope.handler)
        return self.usage

    def _leave(self) -> Scope:
        scope, token = self._scope, self._token
        if scope is None or token is None:
            raise RuntimeError("this track_usage() block is not active")
        self._token = None
        _current.reset(token)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._leave()
        scope.flush(raise_errors=exc is None and strict_mode())

    async def __aenter__(self) -> UsageSummary:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._leave()
        if scope.pending:
            flush = functools.partial(scope.flush, raise_errors=exc is None and strict_mode())
            await asyncio.to_thread(flush)


def track_usage(
    ledger: Ledger | None = None,
    *,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> UsageTracker:
    """Record every LLM call made inside the block, and total them live.

    Calls in the block's own chains, sub-chains, tools, ``RunnableLambda``\\ s, ``batch`` worker
    threads and asyncio tasks started inside it are recorded; nothing outside it is. An inner
    block's calls count in every enclosing block and are written once per ledger. On exit the
    block's rows are committed; an exception in the block is recorded (the failed call's row)
    and re-raised unchanged. Plain ``threading.Thread`` targets do not inherit the block (they
    start with an empty context): use ``contextvars.copy_context().run`` or LangChain's batch.

    Args:
        ledger: where the rows go; default :func:`~langchain_tokenledger.default_ledger`.
        tags: added to every row of the block.
        metadata: defaults for every row's metadata (a run's own keys win).

    Example:
        >>> from langchain_tokenledger.testing import FakeUsageChatModel
        >>> async def main():  # doctest: +SKIP
        ...     async with track_usage(metadata={"user_id": "u1"}) as usage:
        ...         await FakeUsageChatModel().ainvoke("hi")
        ...     return usage.by_model["gpt-4o-mini"].total_tokens
    """
    return UsageTracker(TrackingOptions(ledger, tags=tags, metadata=metadata))
