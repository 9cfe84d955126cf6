"""`python -m mpillama sweep`: grid parsing and its errors, real sweeps under mpirun on the tiny model
(every point's JSON, parameters and trace), failed and timed-out points, an interrupted sweep, the report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from mpillama.errors import MpillamaError
from mpillama.launch import Launcher, find_launcher, is_open_mpi
from mpillama.sweep import bench_program, parse_grid
from mpillama.sweep_file import PointResult, read_results, results_json, write_results
from tests.mpi_launch import ROOT, mpi_env

LAUNCHER = "[launcher]\noversubscribe = true\n"
# `python -m mpillama` that exits 99 if the sweep imported mpi4py: it launches ranks, it is never one
SWEEP = [sys.executable, "-c", "import sys; from mpillama.cli import main; rc = main(sys.argv[1:]); "
                               "sys.exit(99 if 'mpi4py' in sys.modules else rc)", "sweep"]


def grid_text(model: Path, grid: str, top: str = "") -> str:
    return f'model = "{model}"\nprompt_tokens = 8\nsteps = 4\n{top}\n{LAUNCHER}[grid]\n{grid}\n'


Done = subprocess.CompletedProcess[str]


def sweep_cli(*args: str, **env: str) -> Done:
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True,
                          env=mpi_env(**env), cwd=ROOT, timeout=600)


def read_points(path: Path) -> tuple[dict, dict[str, list]]:
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        cols = {name: [v.decode() if isinstance(v, bytes) else v for v in column[()]]
                for name, column in f["points"].items()}
    return attrs, cols


def bench_processes(token: str) -> list[str]:
    """Command lines of live launchers and ranks of `mpillama bench` that mention token (a test's folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if token in cmdline and " bench " in cmdline:
            found.append(cmdline)
    return found


# ------------------------------------------------------------------------------------------ the grid


def test_points_are_every_combination_with_ranks_outermost(models: dict[str, Path]) -> None:
    grid = 'sync = ["star", "allreduce"]\nranks = [1, 2]\nnthreads = 2'
    g = parse_grid(grid_text(models["tiny-q40"], grid), "g.toml")
    assert list(g.params) == ["ranks", "sync", "nthreads"]
    assert [(p["ranks"], p["sync"], p["nthreads"]) for p in g.points()] == [
        (1, "star", 2), (1, "allreduce", 2), (2, "star", 2), (2, "allreduce", 2)]
    assert (g.prompt_tokens, g.steps, g.repeat, g.trace, g.timeout_s) == (8, 4, 1, False, 1800.0)


def test_explicit_rank_weights_pair_with_their_rank_count(models: dict[str, Path]) -> None:
    g = parse_grid(grid_text(models["tiny-q40"], 'ranks = [1, 2, 4]\nrank_weights = ["even", [0.6, 1, 1, 1], "auto"]'),
                   "g.toml")
    assert [(p["ranks"], p["rank_weights"]) for p in g.points()] == [
        (1, None), (1, "auto"), (2, None), (2, "auto"), (4, None), (4, (0.6, 1.0, 1.0, 1.0)), (4, "auto")]
    program = bench_program(g, g.points()[5], "t.h5")
    assert program[-4:] == ["--rank-weights", "0.6,1,1,1", "--trace", "t.h5"]
    assert "--ranks" not in program and program[program.index("--steps") + 1] == "4"
    flat = parse_grid(grid_text(models["tiny-q40"], "ranks = 2\nrank_weights = [1, 3]"), "g.toml")  # one value
    assert [p["rank_weights"] for p in flat.points()] == [(1.0, 3.0)]


def test_the_launcher_gets_open_mpi_flags_only_when_it_is_open_mpi(models: dict[str, Path]) -> None:
    plain = Launcher("/bin/echo", ("--hostfile", "h"), oversubscribe=True)  # `echo --version` is not Open MPI
    assert plain.command_line(2, ["prog"]) == ["/bin/echo", "-n", "2", "--hostfile", "h", "prog"]
    mpirun = find_launcher()
    if is_open_mpi(mpirun):
        assert Launcher(mpirun).command_line(4, ["prog"]) == [mpirun, "-n", "4", "--bind-to", "none", "prog"]
        assert Launcher(mpirun, ("--bind-to", "core"), True).command_line(1, ["prog"]) == [
            mpirun, "-n", "1", "--oversubscribe", "--bind-to", "core", "prog"]
    g = parse_grid(grid_text(models["tiny-q40"], "ranks = 1"), "g.toml", ["/bin/echo", "--cpu-bind=cores"])
    assert (g.launcher.command, g.launcher.args, g.launcher.oversubscribe) == ("/bin/echo", ("--cpu-bind=cores",), True)


def test_the_example_grid_for_the_rock_cluster_is_valid(models: dict[str, Path]) -> None:
    text = (ROOT / "jobs" / "sweep-rocks.toml").read_text()
    g = parse_grid(text.replace('model = "llama3.2-1b.gguf"', f'model = "{models["tiny-q40"]}"'), "sweep-rocks.toml")
    assert len(g.points()) == 24 and g.launcher.args == ("--hostfile", "jobs/rocks.hostfile")
    assert bench_program(g, g.points()[-1], None)[:5] == ["taskset", "-c", "4-7", "python3", "-m"]


@pytest.mark.parametrize("grid, top, words", [
    ("rank = [1, 2]", "", ["unknown key 'rank'", "ranks", "sync_timeout"]),
    ("ranks = [1]", "stpes = 4", ["unknown key 'stpes'", "steps"]),
    ('nthreads = ["4"]', "", ["nthreads", "'4'", "positive integer"]),
    ("ranks = [0]", "", ["ranks", "positive integer"]),
    ("sync = [1]", "", ["sync", "string"]),
    ('sync = ["ring"]', "", ["sync", "ring", "star, allreduce"]),
    ("sync = []", "", ["sync", "at least one value"]),
    ("", "", ["[grid] is empty"]),
    ("ranks = [1, 2]\nrank_weights = [[1, 1, 1]]", "", ["rank_weights", "3 weights", "no ranks value of 3"]),
    ('rank_weights = ["fast"]', "", ["rank_weights", "fast", "one per rank"]),
    ('profile = ["no-such-profile"]', "", ["profile", "no-such-profile", "not found"]),
    ("ranks = [1]", "timeout_s = -5", ["timeout_s", "positive number"]),
    ("ranks = [1]", "trace = 1", ["trace", "true or false"]),
])
def test_a_bad_grid_names_the_key_and_the_fix(models: dict[str, Path], grid: str, top: str, words: list[str]) -> None:
    with pytest.raises(MpillamaError) as e:
        parse_grid(grid_text(models["tiny-q40"], grid, top), "g.toml")
    for word in ["g.toml", *words]:
        assert word in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("[grid]\nranks = [1]\n", ["exactly one of model", "synthetic"]),
    ('model = "/no/such/model.gguf"\n[grid]\nranks = [1]\n', ["/no/such/model.gguf", "not found"]),
    ('synthetic = "huge"\n[grid]\nranks = [1]\n', ["huge", "tiny"]),
    ('synthetic = "tiny"\n[launcher]\ncommand = "no-such-launcher"\n[grid]\nranks = [1]\n',
     ["no-such-launcher", "PATH"]),
    ('synthetic = "tiny"\n[launcher]\nargs = "--hostfile h"\n[grid]\nranks = [1]\n', ["args", "list of strings"]),
    ('synthetic = "tiny"\n[grid\n', ["not valid TOML"]),
])
def test_a_bad_model_or_launcher_is_refused(text: str, words: list[str]) -> None:
    with pytest.raises(MpillamaError) as e:
        parse_grid(text, "g.toml")
    for word in words:
        assert word in str(e.value)


def test_the_cli_refuses_a_bad_grid_before_running_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('synthetic = "tiny"\n[grid]\nranks = [1, 2]\nsync = ["star", "ring"]\n')
    done = sweep_cli("--grid", str(bad), "--out", str(tmp_path / "r.h5"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "ring" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.h5").exists()
    done = sweep_cli()
    assert done.returncode == 2 and "--grid GRID.toml --out RESULTS.h5" in done.stderr


# ------------------------------------------------------------------------------------------ the results file


def test_the_results_file_reads_back_as_written(tmp_path: Path) -> None:
    out = tmp_path / "r.h5"
    meta = {"grid": "[grid]\nranks = [1, 2]\n", "model": "m.gguf", "created": "2024-01-01T00:00:00+00:00",
            "launcher": "mpirun", "program": "python"}
    metrics = {"prompt_tok_s": 50.0, "gen_tok_s": 20.5, "token_ms": 48.8, "rank0_sync_ms": 1.25, "load_s": 0.5}
    results = [
        PointResult(1, {"ranks": 2, "rank_weights": (0.6, 1.0)}, "ok", metrics, 3.0, "r.traces/point-001.h5", ""),
        PointResult(2, {"ranks": 1, "rank_weights": None}, "failed", {}, 1.0, None, "exit 2: no\x00 model"),
    ]
    write_results(out, meta, ["ranks", "rank_weights"], results, planned=3, complete=False)
    data = read_results(out)
    assert data.parameters == ["ranks", "rank_weights"]
    assert {k: data.attrs[k] for k in (*meta, "format", "version", "n_points", "n_done", "complete")} == {
        **meta, "format": "mpillama-sweep", "version": 1, "n_points": 3, "n_done": 2, "complete": False}
    assert type(data.attrs["complete"]) is bool and type(data.attrs["n_done"]) is int
    first, second = data.rows
    assert (first["index"], first["ranks"], first["rank_weights"], first["status"]) == (1, 2, "0.6,1", "ok")
    assert (first["gen_tok_s"], first["trace"], json.loads(first["json"])) == (20.5, "r.traces/point-001.h5", metrics)
    assert (second["rank_weights"], second["error"], second["trace"], second["json"]) == ("even", "exit 2: no model", "", "")
    assert math.isnan(second["gen_tok_s"])
    assert json.loads(json.dumps(results_json(data), default=str))["parameters"] == ["ranks", "rank_weights"]


# ------------------------------------------------------------------------------------------ real sweeps


@pytest.fixture(scope="module")
def swept(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Done]:
    folder = tmp_path_factory.mktemp("sweep")
    grid = folder / "grid.toml"
    grid.write_text(grid_text(models["tiny-q40"], 'ranks = [1, 2]\nsync = ["star", "allreduce"]', "trace = true"))
    return folder / "results.h5", sweep_cli("--grid", str(grid), "--out", str(folder / "results.h5"))


def test_a_sweep_runs_every_point_as_its_own_job(swept: tuple[Path, Done]) -> None:
    out, done = swept
    assert done.returncode == 0, done.stderr
    attrs, cols = read_points(out)
    assert (attrs["format"], attrs["version"], attrs["complete"], attrs["n_points"], attrs["n_done"]) == (
        "mpillama-sweep", 1, True, 4, 4)
    assert "sync = [\"star\", \"allreduce\"]" in attrs["grid"] and attrs["model"].endswith("tiny-q40.gguf")
    assert list(attrs["parameters"]) == ["ranks", "sync"]
    assert cols["index"] == [1, 2, 3, 4] and cols["status"] == ["ok"] * 4 and cols["error"] == [""] * 4
    assert cols["ranks"] == [1, 1, 2, 2] and cols["sync"] == ["star", "allreduce"] * 2
    assert all(v > 0 for name in ("gen_tok_s", "prompt_tok_s", "token_ms", "wall_s") for v in cols[name])
    assert all(v >= 0 for v in cols["rank0_sync_ms"]) and cols["rank0_sync_ms"][2] > 0  # traced points split too
    for i in range(4):  # what each job itself reported: it ran with the point's rank count and sync
        result = json.loads(cols["json"][i])
        assert (result["ranks"], result["sync"], result["gen_tokens"]) == (cols["ranks"][i], cols["sync"][i], 4)
        assert result["gen_tok_s"] == cols["gen_tok_s"][i]
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in progress] == [
        "[1/4] ranks=1 sync=star", "[2/4] ranks=1 sync=allreduce",
        "[3/4] ranks=2 sync=star", "[4/4] ranks=2 sync=allreduce"]
    assert all(" tok/s, prompt " in line for line in progress)


def test_each_point_leaves_a_trace(swept: tuple[Path, Done]) -> None:
    out, _ = swept
    _, cols = read_points(out)
    assert cols["trace"] == [f"results.traces/point-00{i}.h5" for i in range(1, 5)]
    for trace, ranks, sync in zip(cols["trace"], cols["ranks"], cols["sync"]):
        with h5py.File(out.parent / trace, "r") as f:
            assert (f.attrs["n_ranks"], f.attrs["sync"], bool(f.attrs["partial"])) == (ranks, sync, False)
    done = subprocess.run([sys.executable, "-m", "mpillama", "trace", "report", str(out.parent / cols["trace"][3])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 ranks" in done.stdout and "sync allreduce" in done.stdout


def test_the_table_ranks_points_by_generation_speed(swept: tuple[Path, Done]) -> None:
    out, done = swept
    _, cols = read_points(out)
    lines = done.stdout.splitlines()
    rows = [line.split() for line in lines[2:6]]
    fastest_first = sorted(range(4), key=lambda i: -cols["gen_tok_s"][i])
    assert [int(row[1] if row[0] == "*" else row[0]) for row in rows] == [cols["index"][i] for i in fastest_first]
    assert rows[0][0] == "*" and all(row[0] != "*" for row in rows[1:])
    assert lines[-1].startswith(f"* best: point {cols['index'][fastest_first[0]]} (ranks=")
    report = sweep_cli("report", str(out))
    assert report.returncode == 0 and report.stdout == done.stdout  # the same table, from the file
    as_json = json.loads(sweep_cli("report", str(out), "--json").stdout)
    assert as_json["complete"] is True and [p["index"] for p in as_json["points"]] == [1, 2, 3, 4]
    assert as_json["points"][2]["result"]["ranks"] == 2


def test_failed_and_stuck_points_are_recorded_and_the_sweep_goes_on(
        models: dict[str, Path], tmp_path: Path, swept: tuple[Path, Done]) -> None:
    # after `swept`, numba's cache is warm: the good point (and the one failing while loading, 3 ranks)
    # end inside timeout_s even on a host 5x oversubscribed (45 s left too little room: a point's load
    # takes ~8 s on the idle host); the stuck one is declared stuck only then, so this is the test's length
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text(models["tiny-q40"], "ranks = [1, 2, 3]", "trace = true\ntimeout_s = 120"))
    # rank 1 sleeps in every attention block (the 2-rank point never ends); rank 2 fails while loading
    done = sweep_cli("--grid", str(grid), "--out", str(tmp_path / "r.h5"),
                     MPILLAMA_TEST_SLOW="1:600", MPILLAMA_TEST_FAIL_LOAD="2")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"mpillama: 2 of 3 points failed; results in {tmp_path / 'r.h5'}"
    attrs, cols = read_points(tmp_path / "r.h5")
    assert attrs["complete"] and cols["status"] == ["ok", "timeout", "failed"]
    assert cols["gen_tok_s"][0] > 0 and math.isnan(cols["gen_tok_s"][1]) and math.isnan(cols["gen_tok_s"][2])
    assert cols["error"][1].startswith("still running after timeout_s = 120 s")
    assert cols["error"][2].startswith("exit 2: rank 2: test hook MPILLAMA_TEST_FAIL_LOAD")
    assert cols["json"][1:] == ["", ""]
    assert bench_processes(str(tmp_path)) == []  # the stuck job was ended, all of its ranks
    assert "point 3 failed: exit 2: rank 2" in done.stdout


def test_an_interrupted_sweep_stops_its_job_and_keeps_what_it_has(models: dict[str, Path], tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text(models["tiny-q40"], 'ranks = [2]\nsync = ["star", "allreduce"]', "trace = true"))
    out = tmp_path / "r.h5"
    proc = subprocess.Popen([*SWEEP, "--grid", str(grid), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=mpi_env(MPILLAMA_TEST_SLOW="1:60"))
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a measurement
        while not bench_processes(str(tmp_path)):  # the first point's job is running
            assert proc.poll() is None and time.monotonic() < deadline, "the first point never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines()[-1] == (
        f"mpillama: sweep interrupted (SIGTERM) after 0 of 2 points; partial results in {out}")
    assert stdout == "" and "Traceback" not in stderr
    attrs, cols = read_points(out)
    assert (attrs["complete"], attrs["n_points"], attrs["n_done"], cols["index"]) == (False, 2, 0, [])
    assert bench_processes(str(tmp_path)) == []
    report = sweep_cli("report", str(out))
    assert report.returncode == 0 and "0 of 2 points run" in report.stdout and "incomplete" in report.stdout
