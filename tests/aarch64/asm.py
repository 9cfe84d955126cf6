"""The instruction mix of a kernel's hot loop, read from the assembly numba generates (aarch64 and x86).

    python tests/aarch64/run.py -- tests/aarch64/asm.py            # cortex-a76, the portable decode kernel
    python tests/aarch64/run.py --cpu cortex-a72 -- tests/aarch64/asm.py --json --show
    python tests/aarch64/asm.py                                    # the same kernel on this x86 host

The hot loop is found from the branches alone: each label that a later branch jumps back to heads
a loop ending at its last such branch; of the innermost loops (no other loop inside), the one whose
vector multiply instructions compute the most products. Its mix counts every mnemonic, the
products per iteration ("multiply-adds", lanes times the products each lane sums: 16 for an sdot
on .4s, 8 for an mla on .8h, 64 for a vpdpbusd on zmm), and the loads and stores that address the
stack (spills). The parsing functions take assembly text and run anywhere; main() compiles a
kernel on the machine it runs on (under emulation: the emulated CPU). Owns no kernel code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

AARCH64_BRANCHES = {"b", "cbz", "cbnz", "tbz", "tbnz"}  # and b.<cond>
# mnemonic -> products per destination lane; a plain vector multiply counts too (its add is apart)
AARCH64_PRODUCTS = {
    "mla": 1, "mls": 1, "mul": 1, "fmla": 1, "fmls": 1, "fmul": 1,
    "smlal": 1, "smlal2": 1, "umlal": 1, "umlal2": 1, "smlsl": 1, "smlsl2": 1, "umlsl": 1, "umlsl2": 1,
    "smull": 1, "smull2": 1, "umull": 1, "umull2": 1,
    "sdot": 4, "udot": 4, "usdot": 4, "sudot": 4, "smmla": 8, "ummla": 8, "usmmla": 8,
}  # fmt: skip
# mnemonic -> (bits per destination lane, products per lane)
X86_PRODUCTS = {
    "vpdpbusd": (32, 4), "vpdpbusds": (32, 4), "vpdpwssd": (32, 2), "vpdpwssds": (32, 2),
    "vpmaddwd": (32, 2), "vpmaddubsw": (16, 2), "vpmullw": (16, 1), "vpmulld": (32, 1),
}  # fmt: skip
X86_FMA = re.compile(r"^vf(n?)m(add|sub)\d{3}p([sd])$")  # vfmadd231ps ...: one product per lane
X86_WIDTH = {"x": 128, "y": 256, "z": 512}
AARCH64_VREG = re.compile(r"^v\d+\.(\d+)[bhsd]$")
LABEL = re.compile(r"^([.$\w]+):")


@dataclass(frozen=True)
class Instruction:
    mnemonic: str
    operands: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.mnemonic}\t{', '.join(self.operands)}"


@dataclass
class Loop:
    header: str  # the label branched back to
    body: list[Instruction]  # from the header to the last backward branch, both included


@dataclass
class Mix:
    """What one iteration of a loop executes."""

    arch: str  # "aarch64" or "x86_64"
    header: str
    instructions: int
    multiply_adds: int  # products computed by vector multiply(-add) instructions
    stack_loads: int  # loads from [sp ...] or (%rsp): spilled values read back
    stack_stores: int
    mnemonics: dict[str, int] = field(default_factory=dict)

    @property
    def per_instruction(self) -> float:
        return self.multiply_adds / self.instructions if self.instructions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "header": self.header, "instructions": self.instructions,
                "multiply_adds": self.multiply_adds, "per_instruction": round(self.per_instruction, 2),
                "stack_loads": self.stack_loads, "stack_stores": self.stack_stores, "mnemonics": self.mnemonics}

    def summary(self) -> str:
        top = ", ".join(f"{n} {m}" for m, n in sorted(self.mnemonics.items(), key=lambda kv: (-kv[1], kv[0])))
        return (f"{self.arch} hot loop {self.header}: {self.instructions} instructions, {self.multiply_adds} "
                f"multiply-adds ({self.per_instruction:.2f} per instruction), {self.stack_loads} stack loads, "
                f"{self.stack_stores} stack stores\n  {top}")


def arch_of(asm: str) -> str:
    return "x86_64" if re.search(r"%[re]?(sp|ip|ax|di|si)\b|%[xyz]mm\d", asm) else "aarch64"


def parse(asm: str) -> list[str | Instruction]:
    """Labels (str) and instructions in order; directives and comments dropped."""
    comment = "#" if arch_of(asm) == "x86_64" else "//"  # '#' marks immediates on aarch64
    out: list[str | Instruction] = []
    for raw in asm.splitlines():
        line = raw.split(comment, 1)[0].strip()
        label = LABEL.match(line)
        if label:
            out.append(label.group(1))
            line = line[label.end() :].strip()
        if not line or line.startswith("."):
            continue
        mnemonic, _, rest = line.partition(" ") if "\t" not in line else line.partition("\t")
        operands = tuple(o.strip() for o in _split_operands(rest.strip())) if rest.strip() else ()
        out.append(Instruction(mnemonic.strip(), operands))
    return out


def _split_operands(text: str) -> list[str]:
    """Split on commas outside brackets and braces: [x0, #16] and {v0.16b, v1.16b} stay whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _branch_target(ins: Instruction, arch: str) -> str | None:
    if arch == "x86_64":
        is_branch = ins.mnemonic.startswith("j")
    else:
        is_branch = ins.mnemonic in AARCH64_BRANCHES or ins.mnemonic.startswith("b.")
    return ins.operands[-1] if is_branch and ins.operands else None


def loops(asm: str) -> list[Loop]:
    """The innermost loops: a header label, and the code up to the last branch back to it."""
    arch = arch_of(asm)
    items = parse(asm)
    where = {item: i for i, item in enumerate(items) if isinstance(item, str)}
    end: dict[str, int] = {}
    for i, item in enumerate(items):
        target = _branch_target(item, arch) if isinstance(item, Instruction) else None
        if target in where and where[target] <= i:
            end[target] = i
    spans = [(where[h], e, h) for h, e in end.items()]
    inner = [s for s in spans if not any(s[0] < o[0] and o[1] <= s[1] for o in spans if o != s)]
    return [Loop(h, [x for x in items[a : b + 1] if isinstance(x, Instruction)]) for a, b, h in sorted(inner)]


def products(ins: Instruction, arch: str) -> int:
    """Products one instruction computes (0 for everything but vector multiplies)."""
    if not ins.operands:
        return 0
    if arch == "aarch64":
        per_lane = AARCH64_PRODUCTS.get(ins.mnemonic, 0)
        lanes = AARCH64_VREG.match(ins.operands[0])
        return per_lane * int(lanes.group(1)) if per_lane and lanes else 0
    dest = re.match(r"^%([xyz])mm\d+$", ins.operands[-1])
    if dest is None:
        return 0
    fma = X86_FMA.match(ins.mnemonic)
    bits, per_lane = X86_PRODUCTS.get(ins.mnemonic) or ((32 if fma.group(3) == "s" else 64, 1) if fma else (0, 0))
    return X86_WIDTH[dest.group(1)] // bits * per_lane if bits else 0


def _stack_access(ins: Instruction, arch: str) -> str | None:
    """'load' or 'store' when the instruction reads or writes the stack, else None."""
    if arch == "aarch64":
        if any(o.startswith("[sp") for o in ins.operands):  # x29 too is a general register in numba's code
            return "load" if ins.mnemonic.startswith("ld") else "store" if ins.mnemonic.startswith("st") else None
        return None
    stack = [i for i, o in enumerate(ins.operands) if "(%rsp" in o]  # rbp is a general register in numba's code
    if not stack:
        return None
    return "store" if stack[-1] == len(ins.operands) - 1 and len(ins.operands) > 1 else "load"


def mix(loop: Loop, arch: str) -> Mix:
    access = Counter(_stack_access(i, arch) for i in loop.body)
    return Mix(arch, loop.header, len(loop.body), sum(products(i, arch) for i in loop.body), access["load"],
               access["store"], dict(Counter(i.mnemonic for i in loop.body)))


def hot_loop(asm: str) -> Mix | None:
    """The mix of the innermost loop with the most vector products (the first, on a tie); None without loops."""
    arch = arch_of(asm)
    found = [mix(loop, arch) for loop in loops(asm)]
    return max(found, key=lambda m: m.multiply_adds, default=None)


# ---------------------------------------------------------------- compiling a kernel


def find_kernel(name: str) -> Any:
    """The numba dispatcher called name in mpillama.kernels, a module or a package of modules."""
    package = importlib.import_module("mpillama.kernels")
    modules = [package] + [importlib.import_module(m.name)
                           for m in pkgutil.walk_packages(getattr(package, "__path__", []), "mpillama.kernels.")]
    for module in modules:
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no kernel named {name} in mpillama.kernels")


def fresh_asm(dispatcher: Any) -> dict[str, str]:
    """{signature: assembly} for every signature the dispatcher has, compiled anew (not from the cache)."""
    import numba  # only here: the parsing above runs without numba

    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**options)(dispatcher.py_func)
    out = {}
    for sig in dispatcher.signatures:
        fresh.compile(sig)
        out[str(sig)] = fresh.inspect_asm(sig)
    return out


def decode_asm(names: list[str], layout: str, T: int = 1) -> dict[str, str]:
    """{kernel name: assembly} of the kernels one single-thread matmul_q40 call in this layout runs."""
    import numba
    import numpy as np

    from mpillama import kernels, quant

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, cols = 64, 64  # small: the shapes change nothing in the code, only how long the call takes
    m = kernels.pack_q40(quant.quantize_q40(rng.standard_normal((rows, cols)).astype(np.float32)), layout)
    acts = kernels.new_activations(T, cols)
    kernels.quantize_activations(acts, rng.standard_normal((T, cols)).astype(np.float32))
    kernels.matmul_q40(np.zeros((T, rows), np.float32), m, acts, T)
    out = {}
    for name in names:
        compiled = fresh_asm(find_kernel(name))
        if not compiled:
            raise LookupError(f"{name} did not run in a {layout} matmul with T={T}")
        out[name] = next(iter(compiled.values()))
    return out


def target() -> dict[str, str]:
    """The machine and the CPU numba compiles for (NUMBA_CPU_NAME, else what LLVM reads from the host)."""
    import platform

    import numba
    from llvmlite import binding

    return {"machine": platform.machine(), "cpu": numba.config.CPU_NAME or binding.get_host_cpu_name()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="append", help="kernel name (repeatable; default _q40_tiles)")
    parser.add_argument("--layout", default="tiles", help="Q40 layout the kernels read (default tiles)")
    parser.add_argument("-T", type=int, default=1, help="tokens: 1 is decode, more is prefill")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--show", action="store_true", help="print the hot loop's instructions too")
    parser.add_argument("--save", help="write the whole assembly of each kernel to SAVE.NAME.s")
    args = parser.parse_args(argv)
    names = args.kernel or ["_q40_tiles"]
    from mpillama.errors import MpillamaError  # an unknown layout
    report: dict[str, Any] = {**target(), "layout": args.layout, "T": args.T, "kernels": {}}
    try:
        compiled = decode_asm(names, args.layout, args.T)
    except (LookupError, MpillamaError) as e:
        print(f"asm.py: error: {e}", file=sys.stderr)
        return 2
    for name, asm in compiled.items():
        if args.save:
            with open(f"{args.save}.{name}.s", "w") as f:
                f.write(asm)
        found = hot_loop(asm)
        entry = found.as_dict() if found else None
        if found and args.show:
            loop = next(lp for lp in loops(asm) if lp.header == found.header)
            entry["body"] = [str(i) for i in loop.body]
        report["kernels"][name] = entry
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['machine']} {report['cpu']}, layout {args.layout}, T={args.T}")
    for name, entry in report["kernels"].items():
        if entry is None:
            print(f"{name}: no loop found")
            continue
        found = Mix(**{k: entry[k] for k in ("arch", "header", "instructions", "multiply_adds", "stack_loads",
                                            "stack_stores", "mnemonics")})
        print(f"{name}: {found.summary()}")
        for line in entry.get("body", []):
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
