"""The cost-estimate report: memory, hours and dollars per hardware option, seed corrections, measured figures.

`write_report` gathers the data (data.py), draws the charts (charts.py, matplotlib) and writes report.md and a
self-contained report.html (document.py)."""

from mindprint_ray.report.build import write_report

__all__ = ["write_report"]
