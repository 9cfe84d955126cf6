"""The OpenAI-compatible HTTP API of `python -m mpillama serve`, on rank 0.

Owns the HTTP side: the connections (a fixed pool of handler threads, a bounded wait for one,
503 beyond it, read deadlines, keep-alive, closing without a reset), reading and checking
requests, the optional API key, the JSON and server-sent-event shapes of /v1/completions and
/v1/chat/completions (plus /health and /v1/models), stop strings, and the queue that hands the
engine one request at a time. The engine runs only on the main thread (where MPI was
initialised and where signals arrive); handler threads put a Job on the queue and read its
events back (the start, text pieces, the end), and cancel it when their client goes away.
The other ranks follow in Engine.worker_loop, as for generate (run.drive).

Imports the stdlib, engine, chat, sampler, config and errors; never mpi4py.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import math
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from mpillama.chat import render_chat
from mpillama.config import RunConfig
from mpillama.engine import Engine
from mpillama.output import say
from mpillama.errors import MpillamaError
from mpillama.sampler import Sampler

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs until EOS or a full context
MAX_BODY_BYTES = 16 << 20
# request fields asking for what this server does not do: refused rather than silently ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions")
LISTEN_BACKLOG = 256  # connections the kernel holds until they are accepted (the accepting thread never blocks)
WAITING_PER_THREAD = 4  # admitted connections may wait for a handler thread, this many per thread; then 503
RETRY_AFTER_S = 1  # what a 503 tells the client
LINGER_S = 2.0  # how long a closed connection's input is still read and dropped (see Closer)
MAX_LINGERING = 512  # beyond this many, connections are closed at once
POLL_S = 0.05  # how often a handler waiting for its job checks that its client is still there
MAX_LINE = 65536  # the longest request line


class ApiError(Exception):
    """A refused request: its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


# -- requests -> jobs -------------------------------------------------------------------------
@dataclass
class Outcome:
    finish_reason: str  # stop (EOS or a stop string) | length (max_tokens or a full context)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose K/V rows were already in the cache

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Job:
    """One request for the model. The main thread runs it; the handler thread reads `events`:
    ("error", ApiError) alone, or ("start", None), ("text", piece)..., ("end", Outcome)."""

    prompt: Callable[[Engine], list[int]]  # called on the main thread: the tokenizer is not shared
    max_tokens: int | None  # None: until EOS or the context is full
    sampler: Sampler
    stops: list[str]
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client went away: stop at the next token


def completion_job(body: dict[str, Any], run: RunConfig) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_field")
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or a list of one string); token arrays and batches are not supported",
                  "prompt")
    return Job(lambda engine: engine.tokenizer.encode(prompt),
               positive_int(body, "max_tokens", COMPLETION_MAX_TOKENS), sampler_of(body, run), stop_strings(body))


def chat_job(body: dict[str, Any], run: RunConfig) -> Job:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {'role': ..., 'content': ...}", "messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), (str, list, type(None)))):
            raise bad(f"each message needs a string 'role' and a string 'content', not {json.dumps(m)[:200]}",
                      "messages")

    def prompt(engine: Engine) -> list[int]:
        tok = engine.tokenizer
        text = render_chat(tok.chat_template, messages, bos_token=tok.bos_text, eos_token=tok.eos_text,
                           add_generation_prompt=True, arch_hint=engine.cfg.arch)
        return tok.encode(text)  # adds BOS only if the template did not write it

    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Job(prompt, positive_int(body, limit, None), sampler_of(body, run), stop_strings(body))


def check_common(body: dict[str, Any]) -> None:
    for name in ("n", "best_of"):
        if body.get(name, 1) != 1:
            raise bad(f"'{name}' other than 1 is not supported: send one request per completion", name, "unsupported")
    for name in UNSUPPORTED:
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server: leave it out", name, "unsupported")
    if not isinstance(body.get("stream", False), bool):
        raise bad("'stream' must be true or false", "stream")


def number(body: dict[str, Any], name: str, default: Any, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    return value


def positive_int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = number(body, name, default, integer=True)
    if value is not None and value < 1:
        raise bad(f"'{name}' must be at least 1, not {value}", name)
    return value


def sampler_of(body: dict[str, Any], run: RunConfig) -> Sampler:
    """The request's sampling settings; what it leaves out comes from the command line."""
    temperature = number(body, "temperature", run.temperature)
    top_p = number(body, "top_p", run.top_p)
    top_k = number(body, "top_k", run.top_k, integer=True)
    seed = number(body, "seed", run.seed, integer=True)
    for name, ok, rule in (("temperature", temperature >= 0, ">= 0"), ("top_p", 0 < top_p <= 1, "in (0, 1]"),
                           ("top_k", top_k >= 0, ">= 0 (0 turns it off)")):
        if not ok:
            raise bad(f"'{name}' must be {rule}, not {body[name]}", name)
    # a negative seed means a fresh one, as llama.cpp's -1
    return Sampler(temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                   seed=seed if seed is None or seed >= 0 else None)


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop")
    return [s for s in stop if s]


class StopText:
    """The generated text cut at the first stop string. push() returns what is safe to send now:
    text that could still turn out to begin a stop string is held back until it cannot."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0  # characters of text already returned
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a new match must end in the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        hold = next((k for k in range(min(self.longest - 1, len(self.text)), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# -- the engine's side (main thread) ----------------------------------------------------------
class Service:
    """Runs jobs one at a time on the main thread until SIGINT/SIGTERM."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stopping = False  # set by the signal handler: a plain flag is safe there, a lock is not
        self.current: Job | None = None  # the job on the engine now (read by /health)
        self.requests = self.prompt_tokens = self.generated_tokens = 0

    def run(self) -> None:
        while not self.stopping:
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancelled:  # its client went away while it waited its turn
                continue
            self.current = job
            try:
                self.run_job(job)
            finally:
                self.current = None
        while not self.jobs.empty():
            self.jobs.get().events.put(("error", ApiError(503, "the server is shutting down", "shutting_down")))

    def run_job(self, job: Job) -> None:
        """Errors in the request become ("error", ...); a failure in a forward pass propagates
        (run.drive ends the whole job: the workers are inside collectives)."""
        engine = self.engine
        try:
            ids = job.prompt(engine)
        except MpillamaError as e:
            job.events.put(("error", bad(str(e))))
            return
        if not ids:
            job.events.put(("error", bad("the prompt is empty", "prompt")))
            return
        if len(ids) >= engine.max_seq_len:
            job.events.put(("error", bad(f"the prompt has {len(ids)} tokens but the context (--max-seq-len) is "
                                         f"{engine.max_seq_len}: shorten it or restart the server with a larger "
                                         "--max-seq-len", code="context_length_exceeded")))
            return
        job.events.put(("start", None))
        text = StopText(job.stops)

        def send(piece: str) -> None:
            if safe := text.push(piece):
                job.events.put(("text", safe))

        # a resent conversation only pays for its new tokens: the engine keeps the shared prefix's K/V rows
        gen = engine.generate(ids, job.max_tokens or engine.max_seq_len, job.sampler, on_text=send,
                              until=lambda: text.stopped or job.cancelled or self.stopping)
        if rest := text.flush():
            job.events.put(("text", rest))
        finish = "length" if gen.stop_reason in ("steps", "context") else "stop"
        job.events.put(("end", Outcome(finish, len(ids), len(gen.tokens), gen.cached_tokens)))
        self.requests += 1
        self.prompt_tokens += len(ids)
        self.generated_tokens += len(gen.tokens)


# -- connections ------------------------------------------------------------------------------
class DeadlineInput(io.RawIOBase):
    """A socket's input with one deadline for a whole phase (an idle keep-alive wait, then one
    request's headers and body): a client that trickles bytes cannot stretch it, as it could a
    timeout per read. Past the deadline a read raises TimeoutError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = 0.0  # time.monotonic() value; set before every phase

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # past the deadline, what arrived in time (while the connection waited for a thread) still counts
        self.sock.settimeout(max(0.0, self.deadline - time.monotonic()))
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:
            raise TimeoutError("the read deadline passed") from None


class TimedOutput(io.RawIOBase):
    """A socket's output: a client that takes more than `timeout` seconds to take a write is dropped."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.timeout = sock, timeout

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)
        return len(data)


def peer_gone(sock: socket.socket) -> bool:
    """Whether the client closed its side or the connection broke, seen without reading (input
    that is there, such as a next request, stays). A client that only half-closes counts as gone,
    as in Go's net/http: a request cannot be told apart from one whose client left."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class Closer:
    """Closes connections without a reset, on its own thread. Closing a socket whose input is
    unread makes the kernel send a reset, which can destroy the response before the client has
    read it; so the closer sends what is left to say (a 503), ends the output, then reads and
    drops the client's input until the client closes too or LINGER_S pass."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.wake_in, self.wake_out = socket.socketpair()
        for s in (self.wake_in, self.wake_out):
            s.setblocking(False)
        self.selector.register(self.wake_in, selectors.EVENT_READ)
        self.arrivals: queue.SimpleQueue[tuple[socket.socket, bytes]] = queue.SimpleQueue()
        self.deadlines: dict[socket.socket, float] = {}
        threading.Thread(target=self.loop, name="http-closer", daemon=True).start()

    def close(self, sock: socket.socket, reply: bytes = b"") -> None:
        """Any thread: hand over a connection, with the last bytes to send on it."""
        self.arrivals.put((sock, reply))
        with contextlib.suppress(BlockingIOError):  # a full wake-up pipe wakes the loop anyway
            self.wake_out.send(b"\0")

    def loop(self) -> None:
        while True:
            now = time.monotonic()
            timeout = max(0.0, min(self.deadlines.values(), default=now + 1.0) - now)
            for key, _ in self.selector.select(timeout):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if sock is not self.wake_in and not data:
                    self.drop(sock)
            while not self.arrivals.empty():
                self.linger(*self.arrivals.get())
            now = time.monotonic()
            for sock in [s for s, deadline in self.deadlines.items() if deadline <= now]:
                self.drop(sock)

    def linger(self, sock: socket.socket, reply: bytes) -> None:
        try:
            sock.setblocking(False)
            if reply:
                sock.send(reply)  # a few hundred bytes: the send buffer of a new connection takes them whole
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self.deadlines) >= MAX_LINGERING:
            sock.close()
            return
        self.selector.register(sock, selectors.EVENT_READ)
        self.deadlines[sock] = time.monotonic() + LINGER_S

    def drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        del self.deadlines[sock]
        sock.close()


@dataclass(frozen=True)
class HttpOptions:
    """The serve command's HTTP settings (checked by http_options)."""

    host: str
    port: int
    api_key: str | None  # None: every endpoint is open
    max_clients: int  # handler threads: connections served at once
    read_timeout: float  # seconds to send a request; an idle keep-alive connection closes after it too


class ApiServer(socketserver.TCPServer):
    """Accepts on one thread and never blocks there: an admitted connection waits in a queue for
    one of max_clients handler threads; when max_clients * (1 + WAITING_PER_THREAD) connections
    are admitted, a new one gets 503 with Retry-After at once. So a crowd of clients costs
    neither threads nor resets."""

    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, service: Service, run: RunConfig, model: str, options: HttpOptions) -> None:
        super().__init__((options.host, options.port), Handler)
        self.service, self.run, self.model, self.options = service, run, model, options
        self.started = int(time.time())
        self.capacity = options.max_clients * (1 + WAITING_PER_THREAD)
        self.waiting: queue.SimpleQueue[tuple[socket.socket, Any, float]] = queue.SimpleQueue()  # with accept time
        self.admitted = 0  # connections in the queue or on a handler thread
        self.lock = threading.Lock()
        self.turned_away, self.last_busy_log = 0, 0.0
        self.closer = Closer()
        busy = ApiError(503, f"the server is busy ({options.max_clients} clients served at once and "
                             f"{self.capacity - options.max_clients} waiting): retry after {RETRY_AFTER_S} s",
                        "server_busy")
        body = json.dumps(busy.body()).encode()
        self.busy_reply = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\n"
                           "Connection: close\r\n\r\n").encode() + body
        for i in range(options.max_clients):
            threading.Thread(target=self.work, name=f"http-{i}", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accepting thread: admit the connection or turn it away, never wait."""
        with self.lock:
            admit = self.admitted < self.capacity
            self.admitted += admit
        if admit:
            self.waiting.put((request, client_address, time.monotonic()))
            return
        self.closer.close(request, self.busy_reply)
        self.turned_away += 1
        if time.monotonic() - self.last_busy_log > 1.0:  # one line per second of crowding, not one per client
            self.last_busy_log = time.monotonic()
            log(f"mpillama: busy: 503 to {client_address[0]} (all {self.capacity} places taken; "
                f"{self.turned_away} turned away so far)")

    def work(self) -> None:
        """A handler thread: serve admitted connections one after the other."""
        while True:
            request, client_address, accepted = self.waiting.get()
            try:
                Handler(request, client_address, self, accepted)
            except Exception:  # noqa: BLE001 - one connection's failure must not end the thread
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self.lock:
                    self.admitted -= 1

    def crowded(self) -> bool:
        """Connections wait for a handler thread: a finished keep-alive connection should make room."""
        return not self.waiting.empty()

    def shutdown_request(self, request: Any) -> None:
        self.closer.close(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log(f"mpillama: request from {client_address[0]} failed: {sys.exc_info()[1]!r}")


# -- the HTTP side (handler threads) ----------------------------------------------------------
class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


@dataclass
class Reply:
    """The response objects of one completion or chat request."""

    chat: bool
    model: str
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def whole(self, text: str, outcome: Outcome) -> dict[str, Any]:
        choice = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._wrap("chat.completion" if self.chat else "text_completion", choice, outcome.finish_reason,
                          usage=outcome.usage())

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            choice = {"delta": {"role": "assistant"} if role else {} if text is None else {"content": text}}
        else:
            choice = {"text": text or ""}
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", choice, finish)

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        body = self._wrap("chat.completion.chunk" if self.chat else "text_completion", None, None)
        return {**body, "choices": [], "usage": outcome.usage()}

    def _wrap(self, kind: str, choice: dict[str, Any] | None, finish: str | None, **extra: Any) -> dict[str, Any]:
        choices = [{"index": 0, **(choice or {}), "logprobs": None, "finish_reason": finish}]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}


class Handler(BaseHTTPRequestHandler):
    """One connection, on a handler thread: HTTP/1.1 keep-alive, any number of requests in turn."""

    server: ApiServer
    server_version = "mpillama"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line back

    def __init__(self, request: Any, client_address: Any, server: ApiServer, accepted: float) -> None:
        self.idle_since = accepted  # a new client has read_timeout from its connection to send a request
        super().__init__(request, client_address, server)  # serves the connection until it closes

    def version_string(self) -> str:
        return self.server_version  # the Server header does not advertise the Python version

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # server-sent events go out at once
        self.input = DeadlineInput(self.connection)
        self.rfile = io.BufferedReader(self.input)
        self.wfile = TimedOutput(self.connection, self.server.options.read_timeout)

    def handle_one_request(self) -> None:
        timeout = self.server.options.read_timeout
        self.input.deadline = self.idle_since + timeout  # waiting for a request: an idle connection closes after this
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        except OSError:  # idle too long (TimeoutError), or the client went away: close without a word
            self.raw_requestline = b""
        if not self.raw_requestline:
            self.close_connection = True
            return
        self.input.deadline = time.monotonic() + timeout  # the rest of the request: its headers and body
        self.chunked, self.body_read = False, False
        try:
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self.send_error(414, f"the request line is longer than {MAX_LINE} bytes")
            elif self.parse_request():  # else it has sent the error
                self.dispatch(self.command)
        except TimeoutError:
            with contextlib.suppress(OSError):
                self.send_error(408, f"the request headers did not arrive within {timeout:g} s (--read-timeout)")
        except OSError:
            self.close_connection = True
        self.idle_since = time.monotonic()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request from dispatch() instead

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or headers): JSON, then the connection closes."""
        self.close_connection = True
        text = message or self.responses.get(code, ("the request is malformed",))[0]
        self.send_json(code, ApiError(code, text, "timeout" if code == 408 else "bad_request").body())
        log(f"mpillama: {self.requestline[:200]!r} {code} {text}")

    def dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        path = urlsplit(self.path).path
        self.status, detail, route = 0, "", None
        try:
            self.route = path.removeprefix("/v1").rstrip("/")
            route = ROUTES.get("/models/*" if self.route.startswith("/models/") else self.route)
            if route is None or route[1] is not health:
                self.check_key()
            if route is None:
                raise ApiError(404, f"no endpoint {path[:200]}: use /health, /v1/models, /v1/completions or "
                                    "/v1/chat/completions", "not_found")
            allowed, serve = route
            if method != allowed:
                raise ApiError(405, f"{method[:20]} is not allowed on {path[:200]}: use {allowed}", "method_not_allowed")
            detail = serve(self)
        except ApiError as e:
            self.refuse(e, allow=route[0] if e.status == 405 and route else None)
            detail = e.message
        except ClientGone as e:
            self.close_connection = True
            detail = str(e)
        except OSError as e:  # the client went away, or stopped reading (TimeoutError)
            self.close_connection = True
            detail = f"connection lost: {e!r}"
        finally:
            log(f"mpillama: {method[:20]} {path[:200]} {self.status or '-'} {detail + ' ' if detail else ''}"
                f"{time.perf_counter() - t0:.2f} s")

    def check_key(self) -> None:
        key = self.server.options.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "this server needs an API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key")
        if not hmac.compare_digest(given.strip().encode("latin-1"), key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    def refuse(self, error: ApiError, allow: str | None = None) -> None:
        if not self.body_read and (self.headers.get("Content-Length", "0").strip() != "0"
                                   or "Transfer-Encoding" in self.headers):
            self.close_connection = True  # the unread body would be taken for the next request
        extra = {"Allow": allow} if allow else {}
        if error.status == 401:
            extra["WWW-Authenticate"] = "Bearer"
        self.send_json(error.status, error.body(), extra)

    def head(self, status: int, content_type: str, length: int | None, extra: dict[str, str] | None = None) -> None:
        """The status line and headers. Without a length the body is chunked (HTTP/1.1) or ends
        with the connection (HTTP/1.0)."""
        if self.server.crowded() or self.server.service.stopping or self.request_version < "HTTP/1.1":
            self.close_connection = True  # make room for a waiting client; 1.0 clients get one request each
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        elif not self.close_connection:
            self.send_header("Transfer-Encoding", "chunked")
            self.chunked = True
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.status = status

    def send_json(self, status: int, obj: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.head(status, "application/json", len(data), extra)
        self.wfile.write(data)

    def send_part(self, data: bytes) -> None:
        """A piece of a body sent without a length; b"" ends it."""
        if self.chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)

    def read_json(self) -> dict[str, Any]:
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            raise bad("chunked request bodies are not supported: send the JSON body with a Content-Length header",
                      code="missing_length")
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
            given = f"Content-Length {', '.join(lengths)[:40]!r} is not" if lengths else "there is no Content-Length:"
            raise bad(f"{given} one number of bytes: send the JSON body with one Content-Length header",
                      code="missing_length")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}", "too_large")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the request body ({length} bytes) did not arrive within "
                                f"{self.server.options.read_timeout:g} s (--read-timeout)", "timeout") from None
        if len(raw) < length:
            raise bad(f"the request body ended after {len(raw)} of its {length} bytes", code="incomplete_body")
        self.body_read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", code="invalid_json")
        return body

    def next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; meanwhile, every POLL_S, check that the client is still there
        (ClientGone if not). A client that reads nothing before the answer is whole is only
        seen leaving this way."""
        while True:
            try:
                event: tuple[str, Any] | None = job.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + POLL_S
                if peer_gone(self.connection):
                    raise ClientGone("client went away")
            if event is not None:
                return event

    def answer(self, job: Job, reply: Reply, stream: bool, include_usage: bool) -> str:
        """Queue the job, then send what it produces: one JSON object, or server-sent events.
        A client that goes away cancels its job: the engine stops at its next token."""
        service = self.server.service
        if service.stopping:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        self.next_check = time.monotonic() + POLL_S
        service.jobs.put(job)
        try:
            kind, error = self.next_event(job)
        except ClientGone:
            job.cancelled = True  # the engine skips it when its turn comes
            raise ClientGone("client went away while waiting its turn") from None
        if kind == "error":
            raise error
        pieces: list[str] = []
        try:
            if stream:
                self.head(200, "text/event-stream", None, {"Cache-Control": "no-cache"})
                if reply.chat:
                    self.send_event(reply.chunk(role=True))
            while (event := self.next_event(job))[0] == "text":
                pieces.append(event[1])
                if stream:
                    self.send_event(reply.chunk(event[1]))
        except (ClientGone, OSError):
            job.cancelled = True
            while (event := job.events.get())[0] != "end":  # comes after the next token at most
                pass
            done: Outcome = event[1]
            raise ClientGone(f"client went away; stopped after {done.prompt_tokens}+{done.completion_tokens} "
                             "tokens") from None
        outcome: Outcome = event[1]
        if stream:
            self.send_event(reply.chunk(finish=outcome.finish_reason))
            if include_usage:
                self.send_event(reply.usage_chunk(outcome))
            self.send_part(b"data: [DONE]\n\n")
            self.send_part(b"")
        else:
            self.send_json(200, reply.whole("".join(pieces), outcome))
        return f"{outcome.prompt_tokens}+{outcome.completion_tokens} tokens ({outcome.cached_tokens} cached)"

    def send_event(self, obj: dict[str, Any]) -> None:
        self.send_part(b"data: " + json.dumps(obj).encode() + b"\n\n")


def health(h: Handler) -> str:
    service = h.server.service
    h.send_json(200, {"status": "ok", "generating": service.current is not None, "waiting": service.jobs.qsize()})
    return ""


def model_card(server: ApiServer) -> dict[str, Any]:
    return {"id": server.model, "object": "model", "created": server.started, "owned_by": "mpillama"}


def models(h: Handler) -> str:
    h.send_json(200, {"object": "list", "data": [model_card(h.server)]})
    return ""


def one_model(h: Handler) -> str:
    wanted = unquote(h.route.removeprefix("/models/"))
    if wanted != h.server.model:
        raise ApiError(404, f"the model {wanted[:200]!r} does not exist: this server has {h.server.model!r}",
                       "model_not_found", "model")
    h.send_json(200, model_card(h.server))
    return ""


def completions(h: Handler) -> str:
    return model_request(h, completion_job, chat=False)


def chat_completions(h: Handler) -> str:
    return model_request(h, chat_job, chat=True)


def model_request(h: Handler, make_job: Callable[[dict[str, Any], RunConfig], Job], chat: bool) -> str:
    body = h.read_json()
    check_common(body)
    job = make_job(body, h.server.run)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return h.answer(job, Reply(chat, h.server.model), body.get("stream", False), include_usage)


ROUTES: dict[str, tuple[str, Callable[[Handler], str]]] = {
    "/health": ("GET", health),
    "/models": ("GET", models),
    "/models/*": ("GET", one_model),
    "/completions": ("POST", completions),
    "/chat/completions": ("POST", chat_completions),
}


def log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# -- starting and stopping --------------------------------------------------------------------
def http_options(args: Any) -> HttpOptions:
    """The serve command's HTTP flags, checked (before loading); the API key from --api-key or
    else the environment's MPILLAMA_API_KEY (empty there: none)."""
    if not 0 <= args.port <= 65535:
        raise MpillamaError(f"--port {args.port}: give a port in 0..65535 (0 picks a free one)")
    if not args.host:
        raise MpillamaError("--host is empty: give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    if not 1 <= args.max_clients <= 1024:
        raise MpillamaError(f"--max-clients {args.max_clients}: give 1..1024 (connections served at once)")
    if not (math.isfinite(args.read_timeout) and 0 < args.read_timeout <= 3600):
        raise MpillamaError(f"--read-timeout {args.read_timeout}: give seconds in (0, 3600]")
    key, where = args.api_key, "--api-key"
    if key is None:
        key, where = os.environ.get("MPILLAMA_API_KEY") or None, "MPILLAMA_API_KEY"
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):  # never quoted: it is a secret
        raise MpillamaError(f"{where}: the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return HttpOptions(args.host, args.port, key, args.max_clients, args.read_timeout)


def ignore_stop_signals() -> None:
    """Workers: SIGINT/SIGTERM (mpirun sends them to every rank) are rank 0's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve_requests(engine: Engine, run: RunConfig, model: str, options: HttpOptions) -> dict[str, Any]:
    """Rank 0: serve HTTP until SIGINT/SIGTERM; returns the run's summary (run.drive then closes the engine)."""
    service = Service(engine)
    try:
        httpd = ApiServer(service, run, model, options)
    except (OSError, OverflowError) as e:
        raise MpillamaError(f"cannot listen on {options.host}:{options.port} ({getattr(e, 'strerror', None) or e}): "
                            "choose another --port (0 picks a free one) or --host") from None

    def stop(signum: int, frame: Any) -> None:
        service.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    ranks = engine.comm.size
    say(engine.comm.rank, f"mpillama: serving {model} on http://{options.host}:{httpd.server_address[1]} "
                          f"({ranks} rank{'' if ranks == 1 else 's'}, {options.max_clients} clients at once"
                          f"{', API key required' if options.api_key else ''}); stop it with: kill {os.getpid()}")
    try:
        service.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    say(engine.comm.rank, f"mpillama: stopped after {service.requests} requests")
    return {"requests": service.requests, "prompt_tokens": service.prompt_tokens,
            "generated_tokens": service.generated_tokens}
