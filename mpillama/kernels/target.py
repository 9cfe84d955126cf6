"""Which Q40 kernel path this process runs, decided once, before numba compiles anything.

    x86-vnni   x86_64 with AVX-512 VNNI: the row-group layout, vpdpbusd (x86.py)
    arm-sdot   aarch64 with the dot-product extension (Armv8.2 dotprod): the same layout, sdot (arm.py)
    portable   any other CPU: the tiles layout, plain numba loops (portable.py)

The environment variable MPILLAMA_KERNELS (vnni | sdot | portable; unset or auto: detect) forces
one. On aarch64 the hardware decides first: the kernel's HWCAP_ASIMDDP bit (bit 20 of
getauxval(AT_HWCAP); under qemu-user, the emulated CPU's), then, where that cannot be read, the
CPU name LLVM compiles for (cortex-a55, cortex-a76, ...: names whose default features include
dotprod).

Why this sets a numba flag at import (the one import-time effect of the package): LLVM's host
feature list on Linux/aarch64 never names dotprod, so numba compiles for what the CPU *name*
implies, and numba fixes its target when the first kernel is decorated. Compiling sdot for a target
without dotprod is no Python error, LLVM aborts the process; and a CPU without dotprod must never
run code compiled as if it had it. So on aarch64, where HWCAP is readable, numba's target features
become the host's plus "+dotprod" or "-dotprod" as HWCAP says, before any kernel exists. numba keys
its cache on the CPU name and that feature string, so a cache built on a dotprod CPU is never
handed to one without (x86 needs none of this: LLVM reads its host features, VNNI included). A
target the user set (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, e.g. for a cache shared between
machines) is left alone and obeyed: sdot only where it names dotprod.

Imports numba, llvmlite, mpillama.errors and the package's vector.py (the x86 check) only.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import numba
from llvmlite import binding as llvm_binding
from numba.core import registry

from mpillama.errors import MpillamaError
from mpillama.kernels.vector import simd_available

X86_VNNI, ARM_SDOT, PORTABLE = "x86-vnni", "arm-sdot", "portable"
ENV = "MPILLAMA_KERNELS"
FORCE = {"vnni": X86_VNNI, "sdot": ARM_SDOT, "portable": PORTABLE}  # the values ENV takes (besides auto)
AT_HWCAP, HWCAP_ASIMDDP = 16, 1 << 20  # from the Linux aarch64 uapi headers

# LLVM aarch64 CPU names whose default features include dotprod (the fallback where HWCAP cannot be
# read, and how a NUMBA_CPU_NAME the user set is read). Older cores (cortex-a53/a57/a72/a73) lack it.
DOTPROD_CPUS = frozenset({
    "cortex-a55", "cortex-a65", "cortex-a65ae", "cortex-a75", "cortex-a76", "cortex-a76ae", "cortex-a77",
    "cortex-a78", "cortex-a78ae", "cortex-a78c", "cortex-a510", "cortex-a520", "cortex-a710", "cortex-a715",
    "cortex-a720", "cortex-a725", "cortex-x1", "cortex-x1c", "cortex-x2", "cortex-x3", "cortex-x4", "cortex-x925",
    "neoverse-n1", "neoverse-n2", "neoverse-n3", "neoverse-v1", "neoverse-v2", "neoverse-v3", "neoverse-512tvb",
    "apple-a13", "apple-a14", "apple-a15", "apple-a16", "apple-a17", "apple-m1", "apple-m2", "apple-m3", "apple-m4",
    "ampere1", "ampere1a", "ampere1b", "tsv110", "carmel", "oryon-1",
})  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """The kernel path (or why the forced one cannot run) and the feature string numba must use."""

    path: str | None  # None: error says why
    error: str | None = None
    features: str | None = None  # set numba's CPU features to this before anything compiles (None: leave them)


def hwcap_dotprod() -> bool | None:
    """The kernel's HWCAP_ASIMDDP bit on aarch64 Linux; None elsewhere or where getauxval cannot be called."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return None
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return bool(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)


def names_dotprod(cpu: str, features: str | None) -> bool:
    """Whether LLVM compiling for cpu with features (a '+a,-b' string; None: the CPU's defaults) has dotprod."""
    flags = (features or "").split(",")
    if "-dotprod" in flags:
        return False
    return "+dotprod" in flags or cpu in DOTPROD_CPUS


def decide(machine: str, forced: str, *, vnni: bool, hwcap: bool | None, cpu: str, features: str | None,
           fixed: bool, host_features: str = "") -> Decision:
    """The kernel path from the facts (a pure function: every case is tested on any machine).

    forced: ENV's value ('' = auto); vnni: simd_available(); hwcap: hwcap_dotprod(); cpu, features:
    the target numba compiles for (features None = the host's list); fixed: that target cannot be
    changed (the user set it, or numba's target exists already); host_features: LLVM's host list.
    """
    forced = forced.strip().lower()
    if forced not in ("", "auto", *FORCE):
        return Decision(None, f"{ENV}={forced!r}: choose auto, {', '.join(FORCE)}")
    want = FORCE.get(forced)
    arm = machine.lower() in ("aarch64", "arm64")
    x86 = machine.lower() in ("x86_64", "amd64")
    if want == X86_VNNI and not (x86 and vnni):
        where = "this CPU (or the NUMBA_CPU_NAME/NUMBA_CPU_FEATURES target) has no AVX-512 VNNI" if x86 else \
            f"the VNNI kernels are x86 code and this machine is {machine}"
        return Decision(None, f"{ENV}=vnni: {where}; use {ENV}=portable or unset it")
    if want == ARM_SDOT and not arm:
        return Decision(None, f"{ENV}=sdot: the SDOT kernels are aarch64 code and this machine is {machine}; "
                              f"use {ENV}=portable or unset it")
    if not arm:
        return Decision(X86_VNNI if x86 and vnni and want is None else want or PORTABLE)
    # aarch64: the target numba compiles for must agree with the hardware (module docstring)
    features_to_set, compiles = None, names_dotprod(cpu, features)
    # what numba's target must say: HWCAP's answer, or, without HWCAP, dotprod where sdot is forced
    says = hwcap if hwcap is not None else (True if want == ARM_SDOT and not compiles else None)
    if says is not None and not fixed:
        base = features if features is not None else host_features
        features_to_set = ",".join(f for f in (base, "+dotprod" if says else "-dotprod") if f)
        compiles = says
    has = hwcap if hwcap is not None else compiles  # what the hardware runs (HWCAP, else the CPU name)
    if want == ARM_SDOT:
        if hwcap is False:
            return Decision(None, f"{ENV}=sdot: this CPU has no dot-product extension (HWCAP_ASIMDDP is not set); "
                                  f"use {ENV}=portable or unset it")
        if not compiles:
            return Decision(None, f"{ENV}=sdot: numba compiles for {cpu!r} without dotprod (NUMBA_CPU_NAME/"
                                  f"NUMBA_CPU_FEATURES); add +dotprod to NUMBA_CPU_FEATURES or unset them")
        return Decision(ARM_SDOT, features=features_to_set)
    return Decision(ARM_SDOT if want is None and has and compiles else PORTABLE, features=features_to_set)


def _decide_here() -> Decision:
    """decide() for this process; applies the feature string it asks for (before any kernel exists)."""
    machine = platform.machine()
    user_target = numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None
    started = "_toplevel_target_context" in vars(registry.cpu_target)  # numba's target is fixed once created
    features = numba.config.CPU_FEATURES
    if started and not user_target:
        features = registry.cpu_target.target_context.codegen()._tm_features  # what it actually uses
    arm = machine.lower() in ("aarch64", "arm64")
    decision = decide(
        machine, os.environ.get(ENV, ""), vnni=simd_available(), hwcap=hwcap_dotprod(),
        cpu=numba.config.CPU_NAME or llvm_binding.get_host_cpu_name(), features=features,
        fixed=user_target or started,
        host_features=llvm_binding.get_host_cpu_features().flatten() if arm else "",
    )
    if decision.features is not None:
        numba.config.CPU_FEATURES = decision.features
        registry.cpu_target.target_context  # noqa: B018  (creates numba's target now, with these features)
    return decision


_DECISION = _decide_here()


def kernel_path() -> str:
    """'x86-vnni', 'arm-sdot' or 'portable': the Q40 kernels this process runs (MpillamaError if
    MPILLAMA_KERNELS asks for one this machine cannot run)."""
    if _DECISION.path is None:
        raise MpillamaError(_DECISION.error)
    return _DECISION.path
