"""``tracked``: record every LLM call of a Runnable, a function, or a class's methods.

Each call of a tracked object runs inside its own :func:`~langchain_tokenledger.track_usage`
scope (nested in whatever block is active), so its calls are recorded however deep they are
made. Functions are wrapped with ``wrapt``: the wrapper keeps the original's name, docstring,
signature, source, sync/async nature and binding (methods, ``classmethod``, ``staticmethod``,
either decorator order), pickles by reference, and stacks with other decorators (tenacity's
``@retry``: every attempt is its own row). Unlike a ``track_usage`` block, a tracked call does
not wait for its rows to be committed: the ledger's writer does that in the background (call
``ledger.flush()`` before reading them with SQL).

Example:
    >>> from langchain_tokenledger import Ledger, tracked
    >>> from langchain_tokenledger.testing import FakeUsageChatModel
    >>> ledger = Ledger("sqlite://")
    >>> model = tracked(FakeUsageChatModel(), ledger=ledger, metadata={"feature": "qa"})
    >>> _ = model.invoke("hi")
    >>> @tracked(ledger=ledger)
    ... def answer(question: str) -> str:
    ...     return str(FakeUsageChatModel().invoke(question).content)
    >>> _ = answer("why?")
    >>> ledger.flush()
    >>> ledger.query("SELECT COUNT(*) AS n FROM llm_calls")
    [{'n': 2}]
"""

from __future__ import annotations

import inspect
import os
import threading
import types
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Literal, Protocol, TypeVar, cast, overload

import wrapt
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.runnables.schema import StreamEvent
from pydantic import BaseModel, Field

from .context import Scope, TrackingOptions, summary_for
from .records import RunUsages, UsageSummary
from .store import Ledger, default_ledger

__all__ = ["TrackedRunnable", "tracked"]

Input = TypeVar("Input")
Output = TypeVar("Output")
T = TypeVar("T")
Y = TypeVar("Y")
S = TypeVar("S")
R = TypeVar("R")

ScopeFactory = Callable[[], Scope]
Kind = Literal["sync", "coroutine", "generator", "asyncgen"]


# -- running code inside a scope ---------------------------------------------------------------


def scoped_generator(make_scope: ScopeFactory, gen: Generator[Y, S, R]) -> Generator[Y, S, R]:
    """Drive ``gen`` one step at a time, each step inside the scope (never across a ``yield``).

    The scope is created at the first step. Closing early (the consumer stops) closes ``gen``
    inside the scope too, so the calls it cancels are recorded in it.
    """
    scope: Scope | None = None
    to_send: Any = None
    to_throw: BaseException | None = None
    try:
        while True:
            if scope is None:
                scope = make_scope()
            with scope.active():
                try:
                    if to_throw is not None:
                        error, to_throw = to_throw, None
                        item = gen.throw(error)
                    else:
                        item = gen.send(to_send)
                except StopIteration as stop:
                    return cast(R, stop.value)
            try:
                to_send = yield item
            except GeneratorExit:
                raise
            except BaseException as exc:  # thrown in by the consumer: pass it on to ``gen``
                to_throw = exc
    finally:
        if scope is None:
            gen.close()
        else:
            with scope.active():
                gen.close()


async def scoped_async_generator(
    make_scope: ScopeFactory, agen: AsyncGenerator[Y, S]
) -> AsyncGenerator[Y, S]:
    """The async twin of :func:`scoped_generator`."""
    scope: Scope | None = None
    to_send: Any = None
    to_throw: BaseException | None = None
    try:
        while True:
            if scope is None:
                scope = make_scope()
            with scope.active():
                try:
                    if to_throw is not None:
                        error, to_throw = to_throw, None
                        item = await agen.athrow(error)
                    else:
                        item = await agen.asend(to_send)
                except StopAsyncIteration:
                    return
            try:
                to_send = yield item
            except GeneratorExit:
                raise
            except BaseException as exc:  # thrown in by the consumer: pass it on to ``agen``
                to_throw = exc
    finally:
        if scope is None:
            await agen.aclose()
        else:
            with scope.active():
                await agen.aclose()


async def scoped_await(make_scope: ScopeFactory, awaitable: Awaitable[R]) -> R:
    """Await ``awaitable`` inside the scope."""
    with make_scope().active():
        return await awaitable


def continue_in_scope(scope: Scope, result: Any) -> Any:
    """A coroutine, generator or async generator returned by a sync call, finished in ``scope``.

    A plain function that returns ``model.stream(...)`` or a coroutine makes its LLM calls after
    it has returned; they belong to the same tracked call.
    """
    if inspect.iscoroutine(result):
        return scoped_await(lambda: scope, result)
    if isinstance(result, types.GeneratorType):
        return scoped_generator(lambda: scope, result)
    if isinstance(result, types.AsyncGeneratorType):
        return scoped_async_generator(lambda: scope, result)
    return result


# -- functions and methods -------------------------------------------------------------------


class _TrackedFunction(wrapt.FunctionWrapper):  # type: ignore[type-arg]  # any signature
    """A ``wrapt`` function wrapper that pickles and copies like the function it wraps."""

    def __reduce_ex__(self, protocol: Any) -> str:
        # A module-level function pickles by reference: its qualified name in its module (which
        # now holds this wrapper, so unpickling gives the wrapper back).
        return self.__qualname__

    def __copy__(self) -> _TrackedFunction:
        return self

    def __deepcopy__(self, memo: Any) -> _TrackedFunction:
        return self


def _kind(target: Any) -> Kind:
    func = target.__func__ if isinstance(target, (classmethod, staticmethod)) else target
    if inspect.isasyncgenfunction(func):
        return "asyncgen"
    if inspect.iscoroutinefunction(func):
        return "coroutine"
    if inspect.isgeneratorfunction(func):
        return "generator"
    return "sync"


class _InstanceUsages:
    """Per-instance totals for tracked classes, keyed by identity (instances may be unhashable,
    or equal to each other) and dropped with the instance."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a weakref callback may run during a GC
        self._by_id: dict[int, tuple[weakref.ref[Any], UsageSummary]] = {}

    def get(self, instance: object) -> UsageSummary | None:
        with self._lock:
            entry = self._by_id.get(id(instance))
        if entry is not None and entry[0]() is instance:
            return entry[1]
        return None

    def get_or_create(self, instance: object, ledger: Ledger) -> UsageSummary:
        with self._lock:
            found = self.get(instance)
            if found is not None:
                return found
            key = id(instance)
            ref = weakref.ref(instance, lambda dead: self._forget(key, dead))
            summary = summary_for(ledger)
            self._by_id[key] = (ref, summary)
            return summary

    def _forget(self, key: int, ref: weakref.ref[Any]) -> None:
        with self._lock:
            entry = self._by_id.get(key)
            if entry is not None and entry[0] is ref:
                del self._by_id[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()  # a thread of the parent may have held it at the fork


_instance_usages = _InstanceUsages()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_instance_usages._after_fork)


class _TokenUsages:
    """The ``token_usages`` attribute of a tracked class's instances (read-only).

    ``{root_run_id: {model: ModelUsage}}`` for the calls made by this instance's tracked
    methods; a ``ModelUsage`` also reads like a dict (``usage["total_tokens"]``).
    """

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        summary = _instance_usages.get(instance)
        return summary.by_run if summary is not None else RunUsages()

    def __set__(self, instance: object, value: Any) -> None:
        raise AttributeError("token_usages is filled by tracked methods and cannot be set")


def _wrap_callable(target: Any, options: TrackingOptions, *, per_instance: bool) -> Any:
    kind = _kind(target)

    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ledger = options.ledger if options.ledger is not None else default_ledger()
        sink = None
        if per_instance and instance is not None and not isinstance(instance, type):
            sink = _instance_usages.get_or_create(instance, ledger)

        def make_scope() -> Scope:
            return Scope(options, ledger=ledger, sink=sink)

        if kind == "coroutine":
            return scoped_await(make_scope, wrapped(*args, **kwargs))
        if kind == "asyncgen":
            return scoped_async_generator(make_scope, wrapped(*args, **kwargs))
        if kind == "generator":
            return scoped_generator(make_scope, wrapped(*args, **kwargs))
        scope = make_scope()
        with scope.active():
            result = wrapped(*args, **kwargs)
        return continue_in_scope(scope, result)

    return _TrackedFunction(target, wrapper)


def _is_method_like(obj: Any) -> bool:
    """A callable, or a non-data descriptor such as ``classmethod`` or ``partialmethod``."""
    kind = type(obj)
    is_data_descriptor = hasattr(kind, "__set__") or hasattr(kind, "__delete__")
    return callable(obj) or (hasattr(kind, "__get__") and not is_data_descriptor)


def _public_methods(cls: type) -> list[str]:
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if isinstance(func, types.FunctionType):
            names.append(name)
    return names


def _track_class(cls: type[T], options: TrackingOptions, methods: Sequence[str] | None) -> type[T]:
    where = cls.__qualname__
    existing = inspect.getattr_static(cls, "token_usages", None)
    fields = getattr(cls, "model_fields", None) if issubclass(cls, BaseModel) else None
    if (existing is not None and not isinstance(existing, _TokenUsages)) or (
        fields and "token_usages" in fields
    ):
        raise TypeError(f"{where} already defines token_usages, which tracked(...) provides")
    if cls.__weakrefoffset__ == 0:
        raise TypeError(f"tracked({where}) needs weak references: add '__weakref__' to __slots__")
    names = list(methods) if methods is not None else _public_methods(cls)
    if not names:
        raise TypeError(f"{where} has no public methods to track; name them with methods=[...]")
    wrapped: dict[str, Any] = {}
    for name in names:
        try:
            raw = inspect.getattr_static(cls, name)
        except AttributeError:
            raise AttributeError(f"{where} has no method {name!r} to track") from None
        if isinstance(raw, type) or not _is_method_like(raw):
            raise TypeError(f"{where}.{name} is not a method ({type(raw).__name__})")
        wrapped[name] = _wrap_callable(raw, options, per_instance=True)
    for name, wrapper in wrapped.items():
        setattr(cls, name, wrapper)
    cls.token_usages = _TokenUsages()  # type: ignore[attr-defined]  # added by the decorator
    return cls


# -- runnables -------------------------------------------------------------------------------


class TrackedRunnable(RunnableBinding[Input, Output]):
    """A Runnable whose every run (invoke, stream, batch, events; sync and async) is recorded.

    Made by :func:`tracked`. It stays a real Runnable: ``|`` composition, ``with_config``,
    ``bind``, ``with_retry``, ``with_listeners`` and ``with_types`` keep the tracking.

    Example:
        >>> from langchain_tokenledger.testing import FakeUsageChatModel
        >>> chain = tracked(FakeUsageChatModel(), ledger=Ledger("sqlite://"))
        >>> chain.with_config(run_name="answer").tracking.ledger is chain.tracking.ledger
        True
    """

    tracking: TrackingOptions = Field(default_factory=TrackingOptions)
    """Where each run's rows go, and their tags/metadata."""

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Not serializable: it holds a live ledger."""
        return False

    def _scope(self) -> Scope:
        return Scope(self.tracking)

    def _keep(self, other: Runnable[Input, Output]) -> Runnable[Input, Output]:
        if isinstance(other, TrackedRunnable):
            other.tracking = self.tracking
        return other

    # -- derived runnables keep the tracking ------------------------------------------------

    def bind(self, **kwargs: Any) -> Runnable[Input, Output]:
        """Like ``RunnableBinding.bind``, tracked the same way."""
        return self._keep(super().bind(**kwargs))

    def with_config(
        self, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Runnable[Input, Output]:
        """Like ``RunnableBinding.with_config``, tracked the same way."""
        return self._keep(super().with_config(config, **kwargs))

    def with_listeners(self, **kwargs: Any) -> Runnable[Input, Output]:
        """Like ``RunnableBinding.with_listeners``, tracked the same way."""
        return self._keep(super().with_listeners(**kwargs))

    def with_types(
        self,
        input_type: type[Input] | BaseModel | None = None,
        output_type: type[Output] | BaseModel | None = None,
    ) -> Runnable[Input, Output]:
        """Like ``RunnableBinding.with_types``, tracked the same way."""
        return self._keep(super().with_types(input_type, output_type))

    def with_retry(self, **kwargs: Any) -> Runnable[Input, Output]:
        """Like ``RunnableBinding.with_retry``, tracked the same way."""
        return self._keep(super().with_retry(**kwargs))

    # -- every way to run it ----------------------------------------------------------------

    def invoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        """Run once, inside a tracked scope."""
        with self._scope().active():
            return super().invoke(input, config, **kwargs)

    async def ainvoke(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Output:
        """Run once (async), inside a tracked scope."""
        with self._scope().active():
            return await super().ainvoke(input, config, **kwargs)

    def batch(
        self,
        inputs: list[Input],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Output]:
        """Run a batch (worker threads included) inside one tracked scope."""
        with self._scope().active():
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[Input],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Output]:
        """Run a batch (async) inside one tracked scope."""
        with self._scope().active():
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )

    @overload
    def batch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: Literal[False] = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Output]]: ...

    @overload
    def batch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: Literal[True],
        **kwargs: Any,
    ) -> Iterator[tuple[int, Output | Exception]]: ...

    def batch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Output | Exception]]:
        """Yield batch results as they complete, inside one tracked scope."""
        base: Any = super()  # one call for both overloads
        gen = base.batch_as_completed(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return scoped_generator(self._scope, cast(Generator[Any, None, None], gen))

    @overload
    def abatch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: Literal[False] = False,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Output]]: ...

    @overload
    def abatch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: Literal[True],
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Output | Exception]]: ...

    def abatch_as_completed(
        self,
        inputs: Sequence[Input],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Output | Exception]]:
        """Yield batch results (async) as they complete, inside one tracked scope."""
        base: Any = super()  # one call for both overloads
        agen = base.abatch_as_completed(
            inputs, config, return_exceptions=return_exceptions, **kwargs
        )
        return scoped_async_generator(self._scope, cast(AsyncGenerator[Any, None], agen))

    def stream(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Output]:
        """Stream, each step inside the run's tracked scope."""
        gen = super().stream(input, config, **kwargs)
        return scoped_generator(self._scope, cast(Generator[Output, None, None], gen))

    def astream(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Output]:
        """Stream (async), each step inside the run's tracked scope."""
        agen = super().astream(input, config, **kwargs)
        return scoped_async_generator(self._scope, cast(AsyncGenerator[Output, None], agen))

    def transform(
        self, input: Iterator[Input], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Output]:
        """Transform a stream (as a step of a streamed chain) inside a tracked scope."""
        gen = super().transform(input, config, **kwargs)
        return scoped_generator(self._scope, cast(Generator[Output, None, None], gen))

    def atransform(
        self, input: AsyncIterator[Input], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Output]:
        """Transform an async stream inside a tracked scope."""
        agen = super().atransform(input, config, **kwargs)
        return scoped_async_generator(self._scope, cast(AsyncGenerator[Output, None], agen))

    @overload
    def astream_events(
        self,
        input: Input,
        config: RunnableConfig | None = None,
        *,
        version: Literal["v1", "v2"] = "v2",
        **kwargs: Any,
    ) -> AsyncIterator[StreamEvent]: ...

    @overload
    def astream_events(
        self,
        input: Input,
        config: RunnableConfig | None = None,
        *,
        version: Literal["v3"],
        **kwargs: Any,
    ) -> Awaitable[Any]: ...

    def astream_events(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamEvent] | Awaitable[Any]:
        """Stream events (async) inside a tracked scope."""
        result = super().astream_events(input, config, **kwargs)
        if isinstance(result, types.AsyncGeneratorType):
            return scoped_async_generator(self._scope, result)
        return scoped_await(self._scope, cast(Coroutine[Any, Any, Any], result))

    @overload
    def stream_events(
        self,
        input: Input,
        config: RunnableConfig | None = None,
        *,
        version: Literal["v1", "v2"] = "v2",
        **kwargs: Any,
    ) -> Iterator[StreamEvent]: ...

    @overload
    def stream_events(
        self,
        input: Input,
        config: RunnableConfig | None = None,
        *,
        version: Literal["v3"],
        **kwargs: Any,
    ) -> Any: ...

    def stream_events(
        self,
        input: Input,
        config: RunnableConfig | None = None,
        *,
        version: Literal["v1", "v2", "v3"] = "v2",
        **kwargs: Any,
    ) -> Iterator[StreamEvent] | Any:
        """Stream events (``version="v3"`` on chat models) with the model's run tracked."""
        # v3 returns a stream object whose callback manager is configured right here.
        with self._scope().active():
            return super().stream_events(input, config, version=version, **kwargs)


# -- the decorator ---------------------------------------------------------------------------


class _Decorator(Protocol):
    @overload
    def __call__(self, target: Runnable[Input, Output], /) -> TrackedRunnable[Input, Output]: ...

    @overload
    def __call__(self, target: T, /) -> T: ...


@overload
def tracked(
    target: Runnable[Input, Output],
    /,
    *,
    ledger: Ledger | None = None,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TrackedRunnable[Input, Output]: ...


@overload
def tracked(
    target: T,
    /,
    *,
    ledger: Ledger | None = None,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    methods: Iterable[str] | None = None,
) -> T: ...


@overload
def tracked(
    target: None = None,
    /,
    *,
    ledger: Ledger | None = None,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    methods: Iterable[str] | None = None,
) -> _Decorator: ...


def tracked(
    target: Any = None,
    /,
    *,
    ledger: Ledger | None = None,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    methods: Iterable[str] | None = None,
) -> Any:
    """Record every LLM call made by a Runnable, a function/method, or a class's methods.

    * On a Runnable: returns a :class:`TrackedRunnable` whose every run is recorded.
    * On a function or method (sync, ``async def``, generator, async generator, ``classmethod``,
      ``staticmethod`` or another method descriptor, such as ``partialmethod``): each call (for
      generators, the whole iteration, also when the consumer stops early) runs in its own
      tracked scope. A plain function that returns a coroutine, a generator or an async
      generator is tracked until that result is finished too.
    * On a class: wraps ``methods`` (default: its public methods), and gives each instance a
      read-only ``token_usages``: ``{root_run_id: {model: ModelUsage}}`` of its own calls.

    Use it bare (``@tracked``) or with options (``@tracked(ledger=..., tags=..., metadata=...)``).

    Args:
        target: what to track; omitted when options are given first.
        ledger: where rows go; default :func:`~langchain_tokenledger.default_ledger`.
        tags: added to every row.
        metadata: defaults for every row's metadata (a run's own keys win).
        methods: on a class only, the names of the methods to wrap.

    Example:
        >>> from langchain_tokenledger.testing import FakeUsageChatModel
        >>> @tracked(ledger=Ledger("sqlite://"), methods=["run"])
        ... class Assistant:
        ...     def run(self, question: str) -> str:
        ...         return str(FakeUsageChatModel().invoke(question).content)
        >>> bot = Assistant()
        >>> _ = bot.run("hi")
        >>> [usage["gpt-4o-mini"]["total_tokens"] for usage in bot.token_usages.values()]
        [30]
    """
    options = TrackingOptions(ledger, tags=tags, metadata=metadata)
    if isinstance(methods, (str, bytes)):
        raise TypeError(f"methods must be a list of names, not a string: use methods=[{methods!r}]")
    names = None if methods is None else list(methods)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise TypeError("methods must be a list of method names (strings)")

    def apply(obj: Any) -> Any:
        if isinstance(obj, type):
            return _track_class(obj, options, names)
        if names is not None:
            raise TypeError("methods=[...] applies to a class only")
        if isinstance(obj, Runnable):
            return TrackedRunnable(bound=obj, tracking=options)
        if _is_method_like(obj):
            return _wrap_callable(obj, options, per_instance=False)
        hint = " (did you mean tracked(ledger=...)?)" if isinstance(obj, Ledger) else ""
        raise TypeError(
            f"tracked() applies to a Runnable, a function, a method or a class, "
            f"not {type(obj).__name__}{hint}"
        )

    return apply if target is None else apply(target)
