"""Helpers shared by the benchmark scripts: timing, medians, markdown tables, realistic records.

Not part of the package: the scripts put ``benchmarks/`` on ``sys.path`` by being run from it.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from langchain_core.utils.uuid import uuid7

from langchain_tokenledger import UsageRecord

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "claude-3-5-haiku-latest")


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (they must not be empty).

    Example:
        >>> median([3.0, 1.0, 2.0])
        2.0
    """
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (after a garbage collection, so blocks start alike).

    Example:
        >>> timed(lambda: None) >= 0
        True
    """
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` leaves the elapsed seconds in ``t[0]``.

    Example:
        >>> with stopwatch() as t:
        ...     pass
        >>> t[0] >= 0
        True
    """
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (numbers already formatted by the caller).

    Example:
        >>> print(table(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def us(seconds: float) -> str:
    """Seconds as whole microseconds, e.g. ``"136 us"``.

    Example:
        >>> us(0.000136)
        '136 us'
    """
    return f"{seconds * 1e6:.0f} us"


def ratio(value: float) -> str:
    """A ratio as ``x1.23``.

    Example:
        >>> ratio(1.234)
        'x1.23'
    """
    return f"x{value:.2f}"


def realistic_records(n: int, seed: int = 7) -> list[UsageRecord]:
    """``n`` records shaped like a production app's: time-ordered uuid7 run ids, a chain root,
    varied token counts with cache and reasoning details, tags, metadata with a user id, notes.

    Example:
        >>> [r] = realistic_records(1)
        >>> r.model in MODELS, r.metadata["user_id"].startswith("user-")
        (True, True)
    """
    rng = random.Random(seed)
    start = datetime.now(timezone.utc)
    records = []
    root = str(uuid7())
    for i in range(n):
        if i % 3 == 0:
            root = str(uuid7())
        inp = rng.randint(40, 6000)
        out = rng.randint(5, 900)
        cached = rng.choice((0, 0, 0, inp // 2 // 64 * 64))
        reasoning = rng.choice((0, 0, 0, out // 3))
        user = f"user-{rng.randint(1, 500)}"
        session = f"sess-{rng.randint(1, 5000)}"
        began = start + timedelta(milliseconds=i)
        latency = rng.uniform(200, 4000)
        streamed = i % 4 == 0
        error = i % 50 == 0
        records.append(
            UsageRecord(
                run_id=str(uuid7()),
                parent_run_id=root,
                root_run_id=root,
                root_name="RunnableSequence",
                run_name="ChatOpenAI",
                provider="anthropic" if i % 7 == 0 else "openai",
                model=MODELS[3] if i % 7 == 0 else MODELS[i % 3],
                status="error" if error else "ok",
                error_type="RateLimitError" if error else None,
                input_tokens=inp,
                output_tokens=out,
                total_tokens=inp + out,
                cache_read_tokens=cached,
                cache_creation_tokens=0,
                reasoning_tokens=reasoning,
                usage_source="provider",
                usage_details={
                    "input_tokens": inp,
                    "output_tokens": out,
                    "total_tokens": inp + out,
                    "input_token_details": {"cache_read": cached, "audio": 0},
                    "output_token_details": {"reasoning": reasoning, "audio": 0},
                },
                streamed=streamed,
                started_at=began,
                ended_at=began + timedelta(milliseconds=latency),
                latency_ms=latency,
                ttft_ms=rng.uniform(80, 600) if streamed else None,
                user_id=user,
                session_id=session,
                tags=["prod", "team-search"],
                metadata={"user_id": user, "session_id": session, "feature": "answer"},
                notes=["http_status:429"] if error else [],
                ancestry=root,
            )
        )
    return records


def priced_copy(record: UsageRecord) -> UsageRecord:
    """``record`` with a cost filled in (for measuring serialization alone).

    Example:
        >>> priced_copy(UsageRecord(run_id="r")).cost_usd
        Decimal('0.000123456789')
    """
    return record.replace(cost_usd=Decimal("0.000123456789"), price_source="genai-prices 0.2.3")
