"""The commands that run the model (generate, chat, bench) and their error policy.

Every rank loads; rank 0 drives and prints, the others follow in Engine.worker_loop.
Errors before the first forward pass are agreed by all ranks and exit with code 2 on every
rank. After that, a failure on any rank prints one line (tagged with the rank), leaves a
partial trace on rank 0 where it can, and ends the whole job with MPI Abort: the other ranks
are inside collectives and would otherwise wait forever.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpillama.checks import before_loading
from mpillama.comm import Comm, world
from mpillama.config import RunConfig
from mpillama.engine import Engine, Generation, install_signal_handlers, save_npy_atomic
from mpillama.loading import load_engine
from mpillama.mpienv import world_mismatch
from mpillama.output import describe_error, end_job, say
from mpillama.errors import MpillamaError
from mpillama.sampler import Sampler


def start(run: RunConfig) -> Comm:
    comm = Comm(world(), run.sync_timeout, run.chunk_bytes)
    if problem := world_mismatch(comm.size):
        raise MpillamaError(problem)
    return comm


def drive(comm: Comm, engine: Engine, body: Callable[[Engine], dict[str, Any]]) -> int:
    """Run body on rank 0 while the workers follow; apply the error policy."""
    if comm.rank != 0:
        try:
            engine.worker_loop()
            engine.close()
        except BaseException as e:  # noqa: BLE001 - any failure must end every rank
            fail(comm, engine, e)
        return 0
    install_signal_handlers(engine.session)
    try:
        summary = body(engine)
        rss = engine.close(summary)
    except MpillamaError as e:
        if not engine.started:  # the workers are waiting for a command: stop them cleanly
            engine.close()
            raise
        fail(comm, engine, e)
    except BaseException as e:  # noqa: BLE001
        fail(comm, engine, e)
    say(comm.rank, "mpillama: memory per rank, MB private (peak with mapped file pages): "
              + ", ".join(f"{private:.0f} ({peak:.0f})" for private, peak in rss))
    return 0


def fail(comm: Comm, engine: Engine, error: BaseException) -> None:
    """A failure after the first forward pass: leave a partial trace on rank 0, then end every rank."""
    if comm.rank == 0:
        engine.session.write_partial(describe_error(error))
    end_job(error, comm.rank, comm.size)


def print_stats(comm: Comm, gen: Generation) -> None:
    say(comm.rank, f"mpillama: prompt {gen.prompt_tokens} tokens in {gen.prefill_s:.2f} s ({gen.prompt_tok_s:.1f} tok/s); "
              f"generated {len(gen.tokens)} tokens, {gen.gen_tok_s:.2f} tok/s; stop: {gen.stop_reason}")


def summary_of(gen: Generation) -> dict[str, Any]:
    return {"prompt_tokens": gen.prompt_tokens, "generated_tokens": len(gen.tokens),
            "prompt_tok_s": gen.prompt_tok_s, "gen_tok_s": gen.gen_tok_s, "stop_reason": gen.stop_reason}


def sampler_of(run: RunConfig) -> Sampler:
    return Sampler(temperature=run.temperature, top_p=run.top_p, top_k=run.top_k, seed=run.seed)


def write_text(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# -- generate ---------------------------------------------------------------------------------
def generate(args: argparse.Namespace, run: RunConfig) -> int:
    if args.steps < 1:
        raise MpillamaError(f"--steps {args.steps}: generate at least one token")
    comm = start(run)
    before_loading(comm, run, args.trace, args.dump_logits, args.prompt)
    engine = load_engine(comm, args.model, args.tokenizer, run, trace_path=args.trace, argv=sys.argv)

    def body(engine: Engine) -> dict[str, Any]:
        ids = engine.tokenizer.encode(args.prompt, add_bos=False if args.no_bos else None)
        rows = min(args.steps, engine.max_seq_len)  # generation stops when the context is full
        dump = np.zeros((rows, engine.cfg.vocab_size), dtype=np.float32) if args.dump_logits else None
        gen = engine.generate(ids, args.steps, sampler_of(run), on_text=write_text, dump_logits=dump,
                              stop_on_eos=not args.ignore_eos)
        write_text("\n")
        if dump is not None:
            save_npy_atomic(args.dump_logits, dump[: len(gen.tokens)])
        print_stats(comm, gen)
        return summary_of(gen)

    return drive(comm, engine, body)


# -- chat -------------------------------------------------------------------------------------
def chat(args: argparse.Namespace, run: RunConfig) -> int:
    from mpillama.chat import CHAT_HELP, chat_loop

    comm = start(run)
    before_loading(comm, run, args.trace)
    engine = load_engine(comm, args.model, args.tokenizer, run, trace_path=args.trace, argv=sys.argv)
    interactive = sys.stdin.isatty()
    if interactive:
        say(comm.rank, f"mpillama: {CHAT_HELP}")
    sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused by the tokenizer, not fatal

    def prompt() -> None:
        if interactive:
            say(comm.rank, "> ", end="")

    def body(engine: Engine) -> dict[str, Any]:
        last = chat_loop(engine, args.system, args.steps, sampler_of(run), sys.stdin, write_text, prompt)
        return summary_of(last) if last is not None else {}

    return drive(comm, engine, body)


# -- serve ------------------------------------------------------------------------------------
def serve(args: argparse.Namespace, run: RunConfig) -> int:
    from mpillama.server import http_options, ignore_stop_signals, serve_requests

    options = http_options(args)  # checked before loading, like every flag
    comm = start(run)
    before_loading(comm, run, args.trace)
    engine = load_engine(comm, args.model, args.tokenizer, run, trace_path=args.trace, argv=sys.argv)
    if comm.rank != 0:
        ignore_stop_signals()  # mpirun passes SIGTERM to every rank: rank 0 stops the workers itself
    name = Path(args.model).name
    return drive(comm, engine, lambda engine: serve_requests(engine, run, name, options))


# -- bench ------------------------------------------------------------------------------------
def synthetic_model(comm: Comm, shape: str, weight_type: str) -> Path:
    """The cached synthetic model of this shape, written by rank 0 on first use."""
    from mpillama.formats.synth import write_synthetic
    from mpillama.formats.vocab import cache_dir

    path = cache_dir() / "models" / f"{shape}-{weight_type}.gguf"
    error = None
    if comm.rank == 0 and not path.exists():
        say(comm.rank, f"mpillama: writing synthetic model {path} (once)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic(shape, path, weight_type=weight_type, seed=0)
        except MpillamaError as e:
            error = e
    comm.agree(error)
    return path


def bench(args: argparse.Namespace, run: RunConfig) -> int:
    from mpillama.bench_run import run_bench

    comm = start(run)
    before_loading(comm, run, args.trace)
    model = args.model or str(synthetic_model(comm, args.synthetic, "f32" if run.weight_type == "f32" else "q40"))
    engine = load_engine(comm, model, None, run, trace_path=args.trace, argv=sys.argv, verbose=not args.json,
                         need_tokenizer=False)

    def body(engine: Engine) -> dict[str, Any]:
        result = run_bench(engine, args.prompt_tokens, args.steps, args.repeat)
        result["model"] = args.synthetic or model
        if args.json:
            say(comm.rank, json.dumps(result), err=False)
        else:
            for key, value in result.items():
                say(comm.rank, f"{key:>24}: {value}", err=False)
        return result

    return drive(comm, engine, body)

