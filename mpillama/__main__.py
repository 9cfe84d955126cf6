"""`python -m mpillama ...`: see mpillama/cli.py.

BLAS reads its thread count once, as numpy loads: set it from the command line before the
import of cli (whose commands import numpy) can load it.
"""

import sys

from mpillama.blas_threads import limit_blas_threads

limit_blas_threads(sys.argv[1:])

from mpillama.cli import main  # noqa: E402  (after the BLAS variables, on purpose)

raise SystemExit(main())
