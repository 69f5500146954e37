"""How numbers are written for people: scores with their bootstrap intervals, durations, memory, dollars and
percent errors. The report, the terminal views and both backends' printouts use these, so a figure reads the
same everywhere."""

from __future__ import annotations


def score(value: float | None, digits: int = 3) -> str:
    """'0.540'; '-' when there is no value."""
    return "-" if value is None else f"{value:.{digits}f}"


def interval(ci: list[float] | None, digits: int = 3) -> str:
    """'[0.490, 0.590]'; '' when there is no interval."""
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def with_interval(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    """'0.540 [0.490, 0.590]': a score and its bootstrap 95% interval; the bare score without one; '-' without."""
    if value is None:
        return "-"
    return score(value, digits) if ci is None else f"{score(value, digits)} {interval(ci, digits)}"


def duration(hours: float) -> str:
    """'45.0 min' below an hour, '3.2 h' below two days, '4.1 days' beyond."""
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def gb(value: float) -> str:
    """Decimal gigabytes with two decimals and thousands separators: '1,234.57' (the unit is written after)."""
    return f"{value:,.2f}"


def usd(value: float) -> str:
    """'$1,234.57'."""
    return f"${value:,.2f}"


def signed_percent(value: float | None) -> str:
    """'+3.2%' (an estimate's error against a measurement); '-' when there is none."""
    return "-" if value is None else f"{value:+.1f}%"
