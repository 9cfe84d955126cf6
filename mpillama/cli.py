"""Command line: parse, build configs, call one function, turn its result into an exit code.

    python -m mpillama generate|chat|serve|bench|synth|inspect|trace|sweep ...

Commands that run the model (generate, chat, serve, bench) work the same under
`python -m mpillama` (one rank) and `mpirun -n N python -m mpillama` (N ranks); only rank 0
prints. Bad input exits with code 2 and one line on stderr; nothing else is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from mpillama.blas_threads import limit_blas_threads
from mpillama.config import (
    BUFFER_TYPES, DEFAULTS, RUN_FIELDS, SYNC_KINDS, WEIGHT_SOURCES, WEIGHT_TYPES, build_run_config, parse_rank_weights,
)
from mpillama.errors import MpillamaError
from mpillama.mpienv import launched_rank
from mpillama.output import error_line, say


def env_rank() -> int:
    """This process's rank from the MPI launcher's environment, without initialising MPI."""
    return launched_rank() or 0


def run_flags() -> argparse.ArgumentParser:
    """A parent parser of the flags every command that runs the model shares (but --model, which
    bench puts in a group with --synthetic). Defaults are None: RunConfig owns them, the help
    quotes them from there."""
    d = DEFAULTS
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tokenizer", help="tokenizer: distributed-llama .t file, tokenizer.json or a folder")
    p.add_argument("--sync", choices=SYNC_KINDS, help=f"how blocks combine across ranks (default {d.sync})")
    p.add_argument("--buffer-float-type", choices=BUFFER_TYPES, help=f"sync payloads (default {d.buffer_float_type})")
    p.add_argument("--weight-type", choices=WEIGHT_TYPES, help=f"weights in memory (default {d.weight_type})")
    p.add_argument("--weights", dest="weight_source", choices=WEIGHT_SOURCES,
                   help=f"mmap: every host reads its own copy; scatter: rank 0 sends the slices (default {d.weight_source})")
    p.add_argument("--nthreads", type=int, help=f"numba threads per rank (default {d.nthreads})")
    p.add_argument("--profile", help="a profile name from profiles/ or a TOML file")
    p.add_argument("--rank-weights", help="'auto' or one weight per rank, e.g. 0.6,1,1,1 (default even)")
    p.add_argument("--max-seq-len", type=int, help=f"KV cache length (default {d.max_seq_len}, at most the model's)")
    p.add_argument("--batch", type=int, help=f"prompt tokens per prefill pass (default {d.batch})")
    p.add_argument("--chunk-bytes", type=int, help=f"largest single MPI transfer (default {d.chunk_bytes})")
    p.add_argument("--prefill-chunks", type=int,
                   help="allreduce: send a prefill block's output in N pieces, each while the next computes "
                        "(default 0: measured at start-up)")
    p.add_argument("--sync-timeout", type=float,
                   help=f"seconds before a stuck collective ends the job (default {d.sync_timeout:g})")
    p.add_argument("--temperature", type=float, help=f"0 is greedy (default {d.temperature:g})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass (default {d.top_p:g})")
    p.add_argument("--top-k", type=int, help=f"keep the k most likely tokens, 0 for all (default {d.top_k})")
    p.add_argument("--seed", type=int, help="sampling seed (default: fresh each run)")
    p.add_argument("--trace", help="write an HDF5 trace of this run to FILE.h5")
    return p


MODEL_HELP = "GGUF file, distributed-llama .m file, or Hugging Face folder"


def run_config(args: argparse.Namespace) -> Any:
    """RunConfig from the flags given (None: not given), over the profile, over the defaults."""
    flags = {name: getattr(args, name) for name in RUN_FIELDS if name != "rank_weights"}
    return build_run_config(profile=args.profile, rank_weights=parse_rank_weights(args.rank_weights), **flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpillama", description="Tensor-parallel LLM inference over MPI.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = run_flags()

    p = sub.add_parser("generate", help="generate text from a prompt", parents=[run])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=64, help="tokens to generate")
    p.add_argument("--dump-logits", help="rank 0 writes float32 [steps, vocab] logits to FILE.npy")
    p.add_argument("--no-bos", action="store_true", help="do not add the tokenizer's BOS token")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after an end-of-text token")
    p.set_defaults(func=lambda a: _run_commands().generate(a, run_config(a)))

    p = sub.add_parser("chat", help="interactive chat with the model's chat template", parents=[run])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--steps", type=int, default=512, help="most tokens per answer")
    p.set_defaults(func=lambda a: _run_commands().chat(a, run_config(a)))

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)", parents=[run])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one, shown on stderr)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $MPILLAMA_API_KEY, which keeps the key out of the process list; unset: no key)")
    p.add_argument("--max-clients", type=int, default=16,
                   help="connections served at once, a thread each (default 16); 4 times as many more wait, "
                   "beyond that 503 with Retry-After")
    p.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request; an idle keep-alive connection closes after it (default 10)")
    p.set_defaults(func=lambda a: _run_commands().serve(a, run_config(a)))

    p = sub.add_parser("bench", help="prompt-eval and generation tok/s", parents=[run])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--synthetic", metavar="SHAPE", help="a synth shape, written to the cache on first use")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="measure this many times and report the median")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: _run_commands().bench(a, run_config(a)))

    p = sub.add_parser("synth", help="write a random-weight GGUF model with a real shape and vocabulary")
    p.add_argument("--shape", required=True, choices=SynthShapes(),
                   help="the shape of a real model, or a test shape (the tiny ones: two layers, but a real "
                        "vocabulary makes them 26-28 MB as q40)")
    p.add_argument("--out", required=True)
    p.add_argument("--type", choices=SynthTypes(), default="q40",
                   help="the matrices' type; q4_k_m mixes Q4_K and Q6_K as llama-quantize does (K-quant types "
                        "need widths that are multiples of 256: tiny-256 among the test shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="header, tensors and the slice plan for N ranks")
    p.add_argument("model")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--rank-weights")
    p.add_argument("--max-seq-len", type=int, help=f"KV cache length (default {DEFAULTS.max_seq_len})")
    p.add_argument("--weight-type", choices=WEIGHT_TYPES, default=DEFAULTS.weight_type)
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sweep", help="run bench once per point of a grid of settings; collect the results in HDF5")
    p.add_argument("--grid", help="GRID.toml: model, launcher and the settings to combine (see mpillama/sweep.py)")
    p.add_argument("--out", help="RESULTS.h5, rewritten after every point")
    p.add_argument("--launcher", help="replaces the grid's [launcher] command and args, e.g. 'srun --mpi=pmix --cpu-bind=cores'")
    ssub = p.add_subparsers(dest="sweep_command")
    t = ssub.add_parser("report", help="print the table of a results file again")
    t.add_argument("file")
    t.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("trace", help="report, plot, export, compare or project HDF5 traces")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    t = tsub.add_parser("report")
    t.add_argument("file")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=lambda a: _trace(lambda m: m.trace_report(a.file, a.json)))
    t = tsub.add_parser("plot")
    t.add_argument("file")
    t.add_argument("--out", required=True, help="folder for the PNG files")
    t.set_defaults(func=lambda a: _trace(lambda m: "\n".join(str(x) for x in m.trace_plot(a.file, a.out))))
    t = tsub.add_parser("export")
    t.add_argument("file")
    t.add_argument("--perfetto", required=True, help="output JSON (Chrome/Perfetto trace events)")
    t.set_defaults(func=lambda a: _trace(lambda m: str(m.trace_export(a.file, a.perfetto))))
    t = tsub.add_parser("compare")
    t.add_argument("a")
    t.add_argument("b")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=lambda a: _trace(lambda m: m.trace_compare(a.a, a.b, a.json)))
    t = tsub.add_parser("project", help="predict tok/s, waits and the straggler of another configuration")
    t.add_argument("file")
    t.add_argument("--ranks", help="rank count (default the trace's); a comma list makes a grid")
    t.add_argument("--delay", help="the link's one-way latency in ms (default: the trace's ping-pong); list: grid")
    t.add_argument("--bandwidth", help="the link's rate in Gbit/s (default: fitted to the trace); list: grid")
    t.add_argument("--sync", help="star, allreduce or auto (both, the faster kept); default the trace's; list: grid")
    t.add_argument("--rank-weights", help="one weight per rank, e.g. 1,1,0.5 (default: the trace's, or even)")
    t.add_argument("--speed", action="append", metavar="RANK=FACTOR",
                   help="that rank runs FACTOR times as fast as the trace's fastest rank (repeatable)")
    t.add_argument("--calibrate", action="append", metavar="FILE.h5",
                   help="another trace of the same model (another rank count) to fit the compute model on")
    t.add_argument("--model", help="the model file, when the one the trace names is gone")
    t.add_argument("--grid", metavar="PNG", help="plot decode tok/s against ranks for the values given")
    t.add_argument("--out", metavar="FILE.h5", help="write the projected run as a trace (for trace compare)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=lambda a: _trace(lambda m: m.trace_project(
        a.file, a.ranks, a.delay, a.bandwidth, a.sync, a.rank_weights, a.speed, a.calibrate, a.model, a.json,
        a.grid, a.out)))
    return parser


class SynthShapes:
    """The synth shape names as argparse choices, read from formats.synth only when argparse needs
    them (help, or checking --shape): every other command starts without importing it."""

    def _names(self) -> list[str]:
        from mpillama.formats.synth import SHAPES

        return list(SHAPES)

    def __iter__(self) -> Any:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


class SynthTypes(SynthShapes):
    """The synth weight types, read as lazily as the shapes."""

    def _names(self) -> list[str]:
        from mpillama.formats.synth import WEIGHT_TYPES

        return list(WEIGHT_TYPES)


def _run_commands() -> Any:
    # imported late: synth, inspect and trace need neither MPI nor numba compilation
    from mpillama import run

    return run


def _trace(fn: Callable[[Any], str]) -> int:
    from mpillama.trace import commands

    text = fn(commands)
    if text:
        say(env_rank(), text, err=False)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mpillama.formats.synth import write_synthetic

    if env_rank() != 0:
        return 0
    path = write_synthetic(args.shape, args.out, weight_type=args.type, seed=args.seed)
    say(0, f"mpillama: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mpillama.describe import describe

    text = describe(args.model, args.ranks, parse_rank_weights(args.rank_weights), args.max_seq_len, args.weight_type,
                    list_tensors=args.tensors)
    say(env_rank(), text, err=False)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mpillama.sweep import command  # the sweep launches ranks; it is never one (no MPI here)

    return command(args)


def main(argv: list[str] | None = None) -> int:
    # the console script's entry: nothing above has loaded numpy yet (a test keeps it so), so the
    # BLAS thread count can still be set (python -m mpillama has set it already, see __main__.py)
    limit_blas_threads(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # numba's message highlighting wraps stdout with colorama, which then writes a colour reset
    # escape at exit (seen under mpirun): the generated text on stdout must stay clean
    os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")
    try:
        return int(args.func(args) or 0)
    except MpillamaError as e:
        # errors that reach here were agreed by every rank (or raised before MPI): say it once
        if env_rank() == 0:
            error_line(str(e))
        return 2
    except KeyboardInterrupt:
        say(env_rank(), "mpillama: interrupted")
        return 130
    except BrokenPipeError:
        return 0
