"""The report page: one self-contained HTML file (CSS inline, figures embedded as base64 ``data:``
URIs, no external resource) that opens offline in any browser, and :func:`write_report`, which
rebuilds it (and the figures) from a run directory's files at any time.

The page opens with the claims table when the experiment states claims (:mod:`initlab.lab.claims`; also
written as ``claims.csv``, a claim that did not reproduce in red), then the findings (:mod:`.findings`), a summary table (final value of each metric,
mean +- standard deviation over seeds), the first-pass table (per scenario and layer, measured
pre-activation variance beside the prediction of :mod:`initlab.theory`) and the figures
(:mod:`.plots`). A tiny inline script records, once the page has loaded, each image's
``naturalWidth`` and any script error in the hidden element ``#render-status`` (the browser test
reads it back).
"""
from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._errors import InitlabError
from .._io import atomic_write_text
from ..claims import CLAIMS_COLUMNS, claims_csv, evaluate_claims
from ..config import claims_from_dict, read_toml
from ..metrics import find, headline
from .. import studies as _studies  # noqa: F401 - registers the theory presets' claim quantities
from .figures import grid_captions, grid_figures
from .findings import Finding, findings
from .load import RunData, load_run
from .plots import figures as figure_captions
from .plots import make_figures
from .stats import Stat, mean_sd, num, pct
from .tables import first_pass_rows, summary_columns, summary_rows

__all__ = ["render_html", "write_report", "claim_rows", "CLAIMS_COLUMNS"]


_CSS = """
:root { --fg: #1d2433; --muted: #5b6475; --line: #d9dee7; --bg: #ffffff; --band: #f5f7fa; --accent: #2457c5; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p.lead { color: var(--muted); margin: 0 0 12px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0; font-size: 14px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--band); padding: 10px 12px; border-radius: 6px; overflow-x: auto; }
ul.findings { padding-left: 0; list-style: none; }
ul.findings li { margin: 0 0 10px; padding: 8px 12px; background: var(--band); border-left: 4px solid var(--accent);
                 border-radius: 4px; }
ul.findings .topic { display: inline-block; min-width: 86px; font-size: 12px; text-transform: uppercase;
                     letter-spacing: .04em; color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-size: 14px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #fafbfd; }
p.note { color: var(--muted); font-size: 13px; margin: 4px 0 0; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
tr.claim-failed td { color: #b00020; background: #fdecee; }
p.warn { color: #b00020; background: #fdecee; padding: 6px 10px; }
tr.claim-ok td:nth-child(5) { color: #1b7f3b; }
"""

# Records image status and script errors in #render-status once the page has loaded.
_STATUS_JS = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    errors.push(t && t.tagName ? ('failed to load ' + t.tagName.toLowerCase() + ' ' + (t.alt || '')) : String(e.message));
  }, true);
  window.addEventListener('load', function () {
    var images = [];
    for (var i = 0; i < document.images.length; i++) {
      var im = document.images[i];
      images.push({alt: im.alt, complete: im.complete, naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight});
    }
    var el = document.getElementById('render-status');
    el.textContent = JSON.stringify({loaded: true, images: images, errors: errors});
    el.setAttribute('data-loaded', 'true');
  });
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _meta_items(data: RunData) -> list[tuple[str, str]]:
    n_members = int(data.metrics.groupby(["scenario", "seed"]).ngroups) if not data.metrics.empty else 0
    steps = int(data.metrics["step"].max()) if not data.metrics.empty else 0
    tr = data.train
    items = [
        ("Scenarios", f"{len(data.scenarios)} ({', '.join(data.scenarios)})"),
        ("Members", f"{n_members} (scenario \u00d7 seed)" + (f", seeds {', '.join(str(s) for s in tr.get('seeds', []))}" if tr.get("seeds") else "")),
        ("Training", (f"{tr.get('optimizer', '?')} lr {tr.get('lr', '?')}, batch {tr.get('batch_size', '?')}, "
                      f"{steps} steps, logged every {tr.get('log_every', '?')}") if tr else f"{steps} steps"),
    ]
    if data.meta.get("status", ""):
        items.append(("Status", str(data.meta["status"])))
    if data.meta.get("wall_s"):
        items.append(("Training time", f"{float(data.meta['wall_s']):.1f} s"))
    return items


def _head(data: RunData) -> str:
    status = data.meta.get("status", "")
    out = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
           f"<title>initlab report: {_e(data.name)}</title>\n<style>{_CSS}</style>\n"
           f"<script>{_STATUS_JS}</script>\n</head>\n<body>\n<main>\n",
           f"<h1>initlab report: {_e(data.name)}</h1>\n"]
    if data.description:
        out.append(f"<p class=\"lead\">{_e(data.description)}</p>\n")
    if status and status != "complete":
        out.append("<p class=\"note\"><strong>This run is not complete</strong>: the tables show the finished members only. "
                   "Re-run the same command to finish it.</p>\n")
    out.append("<dl class=\"meta\">" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _meta_items(data)) + "</dl>\n")
    return "".join(out)


def _findings_section(found: Sequence[Finding]) -> str:
    out = ["<h2>Findings</h2>\n<ul class=\"findings\">\n"]
    for f in found:
        out.append(f"<li><span class=\"topic\">{_e(f.code)}</span> {_e(f.message)}</li>\n")
    if not found:
        out.append("<li>No finding: the run has too little data.</li>\n")
    out.append("</ul>\n")
    return "".join(out)


def _frac(s: Stat) -> str:
    return f"{100 * s.mean:.0f}%" if s.n else "\u2013"


def _metric_cell(key: str, s: Stat) -> str:
    """A final value: a percentage for percent metrics (accuracy), else mean \u00b1 std."""
    metric = find(key.split("_", 1)[1])
    return _e(pct(s) if metric is not None and metric.percent else mean_sd(s))


def _summary_section(data: RunData) -> str:
    cols = summary_columns()
    out = ["<h2>Summary</h2>\n<table>\n<thead><tr><th>Scenario</th><th>Activation</th><th>Scheme</th>"
           "<th class=\"num\">Seeds</th>" + "".join(f"<th class=\"num\">{_e(title)}</th>" for _, title in cols)
           + "<th class=\"num\">Layer-1 saturated</th><th class=\"num\">Layer-1 dead</th>"
           "</tr></thead>\n<tbody>\n"]
    lead = f"test_{headline().name}"
    for r in summary_rows(data):
        n_note = "" if r[lead].n == r[lead].n_total else f" ({r[lead].n_total - r[lead].n} diverged)"
        out.append(f"<tr><td>{_e(r['scenario'])}</td><td>{_e(r['activation'])}</td><td>{_e(r['scheme'])}</td>"
                   f"<td class=\"num\">{r['seeds']}{_e(n_note)}</td>"
                   + "".join(f"<td class=\"num\">{_metric_cell(key, r[key])}</td>" for key, _ in cols)
                   + f"<td class=\"num\">{_frac(r['saturated'])}</td><td class=\"num\">{_frac(r['dead'])}</td></tr>\n")
    out.append("</tbody>\n</table>\n<p class=\"note\">Mean \u00b1 standard deviation over seeds. Train accuracy: mean over the "
               "minibatches of the last logging interval; test accuracy: the whole held-out split after the last step. "
               "Saturated: fraction of layer-1 unit outputs (first-pass batch) where the activation's slope is below 10% of "
               "its peak; dead: fraction of layer-1 units that output zero for every sample.</p>\n")
    return "".join(out)


def _first_pass_section(data: RunData) -> str:
    fp_rows = first_pass_rows(data)
    if not fp_rows:
        return ""
    out = ["<h2>First pass: variance per layer</h2>\n<table>\n<thead><tr><th>Scenario</th><th>Layer (module)</th>"
           "<th>Activation</th><th class=\"num\">fan_in</th><th class=\"num\">Var(w)</th>"
           "<th class=\"num\">E[input\u00b2]</th><th class=\"num\">E[(Wx)\u00b2] measured</th>"
           "<th class=\"num\">E[(Wx)\u00b2] predicted</th><th class=\"num\">measured / predicted</th>"
           "<th class=\"num\">output mean</th></tr></thead>\n<tbody>\n"]
    for r in fp_rows:
        out.append(f"<tr><td>{_e(r['scenario'])}</td><td>{r['index']} ({_e(r['layer'])})</td><td>{_e(r['activation'])}</td>"
                   f"<td class=\"num\">{r['fan_in'] if r['fan_in'] is not None else 'n/a'}</td>"
                   f"<td class=\"num\">{_e(num(r['weight_var'].mean))}</td>"
                   f"<td class=\"num\">{_e(num(r['input_sq_mean'].mean))}</td>"
                   f"<td class=\"num\">{_e(mean_sd(r['pre_sq_mean']))}</td><td class=\"num\">{_e(mean_sd(r['predicted_pre_sq_mean']))}</td>"
                   f"<td class=\"num\">{_e(num(r['ratio']))}</td><td class=\"num\">{_e(num(r['post_mean'].mean))}</td></tr>\n")
    out.append("</tbody>\n</table>\n<p class=\"note\">E[(Wx)\u00b2] is the pre-activation second moment without bias on each "
               "member's first-pass batch (mean \u00b1 std over seeds). Predicted: the variance recursion of "
               "initlab.theory, E[(W\u2081x)\u00b2] = fan_in\u00b7Var(w)\u00b7E[x\u00b2] and then "
               "E[(W\u2097h)\u00b2] = fan_in\u00b7Var(w)\u00b7E[\u03c6(z)\u00b2] for Gaussian z of the previous layer's "
               "variance. Full table with all columns: first_pass.csv.</p>\n")
    return "".join(out)


def _figures_section(figures: Mapping[str, Path], missing: Mapping[str, str] | None = None) -> str:
    if not figures and not missing:
        return ""
    captions = {**figure_captions(), **grid_captions()}
    out = ["<h2>Figures</h2>\n"]
    for name, path in figures.items():
        caption = captions.get(name, name)
        out.append(f"<figure>{_img_tag(Path(path), caption)}<figcaption>{_e(caption)} "
                   f"(<code>figures/{_e(name)}</code>)</figcaption></figure>\n")
    for name, why in (missing or {}).items():
        out.append(f"<p class=\"warn\"><strong>Figure missing:</strong> <code>figures/{_e(name)}</code> "
                   f"({_e(captions.get(name, name))}) could not be drawn: {_e(why)}</p>\n")
    return "".join(out)


def _files_section(data: RunData) -> str:
    return ("<h2>Files and TensorBoard</h2>\n<p>This directory holds <code>config.toml</code> (the resolved "
            "configuration), <code>metrics.csv</code> (scenario, seed, step, split, metric, value), "
            "<code>first_pass.csv</code> (the probe table per scenario, seed and layer), when the run has them "
            "<code>init.csv</code> (the init report's per-layer numbers, e.g. LSUV's iterations) and "
            "<code>layer_histograms.csv</code> (activation and gradient histograms per layer over training), "
            "<code>figures/</code> and "
            "TensorBoard logs, one run per scenario and seed:</p>\n"
            f"<pre>tensorboard --logdir {_e(os.path.join(str(data.run_dir), 'tb'))}</pre>\n"
            "<p>Regenerate this page from the CSV files with:</p>\n"
            f"<pre>initlab report {_e(str(data.run_dir))}</pre>\n"
            "<details><summary>Resolved configuration (config.toml)</summary>\n"
            f"<pre>{_e(data.config_text)}</pre></details>\n"
            f"<footer>Generated by initlab on {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}."
            " Schemes: Glorot &amp; Bengio (2010), He et al. (2015), LeCun et al. (1998).</footer>\n"
            "<pre id=\"render-status\" hidden></pre>\n</main>\n</body>\n</html>\n")


def _claims_section(rows: Sequence[Mapping[str, str]]) -> str:
    """The claims table: one row per claim, a claim that did not reproduce in red with its numbers."""
    if not rows:
        return ""
    heads = ("Claim", "Source", "Expected", "Measured", "Verdict", "Test")
    out = ["<h2>Claims</h2>\n<table class=\"claims\">\n<thead><tr>" + "".join(f"<th>{h}</th>" for h in heads)
           + "</tr></thead>\n<tbody>\n"]
    for r in rows:
        cls = {"reproduced": "ok", "not reproduced": "failed"}.get(r["verdict"], "open")
        out.append(f"<tr class=\"claim-{cls}\"><td><code>{_e(r['claim_id'])}</code> {_e(r['claim'])}</td>"
                   f"<td>{_e(r['source'])}</td><td>{_e(r['expected'])}</td><td class=\"num\">{_e(r['measured'])}</td>"
                   f"<td><strong>{_e(r['verdict'])}</strong></td><td>{_e(r['test'])}</td></tr>\n")
    out.append("</tbody>\n</table>\n<p class=\"note\">x is the claim's quantity (claims.csv names it) per seed; "
               "reproduced: the test puts it inside the expected region, not reproduced (red): outside, "
               "inconclusive: the seeds do not decide. Full table: claims.csv.</p>\n")
    return "".join(out)


def render_html(data: RunData, figures: Mapping[str, Path], found: Sequence[Finding],
                claims: Sequence[Mapping[str, str]] = (), missing: Mapping[str, str] | None = None) -> str:
    """The report page as a string (see the module docstring); ``claims``: the rows of claims.csv, shown
    first; ``missing``: figures that could not be drawn (name -> why), named in the figures section."""
    before, after = _around_figures(data, found, claims)
    return before + _figures_section(figures, missing) + after


def _around_figures(data: RunData, found: Sequence[Finding], claims: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    """The page's text before the figures section and after it."""
    return (_head(data) + _claims_section(claims) + _findings_section(found) + _summary_section(data)
            + _first_pass_section(data), _files_section(data))


@dataclass(frozen=True)
class Page:
    """Everything of a run's page but its figures (:func:`prepare_page`), for :func:`write_report`."""

    before: str
    after: str
    claims: list[dict[str, str]]


def prepare_page(data: RunData) -> Page:
    """The page's claims, findings and tables, which need no figure: computed while figures are drawn elsewhere
    (:func:`initlab.lab.report.workers.write_report_forked`), then passed to :func:`write_report`."""
    rows = claim_rows(data)
    before, after = _around_figures(data, findings(data), rows)
    return Page(before, after, rows)


def claim_rows(data: RunData) -> list[dict[str, str]]:
    """The claims of the run's config.toml, measured on ``data`` (:func:`initlab.lab.claims.evaluate_claims`)."""
    try:
        claims = claims_from_dict(read_toml(data.config_text, "config.toml"))
    except InitlabError as e:
        raise InitlabError(f"{data.run_dir / 'config.toml'}: {e}") from None
    return evaluate_claims(claims, data)


def write_report(run_dir: str | os.PathLike[str], *, figures: bool = True,
                 missing: Mapping[str, str] | None = None, data: RunData | None = None,
                 page: Page | None = None) -> Path:
    """(Re)build ``figures/*.png`` and ``report.html`` of ``run_dir`` from its files; return the report's path.

    With ``figures=False`` the existing PNGs are embedded as they are (none are redrawn); ``missing``
    (name -> why) names figures that could not be drawn (their files are not embedded). ``data``: the
    run directory already loaded (:func:`load_run`), e.g. by the figure worker that writes the page;
    ``page``: its :func:`prepare_page`, computed beforehand.
    """
    data = load_run(run_dir) if data is None else data
    fig_dir = data.run_dir / "figures"
    if figures:
        figs = make_figures(data.metrics, data.first_pass, data.values, data.scenarios, fig_dir, info=data.info,
                            models=data.models)
        figs.update(grid_figures(data, fig_dir))
    else:
        figs = {name: fig_dir / name for name in {**figure_captions(), **grid_captions()}
                if (fig_dir / name).is_file() and name not in (missing or {})}
    page = prepare_page(data) if page is None else page
    if page.claims:
        atomic_write_text(data.run_dir / "claims.csv", claims_csv(page.claims))
    text = page.before + _figures_section(figs, missing) + page.after
    return atomic_write_text(data.run_dir / "report.html", text)
