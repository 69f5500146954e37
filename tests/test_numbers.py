"""Numbers as people read them, one way everywhere: the report, the terminal and both backends' printouts."""

from __future__ import annotations

from mindprint_ray.report.numbers import duration, gb, interval, score, signed_percent, usd, with_interval


def test_scores_and_intervals():
    assert score(0.54) == "0.540" and score(None) == "-" and score(12.345, 2) == "12.35"
    assert interval([0.49, 0.59]) == "[0.490, 0.590]" and interval(None) == ""
    assert with_interval(0.54, [0.49, 0.59]) == "0.540 [0.490, 0.590]"
    assert with_interval(0.54, None) == "0.540" and with_interval(None, [0.1, 0.2]) == "-"


def test_durations_minutes_hours_days():
    """`plan` and the report write hours per topic the same way (plan used to print '0.50 h' and '1.23 h')."""
    assert duration(0.5) == "30.0 min" and duration(0.05) == "3.0 min"
    assert duration(1.234) == "1.2 h" and duration(47.9) == "47.9 h"
    assert duration(50) == "2.1 days"


def test_memory_dollars_and_errors():
    assert gb(1234.5678) == "1,234.57" and usd(1234.5) == "$1,234.50"
    assert signed_percent(3.21) == "+3.2%" and signed_percent(-0.04) == "-0.0%" and signed_percent(None) == "-"
