"""``tracked``: Runnables, functions, methods and classes whose every LLM call is recorded.

All calls use the real ``ChatOpenAI`` against the local server: a single user message of ``w``
words is billed ``w + 7`` prompt and ``w + 1`` completion tokens ("hello there": 9 + 3 = 12,
"how many tokens is this": 12 + 6 = 18). Models stream with ``stream_usage=True`` so streamed
calls carry their usage too.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import pickle
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest
import wrapt
from helpers import lock_is_free_in_forked_child, rows
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import BaseModel, ConfigDict
from tenacity import retry, stop_after_attempt, wait_none

from langchain_tokenledger import Ledger, TrackedRunnable, track_usage, tracked
from langchain_tokenledger.decorators import _instance_usages
from langchain_tokenledger.testing import FakeOpenAIServer

MODEL = "gpt-4o-mini"
PROMPT = ChatPromptTemplate.from_messages([("user", "{q}")])


@pytest.fixture
def model(openai_server: FakeOpenAIServer) -> Runnable[Any, Any]:
    return openai_server.chat_model(MODEL, stream_usage=True)


# -- module-level functions: introspection and pickling --------------------------------------


@tracked
def summarize(text: str, *, words: int = 10) -> str:
    """Summarize ``text`` in at most ``words`` words."""
    return text


@tracked(tags=["async"])
async def asummarize(text: str) -> str:
    """Summarize ``text`` (async)."""
    return text


@tracked
def summary_stream(text: str) -> Iterator[str]:
    """Stream a summary of ``text``."""
    yield text


@tracked
async def asummary_stream(text: str) -> AsyncIterator[str]:
    """Stream a summary of ``text`` (async)."""
    yield text


INTROSPECTION = [
    (summarize, "summarize", ["text", "words"], "function"),
    (asummarize, "asummarize", ["text"], "coroutine"),
    (summary_stream, "summary_stream", ["text"], "generator"),
    (asummary_stream, "asummary_stream", ["text"], "asyncgen"),
]


@pytest.mark.parametrize(("func", "name", "params", "kind"), INTROSPECTION)
def test_a_tracked_function_keeps_its_introspection(
    func: Any, name: str, params: list[str], kind: str
) -> None:
    original = func.__wrapped__
    assert isinstance(func, wrapt.FunctionWrapper)
    assert not isinstance(original, wrapt.FunctionWrapper)
    assert (func.__name__, func.__qualname__, func.__module__) == (name, name, __name__)
    assert func.__doc__ == original.__doc__
    assert func.__doc__.startswith(("Summarize", "Stream a summary"))
    assert inspect.signature(func) == inspect.signature(original)
    assert list(inspect.signature(func).parameters) == params
    assert inspect.getsource(func) == inspect.getsource(original)
    assert f"def {name}(text: str" in inspect.getsource(func)
    assert inspect.iscoroutinefunction(func) is (kind == "coroutine")
    assert inspect.isasyncgenfunction(func) is (kind == "asyncgen")
    assert inspect.isgeneratorfunction(func) is (kind == "generator")
    assert pickle.loads(pickle.dumps(func)) is func


# -- Runnables -------------------------------------------------------------------------------


async def run_each_way(way: str, chain: Runnable[Any, Any]) -> int:
    """Run ``chain`` the way named; returns how many inputs it ran."""
    one, two = {"q": "hello there"}, {"q": "how many tokens is this"}
    if way == "invoke":
        chain.invoke(one)
    elif way == "ainvoke":
        await chain.ainvoke(one)
    elif way == "stream":
        assert "".join(chain.stream(one)) == "echo: hello there"
    elif way == "astream":
        assert "".join([c async for c in chain.astream(one)]) == "echo: hello there"
    elif way == "astream_events":
        events = [e["event"] async for e in chain.astream_events(one, version="v2")]
        assert events.count("on_chat_model_end") == 1
    elif way == "with_config":
        chain.with_config(run_name="summarize").invoke(one)
    elif way == "composed":
        assert (chain | RunnableLambda(str.upper)).invoke(one) == "ECHO: HELLO THERE"
    elif way == "batch":
        chain.batch([one, two])
        return 2
    elif way == "abatch":
        await chain.abatch([one, two])
        return 2
    elif way == "batch_as_completed":
        assert sorted(i for i, _ in chain.batch_as_completed([one, two])) == [0, 1]
        return 2
    elif way == "abatch_as_completed":
        assert sorted([i async for i, _ in chain.abatch_as_completed([one, two])]) == [0, 1]
        return 2
    return 1


WAYS = [
    "invoke",
    "ainvoke",
    "stream",
    "astream",
    "astream_events",
    "with_config",
    "composed",
    "batch",
    "abatch",
    "batch_as_completed",
    "abatch_as_completed",
]


@pytest.mark.parametrize("way", WAYS)
async def test_every_run_of_a_tracked_runnable_is_recorded(
    way: str, sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    chain = tracked(PROMPT | model | StrOutputParser(), ledger=sqlite_ledger, metadata={"f": "s"})

    inputs = await run_each_way(way, chain)

    got = rows(sqlite_ledger)
    assert sorted(r["total_tokens"] for r in got) == [12, 18][:inputs]
    assert [r["metadata"] for r in got] == [{"f": "s"}] * inputs
    assert [r["status"] for r in got] == ["ok"] * inputs
    assert all(r["root_run_id"] != r["run_id"] for r in got)  # the chain is the root


async def test_the_issue_example_as_a_step_of_a_streamed_chain(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    summarize_chain = tracked(model, ledger=sqlite_ledger, metadata={"feature": "summarize"})
    chain = PROMPT | summarize_chain | StrOutputParser()
    first, second = uuid4(), uuid4()

    assert "".join(chain.stream({"q": "hello there"}, {"run_id": first})) == "echo: hello there"
    chunks = chain.astream({"q": "one two"}, {"run_id": second})
    assert "".join([c async for c in chunks]) == "echo: one two"

    got = rows(sqlite_ledger)
    assert [r["total_tokens"] for r in got] == [12, 12]
    assert [r["metadata"] for r in got] == [{"feature": "summarize"}] * 2
    # Only the step is tracked: its rows know their parent (the chain), not the chain's start.
    # Track the whole chain, or run it in a track_usage block, to have the chain as the root.
    assert [r["parent_run_id"] for r in got] == [str(first), str(second)]
    assert [r["root_run_id"] for r in got] == [r["run_id"] for r in got]


def test_only_the_tracked_runnable_is_recorded(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    tracked_model = tracked(model, ledger=sqlite_ledger)

    model.invoke("not tracked")
    tracked_model.invoke("hello there")

    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12]


def test_derived_runnables_keep_the_tracking(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    chain = tracked(model, ledger=sqlite_ledger, tags=["t"])

    derived = [
        chain.with_config(run_name="x"),
        chain.bind(stop=["never"]),
        chain.with_retry(stop_after_attempt=2),
        chain.with_listeners(on_end=lambda run: None),
        chain.with_types(input_type=str),
    ]

    assert all(isinstance(d, TrackedRunnable) for d in derived)
    assert [d.tracking for d in derived] == [chain.tracking] * 5  # type: ignore[attr-defined]
    for d in derived:
        d.invoke("hello there")
    assert [r["tags"] for r in rows(sqlite_ledger)] == [["t"]] * 5


def test_a_tracked_runnable_inside_a_block_counts_there_and_is_written_once(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    chain = PROMPT | tracked(model, ledger=sqlite_ledger, tags=["model"]) | StrOutputParser()
    root_run_id = uuid4()

    with track_usage(sqlite_ledger, tags=["block"]) as usage:
        chain.invoke({"q": "hello there"}, {"run_id": root_run_id})

    [row] = rows(sqlite_ledger)
    assert row["tags"] == ["block", "model"]
    assert (row["root_run_id"], row["root_name"]) == (str(root_run_id), "RunnableSequence")
    assert usage.by_run[root_run_id][MODEL].total_tokens == 12


# -- functions -------------------------------------------------------------------------------

KINDS = ["sync", "async", "generator", "async generator"]


def tracked_answer(kind: str, ledger: Ledger) -> Callable[..., Any]:
    """A tracked function of the given kind that asks ``model`` two questions."""
    track = tracked(ledger=ledger, tags=[kind])
    if kind == "sync":

        @track
        def answer(model: Runnable[Any, Any], q: str) -> str:
            return str(model.invoke(q).content) + str(model.invoke(q + " again").content)

        return answer
    if kind == "async":

        @track
        async def aanswer(model: Runnable[Any, Any], q: str) -> str:
            first = await model.ainvoke(q)
            return str(first.content) + str((await model.ainvoke(q + " again")).content)

        return aanswer
    if kind == "generator":

        @track
        def answer_stream(model: Runnable[Any, Any], q: str) -> Iterator[str]:
            for question in (q, q + " again"):
                for chunk in model.stream(question):
                    yield str(chunk.content)

        return answer_stream

    @track
    async def aanswer_stream(model: Runnable[Any, Any], q: str) -> AsyncIterator[str]:
        for question in (q, q + " again"):
            # An abandoned ``async for`` does not close its iterator (the event loop does, later):
            # aclosing() ends the model's stream, and records it, as soon as this one is closed.
            async with contextlib.aclosing(model.astream(question)) as chunks:
                async for chunk in chunks:
                    yield str(chunk.content)

    return aanswer_stream


async def call(kind: str, func: Callable[..., Any], *args: Any) -> str:
    """Call ``func`` and consume its whole result, whatever its kind."""
    if kind == "sync":
        return str(func(*args))
    if kind == "async":
        return str(await func(*args))
    if kind == "generator":
        return "".join(func(*args))
    return "".join([chunk async for chunk in func(*args)])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_tracked_function_records_all_its_calls(
    kind: str, sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    answer = tracked_answer(kind, sqlite_ledger)

    reply = await call(kind, answer, model, "hello there")

    assert reply == "echo: hello thereecho: hello there again"
    got = rows(sqlite_ledger)
    assert [r["total_tokens"] for r in got] == [12, 14]
    assert [r["tags"] for r in got] == [[kind], [kind]]
    assert [r["streamed"] for r in got] == [kind.endswith("generator")] * 2


async def test_a_tracked_generator_stopped_early_records_the_cancelled_call(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    gen = tracked_answer("generator", sqlite_ledger)(model, "hello there")
    assert [next(gen), next(gen)] == ["", "echo:"]
    gen.close()
    agen = tracked_answer("async generator", sqlite_ledger)(model, "one two")
    async with contextlib.aclosing(agen):
        assert [await anext(agen), await anext(agen)] == ["", "echo:"]

    got = rows(sqlite_ledger)
    assert [r["status"] for r in got] == ["cancelled", "cancelled"]
    assert [r["total_tokens"] for r in got] == [None, None]  # the usage comes in the last chunk
    assert [r["notes"] for r in got] == [["usage_unknown"], ["usage_unknown"]]
    assert [r["tags"] for r in got] == [["generator"], ["async generator"]]


def test_a_plain_function_returning_a_stream_is_tracked_while_it_is_consumed(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    @tracked(ledger=sqlite_ledger, tags=["returned"])
    def stream_answer(q: str) -> Iterator[Any]:
        return model.stream(q)  # the call happens later, while the caller iterates

    chunks = stream_answer("hello there")
    assert "".join(str(c.content) for c in chunks) == "echo: hello there"

    [row] = rows(sqlite_ledger)
    assert (row["total_tokens"], row["tags"], row["streamed"]) == (12, ["returned"], True)


def test_nested_tracked_functions_write_each_call_once(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    @tracked(ledger=sqlite_ledger, tags=["inner"])
    def inner(q: str) -> str:
        return str(model.invoke(q).content)

    @tracked(ledger=sqlite_ledger, tags=["outer"])
    def outer(q: str) -> str:
        return inner(q) + str(model.invoke(q).content)

    with track_usage(sqlite_ledger) as usage:
        outer("hello there")

    assert [r["tags"] for r in rows(sqlite_ledger)] == [["outer", "inner"], ["outer"]]
    assert usage.total_tokens == 24


# -- methods ---------------------------------------------------------------------------------


def make_bot_class(ledger: Ledger) -> type:
    """A class whose methods are tracked in every binding form and decorator order."""
    track = tracked(ledger=ledger)

    class Bot:
        def __init__(self, model: Runnable[Any, Any]) -> None:
            self.model = model

        @track
        def method(self, q: str) -> tuple[Any, str]:
            return self, str(self.model.invoke(q).content)

        @track
        async def amethod(self, q: str) -> tuple[Any, str]:
            return self, str((await self.model.ainvoke(q)).content)

        @track
        @classmethod
        def class_first(cls, model: Runnable[Any, Any], q: str) -> tuple[Any, str]:
            return cls, str(model.invoke(q).content)

        @classmethod
        @track
        def class_second(cls, model: Runnable[Any, Any], q: str) -> tuple[Any, str]:
            return cls, str(model.invoke(q).content)

        @track
        @staticmethod
        def static_first(model: Runnable[Any, Any], q: str) -> tuple[Any, str]:
            return None, str(model.invoke(q).content)

        @staticmethod
        @track
        def static_second(model: Runnable[Any, Any], q: str) -> tuple[Any, str]:
            return None, str(model.invoke(q).content)

        def ask(self, q: str, suffix: str) -> tuple[Any, str]:
            return self, str(self.model.invoke(q + suffix).content)

        ask_again = track(functools.partialmethod(ask, suffix=" again"))

    return Bot


async def test_tracked_methods_bind_like_the_originals(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    Bot = make_bot_class(sqlite_ledger)
    bot = Bot(model)
    q = "hello there"

    results = [
        bot.method(q),
        Bot.method(bot, q),
        await bot.amethod(q),
        bot.class_first(model, q),
        Bot.class_first(model, q),
        Bot.class_second(model, q),
        bot.static_first(model, q),
        Bot.static_second(model, q),
        bot.ask_again(q),
    ]

    assert [owner for owner, _ in results] == [bot, bot, bot, Bot, Bot, Bot, None, None, bot]
    assert {reply for _, reply in results[:-1]} == {"echo: hello there"}
    assert results[-1][1] == "echo: hello there again"
    assert [r["total_tokens"] for r in rows(sqlite_ledger)] == [12] * 8 + [14]
    assert inspect.iscoroutinefunction(Bot.amethod)
    assert inspect.iscoroutinefunction(bot.amethod)
    assert list(inspect.signature(bot.method).parameters) == ["q"]
    assert list(inspect.signature(Bot.method).parameters) == ["self", "q"]
    assert list(inspect.signature(Bot.class_first).parameters) == ["model", "q"]
    assert list(inspect.signature(Bot.static_second).parameters) == ["model", "q"]


# -- tenacity --------------------------------------------------------------------------------

ORDERS = ["retry above tracked", "retry below tracked"]


def retried(order: str, ledger: Ledger, func: Callable[..., Any]) -> Callable[..., Any]:
    again = retry(stop=stop_after_attempt(3), wait=wait_none(), reraise=True)
    track = tracked(ledger=ledger)
    return again(track(func)) if order == "retry above tracked" else track(again(func))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_each_retry_attempt_is_a_row(
    order: str,
    mode: str,
    sqlite_ledger: Ledger,
    openai_server: FakeOpenAIServer,
    model: Runnable[Any, Any],
) -> None:
    def answer(q: str) -> str:
        return str(model.invoke(q).content)

    async def aanswer(q: str) -> str:
        return str((await model.ainvoke(q)).content)

    func = retried(order, sqlite_ledger, answer if mode == "sync" else aanswer)
    openai_server.fail_next(500, times=2)

    reply = func("hello there") if mode == "sync" else await func("hello there")

    assert reply == "echo: hello there"
    got = rows(sqlite_ledger)
    assert [r["status"] for r in got] == ["error", "error", "ok"]
    assert [r["total_tokens"] for r in got] == [None, None, 12]


# -- classes ---------------------------------------------------------------------------------


def make_assistant_class(ledger: Ledger) -> type[BaseModel]:
    """The seed's assistant: tenacity on every entry point, each returning (result, run_id)."""
    again = retry(stop=stop_after_attempt(3), wait=wait_none(), reraise=True)

    @tracked(ledger=ledger, methods=["run", "arun", "stream", "astream"])
    class Assistant(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        llm: Any

        @again
        def run(self, q: str) -> tuple[str, UUID]:
            run_id = uuid4()
            return str(self.llm.invoke(q, {"run_id": run_id}).content), run_id

        @again
        async def arun(self, q: str) -> tuple[str, UUID]:
            run_id = uuid4()
            return str((await self.llm.ainvoke(q, {"run_id": run_id})).content), run_id

        @again
        def stream(self, q: str) -> tuple[str, UUID]:
            run_id = uuid4()
            chunks = self.llm.stream(q, {"run_id": run_id})
            return "".join(str(c.content) for c in chunks), run_id

        @again
        async def astream(self, q: str) -> tuple[str, UUID]:
            run_id = uuid4()
            chunks = self.llm.astream(q, {"run_id": run_id})
            return "".join([str(c.content) async for c in chunks]), run_id

    return Assistant


async def test_a_tracked_class_gives_each_instance_its_own_token_usages(
    sqlite_ledger: Ledger, openai_server: FakeOpenAIServer, model: Runnable[Any, Any]
) -> None:
    Assistant = make_assistant_class(sqlite_ledger)
    alice, bob = Assistant(llm=model), Assistant(llm=model)

    openai_server.fail_next(500)  # alice.run's first attempt fails, the second succeeds
    _, run1 = alice.run("hello there")
    _, run2 = await alice.arun("one two three")
    _, run3 = alice.stream("x")
    reply, run4 = await bob.astream("how many tokens is this")

    assert reply == "echo: how many tokens is this"
    assert set(bob.token_usages) == {str(run4)}
    assert bob.token_usages[run4][MODEL]["total_tokens"] == 18
    usages = alice.token_usages
    assert len(usages) == 4  # the failed attempt has its own run id
    assert [usages[r][MODEL].total_tokens for r in (run1, run2, run3)] == [12, 14, 10]
    assert usages[run1][MODEL].as_dict() == {
        "model_name": MODEL,
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "successful_requests": 1,
        "failed_requests": 0,
        "total_cost": usages[run1][MODEL].total_cost,
    }
    assert usages[run1][MODEL].total_cost == sum(
        r["cost_usd"] for r in rows(sqlite_ledger) if r["root_run_id"] == str(run1)
    )
    [failed] = [u for r, u in usages.items() if r not in {str(run1), str(run2), str(run3)}]
    assert (failed[MODEL].failed_requests, failed[MODEL].total_tokens) == (1, 0)
    assert [r["status"] for r in rows(sqlite_ledger)] == ["error", "ok", "ok", "ok", "ok"]
    assert set(alice.model_dump()) == {"llm"}  # pydantic sees no new field
    assert Assistant(llm=model).token_usages == {}


def test_an_instances_token_usages_go_away_with_it(
    sqlite_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    @tracked(ledger=sqlite_ledger, methods=["run"])
    class Service:
        def run(self, q: str) -> str:
            return str(model.invoke(q).content)

    service = Service()
    service.run("hello there")
    held = len(_instance_usages)

    del service
    gc.collect()

    assert len(_instance_usages) == held - 1


def test_a_bare_tracked_class_wraps_its_public_methods(
    default_ledger: Ledger, model: Runnable[Any, Any]
) -> None:
    @tracked
    class Service:
        def answer(self) -> str:
            return str(model.invoke("hello there").content)

        @staticmethod
        def helper() -> str:
            return "h"

        def _private(self) -> str:
            return "p"

        @property
        def name(self) -> str:
            return "n"

    wrapped = {n for n, v in vars(Service).items() if isinstance(v, wrapt.FunctionWrapper)}
    assert wrapped == {"answer", "helper"}
    assert (Service().answer(), Service.helper(), Service().name) == ("echo: hello there", "h", "n")
    assert [r["total_tokens"] for r in rows(default_ledger)] == [12]


def test_token_usages_is_read_only(sqlite_ledger: Ledger) -> None:
    @tracked(ledger=sqlite_ledger, methods=["run"])
    class Service:
        def run(self) -> None:
            return None

    with pytest.raises(AttributeError, match="filled by tracked methods"):
        Service().token_usages = {}  # type: ignore[attr-defined]


# -- bad input -------------------------------------------------------------------------------


def test_bad_targets_and_options_fail_at_decoration_time(sqlite_ledger: Ledger) -> None:
    class Plain:
        def run(self) -> None:
            return None

        @property
        def size(self) -> int:
            return 1

    class HasUsages:
        token_usages: ClassVar[dict[str, Any]] = {}

        def run(self) -> None:
            return None

    class Slotted:
        __slots__ = ()

        def run(self) -> None:
            return None

    with pytest.raises(TypeError, match=r"methods must be a list of names.*methods=\['run'\]"):
        tracked(methods="run")
    with pytest.raises(TypeError, match=r"methods=\[\.\.\.\] applies to a class only"):
        tracked(methods=["run"])(lambda: None)
    with pytest.raises(AttributeError, match="Plain has no method 'walk' to track"):
        tracked(methods=["walk"])(Plain)
    with pytest.raises(TypeError, match="already defines token_usages"):
        tracked(HasUsages)
    with pytest.raises(TypeError, match="needs weak references"):
        tracked(Slotted)
    with pytest.raises(TypeError, match=r"not Ledger \(did you mean tracked\(ledger=...\)\?\)"):
        tracked(sqlite_ledger)
    with pytest.raises(TypeError, match="tags must be a list of strings"):
        tracked(tags="nightly")
    with pytest.raises(TypeError, match=r"Plain.size is not a method \(property\)"):
        tracked(methods=["size"])(Plain)


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # a multi-threaded process
def test_a_forked_child_gets_a_free_instance_registry_even_if_a_parent_thread_held_it() -> None:
    """The thread holding the registry's lock at the fork does not exist in the child."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with _instance_usages._lock:
            held.set()
            done.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        assert lock_is_free_in_forked_child(lambda: _instance_usages._lock)
    finally:
        done.set()
        holder.join()
