"""A report worker with faults, for tests/test_figure_workers.py: ``python figure_worker_faults.py KIND=FIGURE ...``
runs :func:`initlab.lab.report.workers.main` with the drawing of each FIGURE (a file name of the report's figure
list) made to raise (KIND ``raise``), to end the process (``exit``) or to hang (``hang``); the other figures are
drawn as usual."""
from __future__ import annotations

import os
import sys
import time

import initlab.lab.report.workers as workers

FAULTS = dict(reversed(arg.split("=", 1)) for arg in sys.argv[1:])  # figure -> kind
_real = workers.make_figures


def _faulty(*args, only=None, **kwargs):
    kind = FAULTS.get(next(iter(only))) if only is not None and len(only) == 1 else None
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        time.sleep(3600)
    if kind == "raise":
        raise RuntimeError("injected fault")
    return _real(*args, only=only, **kwargs)


if __name__ == "__main__":
    workers.make_figures = _faulty
    sys.exit(workers.main())
