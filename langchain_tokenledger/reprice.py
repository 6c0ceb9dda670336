"""Re-pricing: recompute ``cost_usd`` of stored rows with today's price data and overrides.

Prices change and price tables get corrected. :func:`reprice` reads the matching rows in chunks
(keyset pagination on ``run_id``, so memory stays flat on any ledger size), prices each one again
exactly as the writer does (:func:`~langchain_tokenledger.store.price_record`, from the usage
stored in ``usage_details``, at the prices in force when the call started), and updates the rows
whose cost, price source or pricing notes changed, one transaction per chunk.
``Ledger.reprice(...)`` calls it.

Example:
    >>> from langchain_tokenledger import Ledger, UsageRecord
    >>> ledger = Ledger("sqlite://")
    >>> ledger.record(UsageRecord(run_id="r1", model="my-llama", input_tokens=1_000_000,
    ...                           output_tokens=0, total_tokens=1_000_000,
    ...                           usage_details={"input_tokens": 1_000_000, "output_tokens": 0}))
    >>> ledger.flush()                      # unknown model: written with cost_usd NULL
    >>> ledger.pricer = Pricer(prices={"my-llama": {"input": 2, "output": 4}})
    >>> result = ledger.reprice(model="my-llama")
    >>> result.changed, result.old_total, result.new_total
    (1, Decimal('0'), Decimal('2'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .pricing import Pricer
from .query import When, _record, money, parse_when
from .records import UsageRecord
from .schema import llm_calls
from .store import price_record

if TYPE_CHECKING:
    from .store import Ledger

__all__ = ["PRICING_NOTES", "RepriceResult", "reprice", "repriced"]

PRICING_NOTES = frozenset(
    {
        "unknown_model",
        "invalid_usage",
        "fine_tune_base_price",
        "model_only_match",
        "price_data_error",
        "pricing_error",
        "pricing_failed",
        "no_usage",
    }
)
"""Notes written by pricing (not by counting): dropped and recomputed when a row is re-priced.
``service_tier_price_unavailable:<tier>`` notes are too."""

_TIER_NOTE = "service_tier_price_unavailable:"
_PLACES = Decimal("1e-12")  # the scale of the cost_usd column
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class RepriceResult:
    """What :func:`reprice` did.

    ``examined``: rows matching the filters; ``changed``: rows whose ``cost_usd`` changed;
    ``updated``: rows written (a cost, price source or pricing-note change); ``unpriced``: rows
    still without a cost (their notes say why); ``old_total`` / ``new_total``: the summed cost of
    the examined rows before and after (NULL counts as 0). Nothing is written when ``dry_run``.

    Example:
        >>> r = RepriceResult(examined=3, changed=1, updated=1, unpriced=0,
        ...                   old_total=Decimal("0.5"), new_total=Decimal("0.75"), dry_run=False)
        >>> r.delta
        Decimal('0.25')
    """

    examined: int
    changed: int
    updated: int
    unpriced: int
    old_total: Decimal
    new_total: Decimal
    dry_run: bool

    @property
    def delta(self) -> Decimal:
        """``new_total - old_total``: what the corrected prices add (negative: remove)."""
        return self.new_total - self.old_total

    def __str__(self) -> str:
        """One line for a terminal, e.g. from a ``reprice`` CLI command.

        Example:
            >>> print(RepriceResult(examined=3, changed=1, updated=1, unpriced=0,
            ...       old_total=Decimal("0.5"), new_total=Decimal("0.75"), dry_run=True))
            3 rows examined, 1 with a new cost: $0.5 -> $0.75 (+0.25); dry run, nothing written
        """
        line = (
            f"{self.examined:,} rows examined, {self.changed:,} with a new cost: "
            f"${_plain(self.old_total)} -> ${_plain(self.new_total)} "
            f"({'+' if self.delta >= 0 else '-'}{_plain(abs(self.delta))})"
        )
        if self.unpriced:
            line += f"; {self.unpriced:,} still unpriced (see their notes)"
        if self.dry_run:
            line += "; dry run, nothing written"
        return line


def _plain(value: Decimal) -> str:
    """``value`` without trailing zeros (``0.000`` -> ``0``), never in exponent form."""
    return format(value.normalize(), "f") if value else "0"


def _cost(value: Decimal | None) -> Decimal | None:
    """A cost at the column's scale (half up, as the databases round on insert)."""
    return None if value is None else value.quantize(_PLACES, rounding=ROUND_HALF_UP)


def _counting_notes(notes: Sequence[str]) -> list[str]:
    return [n for n in notes if n not in PRICING_NOTES and not n.startswith(_TIER_NOTE)]


def repriced(pricer: Pricer, record: UsageRecord) -> UsageRecord:
    """``record`` priced afresh with ``pricer`` (its old cost, source and pricing notes dropped).

    Example:
        >>> r = UsageRecord(run_id="r", model="my-llama", input_tokens=10, output_tokens=0,
        ...                 total_tokens=10, notes=["unknown_model"],
        ...                 usage_details={"input_tokens": 10, "output_tokens": 0})
        >>> new = repriced(Pricer(prices={"my-llama": {"input": 1, "output": 1}}), r)
        >>> new.cost_usd, new.price_source, new.notes
        (Decimal('0.000010'), 'override', [])
    """
    fresh = record.replace(cost_usd=None, price_source=None, notes=_counting_notes(record.notes))
    return price_record(pricer, fresh)


def _filters(
    since: When | None, until: When | None, model: str | None, provider: str | None
) -> list[sa.ColumnElement[bool]]:
    c = llm_calls.c
    where: list[sa.ColumnElement[bool]] = []
    for name, value in (("model", model), ("provider", provider)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if since is not None:
        where.append(c.started_at >= parse_when(since))
    if until is not None:
        where.append(c.started_at < parse_when(until))
    if model is not None:
        where.append(c.model == model)
    if provider is not None:
        where.append(c.provider == provider)
    return where


_UPDATE = (
    sa.update(llm_calls)
    .where(llm_calls.c.run_id == sa.bindparam("b_run_id"))
    .values(
        cost_usd=sa.bindparam("b_cost"),
        price_source=sa.bindparam("b_source"),
        notes=sa.bindparam("b_notes", type_=llm_calls.c.notes.type),
    )
)


def reprice(
    ledger: Ledger,
    *,
    since: When | None = None,
    until: When | None = None,
    model: str | None = None,
    provider: str | None = None,
    dry_run: bool = False,
    batch_size: int = 1000,
) -> RepriceResult:
    """Recompute ``cost_usd`` of the rows matching the filters with ``ledger.pricer``.

    ``since`` / ``until`` bound ``started_at`` (``"7d"``, ``"2026-11-01"``, a datetime, ...; see
    :func:`~langchain_tokenledger.query.parse_when`), ``model`` / ``provider`` match exactly.
    Rows are read ``batch_size`` at a time and each chunk's changes are written in one
    transaction; with ``dry_run`` nothing is written. Call it through ``Ledger.reprice``, which
    first flushes the rows still queued.

    Example:
        >>> result = ledger.reprice(since="30d", model="gpt-4o-mini")  # doctest: +SKIP
        >>> result.changed, result.delta  # doctest: +SKIP
        (412, Decimal('-0.031250000000'))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    where = _filters(since, until, model, provider)
    c = llm_calls.c
    examined = changed = updated = unpriced = 0
    old_total = new_total = _ZERO
    last = ""
    while True:
        stmt = (
            sa.select(llm_calls).where(*where, c.run_id > last).order_by(c.run_id).limit(batch_size)
        )
        with ledger.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        if not rows:
            break
        writes: list[dict[str, Any]] = []
        for row in rows:
            old = _record(row)
            new = repriced(ledger.pricer, old)
            old_cost, new_cost = _cost(old.cost_usd), _cost(new.cost_usd)
            examined += 1
            old_total += old_cost or _ZERO
            new_total += new_cost or _ZERO
            unpriced += new_cost is None
            changed += old_cost != new_cost
            if (old_cost, old.price_source, old.notes) != (new_cost, new.price_source, new.notes):
                writes.append(
                    {
                        "b_run_id": old.run_id,
                        "b_cost": new_cost,
                        "b_source": new.price_source,
                        "b_notes": new.notes,
                    }
                )
        updated += len(writes)
        if writes and not dry_run:
            with ledger.engine.begin() as conn:
                conn.execute(_UPDATE, writes)
        last = rows[-1]["run_id"]
    return RepriceResult(
        examined=examined,
        changed=changed,
        updated=updated,
        unpriced=unpriced,
        old_total=money(old_total),
        new_total=money(new_total),
        dry_run=dry_run,
    )
