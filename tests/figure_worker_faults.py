"""A report worker with a fault, for tests/test_figure_workers.py: ``python figure_worker_faults.py KIND FUNCTION``
runs :func:`initlab.lab.report.workers.main` with ``initlab.lab.report.plots.FUNCTION`` (a figure's drawing
function) made to raise (KIND ``raise``), to end the process (``exit``) or to hang (``hang``)."""
from __future__ import annotations

import os
import sys
import time

import initlab.lab.report.plots as plots
import initlab.lab.report.workers as workers

KIND, FUNCTION = sys.argv[1], sys.argv[2]


def _fault(*args, **kwargs):
    if KIND == "exit":
        os._exit(3)
    if KIND == "hang":
        time.sleep(3600)
    raise RuntimeError("injected fault")


if __name__ == "__main__":
    setattr(plots, FUNCTION, _fault)
    sys.exit(workers.main())
