"""Offline test doubles for checking token accounting without a network or an API key.

Two families of fakes live here:

* :class:`FakeOpenAIServer`: a tiny OpenAI-compatible chat-completions server on ``127.0.0.1``
  (stdlib only). Point the *real* ``langchain_openai.ChatOpenAI`` at it (or use
  :meth:`FakeOpenAIServer.chat_model`) and compare what your callbacks recorded with what the
  server says it billed (:attr:`FakeOpenAIServer.reported`).
* :class:`FakeUsageChatModel` and :class:`FakeUsageLLM`: in-process models (no HTTP) that report
  fixed, configurable usage, for benchmarks and for completion-style tests.

Example:
    >>> from langchain_tokenledger.testing import FakeOpenAIServer
    >>> with FakeOpenAIServer() as server:  # doctest: +SKIP
    ...     reply = server.chat_model().invoke("hello there")
    ...     reply.content, reply.usage_metadata["total_tokens"], server.totals()["total_tokens"]
    ('echo: hello there', 12, 12)
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from socketserver import TCPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    LLMResult,
)
from pydantic import ConfigDict, Field

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI
    from typing_extensions import Self

__all__ = [
    "FakeOpenAIServer",
    "FakeUsageChatModel",
    "FakeUsageLLM",
    "ReportedUsage",
    "fake_completion_tokens",
    "fake_prompt_tokens",
]

_WORD = re.compile(r"\s*\S+")


# --------------------------------------------------------------------------------------------
# The token-counting rule shared by the fake server and the tests
# --------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """The text of an OpenAI message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    return ""


def fake_prompt_tokens(messages: str | Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens :class:`FakeOpenAIServer` bills for a list of OpenAI-format messages.

    The rule is ``3 + sum(4 + words(message content))``: every message costs 4 tokens plus one
    per whitespace-separated word of its text, and every request costs 3 more (a crude copy of
    OpenAI's real per-message overhead). A plain string means one user message.

    Example:
        >>> fake_prompt_tokens("hello there")
        9
        >>> fake_prompt_tokens([{"role": "system", "content": "be brief"},
        ...                     {"role": "user", "content": "hi"}])
        14
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return 3 + sum(4 + len(_content_text(m.get("content")).split()) for m in messages)


def fake_completion_tokens(text: str) -> int:
    """Completion tokens :class:`FakeOpenAIServer` bills for one choice's reply text.

    One token per whitespace-separated word (reasoning tokens come on top, see
    :class:`FakeOpenAIServer`).

    Example:
        >>> fake_completion_tokens("echo: hello there")
        3
    """
    return len(text.split())


# --------------------------------------------------------------------------------------------
# What the server billed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportedUsage:
    """One completion response as billed by :class:`FakeOpenAIServer`.

    ``model`` is the model as *answered* (see :attr:`FakeOpenAIServer.response_model`),
    ``requested_model`` the one in the request. ``n`` is the number of choices (one usage covers
    all of them). ``usage_sent`` tells whether the usage actually reached the client: a stream
    without ``stream_options.include_usage`` is billed all the same, but with ``usage_sent=False``.

    Example:
        >>> ReportedUsage(model="gpt-4o-mini", prompt_tokens=9, completion_tokens=3,
        ...               total_tokens=12, cached_tokens=0, reasoning_tokens=0, n=1,
        ...               streamed=False, usage_sent=True).total_tokens
        12
    """

    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    n: int
    streamed: bool
    usage_sent: bool
    requested_model: str = ""
    service_tier: str | None = None


_TOTAL_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
)

_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "bad request"),
    401: ("invalid_request_error", "invalid_api_key", "incorrect API key provided"),
    403: ("invalid_request_error", "unsupported_country_region_territory", "forbidden"),
    404: ("invalid_request_error", "model_not_found", "the model does not exist"),
    408: ("timeout", None, "request timed out"),
    409: ("invalid_request_error", None, "conflict"),
    422: ("invalid_request_error", None, "unprocessable entity"),
    429: ("requests", "rate_limit_exceeded", "rate limited"),
    500: ("server_error", None, "internal server error"),
    502: ("server_error", None, "bad gateway"),
    503: ("server_error", None, "the engine is currently overloaded"),
}


@dataclass(slots=True)
class _Script:
    """A scripted misbehaviour waiting in the FIFO queue."""

    kind: Literal["fail", "cut"]
    remaining: int
    status: int = 500
    message: str = ""
    error_type: str = "server_error"
    code: str | None = None
    retry_after: float | None = None
    after_chunks: int = 0


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything the server decided about one chat-completion response."""

    requested_model: str
    model: str
    text: str
    finish_reason: str
    n: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    service_tier: str | None

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        """The OpenAI ``usage`` object (optionally with a partial completion count)."""
        completion = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def reported(self, *, streamed: bool, usage_sent: bool) -> ReportedUsage:
        return ReportedUsage(
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_tokens=self.reasoning_tokens,
            n=self.n,
            streamed=streamed,
            usage_sent=usage_sent,
            requested_model=self.requested_model,
            service_tier=self.service_tier,
        )


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, owner: FakeOpenAIServer, host: str, port: int) -> None:
        self.owner = owner
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup: skip it (no network).
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients hanging up mid-response is part of the job."""

    def close_open_connections(self) -> None:
        with self.connections_lock:
            sockets = list(self.open_connections)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    sys_version = ""
    timeout = 60.0  # idle keep-alive connections are dropped after this (httpx expires at 5 s)
    disable_nagle_algorithm = True
    server: _HTTPServer

    # -- connection bookkeeping ----------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)
        self.server.owner._count_connection()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.open_connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no access log on stderr."""

    # -- low-level writers ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc

    def _head(self, status: int, headers: Sequence[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: Sequence[tuple[str, str]] = (),
        *,
        cut: bool = False,
    ) -> None:
        body = json.dumps(payload).encode()
        head = self._head(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                *headers,
            ],
        )
        if cut:  # announce the whole body, send half of it, hang up
            self.close_connection = True
            self._write(head + body[: len(body) // 2])
            return
        self._write(head + body)

    def _send_error_json(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        error = {"message": message, "type": error_type, "param": None, "code": code}
        self._send_json(status, {"error": error}, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # -- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path in ("/v1/models", "/models"):
                models = self.server.owner._known_models()
                data = [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in models
                ]
                self._send_json(200, {"object": "list", "data": data})
            else:
                self._send_error_json(404, f"unknown path {path}", "invalid_request_error")
        except _ClientGone:
            pass

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_body()
        try:
            if path.endswith("/chat/completions"):
                self._chat_completions(body)
            else:
                self._send_error_json(404, f"unknown path {path}", "invalid_request_error")
        except _ClientGone:
            pass

    # -- chat completions ----------------------------------------------------------------

    def _chat_completions(self, body: bytes) -> None:
        owner = self.server.owner
        try:
            request = json.loads(body or b"null")
        except ValueError:
            request = None
        epoch = owner._begin(request)
        try:
            self._answer(request, epoch)
        finally:
            owner._end()

    def _answer(self, request: Any, epoch: int) -> None:
        owner = self.server.owner
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            self._send_error_json(
                400, "expected a JSON object with a 'messages' list", "invalid_request_error"
            )
            return
        script = owner._pop_script()
        if owner.delay > 0:
            time.sleep(owner.delay)
        if script is not None and script.kind == "fail":
            owner._count_failure(epoch)
            headers: list[tuple[str, str]] = [("x-request-id", "req_fake")]
            if script.retry_after is not None:
                headers.append(("retry-after-ms", str(int(script.retry_after * 1000))))
            self._send_error_json(
                script.status, script.message, script.error_type, script.code, headers
            )
            return
        plan = owner._plan(request)
        cut_after = script.after_chunks if script is not None else None
        if request.get("stream"):
            self._stream(plan, request, cut_after, epoch)
        elif cut_after is not None:
            owner._count_failure(epoch)
            self._send_json(200, owner._completion_json(plan), cut=True)
        else:
            owner._record(plan.reported(streamed=False, usage_sent=True), epoch)
            self._send_json(200, owner._completion_json(plan))

    def _stream(
        self, plan: _Plan, request: Mapping[str, Any], cut_after: int | None, epoch: int
    ) -> None:
        owner = self.server.owner
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        stream_options = request.get("stream_options")
        include_usage = isinstance(stream_options, Mapping) and bool(
            stream_options.get("include_usage")
        )
        cumulative = owner.cumulative_stream_usage
        chunk_delay = owner.chunk_delay
        base: dict[str, Any] = {
            "id": owner._new_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": plan.model,
            "system_fingerprint": "fp_fake",
        }
        if plan.service_tier is not None:
            base["service_tier"] = plan.service_tier
        produced = plan.reasoning_tokens  # running completion count for cumulative usage

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            chunk = {**base, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            elif cumulative:
                chunk["usage"] = plan.usage(produced)
            elif include_usage:
                chunk["usage"] = None
            data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            return frame(data)

        def frame(data: bytes) -> bytes:
            return b"%X\r\n%s\r\n" % (len(data), data) if chunked else data

        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("x-request-id", "req_fake"),
        ]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        first = b"".join(
            event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(plan.n)
        )
        self._write(self._head(200, headers) + first)

        pieces = _pieces(plan.text)
        sent = 0
        for index in range(plan.n):
            for piece in pieces:
                if cut_after is not None and sent >= cut_after:
                    break
                if chunk_delay > 0:
                    time.sleep(chunk_delay)
                produced += 1
                choice = {
                    "index": index,
                    "delta": {"content": piece},
                    "logprobs": None,
                    "finish_reason": None,
                }
                self._write(event([choice]))
                sent += 1
        if cut_after is not None:
            owner._count_failure(epoch)
            self.close_connection = True  # hang up mid-body: no finish, no usage, no [DONE]
            return

        produced = plan.completion_tokens
        usage_sent = include_usage or cumulative
        owner._record(plan.reported(streamed=True, usage_sent=usage_sent), epoch)
        tail = [
            event(
                [
                    {
                        "index": i,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": plan.finish_reason,
                    }
                ]
            )
            for i in range(plan.n)
        ]
        if include_usage:
            tail.append(event([], plan.usage()))
        tail.append(frame(b"data: [DONE]\n\n"))
        if chunked:
            tail.append(b"0\r\n\r\n")
        self._write(b"".join(tail))


def _pieces(text: str) -> list[str]:
    """Split ``text`` into one piece per word (leading whitespace kept) that join back to it."""
    pieces = _WORD.findall(text)
    rest = text[sum(len(p) for p in pieces) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeOpenAIServer:
    """An OpenAI-compatible chat-completions server on ``127.0.0.1`` that bills deterministically.

    Start it (context manager, or :meth:`start` / :meth:`stop`), point a real ``ChatOpenAI`` at
    :attr:`base_url` (:meth:`chat_model` does it for you), then compare your accounting with
    :attr:`reported`, one :class:`ReportedUsage` per completion response the server billed.

    **Endpoints.** ``POST /v1/chat/completions`` (``model``, ``messages``, ``n``, ``stream``,
    ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``,
    ``service_tier``) and ``GET /v1/models``.

    **Billing rule** (deterministic, see :func:`fake_prompt_tokens` and
    :func:`fake_completion_tokens`):

    * ``prompt_tokens = 3 + sum over messages of (4 + words in the message text)``;
    * the reply is :attr:`reply` if set, else ``"echo: " + <text of the last user message>``;
      every one of the ``n`` choices gets the same reply; ``max_tokens`` /
      ``max_completion_tokens`` truncate it to that many words (``finish_reason="length"``);
    * ``completion_tokens = n * words(reply) + reasoning_tokens`` (as OpenAI does, reasoning
      tokens are counted inside ``completion_tokens``); ``total = prompt + completion``;
    * ``usage.prompt_tokens_details.cached_tokens = min(cached_tokens, prompt_tokens)`` and
      ``usage.completion_tokens_details.reasoning_tokens = reasoning_tokens``; the detail
      objects are always present (zeros included), as they are from OpenAI;
    * ONE usage per response, whatever ``n`` is.

    **Streaming.** Server-sent events over chunked HTTP/1.1 (keep-alive): a role chunk, one chunk
    per word of the reply (so streams have many chunks), a ``finish_reason`` chunk, then, only with
    ``stream_options.include_usage``, a ``choices: []`` chunk carrying ``usage``, then
    ``data: [DONE]``. A stream without ``include_usage`` is billed all the same
    (``usage_sent=False``). With :attr:`cumulative_stream_usage` every chunk carries the running
    usage (prompt fixed, completion so far; reasoning tokens count from the first chunk), as some
    OpenAI-compatible servers do.

    **When is a response billed?** When the server has generated it completely: a non-streamed
    response just before it is written (even if the client has already given up, as OpenAI
    does), a stream just before its ``finish_reason`` chunk. So once the client has the full
    answer it is already in :attr:`reported`. A stream whose client hangs up is abandoned at the
    next write that fails, unbilled. Scripted failures and cut streams are never billed. The
    server thread outlives a client that gives up: :meth:`wait_idle` waits for it.

    **Settings** (plain attributes, back to these defaults on :meth:`reset`):
    :attr:`reply` ``None``, :attr:`cached_tokens` ``0``, :attr:`reasoning_tokens` ``0``,
    :attr:`service_tier` ``None`` (then the request's own ``service_tier`` is echoed, ``"auto"``
    answered as ``"default"``), :attr:`cumulative_stream_usage` ``False``,
    :attr:`response_model` ``None`` and :attr:`model_suffix` ``""`` (the answered model is
    ``response_model`` if set, else the requested model + ``model_suffix``), :attr:`delay` ``0.0``
    seconds before each response and :attr:`chunk_delay` ``0.0`` seconds before each content chunk.

    **Scripted misbehaviour** (:meth:`fail_next`, :meth:`cut_next_stream`): one FIFO queue; each
    chat-completion request consumes one use of the entry at its head.

    Example:
        >>> with FakeOpenAIServer() as server:  # doctest: +SKIP
        ...     model = server.chat_model(model="gpt-4o-mini")
        ...     model.invoke("hello there").usage_metadata["total_tokens"]
        ...     server.totals()
        12
        {'calls': 1, 'prompt_tokens': 9, 'completion_tokens': 3, 'total_tokens': 12, ...}
    """

    reply: str | None
    """Reply text for every choice; ``None`` means ``"echo: " + <last user message>``."""
    cached_tokens: int
    """Reported as ``prompt_tokens_details.cached_tokens`` (clipped to ``prompt_tokens``)."""
    reasoning_tokens: int
    """Reported as ``completion_tokens_details.reasoning_tokens`` and added to completion."""
    service_tier: str | None
    """The response's ``service_tier`` (``None``: echo the request's, if it has one)."""
    cumulative_stream_usage: bool
    """Every streamed chunk carries the running cumulative usage."""
    response_model: str | None
    """Answer with this model name, whatever was requested."""
    model_suffix: str
    """Answer with the requested model + this suffix (e.g. ``"-2024-07-18"``)."""
    delay: float
    """Seconds to wait before each chat-completion response (failures included)."""
    chunk_delay: float
    """Seconds to wait before each streamed content chunk."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._epoch = 0
        self._in_flight = 0
        self._ids = count(1)
        self._reported: list[ReportedUsage] = []
        self._received: list[Any] = []
        self._requests = 0
        self._failures = 0
        self._connections = 0
        self._scripts: deque[_Script] = deque()
        self._models_seen: dict[str, None] = {}
        self._set_defaults()
        self._clear_records()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind (a free port by default) and serve from a daemon thread. Returns ``self``.

        Example:
            >>> server = FakeOpenAIServer().start()  # doctest: +SKIP
            >>> server.base_url  # doctest: +SKIP
            'http://127.0.0.1:54321/v1'
            >>> server.stop()  # doctest: +SKIP
        """
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(self, self._host, self._port)
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeOpenAIServer:{httpd.server_port}",
            daemon=True,
        )
        self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, hang up open keep-alive connections and release the port.

        Example:
            >>> server = FakeOpenAIServer().start()  # doctest: +SKIP
            >>> server.stop()  # doctest: +SKIP
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.close_open_connections()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (the server must be started).

        Example:
            >>> FakeOpenAIServer().start().port > 0  # doctest: +SKIP
            True
        """
        if self._httpd is None:
            msg = "FakeOpenAIServer is not running; call start() or use it as a context manager"
            raise RuntimeError(msg)
        return self._httpd.server_port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the ``base_url`` to give an OpenAI client.

        Example:
            >>> FakeOpenAIServer().start().base_url  # doctest: +SKIP
            'http://127.0.0.1:54321/v1'
        """
        return f"http://{self._host}:{self.port}/v1"

    def chat_model(self, model: str = "gpt-4o-mini", **kwargs: Any) -> ChatOpenAI:
        """A real ``langchain_openai.ChatOpenAI`` wired to this server.

        Defaults: ``base_url=self.base_url``, ``api_key="test"``, ``max_retries=0``; any keyword
        (``stream_usage=True``, ``n=2``, ``service_tier="priority"``, ...) is passed through and
        may override them. Note that ``ChatOpenAI`` does *not* ask for streamed usage when
        ``base_url`` is custom: pass ``stream_usage=True`` to get it.

        Example:
            >>> with FakeOpenAIServer() as server:  # doctest: +SKIP
            ...     server.chat_model(stream_usage=True).invoke("hi").content
            'echo: hi'
        """
        from langchain_openai import ChatOpenAI

        params: dict[str, Any] = {
            "model": model,
            "base_url": self.base_url,
            "api_key": "test",
            "max_retries": 0,
        }
        params.update(kwargs)
        return ChatOpenAI(**params)

    # -- settings ------------------------------------------------------------------------

    def _set_defaults(self) -> None:
        self.reply = None
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.service_tier = None
        self.cumulative_stream_usage = False
        self.response_model = None
        self.model_suffix = ""
        self.delay = 0.0
        self.chunk_delay = 0.0

    def _clear_records(self) -> None:
        with self._lock:
            self._epoch += 1
            self._reported = []
            self._received = []
            self._requests = 0
            self._failures = 0
            self._connections = 0
            self._scripts = deque()
            self._models_seen = {}

    def reset(self) -> None:
        """Forget everything: billed usage, counters, scripted failures, and settings.

        Requests still being answered when ``reset()`` is called are not billed or counted
        afterwards (see :meth:`wait_idle`).

        Example:
            >>> server = FakeOpenAIServer()
            >>> server.cached_tokens = 5
            >>> server.reset()
            >>> server.cached_tokens, server.reported
            (0, [])
        """
        self._set_defaults()
        self._clear_records()

    # -- scripting -----------------------------------------------------------------------

    def fail_next(
        self,
        status: int = 429,
        times: int = 1,
        message: str | None = None,
        *,
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` chat-completion requests with an HTTP error.

        The body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``; ``type`` and
        ``code`` default to what OpenAI sends for that status (429: ``"requests"`` /
        ``"rate_limit_exceeded"``, 5xx: ``"server_error"``). ``retry_after`` (seconds) adds a
        ``retry-after-ms`` header, which the openai client honours when it retries. Nothing is
        billed; :attr:`failures` counts each one.

        Example:
            >>> with FakeOpenAIServer() as server:  # doctest: +SKIP
            ...     server.fail_next(429)
            ...     server.chat_model().invoke("hi")
            Traceback (most recent call last):
            openai.RateLimitError: ...
        """
        if status < 400 or status > 599:
            msg = f"status must be an HTTP error status (4xx or 5xx), got {status}"
            raise ValueError(msg)
        if times < 1:
            msg = f"times must be at least 1, got {times}"
            raise ValueError(msg)
        family = 500 if status >= 500 else 400
        default_type, default_code, default_message = _ERROR_DEFAULTS.get(
            status, _ERROR_DEFAULTS[family]
        )
        script = _Script(
            kind="fail",
            remaining=times,
            status=status,
            message=message if message is not None else default_message,
            error_type=error_type if error_type is not None else default_type,
            code=code if code is not None else default_code,
            retry_after=retry_after,
        )
        with self._lock:
            self._scripts.append(script)

    def cut_next_stream(self, after_chunks: int = 2, times: int = 1) -> None:
        """Drop the connection of the next ``times`` responses part-way through.

        A streamed response sends its role chunk and ``after_chunks`` content chunks (one word
        each), then the server hangs up mid-body: no ``finish_reason``, no usage, no ``[DONE]``,
        and the chunked body is left unterminated, so the client gets a connection error
        (``openai.APIConnectionError``) right after those chunks. A non-streamed request that
        meets this script gets half of its JSON body and the same hang-up. Not billed; counted in
        :attr:`failures`.

        Example:
            >>> with FakeOpenAIServer() as server:  # doctest: +SKIP
            ...     server.cut_next_stream(after_chunks=2)
            ...     list(server.chat_model().stream("one two three"))
            Traceback (most recent call last):
            openai.APIConnectionError: Connection error.
        """
        if after_chunks < 0:
            msg = f"after_chunks must be >= 0, got {after_chunks}"
            raise ValueError(msg)
        if times < 1:
            msg = f"times must be at least 1, got {times}"
            raise ValueError(msg)
        with self._lock:
            self._scripts.append(_Script(kind="cut", remaining=times, after_chunks=after_chunks))

    # -- what happened -------------------------------------------------------------------

    @property
    def reported(self) -> list[ReportedUsage]:
        """A copy of the usage billed so far, one entry per completion response, oldest first.

        Example:
            >>> FakeOpenAIServer().reported
            []
        """
        with self._lock:
            return list(self._reported)

    @property
    def requests(self) -> int:
        """Chat-completion requests received (failed, cut and malformed ones included).

        Example:
            >>> FakeOpenAIServer().requests
            0
        """
        with self._lock:
            return self._requests

    @property
    def failures(self) -> int:
        """Scripted failures served (:meth:`fail_next` errors and :meth:`cut_next_stream` cuts).

        Example:
            >>> FakeOpenAIServer().failures
            0
        """
        with self._lock:
            return self._failures

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (keep-alive means far fewer than :attr:`requests`).

        Example:
            >>> FakeOpenAIServer().connections
            0
        """
        with self._lock:
            return self._connections

    @property
    def received(self) -> list[Any]:
        """A copy of the JSON bodies of the chat-completion requests received, oldest first.

        Example:
            >>> FakeOpenAIServer().received
            []
        """
        with self._lock:
            return list(self._received)

    def totals(self, model: str | None = None) -> dict[str, int]:
        """Sums over :attr:`reported` (only responses answered as ``model`` if given).

        Keys: ``calls``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
        ``cached_tokens``, ``reasoning_tokens``.

        Example:
            >>> FakeOpenAIServer().totals()
            {'calls': 0, 'prompt_tokens': 0, 'completion_tokens': 0, 'total_tokens': 0, \
'cached_tokens': 0, 'reasoning_tokens': 0}
        """
        rows = [r for r in self.reported if model is None or r.model == model]
        totals = {"calls": len(rows)}
        for key in _TOTAL_KEYS:
            totals[key] = sum(getattr(r, key) for r in rows)
        return totals

    def wait_for_reported(self, count: int, timeout: float = 5.0) -> list[ReportedUsage]:
        """Block until at least ``count`` responses are billed; return :attr:`reported`.

        Useful after cancelling a client mid-request: the server keeps generating (and billing)
        in its own thread. Raises ``TimeoutError`` if ``timeout`` seconds pass first.

        Example:
            >>> FakeOpenAIServer().wait_for_reported(0)
            []
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._reported) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = f"{len(self._reported)} responses billed, waited for {count}"
                    raise TimeoutError(msg)
                self._changed.wait(remaining)
            return list(self._reported)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Block until no chat-completion request is being answered.

        A client that gives up (timeout, cancellation) does not stop the server thread that is
        answering it; call this before asserting on :attr:`reported` or reusing the server.
        Raises ``TimeoutError`` if ``timeout`` seconds pass first.

        Example:
            >>> FakeOpenAIServer().wait_idle()
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = f"{self._in_flight} chat-completion requests still being answered"
                    raise TimeoutError(msg)
                self._changed.wait(remaining)

    # -- internals used by the handler threads -------------------------------------------

    def _new_id(self) -> str:
        return f"chatcmpl-fake{next(self._ids):06d}"

    def _known_models(self) -> list[str]:
        with self._lock:
            seen = list(self._models_seen)
        return list(dict.fromkeys(["gpt-4o-mini", "gpt-4o", *seen]))

    def _begin(self, request: Any) -> int:
        """Count a chat-completion request; returns the epoch it belongs to."""
        with self._lock:
            self._in_flight += 1
            self._requests += 1
            self._received.append(request)
            if isinstance(request, dict) and isinstance(request.get("model"), str):
                self._models_seen[request["model"]] = None
            return self._epoch

    def _end(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def _pop_script(self) -> _Script | None:
        with self._lock:
            if not self._scripts:
                return None
            head = self._scripts[0]
            head.remaining -= 1
            if head.remaining <= 0:
                self._scripts.popleft()
            return head

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _count_failure(self, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:  # a request from before reset() leaves no trace
                self._failures += 1

    def _record(self, usage: ReportedUsage, epoch: int) -> None:
        with self._changed:
            if epoch == self._epoch:  # a request from before reset() leaves no trace
                self._reported.append(usage)
            self._changed.notify_all()

    def _plan(self, request: Mapping[str, Any]) -> _Plan:
        messages: list[Any] = [m for m in request["messages"] if isinstance(m, Mapping)]
        requested = str(request.get("model") or "")
        answered = self.response_model or requested + self.model_suffix
        reply = self.reply
        if reply is None:
            last_user = next(
                (m for m in reversed(messages) if m.get("role") == "user"),
                messages[-1] if messages else {},
            )
            reply = "echo: " + _content_text(last_user.get("content"))
        text, finish_reason = reply, "stop"
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool):
            pieces = _pieces(reply)
            if len(pieces) > limit:
                text, finish_reason = "".join(pieces[: max(limit, 0)]), "length"
        n_raw = request.get("n")
        n = n_raw if isinstance(n_raw, int) and n_raw >= 1 else 1
        prompt = fake_prompt_tokens(messages)
        reasoning = max(self.reasoning_tokens, 0)
        tier = self.service_tier
        if tier is None and isinstance(request.get("service_tier"), str):
            tier = "default" if request["service_tier"] == "auto" else request["service_tier"]
        return _Plan(
            requested_model=requested,
            model=answered,
            text=text,
            finish_reason=finish_reason,
            n=n,
            prompt_tokens=prompt,
            completion_tokens=n * fake_completion_tokens(text) + reasoning,
            cached_tokens=min(max(self.cached_tokens, 0), prompt),
            reasoning_tokens=reasoning,
            service_tier=tier,
        )

    def _completion_json(self, plan: _Plan) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": self._new_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": plan.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
                for i in range(plan.n)
            ],
            "usage": plan.usage(),
            "system_fingerprint": "fp_fake",
        }
        if plan.service_tier is not None:
            response["service_tier"] = plan.service_tier
        return response


# --------------------------------------------------------------------------------------------
# In-process fakes
# --------------------------------------------------------------------------------------------


def _add_counts(into: dict[str, Any], counts: Mapping[str, Any]) -> None:
    """``into += counts`` for OpenAI-style usage dicts (ints, possibly nested one level)."""
    for key, value in counts.items():
        if isinstance(value, Mapping):
            _add_counts(into.setdefault(key, {}), value)
        elif isinstance(value, int):
            into[key] = into.get(key, 0) + value


class FakeUsageChatModel(BaseChatModel):
    """An in-process chat model that reports fixed usage, shaped like ``ChatOpenAI``'s.

    ``invoke`` returns ``AIMessage(reply)`` with ``usage_metadata`` (``input_tokens``,
    ``output_tokens``, their sum, plus ``input_token_details.cache_read`` /
    ``output_token_details.reasoning`` when non-zero; as in ``UsageMetadata``, cached tokens are
    part of ``input_tokens`` and reasoning tokens part of ``output_tokens``),
    ``response_metadata["model_name"]`` and an OpenAI-style ``llm_output["token_usage"]``.
    Streaming yields exactly ``chunks`` chunks that join to ``reply``; only the last carries
    ``usage_metadata`` and ``model_name`` (like ``ChatOpenAI(stream_usage=True)``). Async methods
    are native (no thread pool), so it is cheap enough to measure callback overhead against.

    Example:
        >>> model = FakeUsageChatModel(input_tokens=7, output_tokens=3)
        >>> model.invoke("hi").usage_metadata
        {'input_tokens': 7, 'output_tokens': 3, 'total_tokens': 10}
        >>> len(list(model.stream("hi")))
        20
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = "gpt-4o-mini"
    reply: str = "hello world"
    chunks: int = Field(default=20, ge=1)
    input_tokens: int = 10
    output_tokens: int = 20
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    provider: str = "openai"

    @property
    def _llm_type(self) -> str:
        return "fake-usage-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=self.provider, ls_model_name=self.model_name, ls_model_type="chat"
        )
        if stop:
            params["ls_stop"] = stop
        return params

    def _usage(self) -> UsageMetadata:
        # A plain dict, cast: checked for Python 3.10, mypy does not see langchain-core's
        # typing.NotRequired (3.11+) and would ask for every detail key.
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }
        if self.cached_tokens:
            usage["input_token_details"] = InputTokenDetails(cache_read=self.cached_tokens)
        if self.reasoning_tokens:
            usage["output_token_details"] = OutputTokenDetails(reasoning=self.reasoning_tokens)
        return cast("UsageMetadata", usage)

    def _token_usage(self) -> dict[str, Any]:
        token_usage: dict[str, Any] = {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }
        if self.cached_tokens:
            token_usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens:
            token_usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return token_usage

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None], /) -> dict[str, Any]:
        """Sum ``token_usage`` over the prompts of a ``generate`` call, as ``ChatOpenAI`` does."""
        token_usage: dict[str, Any] = {}
        for output in llm_outputs:
            if output is not None:
                _add_counts(token_usage, output.get("token_usage") or {})
        return {"model_name": self.model_name, "token_usage": token_usage}

    def _result(self) -> ChatResult:
        message = AIMessage(
            content=self.reply,
            usage_metadata=self._usage(),
            response_metadata={"model_name": self.model_name},
        )
        return ChatResult(
            generations=[ChatGeneration(message=message)],
            llm_output={"model_name": self.model_name, "token_usage": self._token_usage()},
        )

    def _chunks(self) -> Iterator[ChatGenerationChunk]:
        reply, n = self.reply, self.chunks
        size = len(reply)
        for i in range(n - 1):
            piece = reply[i * size // n : (i + 1) * size // n]
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        last = AIMessageChunk(
            content=reply[(n - 1) * size // n :],
            usage_metadata=self._usage(),
            response_metadata={"model_name": self.model_name, "finish_reason": "stop"},
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result()

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks():
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks():
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


class FakeUsageLLM(BaseLLM):
    """An in-process completion-style LLM that reports usage the way OpenAI's ``OpenAI`` LLM does.

    One ``Generation(reply)`` per prompt; ``llm_output`` is
    ``{"token_usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "model_name"}``
    summed over the prompts of the call (``input_tokens`` / ``output_tokens`` per prompt). Note
    that LangChain then gives the whole sum to the *first* prompt's run and ``{}`` to the others
    (``LLMResult.flatten``).

    Example:
        >>> llm = FakeUsageLLM(input_tokens=4, output_tokens=2)
        >>> llm.generate(["a", "b"]).llm_output["token_usage"]
        {'prompt_tokens': 8, 'completion_tokens': 4, 'total_tokens': 12}
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = "gpt-3.5-turbo-instruct"
    reply: str = "hello world"
    input_tokens: int = 10
    output_tokens: int = 20
    provider: str = "openai"

    @property
    def _llm_type(self) -> str:
        return "fake-usage-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=self.provider, ls_model_name=self.model_name, ls_model_type="llm"
        )
        if stop:
            params["ls_stop"] = stop
        return params

    def _result(self, prompts: list[str]) -> LLMResult:
        k = len(prompts)
        token_usage = {
            "prompt_tokens": k * self.input_tokens,
            "completion_tokens": k * self.output_tokens,
            "total_tokens": k * (self.input_tokens + self.output_tokens),
        }
        return LLMResult(
            generations=[
                [Generation(text=self.reply, generation_info={"finish_reason": "stop"})]
                for _ in prompts
            ],
            llm_output={"token_usage": token_usage, "model_name": self.model_name},
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(prompts)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(prompts)
