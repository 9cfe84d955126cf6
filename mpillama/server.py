"""The OpenAI-compatible HTTP API of `python -m mpillama serve`, on rank 0.

Owns the HTTP side: reading and checking requests, the JSON and server-sent-event shapes of
/v1/completions and /v1/chat/completions (plus /health and /v1/models), stop strings, and the
queue that hands the engine one request at a time. The engine runs only on the main thread
(where MPI was initialised and where signals arrive); HTTP handler threads put a Job on the
queue and read its events back (the start, text pieces, the end). The other ranks follow in
Engine.worker_loop, as for generate (run.drive).

Imports the stdlib, engine, chat, sampler, config and errors; never mpi4py.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

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
        self.requests = self.prompt_tokens = self.generated_tokens = 0

    def run(self) -> None:
        while not self.stopping:
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self.run_job(job)
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


# -- the HTTP side (handler threads) ----------------------------------------------------------
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


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that never finishes its request must not hold up the exit

    def __init__(self, address: tuple[str, int], service: Service, run: RunConfig, model: str) -> None:
        super().__init__(address, Handler)
        self.service, self.run, self.model = service, run, model
        self.started = int(time.time())

    def handle_error(self, request: Any, client_address: Any) -> None:
        log(f"mpillama: request from {client_address[0]} failed: {sys.exc_info()[1]!r}")


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "mpillama"
    timeout = 60  # seconds a client may take to send its request or read a chunk

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request from dispatch() instead

    def dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        path = urlsplit(self.path).path
        self.status, detail = 0, ""
        try:
            route = ROUTES.get(path.removeprefix("/v1").rstrip("/"))
            if route is None:
                raise ApiError(404, f"no endpoint {path}: use /health, /v1/models, /v1/completions or "
                                    "/v1/chat/completions", "not_found")
            allowed, serve = route
            if method != allowed:
                raise ApiError(405, f"{method} is not allowed on {path}: use {allowed}", "method_not_allowed")
            detail = serve(self)
        except ApiError as e:
            self.send_json(e.status, e.body(), allow=route[0] if e.status == 405 and route else None)
            detail = e.message
        except OSError as e:  # the client went away or timed out
            detail = f"connection lost: {e!r}"
        finally:
            log(f"mpillama: {method} {path} {self.status or '-'} {detail + ' ' if detail else ''}"
                f"{time.perf_counter() - t0:.2f} s")

    def send_json(self, status: int, obj: dict[str, Any], allow: str | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(data)
        self.status = status

    def read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise bad("send the JSON body with a Content-Length header", code="missing_length") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}", "too_large")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", code="invalid_json")
        return body

    def answer(self, job: Job, reply: Reply, stream: bool, include_usage: bool) -> str:
        """Queue the job, then send what it produces: one JSON object, or server-sent events."""
        service = self.server.service
        if service.stopping:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        service.jobs.put(job)
        kind, error = job.events.get()
        if kind == "error":
            raise error
        pieces: list[str] = []
        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.status = 200
        try:
            if stream and reply.chat:
                self.send_event(reply.chunk(role=True))
            while (event := job.events.get())[0] == "text":
                pieces.append(event[1])
                if stream:
                    self.send_event(reply.chunk(event[1]))
        except OSError:
            job.cancelled = True
            raise
        outcome: Outcome = event[1]
        if stream:
            self.send_event(reply.chunk(finish=outcome.finish_reason))
            if include_usage:
                self.send_event(reply.usage_chunk(outcome))
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self.send_json(200, reply.whole("".join(pieces), outcome))
        return f"{outcome.prompt_tokens}+{outcome.completion_tokens} tokens ({outcome.cached_tokens} cached)"

    def send_event(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def health(h: Handler) -> str:
    h.send_json(200, {"status": "ok"})
    return ""


def models(h: Handler) -> str:
    h.send_json(200, {"object": "list", "data": [{"id": h.server.model, "object": "model", "created": h.server.started,
                                                  "owned_by": "mpillama"}]})
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
    "/completions": ("POST", completions),
    "/chat/completions": ("POST", chat_completions),
}


def log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# -- starting and stopping --------------------------------------------------------------------
def check_address(host: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise MpillamaError(f"--port {port}: give a port in 0..65535 (0 picks a free one)")
    if not host:
        raise MpillamaError("--host is empty: give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")


def ignore_stop_signals() -> None:
    """Workers: SIGINT/SIGTERM (mpirun sends them to every rank) are rank 0's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve_requests(engine: Engine, run: RunConfig, model: str, host: str, port: int) -> dict[str, Any]:
    """Rank 0: serve HTTP until SIGINT/SIGTERM; returns the run's summary (run.drive then closes the engine)."""
    service = Service(engine)
    try:
        httpd = ApiServer((host, port), service, run, model)
    except (OSError, OverflowError) as e:
        raise MpillamaError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}): "
                            "choose another --port (0 picks a free one) or --host") from None

    def stop(signum: int, frame: Any) -> None:
        service.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    say(engine.comm.rank, f"mpillama: serving {model} on http://{host}:{httpd.server_address[1]} ({engine.comm.size} ranks)")
    try:
        service.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    say(engine.comm.rank, f"mpillama: stopped after {service.requests} requests")
    return {"requests": service.requests, "prompt_tokens": service.prompt_tokens,
            "generated_tokens": service.generated_tokens}
