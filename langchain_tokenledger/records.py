"""Typed records: one :class:`UsageRecord` per LLM call, and the in-memory totals built from them.

A record is what the handler hands to the ledger; it maps one to one onto a row of the
``llm_calls`` table (same field names, same order as :data:`RECORD_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from uuid import UUID

logger = logging.getLogger("langchain_tokenledger")

_R = TypeVar("_R")

Status = Literal["ok", "error", "cancelled"]
"""The outcome of an LLM call."""

UsageSource = Literal["provider", "estimated", "cache", "none"]
"""Where a row's token counts come from.

``provider``: the provider's own report; ``estimated``: counted locally (tiktoken) because the
provider sent none; ``cache``: an LLM-cache replay (billed columns are zero, the replayed usage is
kept in ``usage_details``); ``none``: unknown, the token columns are NULL.
"""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One LLM call, as written to the ``llm_calls`` table.

    Example:
        >>> from datetime import datetime, timezone
        >>> r = UsageRecord(run_id="0190c5e8-0000-7000-8000-000000000001", model="gpt-4o-mini",
        ...                 input_tokens=10, output_tokens=5, total_tokens=15)
        >>> r.status, r.usage_source
        ('ok', 'provider')
    """

    run_id: str
    parent_run_id: str | None = None
    root_run_id: str | None = None
    root_name: str | None = None
    run_name: str | None = None
    provider: str | None = None
    model: str | None = None
    status: Status = "ok"
    error_type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: Decimal | None = None
    price_source: str | None = None
    cache_hit: bool = False
    usage_source: UsageSource = "provider"
    usage_details: dict[str, Any] = field(default_factory=dict)
    streamed: bool = False
    started_at: datetime | None = None
    ended_at: datetime | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ancestry: str = ""
    """Run ids from the root down to the parent, ``/``-separated (lets a query find every call
    under any inner run)."""

    def replace(self, **changes: Any) -> UsageRecord:
        """Return a copy with ``changes`` applied (like :func:`dataclasses.replace`, faster).

        Example:
            >>> UsageRecord(run_id="r1", model="a").replace(model="b").model
            'b'
        """
        values = list(record_values(self))
        for name, value in changes.items():
            index = _FIELD_INDEX.get(name)
            if index is None:
                raise TypeError(f"UsageRecord has no field {name!r}")
            values[index] = value
        return UsageRecord(*values)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageRecord))
"""Column order of ``llm_calls``; the writer and the schema both follow it."""
TOKEN_FIELDS: tuple[str, ...] = tuple(name for name in RECORD_FIELDS if name.endswith("_tokens"))
"""The token count columns (integers), in column order.

Example:
    >>> TOKEN_FIELDS[:3]
    ('input_tokens', 'output_tokens', 'total_tokens')
"""

_FIELD_INDEX = {name: i for i, name in enumerate(RECORD_FIELDS)}
record_values: Callable[[UsageRecord], tuple[Any, ...]] = operator.attrgetter(*RECORD_FIELDS)
"""A record's field values in column order (one C-level call)."""


class _Factory:
    """Marks a field whose default comes from a factory (``<factory>``, as in dataclasses)."""

    def __repr__(self) -> str:
        return "<factory>"


def _fast_constructors(cls: type[_R]) -> Callable[..., _R]:
    """Give the frozen slots dataclass ``cls`` a faster ``__init__``; return a faster factory.

    A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``,
    and the writer builds one record per LLM call when it unpacks it.
    Instead, the instance is switched to a plain twin class with the same slots (so
    ``__class__`` assignment is allowed), its slots are filled with ordinary attribute stores,
    and it is switched back: less than half the time. Instances of a subclass take the slot
    descriptors' setters instead. The signature, the defaults and the immutability afterwards
    are those of the dataclass.

    The returned factory takes the same arguments and builds the instance the same way, without
    the detour through ``type.__call__`` (a third of the cost of a positional call).
    """
    slots = cast("tuple[str, ...]", cls.__dict__["__slots__"])
    namespace: dict[str, Any] = {
        "_factory": _Factory(),
        "_cls": cls,
        "_twin": type(f"_Open{cls.__name__}", (), {"__slots__": slots}),
        "_retype": object.__setattr__,
        "_alloc": object.__new__,
    }
    params: list[str] = []
    defaults: list[str] = []
    for f in dataclasses.fields(cast(Any, cls)):
        namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_make_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_factory")
            defaults.append(f"    if {f.name} is _factory:\n        {f.name} = _make_{f.name}()")
        else:
            params.append(f.name)
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    stores = [f"self.{name} = {name}" for name in names]
    signature = ", ".join(params)
    source = "\n".join(
        [
            f"def __init__(self, {signature}):",
            *defaults,
            "    if type(self) is _cls:",
            "        _retype(self, '__class__', _twin)",
            *(f"        {line}" for line in stores),
            "        self.__class__ = _cls",
            "    else:",
            *(f"        _set_{name}(self, {name})" for name in names),
            f"def make({signature}):",
            *defaults,
            "    self = _alloc(_twin)",
            *(f"    {line}" for line in stores),
            "    self.__class__ = _cls",
            "    return self",
            "",
        ]
    )
    exec(source, namespace)
    init, make = namespace["__init__"], namespace["make"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    init.__module__ = make.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[method-assign]
    return cast("Callable[..., _R]", make)


if TYPE_CHECKING:
    make_record = UsageRecord
else:
    make_record = _fast_constructors(UsageRecord)
"""``UsageRecord(...)``, faster: the handler's per-call constructor (pass the fields positionally:
with more than 15 keyword arguments CPython packs them into a dict, which costs more than the
construction itself)."""


@dataclass(slots=True)
class ModelUsage:
    """Token and cost totals for one model, in ``get_openai_callback``'s vocabulary.

    Example:
        >>> m = ModelUsage(model="gpt-4o-mini")
        >>> m.add(UsageRecord(run_id="r1", input_tokens=3, output_tokens=2, total_tokens=5))
        >>> m.total_tokens, m.successful_requests
        (5, 1)
    """

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    cache_hits: int = 0
    total_cost: Decimal = Decimal(0)
    unpriced_requests: int = 0

    def add(self, record: UsageRecord) -> None:
        """Add one call to the totals (cache hits count as calls but bill nothing)."""
        if record.status == "ok":
            self.successful_requests += 1
        else:
            self.failed_requests += 1
        if record.cache_hit:
            self.cache_hits += 1
        self.prompt_tokens += record.input_tokens or 0
        self.completion_tokens += record.output_tokens or 0
        self.total_tokens += record.total_tokens or 0
        self.cached_tokens += record.cache_read_tokens or 0
        self.cache_creation_tokens += record.cache_creation_tokens or 0
        self.reasoning_tokens += record.reasoning_tokens or 0
        if record.cost_usd is not None:
            self.total_cost += record.cost_usd
        elif record.total_tokens:
            self.unpriced_requests += 1

    def as_dict(self) -> dict[str, Any]:
        """The plain-dict shape users build by hand from ``get_openai_callback``."""
        return {
            "model_name": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "successful_requests": self.successful_requests,
            "failed_requests": self.failed_requests,
            "total_cost": self.total_cost,
        }

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]


class UsageSummary:
    """Live totals of the calls seen by a :func:`track_usage` block (thread-safe).

    Reads like ``get_openai_callback()``'s handler, with per-model and per-root-run breakdowns.
    Records arrive unpriced from the handler (pricing happens in the ledger's writer thread);
    with ``price`` (``record -> priced record``) each one is priced once, when first read, so
    :attr:`total_cost` equals the sum of the rows' ``cost_usd``.

    Example:
        >>> s = UsageSummary()
        >>> s.add(UsageRecord(run_id="r1", root_run_id="root", model="m", input_tokens=2,
        ...                   output_tokens=1, total_tokens=3))
        True
        >>> s.total_tokens, s.by_model["m"].total_tokens, s.by_run["root"]["m"].prompt_tokens
        (3, 3, 2)
    """

    def __init__(
        self,
        records: Iterable[UsageRecord] = (),
        *,
        price: Callable[[UsageRecord], UsageRecord] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        _summaries.add(self)
        # A call's record, or its packed form (see packing.py) until the totals are read.
        self._records: dict[str, UsageRecord | bytes] = {}
        self._price = price
        self._unread: set[str] = set()  # run ids whose entry is packed or unpriced
        for record in records:
            self.add(record)

    def add(self, record: UsageRecord) -> bool:
        """Count ``record``; ``False`` if its ``run_id`` was already counted.

        The first record of a run is kept, as the ledger's idempotent writes keep the first row,
        so the live totals always equal the block's rows in SQL.
        """
        with self._lock:
            if record.run_id in self._records:
                return False
            self._records[record.run_id] = record
            if self._price is not None and record.cost_usd is None:
                self._unread.add(record.run_id)
            return True

    def add_packed(self, run_id: str, packed: bytes) -> bool:
        """:meth:`add` for a record packed by :mod:`~langchain_tokenledger.packing` (what the
        handler delivers); it is unpacked when the totals are first read."""
        with self._lock:
            if run_id in self._records:
                return False
            self._records[run_id] = packed
            self._unread.add(run_id)
            return True

    @property
    def records(self) -> list[UsageRecord]:
        """The calls seen, in the order they ended."""
        with self._lock:
            if self._unread:
                self._read_pending()
            return cast("list[UsageRecord]", list(self._records.values()))

    def _read_pending(self) -> None:
        from .packing import unpack_record

        for run_id in self._unread:
            entry = self._records[run_id]
            record = entry if isinstance(entry, UsageRecord) else unpack_record(entry)
            if self._price is not None and record.cost_usd is None:
                try:
                    record = self._price(record)
                except Exception:  # a live total must never break the caller; the row says why
                    logger.exception("pricing failed for run %s; counted unpriced", run_id)
            self._records[run_id] = record
        self._unread.clear()

    def _total(self) -> ModelUsage:
        total = ModelUsage()
        for record in self.records:
            total.add(record)
        return total

    @property
    def by_model(self) -> dict[str, ModelUsage]:
        """Totals per model name (``"unknown"`` where the provider named none)."""
        return _group(self.records)

    @property
    def by_run(self) -> RunUsages:
        """Totals per root run id (``str`` or ``UUID`` keys), then per model."""
        runs: dict[str, list[UsageRecord]] = {}
        for record in self.records:
            runs.setdefault(record.root_run_id or record.run_id, []).append(record)
        return RunUsages((run_id, _group(records)) for run_id, records in runs.items())

    @property
    def total_tokens(self) -> int:
        """Billed tokens, input plus output."""
        return self._total().total_tokens

    @property
    def prompt_tokens(self) -> int:
        """Billed input tokens (cache reads included, as providers report them)."""
        return self._total().prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Billed output tokens (reasoning included)."""
        return self._total().completion_tokens

    @property
    def cached_tokens(self) -> int:
        """Input tokens read from the provider's prompt cache."""
        return self._total().cached_tokens

    @property
    def reasoning_tokens(self) -> int:
        """Output tokens spent on reasoning."""
        return self._total().reasoning_tokens

    @property
    def successful_requests(self) -> int:
        """Calls that ended with status ``ok`` (LLM-cache hits included)."""
        return self._total().successful_requests

    @property
    def failed_requests(self) -> int:
        """Calls that ended with status ``error`` or ``cancelled``."""
        return self._total().failed_requests

    @property
    def cache_hits(self) -> int:
        """Calls answered from an LLM cache (billed nothing)."""
        return self._total().cache_hits

    @property
    def total_cost(self) -> Decimal:
        """Cost in USD of the priced calls."""
        return self._total().total_cost

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __repr__(self) -> str:
        return (
            f"UsageSummary(calls={len(self)}, total_tokens={self.total_tokens}, "
            f"total_cost={self.total_cost})"
        )

    def __str__(self) -> str:
        t = self._total()
        lines = [
            f"Tokens Used: {t.total_tokens}",
            f"\tPrompt Tokens: {t.prompt_tokens}",
            f"\t\tPrompt Tokens Cached: {t.cached_tokens}",
            f"\tCompletion Tokens: {t.completion_tokens}",
            f"\t\tReasoning Tokens: {t.reasoning_tokens}",
            f"Successful Requests: {t.successful_requests}",
            f"Failed Requests: {t.failed_requests}",
            f"LLM Cache Hits: {t.cache_hits}",
            f"Total Cost (USD): ${t.total_cost:f}",
        ]
        return "\n".join(lines)


_summaries: weakref.WeakSet[UsageSummary] = weakref.WeakSet()
"""Every live :class:`UsageSummary`: a forked child gives each a new lock."""


def _new_locks_after_fork() -> None:
    for summary in list(_summaries):
        summary._lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_after_fork)


class RunUsages(dict[str, dict[str, ModelUsage]]):
    """``{root_run_id: {model: ModelUsage}}`` that also accepts a ``UUID`` run id as the key.

    Example:
        >>> from uuid import UUID
        >>> u = RunUsages({"0190c5e8-0000-7000-8000-000000000001": {}})
        >>> UUID("0190c5e8-0000-7000-8000-000000000001") in u
        True
    """

    def __missing__(self, key: object) -> dict[str, ModelUsage]:
        if isinstance(key, UUID):
            return self[str(key)]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(str(key) if isinstance(key, UUID) else key)

    def get(self, key: object, default: Any = None) -> Any:
        """``dict.get`` that also accepts a ``UUID`` run id."""
        return super().get(cast(str, str(key) if isinstance(key, UUID) else key), default)


def _group(records: Iterable[UsageRecord]) -> dict[str, ModelUsage]:
    out: dict[str, ModelUsage] = {}
    for record in records:
        name = record.model or "unknown"
        bucket = out.get(name)
        if bucket is None:
            bucket = out[name] = ModelUsage(model=name)
        bucket.add(record)
    return out


def merge_dicts(*parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge mappings left to right (later wins), skipping ``None``."""
    out: dict[str, Any] = {}
    for part in parts:
        if part:
            out.update(part)
    return out
