"""The cost-estimate report: files written, HTML self-contained with embedded charts, measured figures."""

from __future__ import annotations

import base64
import re

import pytest
from conftest import run_cli

QLORA = "configs/qwen72b-qlora-8xh100.yaml"


@pytest.fixture
def env(tmp_path):
    return {"MINDPRINT_CALIBRATION": str(tmp_path / "calibration.json")}


def test_report_all_hardware_writes_md_html_and_charts(tmp_path, env):
    out = tmp_path / "rep"
    r = run_cli("report", QLORA, "--hardware", "all", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    for name in ("report.md", "report.html", "memory.png", "hours.png", "cost.png", "topics.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    md = (out / "report.md").read_text()
    for needle in (
        "8xh100-80gb",
        "4xa100-80gb",
        "mac-studio-m2-ultra-64gb",
        "41.2 GB (NF4)",
        "88.9 MB",
        "$55.04/h",
        "~$98/h",
        "gemma-3-12b",
        "qwen2.5-7b",
        "does not fit",
        "What each term means",
    ):
        assert needle in md, needle
    html = (out / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 4 and all(i.startswith("data:image/png;base64,") for i in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch: self-contained


def test_report_with_measured_run_and_price_override(tmp_path, env, tiny_model_dir):
    from test_estimates_time import _fake_run

    folder = _fake_run(tmp_path / "run", tiny_model_dir)
    out = tmp_path / "rep"
    r = run_cli(
        "report",
        "configs/tiny-cpu.yaml",
        "--hardware",
        "cpu-2",
        "--out",
        str(out),
        "--run",
        str(folder),
        "--price-per-hour",
        "3",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "## Measured vs estimated" in md and "process max RSS" in md
    assert re.search(r"\| cycle_basics \| sft \| [\d,]+ \| 1,800 \| [+-]\d", md)
    assert "3.00 (--price-per-hour)" in md


def test_report_unknown_hardware_is_a_user_error(tmp_path, env):
    r = run_cli("report", QLORA, "--hardware", "9xh200", "--out", str(tmp_path), env=env)
    assert r.returncode == 2 and "unknown hardware profile '9xh200'" in r.stderr and "8xh100-80gb" in r.stderr


def test_cost_chart_of_owned_hardware_alone_draws_no_empty_legend(tmp_path):
    import warnings

    from mindprint_ray.report import charts

    owned = {"profile": "cpu", "time": {"cost_on_demand_usd": None, "cost_spot_usd": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels found" for an empty legend
        path = charts.cost_chart([owned], tmp_path / "cost.png")
    assert path.stat().st_size > 0
