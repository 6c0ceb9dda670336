"""``TokenLedgerHandler``: LangChain callback events -> one :class:`UsageRecord` per LLM call.

The handler follows the run tree so that every LLM row knows its parent, its root and the root's
name. It does no I/O: finished records go to the ledger's queue, and the ledger's writer thread
prices and writes them. Per-run state is dropped when a run ends (and evicted, with a row, when a
run never ends), so memory stays flat.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk, LLMResult

from . import usage as _usage
from .records import Status, UsageRecord

if TYPE_CHECKING:
    from .store import Ledger

logger = logging.getLogger("langchain_tokenledger")

F = TypeVar("F", bound=Callable[..., Any])

SESSION_KEYS = ("session_id", "thread_id", "conversation_id")
"""Metadata keys that fill the ``session_id`` column, first found wins."""

_INTERNAL_META = ("ls_", "lc_")
"""Metadata LangChain adds itself (``ls_provider``, ``lc_versions``): it has its own columns."""
_INTERNAL_TAG = "seq:step:"

_CANCELLED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)
_UTC = timezone.utc


def strict_mode() -> bool:
    """Whether handler faults are raised (``TOKENLEDGER_STRICT=1``, set by our test suite)."""
    return os.environ.get("TOKENLEDGER_STRICT", "") not in ("", "0", "false")


def _guarded(method: F) -> F:
    """Log a handler fault instead of breaking the user's chain (re-raise in strict mode)."""

    @functools.wraps(method)
    def wrapper(self: TokenLedgerHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            logger.exception("langchain-tokenledger: %s failed", method.__name__)
            if self.raise_error:
                raise
            return None

    return cast(F, wrapper)


class _Node:
    """A run the handler has seen start and not yet end.

    Run ids are kept as text (``root``, ``parent``, ``key``), each converted once: ``str(UUID)``
    is pure Python and a call would otherwise convert the same ids again at every level.
    """

    __slots__ = ("ancestry", "key", "name", "parent", "root", "root_name", "seen")

    def __init__(
        self,
        root: str,
        root_name: str | None,
        ancestry: str,
        name: str | None,
        parent: str | None = None,
        key: str | None = None,
    ) -> None:
        self.root = root
        self.root_name = root_name
        self.ancestry = ancestry
        self.name = name
        self.parent = parent  # the parent run's id as text
        self.key = key  # this run's id as text, once someone needed it
        self.seen = time.monotonic()


class _LLMRun:
    """In-flight state of one LLM call."""

    __slots__ = (
        "batch_size",
        "chunk_usages",
        "first_token",
        "messages",
        "metadata",
        "model_hint",
        "name",
        "node",
        "parent",
        "prompts",
        "provider",
        "started_mono",
        "started_wall",
        "tags",
    )

    node: _Node

    def __init__(
        self,
        started_wall: float,
        started_mono: float,
        parent: UUID | None,
        name: str | None,
        tags: list[str] | None,
        metadata: Mapping[str, Any],
        provider: str | None,
        model_hint: str | None,
        batch_size: int,
    ) -> None:
        self.started_wall = started_wall
        self.started_mono = started_mono
        self.parent = parent
        self.name = name
        self.tags = tags
        self.metadata = metadata
        self.provider = provider
        self.model_hint = model_hint
        self.batch_size = batch_size
        self.chunk_usages: list[Mapping[str, Any]] = []
        self.first_token: float | None = None
        self.messages: Sequence[BaseMessage] | None = None
        self.prompts: Sequence[str] | None = None


def _run_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> str | None:
    name = kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ids = serialized.get("id")
        if ids:
            return str(ids[-1])
    return None


class TokenLedgerHandler(BaseCallbackHandler):
    """Records one row per LLM call into a :class:`~langchain_tokenledger.Ledger`.

    One instance serves sync and async runs, threads and asyncio tasks at once. It runs inline
    (no executor hop in async runs) and only enqueues: rows are durable once :meth:`flush`
    returns.

    Example:
        >>> from langchain_tokenledger import Ledger, TokenLedgerHandler
        >>> from langchain_tokenledger.testing import FakeUsageChatModel
        >>> ledger = Ledger("sqlite://")
        >>> handler = TokenLedgerHandler(ledger, tags=["team-a"], metadata={"user_id": "u1"})
        >>> _ = FakeUsageChatModel().invoke("hi", config={"callbacks": [handler]})
        >>> handler.flush()
        >>> ledger.query("SELECT model, total_tokens, user_id FROM llm_calls")
        [{'model': 'gpt-4o-mini', 'total_tokens': 30, 'user_id': 'u1'}]
    """

    run_inline = True

    def __init__(
        self,
        ledger: Ledger | None = None,
        *,
        tags: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_record: Callable[[UsageRecord], None] | None = None,
        stale_after: float = 3600.0,
    ) -> None:
        """Args:
        ledger: where rows go; default :func:`~langchain_tokenledger.default_ledger`.
        tags: added to every row's ``tags``.
        metadata: defaults for every row's ``metadata`` (the run's own keys win).
        on_record: called with every finished record (after it is queued), e.g. live totals.
        stale_after: seconds after which a run that never ended is evicted (and written as
            ``cancelled`` with the note ``evicted_without_end``).
        """
        super().__init__()
        if stale_after <= 0:
            raise ValueError("stale_after must be a positive number of seconds")
        if ledger is None:
            from .store import default_ledger

            ledger = default_ledger()
        self.ledger = ledger
        self.tags: tuple[str, ...] = tuple(tags or ())
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.on_record = on_record
        self.stale_after = stale_after
        self.raise_error = strict_mode()
        self._lock = threading.Lock()
        self._nodes: dict[UUID, _Node] = {}
        self._llm_runs: dict[UUID, _LLMRun] = {}
        self._starts = 0
        self._next_sweep = time.monotonic() + min(60.0, stale_after)
        # Closing the ledger then writes our in-flight calls (a stand-in sink may not do that).
        handlers = getattr(ledger, "_handlers", None)
        if handlers is not None:
            handlers.add(self)

    def __repr__(self) -> str:
        return f"TokenLedgerHandler(ledger={self.ledger!r}, in_flight={len(self._llm_runs)})"

    # -- public --------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Block until every row recorded so far is committed to SQL."""
        self.ledger.flush(timeout=timeout)

    @property
    def in_flight(self) -> int:
        """LLM calls started and not yet ended."""
        return len(self._llm_runs)

    # -- run tree ------------------------------------------------------------------------

    def _enter(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> _Node:
        parent = self._nodes.get(parent_run_id) if parent_run_id is not None else None
        if parent is None:  # a root, or a run whose parent started before this handler saw it
            key = str(run_id)
            pid = str(parent_run_id) if parent_run_id is not None else None
            node = _Node(key, name, "", name, pid, key)
        else:
            pid = parent.key
            if pid is None:
                pid = parent.key = str(parent_run_id)
            ancestry = f"{parent.ancestry}/{pid}" if parent.ancestry else pid
            node = _Node(parent.root, parent.root_name, ancestry, name, pid)
        self._nodes[run_id] = node
        self._starts += 1
        return node

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + min(60.0, self.stale_after)
            self.evict_stale()

    def _leave(self, run_id: UUID) -> None:
        self._nodes.pop(run_id, None)

    @_guarded
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the chain's place in the run tree."""
        with self._lock:
            self._enter(run_id, parent_run_id, _run_name(serialized, kwargs))
        self._maybe_sweep()

    @_guarded
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the tool's place in the run tree."""
        with self._lock:
            self._enter(run_id, parent_run_id, _run_name(serialized, kwargs))
        self._maybe_sweep()

    @_guarded
    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the retriever's place in the run tree."""
        with self._lock:
            self._enter(run_id, parent_run_id, _run_name(serialized, kwargs))
        self._maybe_sweep()

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._leave(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain; a cancellation also ends the LLM calls it was waiting on."""
        self._leave(run_id)
        if isinstance(error, _CANCELLED) and self._llm_runs:
            self._cancel_children(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool."""
        self._leave(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool; a cancellation also ends the LLM calls it was waiting on."""
        self._leave(run_id)
        if isinstance(error, _CANCELLED) and self._llm_runs:
            self._cancel_children(run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever."""
        self._leave(run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever."""
        self._leave(run_id)

    # -- LLM calls -----------------------------------------------------------------------

    def _start_llm(
        self,
        serialized: Mapping[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        kwargs: Mapping[str, Any],
    ) -> _LLMRun:
        meta = kwargs.get("metadata") or {}
        params = kwargs.get("invocation_params") or {}
        name = _run_name(serialized, kwargs)
        run = _LLMRun(
            time.time(),
            time.perf_counter(),
            parent_run_id,
            name,
            kwargs.get("tags"),
            meta,
            meta.get("ls_provider"),
            meta.get("ls_model_name") or params.get("model") or params.get("model_name"),
            kwargs.get("batch_size") or 1,
        )
        with self._lock:
            run.node = self._enter(run_id, parent_run_id, name)
            self._llm_runs[run_id] = run
        self._maybe_sweep()
        return run

    # The four LLM events catch their own faults (see _fault) rather than use @_guarded: they
    # run on every call, and the decorator's *args/**kwargs re-packing costs about a microsecond.

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an LLM call (chat model)."""
        try:
            run = self._start_llm(serialized, run_id, parent_run_id, kwargs)
            run.messages = messages[0] if messages else None
        except Exception:
            if self._fault("on_chat_model_start"):
                raise

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an LLM call (completion-style model)."""
        try:
            run = self._start_llm(serialized, run_id, parent_run_id, kwargs)
            run.prompts = prompts
        except Exception:
            if self._fault("on_llm_start"):
                raise

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Note the first token's time and any usage a chunk carries."""
        run = self._llm_runs.get(run_id)
        if run is None:
            return
        if run.first_token is None:
            run.first_token = time.perf_counter()
        message = getattr(chunk, "message", None)
        if message is not None:
            usage = getattr(message, "usage_metadata", None)
            if usage:
                run.chunk_usages.append(usage)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the call with status ``ok`` and its usage."""
        try:
            self._finish(run_id, "ok", response, None, kwargs)
        except Exception:
            if self._fault("on_llm_end"):
                raise

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the call with status ``error`` (or ``cancelled``) and any usage it carried."""
        try:
            status: Status = "cancelled" if isinstance(error, _CANCELLED) else "error"
            self._finish(run_id, status, kwargs.get("response"), error, kwargs)
        except Exception:
            if self._fault("on_llm_error"):
                raise

    def _fault(self, event: str) -> bool:
        """Log the exception being handled; whether to re-raise it (strict mode), as _guarded."""
        logger.exception("langchain-tokenledger: %s failed", event)
        return self.raise_error

    def _finish(
        self,
        run_id: UUID,
        status: Status,
        response: LLMResult | None,
        error: BaseException | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        ended_mono = time.perf_counter()
        with self._lock:
            run = self._llm_runs.pop(run_id, None)
            self._nodes.pop(run_id, None)
        if run is None:
            # An end without a start: a second end event for the same call (already recorded),
            # or a handler attached after the call began. The ledger's writes are idempotent on
            # run_id, so recording it is safe either way; but we have nothing to add.
            logger.debug("end event for unknown LLM run %s ignored", run_id)
            return
        record = self._build(run_id, run, status, response, error, ended_mono)
        self._emit(record)

    def _build(
        self,
        run_id: UUID,
        run: _LLMRun,
        status: Status,
        response: LLMResult | None,
        error: BaseException | None,
        ended_mono: float,
        extra_notes: Sequence[str] = (),
    ) -> UsageRecord:
        u = _usage.usage_for_call(
            response,
            status=status,
            chunk_usages=run.chunk_usages,
            batch_size=run.batch_size,
            model_hint=run.model_hint,
            prompts=run.prompts,
            messages=run.messages,
        )
        notes = list(extra_notes)
        status_code = getattr(error, "status_code", None)
        if isinstance(status_code, int):
            notes.append(f"http_status:{status_code}")
        notes.extend(u.notes)
        model = u.model
        node = run.node
        merged_meta = {
            key: value for key, value in run.metadata.items() if not key.startswith(_INTERNAL_META)
        }
        if self.metadata:
            merged_meta = {**self.metadata, **merged_meta}
        tags = list(self.tags)
        if run.tags:
            for tag in run.tags:
                if tag not in tags and not tag.startswith(_INTERNAL_TAG):
                    tags.append(tag)
        session_id = None
        for key in SESSION_KEYS:
            if merged_meta.get(key) is not None:
                session_id = str(merged_meta[key])
                break
        user_id = merged_meta.get("user_id")
        latency = (ended_mono - run.started_mono) * 1000.0
        return UsageRecord(
            run_id=node.key or str(run_id),
            parent_run_id=node.parent,
            root_run_id=node.root,
            root_name=node.root_name,
            run_name=run.name,
            provider=run.provider,
            model=model,
            status=status,
            error_type=type(error).__name__ if error is not None else None,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            total_tokens=u.total_tokens,
            cache_read_tokens=u.cache_read_tokens,
            cache_creation_tokens=u.cache_creation_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cache_hit=u.cache_hit,
            usage_source=u.source,
            usage_details=u.details,
            streamed=run.first_token is not None,
            started_at=datetime.fromtimestamp(run.started_wall, _UTC),
            ended_at=datetime.fromtimestamp(
                run.started_wall + (ended_mono - run.started_mono), _UTC
            ),
            latency_ms=latency,
            ttft_ms=(
                (run.first_token - run.started_mono) * 1000.0
                if run.first_token is not None
                else None
            ),
            user_id=str(user_id) if user_id is not None else None,
            session_id=session_id,
            tags=tags,
            metadata=merged_meta,
            notes=notes,
            ancestry=node.ancestry,
        )

    def _emit(self, record: UsageRecord) -> None:
        self.ledger.record(record)
        if self.on_record is not None:
            self.on_record(record)

    # -- eviction ------------------------------------------------------------------------

    def evict_stale(self) -> int:
        """Drop the state of runs older than ``stale_after`` that never ended.

        LLM calls among them are written as ``cancelled`` with the note ``evicted_without_end``
        (nothing is dropped silently). Runs by itself at most once a minute, on a run start;
        returns how many LLM calls it wrote.

        Example:
            >>> handler.evict_stale()  # doctest: +SKIP
            0
        """
        cutoff = time.monotonic() - self.stale_after
        with self._lock:
            stale = [rid for rid, node in self._nodes.items() if node.seen < cutoff]
        return self._end_runs(stale, "evicted_without_end")

    def close_in_flight(self, note: str = "unfinished_at_close") -> int:
        """Write every LLM call still in flight as ``cancelled`` with ``note``.

        The ledger calls this when it closes (and so at interpreter exit): a call whose end
        LangChain never reported (a cancelled ``ainvoke``) still leaves its row.

        Example:
            >>> handler.close_in_flight()  # doctest: +SKIP
            0
        """
        with self._lock:
            runs = list(self._nodes)
        return self._end_runs(runs, note)

    def _cancel_children(self, parent_run_id: UUID) -> None:
        """End the in-flight LLM calls under a cancelled run (LangChain reports no end for a
        chat model call cancelled while awaiting its provider)."""
        key = str(parent_run_id)
        with self._lock:
            children = [
                rid
                for rid, run in self._llm_runs.items()
                if run.parent == parent_run_id or key in run.node.ancestry
            ]
        self._end_runs(children, "cancelled_with_parent", evict_nodes=False)

    def _end_runs(self, run_ids: list[UUID], note: str, *, evict_nodes: bool = True) -> int:
        runs: list[tuple[UUID, _LLMRun]] = []
        with self._lock:
            for rid in run_ids:
                if evict_nodes:
                    self._nodes.pop(rid, None)
                run = self._llm_runs.pop(rid, None)
                if run is not None:
                    self._nodes.pop(rid, None)
                    runs.append((rid, run))
        if runs and note != "cancelled_with_parent":
            logger.warning(
                "%d LLM calls never reported their end: written as cancelled (%s)", len(runs), note
            )
        now = time.perf_counter()
        for rid, run in runs:
            self._emit(self._build(rid, run, "cancelled", None, None, now, extra_notes=(note,)))
        return len(runs)
