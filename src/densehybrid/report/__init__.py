"""Run reports: the metric table, figures (curves, histograms, examples) and Markdown/HTML/JSON output.

``write_report(ReportData(...), out_dir)`` writes ``report.md``, ``report.html``, ``results.json`` and
``figures/*.png``; ``format_table(rows)`` gives the metric table for the terminal. The exact sample curves live in
:mod:`densehybrid.report.curves` and the plotting in :mod:`densehybrid.report.figures`.
"""

from __future__ import annotations

from densehybrid.report.render import Example, ReportData, ReportSection, ScoreSample, format_table, write_report

__all__ = ["Example", "ReportData", "ReportSection", "ScoreSample", "format_table", "write_report"]
