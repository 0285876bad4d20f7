"""``python -m lorasup.trainers.builtin``: install the stop handlers first, then train.

The handlers go in before numpy is imported, so a SIGTERM that arrives while the
trainer is still starting up also ends in a clean exit 143 instead of a traceback.
Single-threaded BLAS (unless the user set it): the matrices are small enough that
threads cost more than they give, and one thread keeps results bit-reproducible.
"""

import os

from .stop import STOP

STOP.install()
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from .cli import main  # noqa: E402 - after the handlers, on purpose

raise SystemExit(main())
