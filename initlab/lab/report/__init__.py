"""The run's report, rebuilt at any time from the run directory's files.

``write_report(run_dir)`` reads ``config.toml``, ``metrics.csv``, ``first_pass.csv`` and the
first-pass arrays under ``parts/`` (for the histograms), redraws ``figures/*.png`` and writes
``report.html``. The package, by stage: :mod:`.load` (the files, as :class:`RunData`),
:mod:`.stats` (seed statistics and number formats), :mod:`.labels` (scenario names and
comparison groups), :mod:`.findings`, :mod:`.tables`, :mod:`.plots` (the figures),
:mod:`.tensorboard` (a member's TensorBoard log), :mod:`.html` (the page and
:func:`write_report`) and :mod:`.workers` (the figures and the page drawn by worker processes
that import these modules while a run trains: ``initlab run --figure-workers``).

pandas, matplotlib and tensorboard are imported inside the functions that use them.
"""
from __future__ import annotations

from .findings import Finding, accuracy_ordering, findings
from .html import render_html, write_report
from .load import RunData, load_run
from .stats import Stat, final_values
from .tables import first_pass_rows, summary_rows

__all__ = ["RunData", "load_run", "findings", "summary_rows", "first_pass_rows", "render_html", "write_report",
           "final_values", "accuracy_ordering", "Finding", "Stat"]
