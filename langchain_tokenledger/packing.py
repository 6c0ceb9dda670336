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
"""

from __future__ import annotations

import json
import marshal
import numbers
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from .records import RECORD_FIELDS, UsageRecord, make_record, record_values

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
    """The record :func:`pack_record` or :func:`pack_values` packed."""
    return record_from_values(marshal.loads(packed))


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
