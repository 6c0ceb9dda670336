"""Offline demo workloads: what ``tokenledger demo`` records, and a synthetic week of traffic.

Both run the *real* ``ChatOpenAI`` against the package's local OpenAI-compatible server
(:class:`~langchain_tokenledger.testing.FakeOpenAIServer`), so they need no network and no API
key, only the ``openai`` extra (``langchain-openai``).

* :func:`run_demo` / :func:`record_workload`: a small, realistic workload (a prompt | model |
  parser chain, a stream, a batch, an ``n=2`` call, an LLM-cache hit, a reasoning model, a
  429 error, a ``track_usage`` block and a ``@tracked`` function).
* :func:`simulate_week`: a week of traffic from a handful of users, for the notebooks' charts.

Example:
    >>> from langchain_tokenledger.demo import run_demo
    >>> result = run_demo("sqlite:///demo.db")  # doctest: +SKIP
    >>> result.calls  # doctest: +SKIP
    13
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import uuid4

from .context import track_usage
from .decorators import tracked
from .handler import TokenLedgerHandler
from .records import UsageRecord
from .store import Ledger
from .testing import FakeOpenAIServer

if TYPE_CHECKING:
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_openai import ChatOpenAI

__all__ = ["DEMO_URL", "DemoResult", "record_workload", "run_demo", "simulate_week"]

DEMO_URL = "sqlite:///tokenledger-demo.db"
"""Where ``tokenledger demo`` writes unless ``--db`` is given (recreated on every run)."""

DEMO_TAG = "tokenledger-demo"
WORKLOAD_CALLS = 13
"""LLM calls :func:`record_workload` makes (one of them fails with a 429)."""

_UTC = timezone.utc


def _require_openai() -> None:
    try:
        import langchain_openai  # noqa: F401
    except ImportError:
        raise ImportError(
            "the demo needs langchain-openai: pip install 'langchain-tokenledger[openai]'"
        ) from None


def _chain(model: ChatOpenAI, name: str) -> Runnable[dict[str, Any], str]:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant. Answer briefly."), ("human", "{question}")]
    )
    return (prompt | model | StrOutputParser()).with_config(run_name=name)


def record_workload(
    server: FakeOpenAIServer,
    ledger: Ledger,
    *,
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Run the demo workload through ``server`` and record it in ``ledger``; returns the calls.

    Every way of capturing is shown: a :class:`~langchain_tokenledger.TokenLedgerHandler` passed
    in ``config``, a :func:`~langchain_tokenledger.track_usage` block and a
    :func:`~langchain_tokenledger.tracked` function. ``tags``/``metadata`` go on every row.

    Example:
        >>> with FakeOpenAIServer() as server, Ledger("sqlite://") as ledger:  # doctest: +SKIP
        ...     record_workload(server, ledger)
        13
    """
    import openai
    from langchain_core.caches import InMemoryCache
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    base = dict(metadata or {})
    handler = TokenLedgerHandler(ledger, tags=tags, metadata=base)

    def config(user: str, feature: str) -> RunnableConfig:
        return {"callbacks": [handler], "metadata": {"user_id": user, "feature": feature}}

    qa = _chain(server.chat_model("gpt-4o-mini"), "qa")
    # 1. a prompt | model | parser chain
    qa.invoke({"question": "What is a token ledger?"}, config("alice", "qa"))
    # 2. a stream that carries usage (custom base_url: ChatOpenAI needs stream_usage=True)
    chat = _chain(server.chat_model("gpt-4o-mini", stream_usage=True), "chat")
    "".join(chat.stream({"question": "Tell me about streaming tokens"}, config("bob", "chat")))
    # 3. a batch of three
    translate = _chain(server.chat_model("gpt-4o-mini"), "translate")
    words = ["hello world", "good morning", "thank you"]
    translate.batch(
        [{"question": f"Translate to French: {w}"} for w in words], config("carol", "translate")
    )
    # 4. two choices in one call (billed once)
    names = server.chat_model("gpt-4o", n=2).with_config(run_name="name-ideas")
    names.invoke("Suggest a name for a cat", config("alice", "naming"))
    # 5. an LLM cache: the second identical call is answered from it and bills nothing
    faq = _chain(server.chat_model("gpt-4o-mini", cache=InMemoryCache()), "faq")
    for _ in range(2):
        faq.invoke({"question": "What are your opening hours?"}, config("dave", "faq"))
    # 6. a reasoning model
    server.reasoning_tokens = 48
    try:
        _chain(server.chat_model("o4-mini"), "plan").invoke(
            {"question": "Plan a three-step rollout"}, config("erin", "plan")
        )
    finally:
        server.reasoning_tokens = 0
    # 7. a rate-limited call: recorded with status "error"
    server.fail_next(429)
    with contextlib.suppress(openai.RateLimitError):
        qa.invoke({"question": "Are you there?"}, config("bob", "qa"))
    # 8. a track_usage block: no callbacks to pass, every call inside is recorded; here a
    #    two-step chain, so `tokenledger show` has a tree to draw
    summarize = _chain(server.chat_model("gpt-4o-mini"), "summarize")
    title = _chain(server.chat_model("gpt-4o"), "title")
    research = (
        RunnablePassthrough.assign(summary=summarize)
        | RunnableLambda(lambda x: {"question": f"Write a title for: {x['summary']}"})
        | title
    ).with_config(run_name="research")
    block_meta = {**base, "user_id": "frank", "feature": "research"}
    with track_usage(ledger, tags=tags, metadata=block_meta):
        research.invoke({"question": "Summarize: the ledger keeps one row per LLM call"})

    # 9. a tracked function (tenacity-style helpers and methods work the same way)
    @tracked(ledger=ledger, tags=tags, metadata={**base, "user_id": "grace", "feature": "triage"})
    def triage(ticket: str) -> str:
        return qa.invoke({"question": f"Which team owns: {ticket}"})

    triage("the login page is slow")
    return WORKLOAD_CALLS


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` recorded, and where.

    Example:
        >>> DemoResult("sqlite:///d.db", "abc", 13, datetime(2026, 11, 1, tzinfo=_UTC)).calls
        13
    """

    url: str
    demo_id: str
    """The ``metadata.demo_id`` of every row of this run of the demo."""
    calls: int
    started_at: datetime


def _fresh_sqlite(url: str) -> None:
    """Delete a demo SQLite file (and its WAL files) so each demo starts empty."""
    database = url.removeprefix("sqlite:///")
    for suffix in ("", "-wal", "-shm"):
        Path(database + suffix).unlink(missing_ok=True)


def run_demo(url: str | None = None) -> DemoResult:
    """Record the demo workload in ``url`` (default :data:`DEMO_URL`, recreated) and flush.

    Starts a local OpenAI-compatible server for the duration; runs offline in a few seconds.
    Rows carry the tag ``tokenledger-demo`` and a fresh ``metadata.demo_id``.

    Example:
        >>> run_demo().url  # doctest: +SKIP
        'sqlite:///tokenledger-demo.db'
    """
    _require_openai()
    if url is None:
        url = DEMO_URL
        _fresh_sqlite(url)
    demo_id = uuid4().hex[:12]
    started = datetime.now(_UTC)
    with FakeOpenAIServer() as server, Ledger(url) as ledger:
        shown = ledger.url.render_as_string(hide_password=False)
        calls = record_workload(server, ledger, tags=[DEMO_TAG], metadata={"demo_id": demo_id})
        ledger.flush()
    return DemoResult(url=shown, demo_id=demo_id, calls=calls, started_at=started)


# -- a synthetic week ---------------------------------------------------------------------------


class _Clock:
    """Forwards records to a ledger, moved to a simulated time (the handler stamps real time)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.shift = timedelta(0)

    def set(self, simulated: datetime) -> None:
        self.shift = simulated - datetime.now(_UTC)

    def record(self, record: UsageRecord) -> None:
        started, ended = record.started_at, record.ended_at
        self.ledger.record(
            record.replace(
                started_at=None if started is None else started + self.shift,
                ended_at=None if ended is None else ended + self.shift,
            )
        )

    def flush(self, timeout: float | None = None) -> None:
        self.ledger.flush(timeout)


_USERS = {  # user: (requests per weekday, features they use)
    "alice": (9, ("qa", "summarize")),
    "bob": (6, ("chat", "qa", "faq")),
    "carol": (4, ("translate", "faq")),
    "dave": (4, ("faq",)),
    "erin": (2, ("plan",)),
}
_MODELS = {
    "qa": "gpt-4o-mini",
    "summarize": "gpt-4o",
    "chat": "gpt-4o-mini",
    "translate": "gpt-4o-mini",
    "faq": "gpt-4o-mini",
    "plan": "o4-mini",
}
# feature: (words of retrieved context sent along, words of the answer); FAQ prompts carry no
# context so that they repeat exactly and the LLM cache can answer them.
_SIZES = {
    "qa": ((300, 900), (30, 120)),
    "summarize": ((800, 2500), (60, 200)),
    "chat": ((20, 200), (20, 150)),
    "translate": ((10, 40), (5, 20)),
    "faq": ((0, 1), (25, 26)),
    "plan": ((100, 300), (100, 400)),
}
_VOCABULARY = ("the", "ledger", "keeps", "one", "row", "per", "call", "with", "tokens", "cost",
               "latency", "status", "and", "run")  # fmt: skip
_QUESTIONS = {
    "qa": ["How do I reset my password?", "Where is my invoice?", "Can I change my plan?"],
    "summarize": [
        "Summarize this week's support tickets about billing and refunds in three bullets",
        "Summarize the meeting notes on the quarterly roadmap and the hiring plan",
    ],
    "chat": ["Hi there", "Tell me a fun fact about tokens", "What can you do?"],
    "translate": ["Translate to German: good morning", "Translate to Spanish: thank you"],
    "faq": ["What are your opening hours?", "Do you ship abroad?"],
    "plan": ["Plan a migration from MySQL to PostgreSQL in five steps"],
}


@dataclass(frozen=True)
class _Request:
    """One simulated request: who asks what, when, and how the server will answer."""

    at: datetime
    user: str
    feature: str
    question: str
    reply: str
    delay: float
    reasoning: int
    fails: bool

    @classmethod
    def draw(cls, rng: random.Random, at: datetime, user: str, feature: str) -> _Request:
        (low, high), (a_low, a_high) = _SIZES[feature]
        context = " ".join(rng.choices(_VOCABULARY, k=rng.randrange(low, high)))
        return cls(
            at=at,
            user=user,
            feature=feature,
            question=f"{rng.choice(_QUESTIONS[feature])}\n\n{context}".strip(),
            reply=" ".join(["answer"] * rng.randrange(a_low, a_high)),
            delay=rng.uniform(0.0, 0.02),
            reasoning=rng.randrange(32, 256) if feature == "plan" else 0,
            fails=feature != "faq" and rng.random() < 0.04,  # a cache hit never reaches the API
        )


def simulate_week(
    server: FakeOpenAIServer,
    ledger: Ledger,
    *,
    days: int = 7,
    seed: int = 7,
    end: datetime | None = None,
) -> int:
    """Record ``days`` days of synthetic traffic ending at ``end`` (default: now); returns calls.

    Five users with their own habits call six features (``metadata.feature``) on three models;
    more traffic on weekdays and in working hours, streamed chats, repeated FAQ questions
    answered from an LLM cache, a few rate-limited calls and a little server latency. Every
    call goes through the real ``ChatOpenAI`` and
    :class:`~langchain_tokenledger.TokenLedgerHandler`; only the timestamps are moved to the
    simulated day and hour. Deterministic for a ``seed``.

    Example:
        >>> with FakeOpenAIServer() as server, Ledger("sqlite://") as ledger:  # doctest: +SKIP
        ...     simulate_week(server, ledger)
        236
    """
    import openai
    from langchain_core.caches import InMemoryCache

    rng = random.Random(seed)
    end = (end or datetime.now(_UTC)).astimezone(_UTC)
    clock = _Clock(ledger)
    handler = TokenLedgerHandler(cast(Ledger, clock), tags=["simulated"])
    cache = InMemoryCache()
    chains = {
        feature: _chain(
            server.chat_model(
                model, stream_usage=feature == "chat", cache=cache if feature == "faq" else None
            ),
            feature,
        )
        for feature, model in _MODELS.items()
    }
    first_day = (end - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    requests: list[_Request] = []
    for d in range(days):
        day = first_day + timedelta(days=d)
        weekend = day.weekday() >= 5
        for user, (per_day, features) in _USERS.items():
            n = max(0, round(per_day * (0.4 if weekend else 1.0) * rng.uniform(0.7, 1.3)))
            for _ in range(n):
                at = day + timedelta(hours=rng.choice(range(8, 19)), minutes=rng.randrange(60))
                if at <= end:
                    requests.append(_Request.draw(rng, at, user, rng.choice(features)))
    requests.sort(key=lambda r: r.at)  # in time order, so a cache hit follows its miss
    try:
        for r in requests:
            server.reply, server.delay, server.reasoning_tokens = r.reply, r.delay, r.reasoning
            if r.fails:
                server.fail_next(429)
            clock.set(r.at)
            config: RunnableConfig = {
                "callbacks": [handler],
                "metadata": {"user_id": r.user, "feature": r.feature},
            }
            try:
                if r.feature == "chat":
                    "".join(chains[r.feature].stream({"question": r.question}, config))
                else:
                    chains[r.feature].invoke({"question": r.question}, config)
            except openai.RateLimitError:
                pass
    finally:
        server.reply, server.delay, server.reasoning_tokens = None, 0.0, 0
    ledger.flush()
    return len(requests)
