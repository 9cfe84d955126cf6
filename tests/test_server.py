"""`python -m mpillama serve` over real HTTP, on one rank and on two under mpirun: the OpenAI
shapes, greedy tokens equal to `generate`, streaming, stop strings, errors that leave the server
(and its workers) running, and a clean exit on SIGTERM."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpillama.cli import main
from tests.mpi_launch import ROOT, mpi_command, mpi_env

PROMPT = "The capital of France is"
STEPS = 8
MAX_SEQ_LEN = "64"
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    stderr: Path
    n_ranks: int

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def start_server(model: Path, n_ranks: int, folder: Path) -> Server:
    args = [sys.executable, "-m", "mpillama", "serve", "--model", str(model), "--port", "0",
            "--max-seq-len", MAX_SEQ_LEN]
    command = args if n_ranks == 1 else mpi_command(n_ranks, *args)
    stderr = folder / f"serve-{n_ranks}.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=mpi_env(), cwd=ROOT,
                                start_new_session=True)
    deadline = time.monotonic() + 300  # a first run compiles numba's kernels
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving \S+ on (http://[\d.]+:\d+) \((\d+) ranks\)", stderr.read_text(errors="replace"))
        if found:
            assert int(found.group(2)) == n_ranks
            return Server(proc, found.group(1), stderr, n_ranks)
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
         method: str | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
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
    assert ok_json(server, "/health") == {"status": "ok"}
    listing = ok_json(server, "/v1/models")
    assert listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [("tiny-q40.gguf", "model", "mpillama")]


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
    too_long = error_of(server, 400, "/v1/completions", {"prompt": "word " * 100})
    assert "--max-seq-len" in too_long and MAX_SEQ_LEN in too_long
    assert "no endpoint" in error_of(server, 404, "/v1/embeddings", {"input": "hi"})
    assert "use POST" in error_of(server, 405, "/v1/completions", method="GET")
    assert "use GET" in error_of(server, 405, "/health", {})
    # the model still answers, with the same tokens
    reply = ok_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS})
    assert reply["choices"][0]["text"] == expected
    log = server.log()
    assert re.search(r"mpillama: POST /v1/completions 400 .*'prompt' is required", log)
    assert re.search(r"mpillama: POST /v1/completions 200 \d+\+8 tokens", log)


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


def rank0_pid(launcher: int) -> int:
    """The process of rank 0 among the launcher's descendants (its MPI environment says so)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    family, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    for pid in family:
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"mpillama" in Path(f"/proc/{pid}/cmdline").read_bytes() and (
                    {b"OMPI_COMM_WORLD_RANK=0", b"PMI_RANK=0", b"PMIX_RANK=0"} & set(env)):
                return pid
    raise AssertionError(f"no rank 0 under process {launcher}")


def test_sigterm_stops_the_server_cleanly(server: Server) -> None:
    """Runs last for each server (pytest keeps file order within a module-scoped parameter)."""
    pid = server.proc.pid if server.n_ranks == 1 else rank0_pid(server.proc.pid)
    os.kill(pid, signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
    log = server.log()
    assert "mpillama: stopped after" in log and "memory per rank" in log
    assert "Traceback" not in log and "mpillama: error" not in log
