"""`python -m mpillama sweep`: run `bench` once per point of a grid of settings, collect one HDF5 file.

    python -m mpillama sweep --grid GRID.toml --out RESULTS.h5   # run every point, print the table
        [--launcher "srun --mpi=pmix --cpu-bind=cores"]                     # replaces [launcher] command and args
    python -m mpillama sweep report RESULTS.h5 [--json]          # print the table of a results file again

GRID.toml:

    model = "llama3.2-1b.gguf"      # or: synthetic = "llama3.2-1b" (a synth shape); paths are relative
                                    # to the current directory, where every point runs too
    prompt_tokens = 64              # bench --prompt-tokens (default 64)
    steps = 32                      # bench --steps (default 32)
    repeat = 1                      # bench --repeat (default 1)
    trace = true                    # keep a trace per point: RESULTS.traces/point-007.h5 (default false)
    timeout_s = 1800                # a point still running after this is stopped, status "timeout"
    [launcher]                      # how each point starts
    command = "mpirun"              # default: mpirun or mpiexec on PATH; "srun" inside a Slurm allocation
    args = ["--hostfile", "rocks"]  # extra launcher arguments, before the program
    oversubscribe = false           # Open MPI: allow more ranks than slots
    python = "python3"              # the program the ranks run: a string or a list such as
                                    # ["taskset", "-c", "4-7", "python3"] (default: this Python)
    [grid]                          # every combination is one point (cartesian product)
    ranks = [1, 2, 4]
    sync = ["star", "allreduce"]
    buffer_float_type = ["q80", "f32"]
    nthreads = [1, 4]

Grid keys are bench's run flags: ranks, sync, buffer_float_type, nthreads, batch, chunk_bytes,
rank_weights, profile, weight_type, weights, max_seq_len, sync_timeout. A scalar is a one-element
list. A rank_weights value is "even", "auto", or one weight per rank ([0.6, 1, 1, 1] or
"0.6,1,1,1"); a list of weights pairs only with the ranks value of its length (the other
combinations are not points). The whole grid is checked before the first point starts.

Under Open MPI the launcher also gets --bind-to none (unless args name --bind-to: a rank's
numba threads need more than one core) and, as root, the variables that allow it.
Exit code: 0 if every point succeeded, 1 if any failed, 2 for a bad grid, 130/143 interrupted.

Never imports mpi4py: this process is the launcher, not a rank.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mpillama.config import build_run_config, parse_rank_weights
from mpillama.errors import MpillamaError
from mpillama.launch import Launcher, find_launcher
from mpillama.output import say
from mpillama.sweep_file import PointResult, format_table, read_results, results_json, value_text, write_results

INT_PARAMS = ("ranks", "nthreads", "batch", "chunk_bytes", "max_seq_len")
GRID_PARAMS = ("ranks", "sync", "buffer_float_type", "nthreads", "batch", "chunk_bytes", "rank_weights", "profile",
               "weight_type", "weights", "max_seq_len", "sync_timeout")
TOP_KEYS = ("model", "synthetic", "prompt_tokens", "steps", "repeat", "trace", "timeout_s", "launcher", "grid")
LAUNCHER_KEYS = ("command", "args", "oversubscribe", "python")
STOP_GRACE_S = 10.0  # after SIGTERM, how long a point's job may take to leave before SIGKILL


@dataclass(frozen=True)
class Grid:
    text: str  # the TOML as written, kept in the results file
    model: str  # a model path, or a synth shape when synthetic
    synthetic: bool
    prompt_tokens: int
    steps: int
    repeat: int
    trace: bool
    timeout_s: float
    launcher: Launcher
    python: tuple[str, ...]
    params: dict[str, list[Any]]  # grid key -> its values; ranks first, then the file's order

    def points(self) -> list[dict[str, Any]]:
        """Every combination, ranks outermost; explicit rank weights only with their rank count."""
        keys = list(self.params)
        combos = (dict(zip(keys, values)) for values in itertools.product(*self.params.values()))
        return [p for p in combos
                if not isinstance(p.get("rank_weights"), tuple) or len(p["rank_weights"]) == p["ranks"]]


# ---------------------------------------------------------------------------------------- the grid file


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise MpillamaError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")


def _is_positive(value: Any, number: bool = False) -> bool:
    return isinstance(value, (int, float) if number else int) and not isinstance(value, bool) and value > 0


def _positive(value: Any, where: str, number: bool = False) -> Any:
    if not _is_positive(value, number):
        raise MpillamaError(f"{where} = {value!r}: give a positive {'number' if number else 'integer'}")
    return value


def _rank_weights(value: Any) -> tuple[float, ...] | str | None:
    if value == "even":
        return None
    if isinstance(value, list) and value and all(_is_positive(w, number=True) for w in value):
        return tuple(float(w) for w in value)
    if isinstance(value, str) and value:
        return parse_rank_weights(value)
    raise MpillamaError('give "even", "auto" or one weight per rank, e.g. [0.6, 1, 1, 1]')


def _grid_value(key: str, value: Any) -> Any:
    """One grid value, converted to what RunConfig takes; raises MpillamaError saying what is wrong."""
    if key == "rank_weights":
        return _rank_weights(value)
    if key in INT_PARAMS or key == "sync_timeout":
        if not _is_positive(value, number=key == "sync_timeout"):
            raise MpillamaError(f"give a positive {'number' if key == 'sync_timeout' else 'integer'}")
        return value
    if not isinstance(value, str):
        raise MpillamaError(f'give a string, e.g. {key} = ["..."]')
    return value


def _grid_values(key: str, raw: Any, where: str) -> list[Any]:
    """The values of one grid key, each checked on its own."""
    if key == "rank_weights" and isinstance(raw, list) and raw and not any(isinstance(v, (list, str)) for v in raw):
        raw = [raw]  # a flat list of numbers is one value: weights alone are never a value
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise MpillamaError(f"{where} = []: give at least one value")
    out = []
    for v in values:
        try:
            out.append(_grid_value(key, v))
            if key != "ranks":
                build_run_config(**{key: out[-1]})  # the run settings' own checks (choices, profile files)
        except MpillamaError as e:
            raise MpillamaError(f"{where} = {v!r}: {e}") from None
    return out


def _launcher(table: Any, where: str, override: list[str] | None) -> tuple[Launcher, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise MpillamaError(f"{where}: must be a table ([launcher] with command, args, oversubscribe, python)")
    _check_keys(table, LAUNCHER_KEYS, where)
    command = table.get("command")
    args = table.get("args", [])
    python = table.get("python", [sys.executable])
    python = [python] if isinstance(python, str) else python
    if command is not None and (not isinstance(command, str) or not command):
        raise MpillamaError(f"{where} command = {command!r}: give the launcher's name or path, e.g. \"mpirun\"")
    for name, value in (("args", args), ("python", python)):
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value) or not (value or name == "args"):
            raise MpillamaError(f"{where} {name} = {value!r}: give a list of strings, e.g. [\"--hostfile\", \"rocks\"]")
    if not isinstance(table.get("oversubscribe", False), bool):
        raise MpillamaError(f"{where} oversubscribe = {table['oversubscribe']!r}: give true or false")
    if override:  # --launcher "srun --mpi=pmix --cpu-bind=cores": the same grid on another cluster
        command, args = override[0], override[1:]
    launcher = Launcher(find_launcher(command), tuple(args), table.get("oversubscribe", False))
    return launcher, tuple(python)


def parse_grid(text: str, source: str, launcher_line: list[str] | None = None) -> Grid:
    """A Grid from TOML text, every value checked; raises MpillamaError naming source and key.
    launcher_line, if given, replaces the [launcher] command and args."""
    try:
        top = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MpillamaError(f"{source} is not valid TOML: {e}") from None
    _check_keys(top, TOP_KEYS, source)
    if ("model" in top) == ("synthetic" in top):
        raise MpillamaError(f"{source}: give exactly one of model = \"FILE.gguf\" or synthetic = \"SHAPE\"")
    synthetic = "synthetic" in top
    model = top["synthetic" if synthetic else "model"]
    if synthetic:
        from mpillama.formats.synth import SHAPES

        if model not in SHAPES:
            raise MpillamaError(f"{source}: synthetic = {model!r} is not a shape; known: {', '.join(SHAPES)}")
    elif not isinstance(model, str) or not Path(model).exists():
        raise MpillamaError(f"{source}: model = {model!r} not found (relative paths start in {os.getcwd()})")
    if not isinstance(top.get("trace", False), bool):
        raise MpillamaError(f"{source}: trace = {top['trace']!r}: give true or false")
    grid = top.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        raise MpillamaError(f"{source}: [grid] is empty: give at least one setting, e.g. ranks = [1, 2]")
    _check_keys(grid, GRID_PARAMS, f"{source} [grid]")
    # ranks first (the outermost loop), one rank unless the grid says otherwise
    params = {"ranks": [1]} | {key: _grid_values(key, grid[key], f"{source} [grid] {key}") for key in grid}
    launcher, python = _launcher(top.get("launcher", {}), f"{source} [launcher]", launcher_line)
    g = Grid(
        text=text, model=model, synthetic=synthetic,
        prompt_tokens=_positive(top.get("prompt_tokens", 64), f"{source}: prompt_tokens"),
        steps=_positive(top.get("steps", 32), f"{source}: steps"),
        repeat=_positive(top.get("repeat", 1), f"{source}: repeat"),
        trace=top.get("trace", False),
        timeout_s=float(_positive(top.get("timeout_s", 1800), f"{source}: timeout_s", number=True)),
        launcher=launcher, python=python, params=params,
    )
    _check_points(g, source)
    return g


def _check_points(grid: Grid, source: str) -> None:
    """What no single value shows: weights that fit no rank count, a profile clashing with a flag."""
    for weights in grid.params.get("rank_weights", []):
        if isinstance(weights, tuple) and len(weights) not in grid.params["ranks"]:
            raise MpillamaError(f"{source} [grid] rank_weights = {list(weights)}: {len(weights)} weights but no "
                                f"ranks value of {len(weights)} (ranks = {grid.params['ranks']})")
    for point in grid.points():
        try:
            build_run_config(**{k: v for k, v in point.items() if k != "ranks"})
        except MpillamaError as e:
            raise MpillamaError(f"{source}: point {label(point)}: {e}") from None


def load_grid(path: str | Path, launcher: str | None = None) -> Grid:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MpillamaError(f"--grid {path}: cannot read it ({e.strerror})") from None
    return parse_grid(text, str(path), shlex.split(launcher) if launcher else None)


# ---------------------------------------------------------------------------------------- one point


def label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={value_text(v)}" for k, v in point.items())


def bench_program(grid: Grid, point: dict[str, Any], trace: str | None) -> list[str]:
    """What every rank of this point runs: `python -m mpillama bench ... --json` with the point's flags."""
    cmd = [*grid.python, "-m", "mpillama", "bench", "--synthetic" if grid.synthetic else "--model", grid.model,
           "--prompt-tokens", str(grid.prompt_tokens), "--steps", str(grid.steps), "--repeat", str(grid.repeat),
           "--json"]
    for key, value in point.items():
        if key != "ranks" and value is not None:
            cmd += [f"--{key.replace('_', '-')}", value_text(value)]
    return cmd + (["--trace", trace] if trace else [])


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the sweep."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _session_pids(sid: int) -> list[int]:
    """Every local process of session sid (Linux /proc; elsewhere only the session leader)."""
    if not os.path.isdir("/proc"):
        return [sid]
    pids = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.getsid(int(name)) == sid:
                pids.append(int(name))
        except OSError:  # gone meanwhile
            continue
    return pids


def _stop(proc: subprocess.Popen[str]) -> None:
    """End the point's whole job: SIGTERM to the launcher, which passes it to the ranks (they leave
    their partial trace); then SIGKILL to whatever of the job's session is left on this host, since
    Open MPI puts each rank in a process group of its own."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    proc.wait()


def last_error_line(stderr: str, only_ours: bool = False) -> str:
    """The line that says why a point failed: mpillama's own error line, else the last meaningful one."""
    lines = [line.strip() for line in stderr.replace("\x00", "").splitlines() if line.strip().strip("-*=")]
    ours = [line.removeprefix("mpillama: error:").strip() for line in lines if line.startswith("mpillama: error:")]
    return (ours or ([] if only_ours else lines) or [""])[-1]


def run_point(index: int, point: dict[str, Any], grid: Grid, env: dict[str, str], trace: str | None) -> PointResult:
    cmd = grid.launcher.command_line(point["ranks"], bench_program(grid, point, trace))
    start = time.monotonic()
    # its own session: Ctrl-C in the terminal reaches the sweep only, which then ends the job as a whole
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=grid.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
        why = "; ".join(filter(None, [f"still running after timeout_s = {grid.timeout_s:g} s",
                                      last_error_line(err, only_ours=True)]))
        return PointResult(index, point, "timeout", {}, time.monotonic() - start, trace, why)
    except BaseException:
        _stop(proc)
        raise
    wall = time.monotonic() - start
    if proc.returncode != 0:
        return PointResult(index, point, "failed", {}, wall, trace, f"exit {proc.returncode}: {last_error_line(err)}")
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1])
        if not all(isinstance(result.get(m), (int, float)) for m in ("gen_tok_s", "prompt_tok_s")):
            raise ValueError
    except (IndexError, ValueError, AttributeError):
        tail = lines[-1][:200] if lines else "nothing"
        return PointResult(index, point, "failed", {}, wall, trace, f"exit 0 but no JSON result on stdout: {tail}")
    return PointResult(index, point, "ok", result, wall, trace, "")


# ---------------------------------------------------------------------------------------- the sweep


def traces_dir(out: Path) -> Path:
    return out.with_name((out.stem if out.suffix == ".h5" else out.name) + ".traces")


def _check_out(out: Path) -> None:
    parent = out.parent
    if out.is_dir():
        raise MpillamaError(f"--out {out} is a directory: give a file name such as results.h5")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MpillamaError(f"--out {out}: directory {parent} does not exist or is not writable")


def progress(index: int, total: int, r: PointResult) -> str:
    head = f"[{index}/{total}] {label(r.point)}: "
    if r.status == "ok":
        return (head + f"gen {r.metrics['gen_tok_s']:.1f} tok/s, prompt {r.metrics['prompt_tok_s']:.0f} tok/s"
                + f" ({r.wall_s:.0f} s)")
    return head + f"{r.status}: {r.error} ({r.wall_s:.0f} s)"


@dataclass
class _Signals:
    """Turns SIGINT/SIGTERM into Interrupted while the sweep runs; restores the old handlers after."""

    old: dict[int, Any]

    @classmethod
    def install(cls) -> _Signals:
        def handler(signum: int, frame: Any) -> None:
            for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
                signal.signal(s, signal.SIG_IGN)
            raise Interrupted(signum)

        return cls({s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)})

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _write(out: Path, grid: Grid, results: list[PointResult], planned: int, complete: bool, created: str) -> None:
    # a signal must not cut the file write short; it is delivered right after
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        meta = {"grid": grid.text, "model": grid.model, "created": created, "program": shlex.join(grid.python),
                "launcher": shlex.join([grid.launcher.command, *grid.launcher.args])}
        write_results(out, meta, list(grid.params), results, planned, complete)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def run_sweep(grid: Grid, out: str | Path) -> int:
    out = Path(out)
    _check_out(out)
    points = grid.points()
    traces = traces_dir(out)
    if grid.trace:
        traces.mkdir(exist_ok=True)
    env = grid.launcher.env()
    example = " ".join(grid.launcher.command_line(points[0]["ranks"], ["..."]))
    say(0, f"mpillama: sweep of {len(points)} points, model {grid.model}, each as: {example}; results in {out}")
    results: list[PointResult] = []
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    signals = _Signals.install()
    try:
        _write(out, grid, results, len(points), False, created)
        for index, point in enumerate(points, start=1):
            trace = traces / f"point-{index:03d}.h5" if grid.trace else None
            if trace is not None:
                trace.unlink(missing_ok=True)  # an earlier sweep's trace must not pass for this point's
            r = run_point(index, point, grid, env, str(trace) if trace else None)
            # relative to the results file: the file and its traces move together
            r.trace = os.path.relpath(trace, out.parent) if trace is not None and trace.exists() else None
            results.append(r)
            _write(out, grid, results, len(points), False, created)
            say(0, progress(index, len(points), r))
        _write(out, grid, results, len(points), True, created)
    except Interrupted as e:
        say(0, f"mpillama: sweep interrupted ({e}) after {len(results)} of {len(points)} points; "
               f"partial results in {out}")
        return 128 + e.signum
    finally:
        signals.restore()
    say(0, format_table(read_results(out), str(out)), err=False)
    failed = sum(r.status != "ok" for r in results)
    if failed:
        say(0, f"mpillama: {failed} of {len(points)} points failed; results in {out}")
    return 1 if failed else 0


def command(args: argparse.Namespace) -> int:
    """cli.py's entry: `sweep --grid G --out R` or `sweep report R [--json]`."""
    if args.sweep_command == "report":
        if args.grid or args.out or args.launcher:
            raise MpillamaError("sweep report RESULTS.h5 takes no --grid, --out or --launcher")
        data = read_results(args.file)
        say(0, json.dumps(results_json(data), indent=1) if args.json else format_table(data, args.file), err=False)
        return 0
    if not args.grid or not args.out:
        raise MpillamaError("sweep needs --grid GRID.toml --out RESULTS.h5 (or: sweep report RESULTS.h5)")
    return run_sweep(load_grid(args.grid, args.launcher), args.out)

