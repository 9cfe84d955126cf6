"""aarch64 emulation: an arm64 Debian Python under qemu-user, to prove kernels on ARM without ARM hardware.

setup.py installs it (idempotent), run.py runs arm64 Python in it, asm.py reads a kernel's hot loop
from its generated assembly. README.md says how to use them; tests/test_aarch64.py is the CI part.
"""
