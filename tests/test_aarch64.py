"""aarch64 under emulation (tests/aarch64): kernel tests, a tiny-model generate equal to x86, the hot loops' assembly.

The emulated tests are marked slow: the first setup downloads ~100 MB (Debian arm64 packages, aarch64
wheels) and qemu runs Python 50-100x slower than the host. They are skipped only where the emulation
cannot be set up: not root (and no ready root), or the package registries out of reach. They run a
subset of the kernel tests, generate and read the hot loops on cortex-a76 only; MPILLAMA_AARCH64_FULL=1
runs all of tests/test_kernels.py and tests/test_quant.py instead, and generates and reads the hot
loops on cortex-a72 too (tests/aarch64/README.md). The assembly parser's own tests use fixed
snippets and run anywhere, fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.aarch64 import asm
from tests.aarch64.run import command
from tests.aarch64.setup import BOARDS, Unavailable, ensure

REPO = Path(__file__).resolve().parents[1]
HANG = 3600  # seconds before a stuck emulated run is killed (a guard against hangs, not a timing check)

# Kernel tests run under emulation (cortex-a76) in CI: every kernel both Q40 paths compile there
# (SDOT on the vnni layout, portable on tiles: pack, Q80 activations, decode and prefill matmul,
# the threaded matmul), on small shapes, and the kernel path's own checks.
KERNEL_SUBSET = [
    "tests/test_kernels.py::test_pack_unpack_roundtrip[96-257-tiles]",
    "tests/test_kernels.py::test_pack_unpack_roundtrip[96-257-vnni]",
    "tests/test_kernels.py::test_pack_stacks_strided_parts_like_their_concatenation[tiles]",
    "tests/test_kernels.py::test_pack_stacks_strided_parts_like_their_concatenation[vnni]",
    "tests/test_kernels.py::test_vnni_layout_bytes",
    "tests/test_kernels.py::test_kernel_path_of_this_process_and_forcing_it",
    "tests/test_kernels.py::test_quantize_activations_is_q8_0[shape1]",
    "tests/test_kernels.py::test_activations_from_q80_equal_quantize_activations",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[1thr-1-32-1-tiles]",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[1thr-600-160-5-tiles]",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[2thr-513-64-17-tiles]",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[1thr-40-2048-1-vnni]",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[1thr-600-160-5-vnni]",
    "tests/test_kernels.py::test_matmul_q40_equals_reference[2thr-513-64-17-vnni]",
    "tests/test_kernels.py::test_matmul_q40_int16_extremes[1thr-tiles]",
    "tests/test_kernels.py::test_matmul_q40_int16_extremes[1thr-vnni]",
    # Q8_0 weights: the sdot layout (cortex-a76's kernel path) and the portable rows layout
    "tests/test_q80w.py::test_pack_stacks_row_blocks[sdot]",
    "tests/test_q80w.py::test_matmul_q80w_equals_reference[1thr-40-2048-1-sdot]",
    "tests/test_q80w.py::test_matmul_q80w_equals_reference[2thr-33-96-8-sdot]",
    "tests/test_q80w.py::test_matmul_q80w_equals_reference[1thr-100-160-5-rows]",
    "tests/test_q80w.py::test_matmul_q80w_extremes[1thr-sdot]",
    "tests/test_quant.py",
    # K-quants: the dot-product kernels (sdot here) on decode, prefill with a token tail, threaded; portable
    "tests/test_kquant.py::test_pack_unpack_roundtrip[17-q4_k]",
    "tests/test_kquant.py::test_matmul_against_reference[1thr-16-2-13-q4_k-arm-sdot]",
    "tests/test_kquant.py::test_matmul_against_reference[1thr-33-3-3-q6_k-arm-sdot]",
    "tests/test_kquant.py::test_matmul_against_reference[2thr-17-2-1-q5_k-arm-sdot]",
    "tests/test_kquant.py::test_matmul_against_reference[1thr-17-2-1-q6_k-portable]",
]
FULL = ["tests/test_kernels.py", "tests/test_q80w.py", "tests/test_quant.py", "tests/test_kquant.py"]
FULL_RUN = bool(os.environ.get("MPILLAMA_AARCH64_FULL"))  # everything, not the CI subset


# ---------------------------------------------------------------- the assembly parser (any machine)

AARCH64_LOOPS = """
fn:
\tmov\tx5, xzr
.LBB0_1:                                // outer loop
\tmov\tx6, xzr
.LBB0_2:                                // =>This Inner Loop Header: scalar, no vector products
\tldrb\tw8, [x1, x6]
\tmadd\tw9, w8, w10, w9
\tadd\tx6, x6, #1
\tcmp\tx6, #16
\tb.ne\t.LBB0_2
\tmov\tx6, xzr
.LBB0_3:                                // the hot loop: a forward branch inside, one back edge
\tldr\tq0, [x2, x6]
\tldr\tq1, [sp, #48]                    // a spilled splat read back
\tushll\tv2.8h, v0.8b, #0
\tmla\tv3.8h, v2.8h, v1.8h
\tsdot\tv4.4s, v0.16b, v1.16b
\tcbz\tx7, .LBB0_4
\tstr\tq3, [sp, #64]
.LBB0_4:
\tadd\tx6, x6, #16
\tcmp\tx6, #256
\tb.lo\t.LBB0_3
\tadd\tx5, x5, #1
\tcmp\tx5, x4
\tb.ne\t.LBB0_1
\tret
"""

X86_LOOP = """
fn:
.LBB0_7:
\tvmovdqu64\t(%rdi,%rax), %zmm0
\tvpmovzxbw\t(%rbp,%rcx), %ymm2          # rbp is a general register here, not the stack
\tvpdpbusd\t128(%rsp), %zmm0, %zmm1     # a stack operand: a load
\tvpmaddwd\t%ymm2, %ymm3, %ymm4
\tvfmadd231ps\t%zmm5, %zmm6, %zmm7
\tvmovdqu64\t%zmm1, 64(%rsp)            # a store
\taddq\t$64, %rax
\tcmpq\t%rcx, %rax
\tjne\t.LBB0_7
\tretq
"""


def test_hot_loop_aarch64_is_the_innermost_loop_with_the_most_products():
    assert [(loop.header, len(loop.body)) for loop in asm.loops(AARCH64_LOOPS)] == [(".LBB0_2", 5), (".LBB0_3", 10)]
    m = asm.hot_loop(AARCH64_LOOPS)
    assert m is not None and (m.arch, m.header, m.instructions) == ("aarch64", ".LBB0_3", 10)
    assert m.multiply_adds == 8 + 16  # mla on .8h: 8; sdot on .4s: 4 lanes x 4 products
    assert (m.stack_loads, m.stack_stores) == (1, 1)
    assert m.mnemonics == {"ldr": 2, "ushll": 1, "mla": 1, "sdot": 1, "cbz": 1, "str": 1, "add": 1, "cmp": 1, "b.lo": 1}
    assert m.per_instruction == pytest.approx(2.4)


def test_hot_loop_x86():
    m = asm.hot_loop(X86_LOOP)
    assert m is not None and (m.arch, m.header, m.instructions) == ("x86_64", ".LBB0_7", 9)
    assert m.multiply_adds == 64 + 16 + 16  # vpdpbusd zmm: 16 x 4; vpmaddwd ymm: 8 x 2; vfmadd zmm ps: 16
    assert (m.stack_loads, m.stack_stores) == (1, 1)


def test_no_loop_no_hot_loop():
    assert asm.hot_loop("fn:\n\tmla\tv0.8h, v1.8h, v2.8h\n\tret\n") is None


# ---------------------------------------------------------------- under emulation (slow)


@pytest.fixture(scope="module")
def emu():
    """The ready emulation root, set up on first use (skip only where that cannot be done)."""
    try:
        return ensure(log=lambda line: print(line, file=sys.stderr))
    except Unavailable as e:
        pytest.skip(f"aarch64 emulation unavailable: {e}")


def emulated(emu, args: list[str], cpu: str = "cortex-a76") -> subprocess.CompletedProcess:
    cmd, env = command(emu, args, cpu)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG, check=False)
    assert done.returncode == 0, f"emulated {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done


PROBE = """
import ctypes, json, platform
from llvmlite import binding
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
from mpillama import kernels
from numba.core import registry
features = registry.cpu_target.target_context.codegen().magic_tuple()[2].split(",")
print(json.dumps([platform.machine(), binding.get_host_cpu_name(), bool(libc.getauxval(16) >> 20 & 1),
                  kernels.kernel_path(), "+dotprod" in features, "-dotprod" in features]))
"""  # AT_HWCAP = 16, HWCAP_ASIMDDP = bit 20


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_emulated_cpu_is_the_board_and_picks_its_kernel_path(emu, cpu):
    # LLVM reads the board from the fake cpuinfo, the kernel's HWCAP comes from qemu's CPU model;
    # HWCAP picks the kernel path, and numba's target features (part of its cache key) say the same
    dotprod = BOARDS[cpu].dotprod
    path = "arm-sdot" if dotprod else "portable"
    found = json.loads(emulated(emu, ["-c", PROBE], cpu).stdout)
    assert found == ["aarch64", cpu, dotprod, path, dotprod, not dotprod]


@pytest.mark.slow
def test_kernel_tests_pass_on_aarch64(emu):
    selection = FULL if FULL_RUN else KERNEL_SUBSET
    done = emulated(emu, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *selection])
    passed = re.search(r"(\d+) passed", done.stdout)  # exit code 0 already: nothing failed, every id found
    assert passed and int(passed.group(1)) >= len(selection), done.stdout[-2000:]


GENERATE = ["-m", "mpillama", "generate", "--prompt", "The quick brown fox jumps over", "--steps", "8",
            "--ignore-eos"]


@pytest.fixture(scope="module")
def x86_runs(models, tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (generated text, logits)} on this host: its own kernel path (x86-vnni where the CPU has
    AVX-512 VNNI) and the portable one."""
    folder = tmp_path_factory.mktemp("x86")
    runs = {}
    for name, extra in (("x86", {}), ("x86-portable", {"MPILLAMA_KERNELS": "portable"})):
        env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
        out = folder / f"{name}.npy"
        cmd = [sys.executable, *GENERATE, "--model", str(models["tiny-q40"]), "--dump-logits", str(out)]
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (done.stdout, np.load(out))
    return runs


@pytest.mark.slow
def test_x86_layouts_generate_the_same(x86_runs):
    text, logits = x86_runs["x86"]
    assert text.strip() and logits.shape[0] == 8
    assert x86_runs["x86-portable"][0] == text
    assert np.array_equal(x86_runs["x86-portable"][1], logits)


# with dotprod (SDOT) and, in the full run, without (portable: its kernels are tested on cortex-a76 too)
GENERATE_CPUS = ["cortex-a76", "cortex-a72"] if FULL_RUN else ["cortex-a76"]


@pytest.mark.slow
@pytest.mark.parametrize("cpu", GENERATE_CPUS)
def test_generate_on_aarch64_equals_x86(emu, models, x86_runs, cpu, tmp_path):
    # Greedy tokens (the text) and every logit bitwise equal to x86's (which equal each other): each
    # output is the same exact integer block sums, then the same float operations in the same order
    out = tmp_path / "logits.npy"
    done = emulated(emu, [*GENERATE, "--model", str(models["tiny-q40"]), "--dump-logits", str(out)], cpu)
    path = "arm-sdot" if BOARDS[cpu].dotprod else "portable"
    assert f"kernels {path};" in done.stderr, done.stderr[-2000:]  # the start-up line
    text, logits = x86_runs["x86"]
    assert done.stdout == text, f"{cpu} generated {done.stdout!r}, x86 {text!r}"
    arm = np.load(out)
    assert arm.shape == logits.shape, f"{cpu}: logits {arm.shape}, x86 {logits.shape}"
    assert np.array_equal(arm, logits), f"{cpu}: logits differ by up to {np.abs(arm - logits).max()}"


ASM_CPUS = ["cortex-a76", "cortex-a72"] if FULL_RUN else ["cortex-a76"]


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ASM_CPUS)
def test_hot_loops_on_aarch64(emu, cpu):
    # bench/kernels.py --asm (each kernel compiled afresh, printed with -s): every hot loop of the kernel
    # path this board runs keeps its values in registers (no stack reloads), and the SDOT decode loop
    # uses sdot at >= 4.5 multiply-adds per instruction (the portable loop on cortex-a76 had 2.2)
    cmd = ["bench/kernels.py", "--asm", "--json", "--shapes", ""]
    doc = json.loads(emulated(emu, cmd, cpu).stdout)
    assert (doc["meta"]["machine"], doc["meta"]["cpu"]) == ("aarch64", cpu)
    loops = {name: mix for found in doc["asm"].values() for name, mix in found.items()}
    for name, mix in loops.items():
        print(f"{cpu} {name}: {json.dumps(mix)}")
    expected = ["_q40s_one", "_q40v_split", "_q40s_pair", "_q40s_single", "_q40_tiles"] if BOARDS[cpu].dotprod \
        else ["_q40_tiles"]
    assert sorted(loops) == sorted(expected) and all(mix is not None for mix in loops.values()), loops
    assert {name: mix["stack_loads"] for name, mix in loops.items()} == dict.fromkeys(expected, 0)
    assert all(mix["arch"] == "aarch64" for mix in loops.values())
    if BOARDS[cpu].dotprod:
        decode = loops["_q40s_one"]
        assert decode["mnemonics"].get("sdot", 0) >= 8 and decode["per_instruction"] >= 4.5, decode
        assert loops["_q40s_pair"]["mnemonics"].get("sdot", 0) >= 8
    assert loops["_q40_tiles"]["per_instruction"] > 2.5, loops["_q40_tiles"]  # 2.2 with spilled coefficients
