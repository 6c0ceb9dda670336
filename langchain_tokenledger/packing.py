"""Records as bytes: the form a finished LLM call travels in from the handler to the writer.

A packed record is ``marshal`` of its field values in column order (:data:`RECORD_FIELDS`), with
timestamps in UTC as POSIX floats (exact to the microsecond from 1833 to 2106; other timestamps
as ISO text) and the cost as decimal text. The handler packs each call when it ends, and the
ledger's queue, the pipe to the writer process and the records the writer process has not
confirmed yet all hold these bytes: one small object per call, which the garbage collector never
traverses, where a record would keep a dozen dicts and lists alive in the application until the
writer took it. The writer unpacks each record to its values once, and prices and serializes
those values as they are: it never builds the record (see ``Ledger._prepare``).

A value ``marshal`` refuses (a user object in the metadata, say) is reduced to what its row
would hold anyway: the JSON the writer would have stored.

The usual call (one choice, one plain usage report, status ``ok``) travels earlier still: as its
*parts* (:data:`PARTS`, a ``tuple`` where values are a ``list``), the usage as the provider
reported it and the run's tags and metadata as LangChain passed them. Normalizing them is the
larger part of a record's cost, and the writer does it (:func:`unpack_values`,
:func:`call_values`), off the application's callback path.
"""

from __future__ import annotations

import json
import logging
import marshal
import numbers
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from .records import RECORD_FIELDS, UsageRecord, make_record, record_values
from .usage import Usage, from_usage_metadata

logger = logging.getLogger("langchain_tokenledger")

SESSION_KEYS = ("session_id", "thread_id", "conversation_id")
"""Metadata keys that fill the ``session_id`` column, first found wins."""

_INTERNAL_META = ("ls_", "lc_")
"""Metadata LangChain adds itself (``ls_provider``, ``lc_versions``): it has its own columns."""
LANGCHAIN_META = frozenset(
    {
        "lc_versions",
        "ls_integration",
        "ls_max_tokens",
        "ls_model_name",
        "ls_model_type",
        "ls_provider",
        "ls_stop",
        "ls_structured_output_format",
        "ls_temperature",
    }
)
"""The usual internal keys: a run's metadata with no other key needs no filtering."""
assert all(key.startswith(_INTERNAL_META) for key in LANGCHAIN_META)
_INTERNAL_TAG = "seq:step:"

PARTS = (
    "run_id",
    "parent_run_id",
    "root_run_id",
    "root_name",
    "run_name",
    "provider",
    "model",
    "status",
    "error_type",
    "reported_usage",
    "notes",
    "started_at",
    "elapsed",
    "first_token_after",
    "handler_tags",
    "run_tags",
    "handler_metadata",
    "run_metadata",
    "ancestry",
)
"""What the handler knows of a finished call, in this order (see :func:`call_values`):
``reported_usage`` is the usage as received (normalized unless a :class:`Usage` is given),
``notes`` the call's own notes (the usage's follow), ``started_at`` a POSIX timestamp,
``run_id`` text or ``UUID.int``, ``root_run_id`` ``None`` when the call is its own root,
``elapsed`` and ``first_token_after`` seconds from the start (``None``: no token streamed),
``run_metadata`` ``None`` when the run's metadata holds only LangChain's own keys."""

_UTC = timezone.utc
_COST = RECORD_FIELDS.index("cost_usd")
_STARTED, _ENDED = RECORD_FIELDS.index("started_at"), RECORD_FIELDS.index("ended_at")
_EXACT = float(2**32)


def pack_values(values: list[Any]) -> bytes:
    """A record's field values packed; timestamps and cost already in their packed form.

    The handler builds these values itself (:meth:`TokenLedgerHandler._values`), so a call's
    record is never built in the application.

    Example:
        >>> values = list(record_values(UsageRecord(run_id="r1", total_tokens=3)))
        >>> unpack_record(pack_values(values)) == UsageRecord(run_id="r1", total_tokens=3)
        True
    """
    try:
        return marshal.dumps(values)
    except ValueError:
        return marshal.dumps(_plain(values))


def pack_record(record: UsageRecord) -> bytes:
    """``record`` packed (see :func:`unpack_record`).

    Example:
        >>> from datetime import datetime, timezone
        >>> r = UsageRecord(run_id="r1", started_at=datetime(2026, 1, 2, 3, 4, 5, 6, timezone.utc))
        >>> unpack_record(pack_record(r)) == r
        True
    """
    values = list(record_values(record))
    for i in (_STARTED, _ENDED):
        when = values[i]
        if when is not None:
            stamp = when.timestamp() if when.tzinfo is _UTC else _EXACT
            # A double holds every microsecond exactly only within 2**32 s of 1970 (1833-2106).
            values[i] = stamp if -_EXACT < stamp < _EXACT else when.isoformat()
    if values[_COST] is not None:
        values[_COST] = str(values[_COST])
    return pack_values(values)


def unpack_record(packed: bytes) -> UsageRecord:
    """The record :func:`pack_record`, :func:`pack_values` or :func:`pack_parts` packed."""
    return record_from_values(unpack_values(packed))


def pack_parts(parts: tuple[Any, ...]) -> bytes | None:
    """A call's :data:`PARTS` packed; ``None`` if ``marshal`` refuses one (then the caller
    packs the call's values, :func:`pack_values`, which reduces such values).

    Example:
        >>> parts = ("r1", None, "r1", None, "chat", "openai", "gpt-4o-mini", "ok", None,
        ...     {"input_tokens": 9, "output_tokens": 6}, (), 0.5, 0.25, None, (), None, {}, {}, "")
        >>> record = unpack_record(pack_parts(parts))
        >>> record.total_tokens, record.latency_ms, record.started_at.isoformat()
        (15, 250.0, '1970-01-01T00:00:00.500000+00:00')
    """
    try:
        return marshal.dumps(parts)
    except ValueError:
        return None


def unpack_values(packed: bytes) -> list[Any]:
    """The field values of a packed record, whichever way it was packed (what the writer reads).

    A call packed as its parts is completed here (:func:`call_values`); if that fails (a bug),
    the call still gets its row, with the usage as reported kept in ``usage_details`` and the
    note ``record_build_failed``.

    Example:
        >>> values = list(record_values(UsageRecord(run_id="r1", total_tokens=3)))
        >>> unpack_values(pack_values(values)) == values
        True
    """
    values = marshal.loads(packed)
    if values.__class__ is list:
        return values
    try:
        return call_values(values)
    except Exception:
        logger.exception("langchain-tokenledger: completing call %s failed", values[0])
        return _unbuilt_values(values)


def call_values(parts: Sequence[Any], usage: Usage | None = None) -> list[Any]:
    """The field values (as :func:`pack_values` takes them) of a call's :data:`PARTS`.

    ``usage`` is the call's usage already normalized; without it, the reported usage is
    normalized here (:func:`~langchain_tokenledger.usage.from_usage_metadata`), the model being
    the one the parts name (note ``no_model`` when there is none). The row's ``tags`` are the
    handler's then the run's own (LangChain's ``seq:step:`` tags left out); its ``metadata`` is
    the handler's overridden by the run's (LangChain's ``ls_*``/``lc_*`` keys left out), and
    fills ``user_id`` and ``session_id`` (:data:`SESSION_KEYS`).

    Example:
        >>> parts = ("r1", None, "r1", None, "chat", "openai", None, "ok", None,
        ...     {"input_tokens": 9, "output_tokens": 6}, (), 0.5, 0.25, 0.1, ("team-a",),
        ...     ["seq:step:1", "x"], {"user_id": "u1"}, {"ls_provider": "openai", "k": 1}, "")
        >>> row = dict(zip(RECORD_FIELDS, call_values(parts)))
        >>> row["total_tokens"], row["notes"], row["tags"], row["metadata"], row["user_id"]
        (15, ['no_model'], ['team-a', 'x'], {'user_id': 'u1', 'k': 1}, 'u1')
    """
    (
        run_id,
        parent_run_id,
        root_run_id,
        root_name,
        run_name,
        provider,
        model,
        status,
        error_type,
        reported,
        own_notes,
        started_at,
        elapsed,
        first_token_after,
        handler_tags,
        run_tags,
        handler_metadata,
        run_metadata,
        ancestry,
    ) = parts
    if run_id.__class__ is int:
        run_id = id_text(run_id)
    if root_run_id is None:
        root_run_id = run_id
    if usage is None:
        usage = from_usage_metadata(reported, owned=True)
        usage.model = model
        if model is None:
            usage.notes.append("no_model")
    notes = [*own_notes, *usage.notes] if own_notes else usage.notes
    if run_metadata is None:  # the handler found only LangChain's own keys (LANGCHAIN_META)
        metadata = dict(handler_metadata)
    else:
        metadata = {
            key: value for key, value in run_metadata.items() if not key.startswith(_INTERNAL_META)
        }
        if handler_metadata:
            metadata = {**handler_metadata, **metadata}
    tags = list(handler_tags)
    if run_tags:
        for tag in run_tags:
            if tag not in tags and not tag.startswith(_INTERNAL_TAG):
                tags.append(tag)
    session_id = user_id = None
    if metadata:
        for key in SESSION_KEYS:
            if metadata.get(key) is not None:
                session_id = str(metadata[key])
                break
        user = metadata.get("user_id")
        if user is not None:
            user_id = str(user)
    # In the order of RECORD_FIELDS (checked below).
    return [
        run_id,
        parent_run_id,
        root_run_id,
        root_name,
        run_name,
        provider,
        usage.model,
        status,
        error_type,
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
        usage.cache_read_tokens,
        usage.cache_creation_tokens,
        usage.reasoning_tokens,
        None,  # cost_usd: priced by the ledger's writer
        None,  # price_source
        usage.cache_hit,
        usage.source,  # usage_source
        usage.details,  # usage_details
        first_token_after is not None,  # streamed
        started_at,
        started_at + elapsed,  # ended_at
        elapsed * 1000.0,  # latency_ms
        first_token_after * 1000.0 if first_token_after is not None else None,  # ttft_ms
        user_id,
        session_id,
        tags,
        metadata,
        notes,
        ancestry,
    ]


_CALL_ORDER = (
    "run_id",
    "parent_run_id",
    "root_run_id",
    "root_name",
    "run_name",
    "provider",
    "model",
    "status",
    "error_type",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cost_usd",
    "price_source",
    "cache_hit",
    "usage_source",
    "usage_details",
    "streamed",
    "started_at",
    "ended_at",
    "latency_ms",
    "ttft_ms",
    "user_id",
    "session_id",
    "tags",
    "metadata",
    "notes",
    "ancestry",
)
assert RECORD_FIELDS == _CALL_ORDER, "update call_values"


def id_text(run_id: int) -> str:
    """A run id (``UUID.int``) as text, as ``str(UUID)`` gives it (which is pure Python).

    Example:
        >>> from uuid import UUID
        >>> run_id = UUID("01a2492b-346c-72f6-8d10-e506e9029a85")
        >>> id_text(run_id.int) == str(run_id)
        True
    """
    h = run_id.to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _unbuilt_values(parts: Sequence[Any]) -> list[Any]:
    """What is written for parts :func:`call_values` could not complete: never no row (as
    ``TokenLedgerHandler._fallback`` for a call it could not pack), with the usage as reported."""
    part = dict(zip(PARTS, parts, strict=False))
    run_id: Any = part.get("run_id")  # as broken as the rest may be: kept as it came
    status: Any = part.get("status")
    if type(run_id) is int:
        run_id = id_text(run_id)
    reported = part.get("reported_usage")
    values = list(
        record_values(
            UsageRecord(
                run_id=run_id,
                parent_run_id=part.get("parent_run_id"),
                root_run_id=part.get("root_run_id") or run_id,
                root_name=part.get("root_name"),
                run_name=part.get("run_name"),
                provider=part.get("provider"),
                model=part.get("model"),
                status=status,
                error_type=part.get("error_type"),
                usage_source="none",
                usage_details=reported if type(reported) is dict else {},
                streamed=part.get("first_token_after") is not None,
                notes=["record_build_failed"],
                ancestry=part.get("ancestry") or "",
            )
        )
    )
    values[_STARTED] = part.get("started_at")  # packed values hold it as a POSIX timestamp
    return values


def record_from_values(values: list[Any]) -> UsageRecord:
    """The record of packed field values (timestamps as POSIX floats or ISO text, cost as text).

    Example:
        >>> values = list(record_values(UsageRecord(run_id="r1")))
        >>> values[RECORD_FIELDS.index("started_at")] = 0.5
        >>> record_from_values(values).started_at.isoformat()
        '1970-01-01T00:00:00.500000+00:00'
    """
    for i in (_STARTED, _ENDED):
        when = values[i]
        if when is not None:
            values[i] = (
                datetime.fromtimestamp(when, _UTC)
                if when.__class__ is float
                else datetime.fromisoformat(when)
            )
    if values[_COST] is not None:
        values[_COST] = Decimal(values[_COST])
    return make_record(*values)


def unpack_records(packed: Sequence[bytes | UsageRecord]) -> list[UsageRecord]:
    """Records from a mix of packed and unpacked ones (what a ledger's queue holds)."""
    return [p if isinstance(p, UsageRecord) else unpack_record(p) for p in packed]


def _plain(values: list[Any]) -> list[Any]:
    """``values`` with what ``marshal`` refuses reduced to what the row would store."""
    from .writers import _JSON_EMPTY, _json  # not at import: the handler needs no SQLAlchemy

    plain: list[Any] = []
    for name, value in zip(RECORD_FIELDS, values, strict=True):
        empty = _JSON_EMPTY.get(name)
        if empty is not None:
            plain.append(json.loads(_json(value, empty)))
        elif value is None or type(value) in (str, int, float, bool):
            plain.append(value)
        elif isinstance(value, numbers.Integral):
            plain.append(int(value))
        elif isinstance(value, numbers.Real):
            plain.append(float(value))
        else:
            plain.append(str(value))
    return plain
