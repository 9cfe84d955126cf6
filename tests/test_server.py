"""`python -m mpillama serve` over real HTTP, on one rank and on two under mpirun: the OpenAI
shapes, greedy tokens equal to `generate`, streaming, stop strings, errors that leave the server
(and its workers) running, the API key, keep-alive, a crowd of clients and clients that are slow,
idle or leave (answered, cut off, their generation cancelled), and a clean exit on SIGTERM.

The servers run with few handler threads and a short read timeout so that these limits are
reached quickly; no assertion depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpillama.cli import main
from tests.mpi_launch import ROOT, mpi_command, mpi_env

PROMPT = "The capital of France is"
STEPS = 8
MAX_SEQ_LEN = "512"  # room for a long generation (the tiny models' own limit)
MAX_CLIENTS = 2  # the servers' handler threads; 4 times as many connections may wait for one
CAPACITY = MAX_CLIENTS * 5
READ_TIMEOUT = 2.0
KEY = "test-key-123"
LONG = 500  # tokens of a generation that a client abandons, on one rank (oversubscribed ranks are slower)
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    stderr: Path
    n_ranks: int
    pid: int  # rank 0's, from the banner

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


BANNER = re.compile(r"serving \S+ on (http://[\d.]+:\d+) \((\d+) (rank|ranks), (\d+) clients at once, API key "
                    r"required\); stop it with: kill (\d+)\n")


def start_server(model: Path, n_ranks: int, folder: Path) -> Server:
    """One rank takes the API key from --api-key, two from the environment."""
    args = [sys.executable, "-m", "mpillama", "serve", "--model", str(model), "--port", "0",
            "--max-seq-len", MAX_SEQ_LEN, "--max-clients", str(MAX_CLIENTS), "--read-timeout", str(READ_TIMEOUT)]
    command = args + ["--api-key", KEY] if n_ranks == 1 else mpi_command(n_ranks, *args)
    env = mpi_env() if n_ranks == 1 else mpi_env(MPILLAMA_API_KEY=KEY)
    stderr = folder / f"serve-{n_ranks}.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT,
                                start_new_session=True)
    deadline = time.monotonic() + 300  # a first run compiles numba's kernels
    while time.monotonic() < deadline and proc.poll() is None:
        found = BANNER.search(stderr.read_text(errors="replace"))
        if found:
            assert int(found.group(2)) == n_ranks and found.group(3) == ("rank" if n_ranks == 1 else "ranks")
            assert int(found.group(4)) == MAX_CLIENTS
            return Server(proc, found.group(1), stderr, n_ranks, int(found.group(5)))
        time.sleep(0.1)
    stop(proc)
    raise AssertionError(f"the server did not start:\n{stderr.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Last resort: end the server's whole process group (mpirun and its ranks)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def server(request: pytest.FixtureRequest, models: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(models["tiny-q40"], request.param, tmp_path_factory.mktemp("serve"))
    try:
        yield srv
    finally:
        stop(srv.proc)


@pytest.fixture(scope="module")
def expected(models: dict[str, Path]) -> str:
    """What `generate` writes for PROMPT and STEPS tokens on one rank (greedy), without its newline."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--model", str(models["tiny-q40"]), "--prompt", PROMPT, "--steps", str(STEPS),
                     "--max-seq-len", MAX_SEQ_LEN])
    assert code == 0
    text = out.getvalue()
    assert text.endswith("\n") and len(text) > 10
    return text[:-1]


def call(srv: Server, path: str, body: Any = None, raw: bytes | None = None,
         method: str | None = None, key: str | None = KEY) -> tuple[int, bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ok_json(srv: Server, path: str, body: Any = None) -> dict[str, Any]:
    """GET (no body) or POST a JSON body; the answer must be 200."""
    status, data = call(srv, path, body)
    assert status == 200, data
    return json.loads(data)


def events(srv: Server, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed answer; checks it ends with [DONE]."""
    status, data = call(srv, path, {**body, "stream": True})
    assert status == 200, data
    lines = [line for line in data.decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), data
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def error_of(srv: Server, status: int, path: str, body: Any = None, **kw: Any) -> str:
    got, data = call(srv, path, body, **kw)
    assert got == status, data
    error = json.loads(data)["error"]
    assert error["type"] == "invalid_request_error"
    return error["message"]


def test_health_and_models(server: Server) -> None:
    assert ok_json(server, "/health") == {"status": "ok", "generating": False, "waiting": 0}
    listing = ok_json(server, "/v1/models")
    assert listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [("tiny-q40.gguf", "model", "mpillama")]
    assert ok_json(server, "/v1/models/tiny-q40.gguf") == listing["data"][0]
    status, data = call(server, "/v1/models/gpt-4")
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found", data


def test_the_api_key_guards_all_but_health(server: Server) -> None:
    assert call(server, "/health", key=None)[0] == 200
    for key, words in ((None, "Authorization: Bearer"), ("wrong-key", "incorrect")):
        for path, body in (("/v1/models", None), ("/v1/completions", {"prompt": PROMPT}), ("/v1/nowhere", None)):
            status, data = call(server, path, body, key=key)
            assert status == 401, data
            error = json.loads(data)["error"]
            assert error["code"] == "invalid_api_key" and words in error["message"]
    assert ok_json(server, "/v1/models")["data"]


def test_greedy_completion_is_what_generate_writes(server: Server, expected: str) -> None:
    body = {"model": "any", "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0}
    reply = ok_json(server, "/v1/completions", body)
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    assert reply["choices"] == [{"index": 0, "text": expected, "logprobs": None, "finish_reason": "length"}]
    usage = reply["usage"]
    assert usage["completion_tokens"] == STEPS and usage["total_tokens"] == usage["prompt_tokens"] + STEPS
    # the same prompt again, streamed: it comes from the cache but for its last token
    chunks = events(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_chat_streamed_equals_whole_and_reuses_the_cache(server: Server) -> None:
    body = {"model": "any", "messages": HELLO, "max_completion_tokens": 6}
    whole = ok_json(server, "/v1/chat/completions", body)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    (choice,) = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 6

    chunks = events(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert "".join(d["content"] for d in deltas) == choice["message"]["content"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"] and usage["completion_tokens"] == 6
    # the conversation was resent: all its tokens but the last came from the KV cache
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_stop_strings_cut_the_text(server: Server, expected: str) -> None:
    cut = len(expected) // 2
    stop = expected[cut : cut + 3]
    at = expected.find(stop)
    body = {"prompt": PROMPT, "max_tokens": STEPS, "stop": ["never-in-the-text", stop]}
    reply = ok_json(server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == expected[:at]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < STEPS
    chunks = events(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected[:at]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    missing = ok_json(server, "/v1/completions", {**body, "stop": "never-in-the-text"})
    assert missing["choices"][0]["text"] == expected and missing["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_take_turns(server: Server, expected: str) -> None:
    chat = {"messages": HELLO, "max_tokens": 4}
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS}),
                              range(3)))
        streams = list(pool.map(lambda _: events(server, "/v1/chat/completions", chat), range(3)))
    assert [t["choices"][0]["text"] for t in texts] == [expected] * 3
    answers = {"".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
               for chunks in streams}
    assert len(answers) == 1 and answers != {""}


def test_bad_requests_are_refused_and_the_server_goes_on(server: Server, expected: str) -> None:
    assert "not valid JSON" in error_of(server, 400, "/v1/completions", raw=b"{not json")
    assert "'prompt' is required" in error_of(server, 400, "/v1/completions", {"max_tokens": 2})
    assert "'messages'" in error_of(server, 400, "/v1/chat/completions", {"messages": "hi"})
    assert "'max_tokens'" in error_of(server, 400, "/v1/completions", {"prompt": "hi", "max_tokens": "ten"})
    assert "'top_p'" in error_of(server, 400, "/v1/completions", {"prompt": "hi", "top_p": 2})
    assert "not supported" in error_of(server, 400, "/v1/completions", {"prompt": "hi", "n": 2})
    too_long = error_of(server, 400, "/v1/completions", {"prompt": "word " * int(MAX_SEQ_LEN)})
    assert "--max-seq-len" in too_long and MAX_SEQ_LEN in too_long
    assert "no endpoint" in error_of(server, 404, "/v1/embeddings", {"input": "hi"})
    assert "use POST" in error_of(server, 405, "/v1/completions", method="GET")
    assert "use GET" in error_of(server, 405, "/health", {})
    with opened(server, b"GARBAGE\r\n\r\n") as sock:
        answer = read_all(sock)
    assert status_of(answer) == 400 and "Bad request syntax" in json_of(answer)["error"]["message"]
    # the model still answers, with the same tokens
    reply = ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})
    assert reply["choices"][0]["text"] == expected
    log = server.log()
    assert re.search(r"mpillama: POST /v1/completions 400 .*'prompt' is required", log)
    assert re.search(r"mpillama: POST /v1/completions 200 \d+\+8 tokens", log)


def test_keep_alive_serves_requests_in_turn_on_one_connection(server: Server, expected: str) -> None:
    conn = http.client.HTTPConnection(*server.address, timeout=120)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def request(method: str, path: str, body: Any = None) -> tuple[http.client.HTTPResponse, bytes]:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response, response.read()

    try:
        response, _ = request("GET", "/v1/models")
        assert response.status == 200 and response.getheader("Connection") is None
        sock = conn.sock
        _, data = request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})
        assert json.loads(data)["choices"][0]["text"] == expected
        response, data = request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS, "stream": True})
        assert response.getheader("Transfer-Encoding") == "chunked" and data.endswith(b"data: [DONE]\n\n")
        assert "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                       for line in data.decode().split("\n\n") if line.startswith("data: {")) == expected
        response, _ = request("POST", "/v1/completions", {"prompt": 5})  # a refusal whose body was read
        assert response.status == 400
        response, data = request("GET", "/health")
        assert response.status == 200
        assert conn.sock is sock  # http.client opens a new connection when the server has closed one
    finally:
        conn.close()
    # pipelined: the second request is sent before the first is answered; answers come in order
    with opened(server, f"GET /v1/models/tiny-q40.gguf HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n\r\n"
                        .encode() + post_bytes({"prompt": PROMPT, "max_tokens": STEPS}).replace(
                            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)) as sock:
        first, second = read_all(sock).split(b"HTTP/1.1 ")[1:]
    assert json_of(b"HTTP/1.1 " + first)["id"] == "tiny-q40.gguf"
    assert json_of(b"HTTP/1.1 " + second)["choices"][0]["text"] == expected


def read_all(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection; a reset fails the test."""
    sock.settimeout(60)  # only ends a hung test
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def opened(srv: Server, data: bytes) -> socket.socket:
    sock = socket.create_connection(srv.address)
    sock.sendall(data)
    return sock


def post_bytes(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Poll until check() gives something true: waits on an event; the bound only ends a hung test."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def test_a_crowd_of_clients_is_answered_and_the_server_goes_on(server: Server, expected: str) -> None:
    """200 clients at once, far more than the places: each gets 200, or 503 with Retry-After; no
    reset, no new thread; then the server is idle and gives the same greedy text."""
    host, port = server.address
    request = post_bytes({"prompt": PROMPT, "max_tokens": 2}).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    threads = threads_of(server.pid)

    async def client() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        try:
            return await reader.read()  # until the server closes; a reset raises
        finally:
            writer.close()

    async def crowd() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(client() for _ in range(200))), 300)

    answers = asyncio.run(crowd())
    statuses = Counter(status_of(a) for a in answers)
    assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses
    for answer in answers:
        if status_of(answer) == 503:
            assert b"\r\nRetry-After: 1\r\n" in answer and json_of(answer)["error"]["code"] == "server_busy"
        else:
            assert json_of(answer)["usage"]["completion_tokens"] == 2
    assert threads_of(server.pid) == threads
    assert ok_json(server, "/health") == {"status": "ok", "generating": False, "waiting": 0}
    assert ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})["choices"][0]["text"] == expected


def test_idle_connections_take_no_thread_and_are_closed(server: Server) -> None:
    """More idle connections than places: those beyond get 503 at once, the admitted ones are
    closed without a word (they started no request) after the read timeout; no thread is started.
    A client turned away while sending a body larger than the socket buffers still reads its 503
    (a server that closes with unread input sends a reset instead)."""
    threads = threads_of(server.pid)
    start = time.monotonic()
    socks = [socket.create_connection(server.address) for _ in range(CAPACITY + 30)]
    try:
        assert status_of(read_all(socks[-1])) == 503  # at most CAPACITY are admitted, in connection order
        assert threads_of(server.pid) == threads  # every connection has been accepted by now
        with socket.create_connection(server.address) as big:
            big.sendall(post_bytes({"prompt": "word " * 400_000, "max_tokens": 1}))
            full = time.monotonic() - start < READ_TIMEOUT  # else the admitted idle ones may have timed out
            # turned away: its 503 arrives whole, not a reset; a loaded machine may have freed a place
            # (the idle ones' read timeout passed), and then the request itself is answered: too long
            assert status_of(read_all(big)) in ((503,) if full else (503, 400))
        answers = [read_all(sock) for sock in socks[:-1]]
    finally:
        for sock in socks:
            sock.close()
    turned_away = [a for a in answers if a]
    assert all(status_of(a) == 503 for a in turned_away)
    assert len(answers) - CAPACITY <= len(turned_away) < len(answers), len(turned_away)
    assert ok_json(server, "/health")["status"] == "ok"


def test_slow_clients_are_cut_off_at_the_read_timeout(server: Server, expected: str) -> None:
    """A body that never comes, or headers trickled a byte at a time (which a timeout per read
    would never stop) get 408 and their connection closes, freeing its thread; a Content-Length
    of -1 or garbage gets 400 at once. The server answers normally after."""
    head = post_bytes({}).split(b"Content-Length")[0]
    minus_one = opened(server, head + b"Content-Length: -1\r\n\r\n{}")
    garbage = opened(server, head + b"Content-Length: 12abc\r\n\r\n{}")
    no_body = opened(server, head + b"Content-Length: 10\r\n\r\n")
    trickle = opened(server, head + b"X-Slow: ")
    for _ in range(1200):  # a byte per 0.05 s until the answer comes
        if select.select([trickle], [], [], 0.05)[0]:
            break
        trickle.send(b"a")
    else:
        raise AssertionError("a client trickling its headers was not cut off in 60 s")
    answers = {name: read_all(sock) for name, sock in (("minus_one", minus_one), ("garbage", garbage),
                                                       ("no_body", no_body), ("trickle", trickle))}
    for sock in (minus_one, garbage, no_body, trickle):
        sock.close()
    assert {name: status_of(a) for name, a in answers.items()} == {
        "minus_one": 400, "garbage": 400, "no_body": 408, "trickle": 408}
    assert "'-1' is not one number of bytes" in json_of(answers["minus_one"])["error"]["message"]
    assert "did not arrive within 2 s (--read-timeout)" in json_of(answers["no_body"])["error"]["message"]
    assert all(b"\r\nConnection: close\r\n" in a for a in answers.values())
    assert ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})["choices"][0]["text"] == expected


def cancelled(srv: Server) -> list[int]:
    """The completion tokens of every request the server cancelled because its client left."""
    return [int(n) for n in re.findall(r"client went away; stopped after \d+\+(\d+) tokens", srv.log())]


def test_a_client_that_leaves_cancels_its_generation(server: Server, expected: str) -> None:
    """A non-streaming client that goes away mid-generation: the next request does not wait for
    the abandoned one's tokens (compared with the time they take, measured here)."""
    tokens = LONG // server.n_ranks
    long = {"prompt": PROMPT, "max_tokens": tokens}
    t0 = time.monotonic()
    assert ok_json(server, "/v1/completions", long)["usage"]["completion_tokens"] == tokens
    long_s = time.monotonic() - t0
    before = len(cancelled(server))
    abandoned = opened(server, post_bytes(long))
    wait_for(lambda: ok_json(server, "/health")["generating"], "the abandoned request to start")
    abandoned.close()
    t1 = time.monotonic()
    assert ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})["choices"][0]["text"] == expected
    next_s = time.monotonic() - t1
    assert next_s < long_s / 2, (next_s, long_s)
    stopped = wait_for(lambda: cancelled(server)[before:], "the cancellation in the log")
    assert stopped[0] < tokens


def test_a_streaming_client_that_leaves_cancels_its_generation(server: Server, expected: str) -> None:
    before = len(cancelled(server))
    stream = opened(server, post_bytes({"prompt": PROMPT, "max_tokens": LONG, "stream": True}))
    stream.settimeout(60)
    received = b""
    while b"data: {" not in received:
        received += stream.recv(65536)
    stream.close()
    stopped = wait_for(lambda: cancelled(server)[before:], "the cancellation in the log")
    assert stopped[0] < LONG
    assert ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})["choices"][0]["text"] == expected


@pytest.mark.parametrize("flags, env, words", [
    (["--max-clients", "0"], {}, "--max-clients 0"),
    (["--read-timeout", "nan"], {}, "--read-timeout nan"),
    (["--port", "70000"], {}, "--port 70000"),
    (["--api-key", ""], {}, "--api-key: the API key must be printable ASCII"),
    (["--api-key", "two words"], {}, "--api-key: the API key must be printable ASCII"),
    ([], {"MPILLAMA_API_KEY": "caf\u00e9"}, "MPILLAMA_API_KEY: the API key must be printable ASCII"),
], ids=["clients", "timeout", "port", "empty-key", "spaced-key", "env-key"])
def test_bad_serve_settings_are_one_line_before_loading(models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                        env: dict[str, str], words: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(models["tiny-q40"]), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mpillama: error: ") and words in err[0], err
    assert "two words" not in err[0] and "caf" not in err[0]  # a key is never echoed


def test_a_busy_port_is_a_one_line_error(models: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "mpillama", "serve", "--model", str(models["tiny-q40"]),
                               "--port", port], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mpillama: error:")]
    assert len(errors) == 1 and port in errors[0] and "--port" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_stops_the_server_cleanly(server: Server) -> None:
    """Runs last for each server (pytest keeps file order within a module-scoped parameter)."""
    os.kill(server.pid, signal.SIGTERM)  # the PID the banner names
    assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
    log = server.log()
    assert "mpillama: stopped after" in log and "memory per rank" in log
    assert "Traceback" not in log and "mpillama: error" not in log
