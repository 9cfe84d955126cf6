"""The row-group layout's shapes and the generic kernels both dot-product paths share (x86.py, arm.py).

The layout (q40.py, "vnni"): rows in groups of VNNI_ROWS = 16; per group and block,
VNNI_BLOCK_BYTES = 288 bytes: the 16 rows' 16 bytes as [byte group k (4)][row (16)][4 bytes],
then the 16 rows' float16 scales. One 64-byte vector holds 4 bytes of each of the 16 rows: an
int32 lane per row, whose 4 bytes one dot-product step (x86's vpdpbusd, ARM's sdot) multiplies by
4 activation bytes and sums. The kernels here use vector.py's generic layer only, so they compile
for any CPU; they are called only by the two paths' kernels.

Imports numba and the package's vector.py only.
"""

from __future__ import annotations

from numba import njit

from mpillama.kernels.vector import _vand, _vload_f16, _vload_i32, _vshr4, _vsplat_i32, _vstore, _vstore_first

VNNI_ROWS = 16  # rows per group of the row-group layout (one int32 lane each)
VNNI_CHUNK = 8  # row groups a thread claims at a time in a threaded matmul (128 rows)
VNNI_BLOCK_BYTES = 288  # one block of a row group: 256 nibble bytes, then 16 float16 scales


@njit(cache=True, fastmath=True, error_model="numpy")
def _store_rows(out, i, v, n):
    # v (16,) f32 -> out.flat[i : i + min(n, 16)]: the last row group may hold padded rows
    if n >= VNNI_ROWS:
        _vstore(out, i, v)
    else:
        _vstore_first(out, i, v, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_split(unp, ws, w, g):
    # row group g of w (n_groups, nb, 288) -> unp (nb*8*16,) int32: per block 8 vectors of 16 lanes,
    # each lane 4 nibbles (one byte each; the low nibbles of byte group k at vector k, the high ones
    # at 4+k); ws (nb*16,) f32: the 16 row scales of each block. Prefill splits a group once for all tokens.
    nb = w.shape[1]
    low = _vsplat_i32(0x0F0F0F0F)
    for b in range(nb):
        o = (g * nb + b) * VNNI_BLOCK_BYTES
        for k in range(4):
            v = _vload_i32(w, o + 64 * k)
            _vstore(unp, (b * 8 + k) * 16, _vand(v, low))
            _vstore(unp, (b * 8 + 4 + k) * 16, _vand(_vshr4(v), low))
        _vstore(ws, b * 16, _vload_f16(w, o + 256))
