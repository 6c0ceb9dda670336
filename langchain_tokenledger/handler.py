"""``TokenLedgerHandler``: LangChain callback events -> one :class:`UsageRecord` per LLM call.

The handler follows the run tree so that every LLM row knows its parent, its root and the root's
name. It does no I/O: a finished call is packed into bytes (:mod:`~langchain_tokenledger.packing`)
and queued, and the ledger's writer unpacks, prices and writes it. The usual call (one choice,
one usage report, status ``ok``) is packed as LangChain reported it, and the writer normalizes
it: the callback path only reads the usage and copies it. Per-run state is dropped when a run
ends (and evicted, with a row, when a run never ends), so memory stays flat.
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
from .packing import (
    LANGCHAIN_META,
    call_values,
    id_text,
    pack_parts,
    pack_values,
    record_from_values,
)
from .records import Status, UsageRecord

if TYPE_CHECKING:
    from .store import Ledger

logger = logging.getLogger("langchain_tokenledger")

F = TypeVar("F", bound=Callable[..., Any])

_NO_METADATA: Mapping[str, Any] = {}

_CANCELLED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)
_UTC = timezone.utc


def _uuid_text(run_id: UUID) -> str:
    """``str(run_id)`` in about half the time (``UUID.__str__`` is pure Python)."""
    return id_text(run_id.int) if type(run_id) is UUID else str(run_id)


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
    is costly and a call would otherwise convert the same ids again at every level. An LLM
    call's own id is converted only if someone needs it in the application
    (:meth:`_LLMRun.text_id`); otherwise the writer does it. The place in the tree (``root`` ...
    ``key``) is filled by :meth:`TokenLedgerHandler._enter`.
    """

    __slots__ = ("ancestry", "key", "name", "parent", "root", "root_name", "started")

    root: str | None  # None: this run is the root, and its id not converted yet (an LLM call)
    root_name: str | None
    ancestry: str
    parent: str | None  # the parent run's id as text
    key: str | None  # this run's id as text, once someone needed it

    def __init__(self, name: str | None, started: float) -> None:
        self.name = name
        self.started = started  # time.perf_counter(); also what eviction compares


class _LLMRun(_Node):
    """In-flight state of one LLM call (also its node in the run tree)."""

    __slots__ = (
        "batch_size",
        "chunk_usages",
        "first_token",
        "id",
        "messages",
        "metadata",
        "model_hint",
        "prompts",
        "provider",
        "started_wall",
        "tags",
    )

    def __init__(
        self,
        run_id: int,
        name: str | None,
        started: float,
        started_wall: float,
        tags: list[str] | None,
        metadata: Mapping[str, Any],
        provider: str | None,
        model_hint: str | None,
        batch_size: int,
        messages: Sequence[BaseMessage] | None,
        prompts: Sequence[str] | None,
    ) -> None:
        self.id = run_id  # as an int: most calls' ids are converted to text by the writer
        self.name = name
        self.started = started
        self.started_wall = started_wall
        self.tags = tags
        self.metadata = metadata
        self.provider = provider
        self.model_hint = model_hint
        self.batch_size = batch_size
        self.messages = messages
        self.prompts = prompts
        self.chunk_usages: list[Mapping[str, Any]] | None = None
        self.first_token: float | None = None

    def text_id(self) -> str:
        """The call's run id as text (and its root's, if it is the root)."""
        key = self.key
        if key is None:
            key = self.key = id_text(self.id)
            if self.root is None:
                self.root = key
        return key


def _run_name(serialized: Mapping[str, Any] | None, name: Any) -> str | None:
    if name:
        return str(name)
    if serialized:
        name = serialized.get("name")
        if name:
            return name if type(name) is str else str(name)
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

    # LangChain reads a handler's ``ignore_*`` flag before every event it sends it: as plain
    # class attributes instead of the base class's properties, the 22 events of a 20-chunk
    # stream cost about 2.5 us less in place (no property call each).
    ignore_llm = False
    ignore_chat_model = False
    ignore_chain = False
    ignore_retriever = False
    ignore_agent = False
    ignore_retry = False
    ignore_custom_event = False

    _nested = False
    """Whether enclosing handlers may track the same runs (a nested ``track_usage`` block's):
    then :meth:`_outer_node` and :meth:`_claim` are consulted."""

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
        # Keyed by ``run_id.int``: hashing a UUID calls the pure-Python UUID.__hash__.
        self._nodes: dict[int, _Node] = {}
        self._llm_runs: dict[int, _LLMRun] = {}
        # In-flight calls that have not streamed a token yet: once a stream's first token is
        # noted, its other tokens cost one check here (on_llm_new_token runs for every chunk).
        self._awaiting_token: dict[int, _LLMRun] = {}
        self._deferred: set[str] = set()  # run ids (text) whose row a nested handler writes
        # A ledger takes our calls packed (a stand-in sink, or on_record, gets records).
        self._record_packed: Callable[[bytes], None] | None = getattr(ledger, "record_packed", None)
        self._packs = self._record_packed is not None and on_record is None
        self._next_sweep = time.perf_counter() + min(60.0, stale_after)
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

    def _after_fork(self) -> None:
        """In a forked child: forget the LLM calls in flight (the parent records them; ended
        here as unfinished, they would write a second, wrong row), keep the run tree."""
        self._lock = threading.Lock()  # perhaps held by a thread of the parent
        for key in self._llm_runs:
            self._nodes.pop(key, None)
        self._llm_runs = {}
        self._awaiting_token = {}

    # -- run tree ------------------------------------------------------------------------

    def _enter(
        self, run_id: UUID, parent_run_id: UUID | None, node: _Node, *, lazy: bool = False
    ) -> None:
        """Place ``node`` in the run tree and remember it (the caller holds the lock).

        ``lazy``: leave the run's own id unconverted (``key`` and, for a root, ``root`` None):
        an LLM call's packed row carries it as an int (see :meth:`_LLMRun.text_id`)."""
        parent = None
        if parent_run_id is not None:
            parent = self._nodes.get(parent_run_id.int)
            if parent is None and self._nested:
                parent = self._outer_node(parent_run_id)
        if parent is None:  # a root, or a run whose parent started before this handler saw it
            node.root = node.key = None if lazy else _uuid_text(run_id)
            node.root_name = node.name
            node.ancestry = ""
            node.parent = _uuid_text(parent_run_id) if parent_run_id is not None else None
        else:
            pid = parent.key
            if pid is None:
                pid = parent.key = _uuid_text(parent_run_id)  # type: ignore[arg-type]  # not None
            node.root = parent.root or pid  # None: the parent is a root LLM call
            node.root_name = parent.root_name
            node.ancestry = f"{parent.ancestry}/{pid}" if parent.ancestry else pid
            node.parent = pid
            node.key = None
        self._nodes[run_id.int] = node

    def _outer_node(self, run_id: UUID) -> _Node | None:
        """The node of a run this handler has not seen start, as an enclosing handler knows it."""
        return None

    def _start(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> None:
        node = _Node(name, time.perf_counter())
        with self._lock:
            self._enter(run_id, parent_run_id, node)
        if node.started >= self._next_sweep:
            self._sweep(node.started)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + min(60.0, self.stale_after)
        self.evict_stale()

    def _leave(self, run_id: UUID) -> None:
        self._nodes.pop(run_id.int, None)

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
        self._start(run_id, parent_run_id, _run_name(serialized, kwargs.get("name")))

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
        self._start(run_id, parent_run_id, _run_name(serialized, kwargs.get("name")))

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
        self._start(run_id, parent_run_id, _run_name(serialized, kwargs.get("name")))

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
        name: str | None,
        tags: list[str] | None,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        batch_size: int | None,
        messages: Sequence[BaseMessage] | None,
        prompts: Sequence[str] | None,
    ) -> None:
        meta = metadata or _NO_METADATA
        model_hint = meta.get("ls_model_name")
        if not model_hint:
            params = invocation_params or _NO_METADATA
            model_hint = params.get("model") or params.get("model_name")
        key = run_id.int
        run = _LLMRun(
            key,
            _run_name(serialized, name),
            time.perf_counter(),
            time.time(),
            tags,
            meta,
            meta.get("ls_provider"),
            model_hint,
            batch_size or 1,
            messages,
            prompts,
        )
        with self._lock:
            self._enter(run_id, parent_run_id, run, lazy=True)
            self._llm_runs[key] = run
            self._awaiting_token[key] = run
        if self._nested:
            self._claim(key, run)
        if run.started >= self._next_sweep:
            self._sweep(run.started)

    def _claim(self, key: int, run: _LLMRun) -> None:
        """Take over, from enclosing handlers, the row of a call they are tracking too."""

    # The LLM events catch their own faults (see _fault) rather than use @_guarded, and name the
    # keyword arguments LangChain passes: they run on every call, and the decorator's
    # *args/**kwargs re-packing, or reading the arguments out of **kwargs, costs about a
    # microsecond each.

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        name: str | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an LLM call (chat model)."""
        try:
            self._start_llm(
                serialized,
                run_id,
                parent_run_id,
                name,
                tags,
                metadata,
                invocation_params,
                batch_size,
                messages[0] if messages else None,
                None,
            )
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
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        name: str | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an LLM call (completion-style model)."""
        try:
            self._start_llm(
                serialized,
                run_id,
                parent_run_id,
                name,
                tags,
                metadata,
                invocation_params,
                batch_size,
                None,
                prompts,
            )
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
        if self._awaiting_token:
            run = self._awaiting_token.pop(run_id.int, None)
            if run is not None:
                run.first_token = time.perf_counter()
        try:
            usage = chunk.message.usage_metadata  # type: ignore[union-attr]
        except AttributeError:  # a completion-style chunk, or none
            return
        if usage:
            run = self._llm_runs.get(run_id.int)
            if run is not None:
                if run.chunk_usages is None:
                    run.chunk_usages = [usage]
                else:
                    run.chunk_usages.append(usage)

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Close the call with status ``ok`` and its usage."""
        try:
            self._finish(run_id, "ok", response, None)
        except Exception:
            if self._fault("on_llm_end"):
                raise

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the call with status ``error`` (or ``cancelled``) and any usage it carried."""
        try:
            status: Status = "cancelled" if isinstance(error, _CANCELLED) else "error"
            self._finish(run_id, status, kwargs.get("response"), error)
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
    ) -> None:
        ended = time.perf_counter()
        key = run_id.int
        with self._lock:
            run = self._llm_runs.pop(key, None)
            self._awaiting_token.pop(key, None)
            self._nodes.pop(key, None)
        if run is None:
            # An end without a start: a second end event for the same call (already recorded),
            # or a handler attached after the call began. The ledger's writes are idempotent on
            # run_id, so recording it is safe either way; but we have nothing to add.
            logger.debug("end event for unknown LLM run %s ignored", run_id)
            return
        if self._deferred and self._take_deferred(run.text_id()):
            return  # a nested handler writes this call
        # The usage is read now: the response's messages are the application's (an LLM cache,
        # for one, rewrites the cached message's usage on its next hit).
        if not self._packs:
            usage = self._usage_of(run, status, response)
            self._emit(record_from_values(self._values(run, usage, status, error, ended)))
            return
        try:
            packed = self._pack(run, status, response, error, ended)
        except Exception:  # a bug: log it, and still write the call
            logger.exception("langchain-tokenledger: packing a call failed; written as unknown")
            self._emit(self._fallback(run, status))
            if self.raise_error:
                raise
            return
        self._deliver(run, packed)

    def _pack(
        self,
        run: _LLMRun,
        status: Status,
        response: LLMResult | None,
        error: BaseException | None,
        ended: float,
    ) -> bytes:
        """The finished call packed: the usual one as reported, for the writer to normalize
        (about half of a record's cost, off the callback path); others as their values."""
        if status == "ok":
            usual = _usage.usual_call_usage(response, run.chunk_usages or ())
            if usual is not None:
                reported, model = usual
                parts = self._parts(run, model or run.model_hint, status, None, reported, (), ended)
                packed = pack_parts(parts)
                if packed is not None:
                    return packed
        usage = self._usage_of(run, status, response)
        return pack_values(self._values(run, usage, status, error, ended))

    def _deliver(self, run: _LLMRun, packed: bytes) -> None:
        """Hand a finished call, packed, to the ledger."""
        self._record_packed(packed)  # type: ignore[misc]  # not None: see _finish

    def _take_deferred(self, run_key: str) -> bool:
        """Whether a nested handler writes this call (then forget it here)."""
        with self._lock:
            if run_key not in self._deferred:
                return False
            self._deferred.discard(run_key)
            return True

    @staticmethod
    def _fallback(run: _LLMRun, status: Status) -> UsageRecord:
        """What is written for a call whose record cannot be built: never no row."""
        return UsageRecord(
            run_id=run.text_id(),
            parent_run_id=run.parent,
            root_run_id=run.root,
            root_name=run.root_name,
            run_name=run.name,
            provider=run.provider,
            model=run.model_hint,
            status=status,
            usage_source="none",
            started_at=datetime.fromtimestamp(run.started_wall, _UTC),
            notes=["record_build_failed"],
            ancestry=run.ancestry,
        )

    @staticmethod
    def _usage_of(run: _LLMRun, status: Status, response: LLMResult | None) -> _usage.Usage:
        return _usage.usage_for_call(
            response,
            status=status,
            chunk_usages=run.chunk_usages or (),
            batch_size=run.batch_size,
            model_hint=run.model_hint,
            prompts=run.prompts,
            messages=run.messages,
        )

    def _values(
        self,
        run: _LLMRun,
        u: _usage.Usage,
        status: Status,
        error: BaseException | None,
        ended: float,
        extra_notes: Sequence[str] = (),
    ) -> list[Any]:
        """The call's record as packed field values (:mod:`~langchain_tokenledger.packing`)."""
        notes: Sequence[str] = ()
        if error is not None or extra_notes:
            notes = list(extra_notes)
            status_code = getattr(error, "status_code", None)
            if isinstance(status_code, int):
                notes.append(f"http_status:{status_code}")
        error_type = type(error).__name__ if error is not None else None
        return call_values(self._parts(run, u.model, status, error_type, None, notes, ended), u)

    def _parts(
        self,
        run: _LLMRun,
        model: str | None,
        status: Status,
        error_type: str | None,
        reported: Mapping[str, Any] | None,
        notes: Sequence[str],
        ended: float,
    ) -> tuple[Any, ...]:
        """The call as :data:`~langchain_tokenledger.packing.PARTS`."""
        first_token = run.first_token
        run_metadata: Mapping[str, Any] | None = run.metadata
        if LANGCHAIN_META.issuperset(run_metadata):  # type: ignore[arg-type]  # a Mapping
            run_metadata = None  # only LangChain's own keys (the usual case): nothing to pack
        return (
            run.key if run.key is not None else run.id,
            run.parent,
            run.root,
            run.root_name,
            run.name,
            run.provider,
            model,
            status,
            error_type,
            reported,
            notes,
            run.started_wall,
            ended - run.started,
            first_token - run.started if first_token is not None else None,
            self.tags,
            run.tags,
            self.metadata,
            run_metadata,
            run.ancestry,
        )

    def _emit(self, record: UsageRecord) -> None:
        if self._deferred and self._take_deferred(record.run_id):
            return  # a nested handler writes this call
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
        cutoff = time.perf_counter() - self.stale_after
        with self._lock:
            stale = [rid for rid, node in self._nodes.items() if node.started < cutoff]
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
        key = _uuid_text(parent_run_id)
        with self._lock:
            children = [
                rid
                for rid, run in self._llm_runs.items()
                if run.parent == key or key in run.ancestry
            ]
        self._end_runs(children, "cancelled_with_parent", evict_nodes=False)

    def _end_runs(self, run_ids: list[int], note: str, *, evict_nodes: bool = True) -> int:
        runs: list[_LLMRun] = []
        with self._lock:
            for rid in run_ids:
                if evict_nodes:
                    self._nodes.pop(rid, None)
                run = self._llm_runs.pop(rid, None)
                self._awaiting_token.pop(rid, None)
                if run is not None:
                    self._nodes.pop(rid, None)
                    runs.append(run)
        if runs and note != "cancelled_with_parent":
            logger.warning(
                "%d LLM calls never reported their end: written as cancelled (%s)", len(runs), note
            )
        now = time.perf_counter()
        for run in runs:
            usage = self._usage_of(run, "cancelled", None)
            values = self._values(run, usage, "cancelled", None, now, (note,))
            self._emit(record_from_values(values))
        return len(runs)
