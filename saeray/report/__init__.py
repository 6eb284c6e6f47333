"""Offline HTML dashboards and PNG figures for runs, diffs and separations (`saeray report`).

    from saeray.report import write_report
    write_report("runs/a", "reports/a", vs="runs/b", category="kind")   # -> reports/a/index.html

`data` gathers what is shown from the analyses, `interactive` draws plotly figures, `png`
draws matplotlib figures, `page` assembles the self-contained page, `build` ties them together.
"""

from .build import write_report

__all__ = ["write_report"]
